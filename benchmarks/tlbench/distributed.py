"""bench.py --distributed: vocab-parallel cross-entropy over P ranks, timed against gathering
the full logits on every rank and calling torch's cross_entropy.

Each rank holds logits (N, V / P); one step is forward + backward of the mean loss.
- torch_losses: vocab_parallel_cross_entropy on the shard (two all-reduces of O(N) floats, the
  shard's gradient written in the forward).
- gather + torch: all_gather of the shards into (N, V) on every rank, F.cross_entropy, backward;
  the rank keeps its slice of the gradient.
CPU: gloo, one process and one thread per rank. CUDA: NCCL with one rank per GPU when more
than one GPU is visible; one GPU runs the single-rank path and says so. Median of reps, rank 0
reports; every rank waits at a barrier before each rep.
"""
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step, device, reps, warmup):
    for _ in range(warmup):
        dist.barrier()
        step()
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    # the slowest rank sets the step time
    worst = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return statistics.median(worst.tolist())


def _rank_main(rank, world, store, backend, device, n, vocab, dtype, reps, warmup, out_file):
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    from torch_losses.distributed import vocab_parallel_cross_entropy

    local = vocab // world
    start = rank * local
    g = torch.Generator().manual_seed(rank)
    shard = torch.randn(n, local, generator=g).to(device=device, dtype=dtype)
    target = torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(0)).to(device)
    state = {}

    def ours():
        x = shard.detach().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, target, vocab_start=start)
        loss.backward()
        state["ours"] = loss.detach()

    def gather_torch():
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard)
        full = torch.cat(parts, 1).requires_grad_()
        loss = F.cross_entropy(full, target)
        loss.backward()
        state["grad"] = full.grad[:, start:start + local]
        state["torch"] = loss.detach()

    results = {"gather + torch": _time(gather_torch, device, reps, warmup),
               "torch_losses": _time(ours, device, reps, warmup)}
    difference = (state["ours"].double() - state["torch"].double()).abs().item()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"ms": results, "loss_difference": difference}, f)
    dist.destroy_process_group()


def _cuda_kernels_present():
    """Whether the vocab-parallel ops run on CUDA (they are CPU-only so far)."""
    try:
        x = torch.zeros(1, 1, device="cuda")
        torch.ops.torch_losses.vocab_parallel_ce_stats(x, torch.zeros(1, dtype=torch.long,
                                                                      device="cuda"),
                                                       None, 0, -100, 0.0, 0.0)
        return True
    except (NotImplementedError, RuntimeError):
        return False


def run(args):
    """bench.py --distributed: prints the table; writes <out>/distributed.json when asked."""
    import torch_losses  # noqa: F401  (the ops)

    dtype = DTYPES[(args.dtype or "float32").split(",")[0]]
    n, vocab = (int(v) for v in (args.sizes or ("512x8192" if args.quick
                                                 else "2048x32000")).split(",")[0].split("x"))
    reps = args.reps or (3 if args.quick else 5)
    warmup = 1 if args.warmup is None else args.warmup
    device, backend = "cpu", "gloo"
    world = args.world or 2
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        if not _cuda_kernels_present():
            print("CUDA is visible, but the vocab-parallel kernels are CPU-only in this version: "
                  "timing gloo on the CPU instead")
        elif torch.cuda.device_count() > 1:
            device, backend = "cuda", "nccl"
            world = min(args.world or torch.cuda.device_count(), torch.cuda.device_count())
        else:
            device, backend, world = "cuda", "nccl", 1
            print("one GPU visible: the single-rank path (no communication)")
    vocab -= vocab % world
    print(f"vocab-parallel cross-entropy, {backend} on {device}, {world} ranks, N={n}, "
          f"V={vocab} ({vocab // world} per rank), {dtype}, forward + backward, median of "
          f"{reps} reps")
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rank0.json")
        mp.start_processes(_rank_main, nprocs=world, start_method="spawn",
                           args=(world, os.path.join(tmp, "store"), backend, device, n, vocab,
                                 dtype, reps, warmup, out_file))
        with open(out_file) as f:
            result = json.load(f)
    for name, ms in result["ms"].items():
        print(f"  {name:16s} {ms:9.2f} ms")
    ratio = result["ms"]["gather + torch"] / result["ms"]["torch_losses"]
    print(f"  speedup {ratio:.2f}x; |loss difference| {result['loss_difference']:.2e}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        record = dict(result, backend=backend, device=device, world=world, n=n, vocab=vocab,
                      dtype=str(dtype).replace("torch.", ""), reps=reps)
        with open(os.path.join(args.out, "distributed.json"), "w") as f:
            json.dump(record, f, indent=1)
    return 0

"""Linear + cross-entropy, forward + backward: torch_losses.functional.linear_cross_entropy
against torch's reference path (options=None), torch's chunked path
(options=LinearCrossEntropyOptions()) and Liger-Kernel's fused linear cross-entropy when it
imports and a GPU is present.

Every implementation runs in a fresh subprocess. Time: the median of --reps fwd+bwd steps
after a warm-up. Peak extra memory: CUDA, torch.cuda.max_memory_allocated() over one step
minus the memory held before it; CPU, the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) over one step minus the RSS before it, with glibc's mmap threshold
pinned low so that freed tensors go back to the OS instead of hiding in the heap. Both count
everything the step allocates, the .grad tensors included.

    python benchmarks/linear_ce_bench.py                 # CPU: 2048x1024 -> 32000 fp32
    python benchmarks/linear_ce_bench.py --json out.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ["torch_eager", "torch_chunked", "torch_losses", "liger"]
SIZES = {"cpu": (2048, 1024, 32000, "float32"), "cuda": (8192, 4096, 128256, "bfloat16")}


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss_fn(impl):
    import torch
    import torch.nn.functional as F
    if impl == "torch_eager":
        return lambda x, w, t: F.linear_cross_entropy(x, w, t)
    if impl == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)
    if impl == "torch_losses":
        import torch_losses.functional as TLF
        return lambda x, w, t: TLF.linear_cross_entropy(x, w, t)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t)
    raise ValueError(impl)


def run_one(impl, device, n, h, v, dtype_name, reps):
    """In the subprocess: one implementation, one size. Returns a dict of results."""
    import torch
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    loss_fn = _loss_fn(impl)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        x.grad = w.grad = None
        loss = loss_fn(x, w, t)
        loss.backward()
        return loss

    step()
    step()
    x.grad = w.grad = None
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        step()
        peak = (_rss_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(reps):
        x.grad = w.grad = None
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "device": device, "shape": [n, h, v], "dtype": dtype_name,
            "median_ms": 1e3 * statistics.median(times),
            "times_ms": [1e3 * s for s in times], "peak_extra_bytes": peak,
            "threads": torch.get_num_threads()}


def _available(impl, device):
    if impl == "liger":
        if device != "cuda":
            return "Liger's kernels are Triton: CUDA only"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel is not installed"
    if impl == "torch_chunked":
        import torch
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return "this torch has no LinearCrossEntropyOptions"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, and cpu always")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=3, metavar=("N", "H", "V"), default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, device, n, h, v, dtype = args.child
        print(json.dumps(run_one(impl, device, int(n), int(h), int(v), dtype, args.reps)))
        return

    import torch
    devices = [args.device] if args.device else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    results = []
    for device in devices:
        n, h, v, dtype = SIZES[device]
        if args.size:
            n, h, v = args.size
        dtype = args.dtype or dtype
        print(f"{device}: linear {n}x{h} -> {v} {dtype}, fwd+bwd, median of {args.reps}")
        for impl in IMPLS:
            why_not = _available(impl, device)
            if why_not:
                print(f"  {impl:14s} skipped: {why_not}")
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--reps", str(args.reps),
                   "--child", impl, device, str(n), str(h), str(v), dtype]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
            if out.returncode != 0:
                print(f"  {impl:14s} failed:\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"  {impl:14s} {r['median_ms']:9.1f} ms   peak extra "
                  f"{r['peak_extra_bytes'] / 2**20:8.1f} MiB")
        eager = next((r for r in results if r["impl"] == "torch_eager"
                      and r["device"] == device), None)
        ours = next((r for r in results if r["impl"] == "torch_losses"
                     and r["device"] == device), None)
        if eager and ours:
            print(f"  torch_losses / eager: time {ours['median_ms'] / eager['median_ms']:.2f}x, "
                  f"memory {ours['peak_extra_bytes'] / eager['peak_extra_bytes']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

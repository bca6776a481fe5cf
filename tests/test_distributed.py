"""Vocab-parallel cross-entropy over torch.distributed: gloo on the CPU, world sizes 1 to 4,
each in one spawn of processes that runs every case (start-up dominates the time). Every rank
compares its loss and its shard's gradient with torch on the concatenated logits in one process
(float64 to 1e-12, float32 to 1e-6), or with a float64 composite of torch ops where torch has no
such option (z_loss, softcap)."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import torch_losses  # noqa: F401  (registers the ops)
from tl_helpers import ce_extras_reference

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available")

WORLD_SIZES = [1, 2, 3, 4]
SPAWN_TIMEOUT_S = 150  # per world size; a hang fails the test instead of blocking CI

TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-12),
              torch.float32: dict(rtol=1e-6, atol=1e-6)}

# Option sets; each runs for both dtypes and every reduction, on the layouts in turn.
OPTIONS = [
    dict(),
    dict(weight=True),
    dict(ignored_rows=True),
    dict(ignored_rows=True, ignore_in_vocab=True),  # ignore_index is a class of the last shard
    dict(label_smoothing=0.2),
    dict(weight=True, label_smoothing=0.3, ignored_rows=True),
    dict(probs=True),
    dict(probs=True, weight=True, label_smoothing=0.25),
    dict(z_loss=0.05),
    dict(softcap=2.5),
    dict(z_loss=0.1, softcap=3.0, weight=True, label_smoothing=0.1, ignored_rows=True),
    dict(probs=True, z_loss=0.02, softcap=4.0, weight=True),
    dict(first_shard_targets=True),  # the other ranks' shards hold no target
    dict(all_ignored=True),          # 'mean' over nothing: nan, as torch
    dict(masked=True, weight=True),  # the last 2 classes -inf: a whole shard at world size 3
]
LAYOUTS = ["even", "uneven", "empty"]  # 'empty': a rank with no classes (world size > 1)


def shard_sizes(layout, world):
    if layout == "even":
        return [4] * world
    if layout == "uneven":
        return [4, 7, 2, 5][:world]
    return [5, 0, 6, 3][:world] if world > 1 else [5]


def cases(world):
    index = 0
    for dtype in (torch.float64, torch.float32):
        for reduction in ("mean", "sum", "none"):
            for options in OPTIONS:
                yield dict(index=index, dtype=dtype, reduction=reduction,
                           layout=LAYOUTS[index % 3],
                           # vocab_start is derived (and cached) per (group, shard size): only
                           # where no rank's size repeats with another layout
                           give_start=index % 3 != 0 or index % 2 == 0,
                           batch=(5,) if index % 4 < 2 else (2, 3), **options)
                index += 1


def make_inputs(case, world):
    """The full (concatenated) logits and targets, the same on every rank."""
    g = torch.Generator().manual_seed(1000 * world + case["index"])
    sizes = shard_sizes(case["layout"], world)
    vocab = sum(sizes)
    dtype, batch = case["dtype"], case["batch"]
    logits = (3 * torch.randn(*batch, vocab, generator=g)).to(dtype)
    if case.get("masked"):
        logits[..., -2:] = -torch.inf
    ignore_index = vocab - 1 if case.get("ignore_in_vocab") else -100
    if case.get("probs"):
        target = torch.softmax(torch.randn(*batch, vocab, generator=g), -1).to(dtype)
        ignore_index = -100
    else:
        high = sizes[0] if case.get("first_shard_targets") else vocab
        if case.get("masked"):
            high = vocab - 2
        target = torch.randint(high, batch, generator=g)
        flat = target.view(-1)
        if case.get("ignored_rows"):
            flat[::3] = ignore_index
        if case.get("ignore_in_vocab"):
            flat[1] = ignore_index  # besides rows whose class happens to be vocab - 1
        if case.get("all_ignored"):
            flat[:] = ignore_index
    weight = (torch.rand(vocab, generator=g) + 0.1).to(dtype) if case.get("weight") else None
    grad_output = (torch.rand(batch, generator=g).to(dtype) if case["reduction"] == "none"
                   else torch.tensor(0.75 if case["index"] % 5 == 0 else 1.0, dtype=dtype))
    return sizes, logits, target, weight, ignore_index, grad_output


def reference_loss(case, x, t, weight, ignore_index):
    """torch's cross_entropy of the full logits x (..., V) (differentiable), or a float64
    composite of torch ops where torch has no such option (z_loss, softcap)."""
    vocab = x.shape[-1]
    probs = bool(case.get("probs"))
    z_loss, softcap = case.get("z_loss", 0.0), case.get("softcap")
    smoothing = case.get("label_smoothing", 0.0)
    batch = x.shape[:-1]
    if not z_loss and softcap is None:
        flat_t = t.reshape(-1, vocab) if probs else t.reshape(-1)
        loss = F.cross_entropy(x.reshape(-1, vocab), flat_t, weight, ignore_index=ignore_index,
                               reduction=case["reduction"], label_smoothing=smoothing)
        return loss.reshape(batch) if case["reduction"] == "none" else loss
    x64 = x.double().reshape(-1, vocab)
    if softcap is not None:
        x64 = softcap * torch.tanh(x64 / softcap)
    w64 = None if weight is None else weight.double()
    flat_t = t.double().reshape(-1, vocab) if probs else t.reshape(-1)
    rows = F.cross_entropy(x64, flat_t, w64, ignore_index=ignore_index, reduction="none",
                           label_smoothing=smoothing)
    kept = torch.ones_like(rows) if probs else (flat_t != ignore_index).double()
    rows = rows + z_loss * torch.logsumexp(x64, -1) ** 2 * kept
    if case["reduction"] == "none":
        loss = rows.reshape(batch)
    elif case["reduction"] == "sum":
        loss = rows.sum()
    else:
        if probs:
            denominator = rows.new_tensor(float(rows.shape[0]))
        else:
            w = torch.ones(vocab, dtype=torch.float64) if w64 is None else w64
            denominator = (w[flat_t.clamp(0, vocab - 1)] * kept).sum()
        loss = rows.sum() / denominator
    return loss.to(x.dtype)


def reference(case, logits, target, weight, ignore_index, grad_output):
    """Loss and gradients (logits, probability target) on one process."""
    probs = bool(case.get("probs"))
    x = logits.clone().requires_grad_()
    t = target.clone().requires_grad_() if probs else target
    loss = reference_loss(case, x, t, weight, ignore_index)
    inputs = (x, t) if probs else (x,)
    grads = torch.autograd.grad(loss, inputs, grad_output, allow_unused=True)
    return loss.detach(), grads


class Checker:
    """Collects mismatches instead of raising, so that every rank keeps issuing the same
    collectives; the worker raises them all at the end."""

    def __init__(self, rank):
        self.rank = rank
        self.failures = []

    def close(self, name, ours, ref, dtype):
        try:
            torch.testing.assert_close(ours, ref, equal_nan=True, **TOLERANCES[dtype])
        except AssertionError as e:
            self.failures.append(f"rank {self.rank}: {name}: {e}")

    def true(self, name, condition, detail=""):
        if not condition:
            self.failures.append(f"rank {self.rank}: {name}: {detail}")


def run_case(case, world, rank, check):
    from torch_losses.distributed import vocab_parallel_cross_entropy

    sizes, logits, target, weight, ignore_index, grad_output = make_inputs(case, world)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    probs = bool(case.get("probs"))
    x = logits[..., start:stop].clone().requires_grad_()
    t = target[..., start:stop].clone().requires_grad_() if probs else target
    loss = vocab_parallel_cross_entropy(
        x, t, vocab_start=start if case["give_start"] else None, weight=weight,
        ignore_index=ignore_index, label_smoothing=case.get("label_smoothing", 0.0),
        reduction=case["reduction"], z_loss=case.get("z_loss", 0.0),
        softcap=case.get("softcap"))
    loss.backward(grad_output)
    ref_loss, ref_grads = reference(case, logits, target, weight, ignore_index, grad_output)
    name = ", ".join(f"{k}={v}" for k, v in case.items())
    check.close(f"loss [{name}]", loss.detach(), ref_loss, case["dtype"])
    check.true(f"loss dtype [{name}]", loss.dtype == case["dtype"], str(loss.dtype))
    check.close(f"grad logits [{name}]", x.grad, ref_grads[0][..., start:stop], case["dtype"])
    if probs:
        check.close(f"grad target [{name}]", t.grad, ref_grads[1][..., start:stop],
                    case["dtype"])


def run_derived_start_case(world, rank, check):
    """vocab_start derived from the shard sizes on a fresh group, uneven shards."""
    from torch_losses.distributed import vocab_parallel_cross_entropy

    group = dist.new_group()
    sizes = [3, 1, 4, 2][:world]
    g = torch.Generator().manual_seed(world)
    logits = torch.randn(6, sum(sizes), dtype=torch.float64, generator=g)
    target = torch.randint(sum(sizes), (6,), generator=g)
    start = sum(sizes[:rank])
    x = logits[:, start:start + sizes[rank]].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target, group=group, label_smoothing=0.1)
    loss.backward()
    ref = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref, target, label_smoothing=0.1)
    ref_loss.backward()
    check.close("derived vocab_start: loss", loss.detach(), ref_loss.detach(), torch.float64)
    check.close("derived vocab_start: grad", x.grad, ref.grad[:, start:start + sizes[rank]],
                torch.float64)


LINEAR_OPTIONS = [
    dict(),
    dict(bias=True, weight=True, ignored_rows=True),
    dict(label_smoothing=0.2, z_loss=0.05, softcap=3.0, bias=True),
    dict(first_shard_targets=True, weight=True, rows_per_chunk=2),
    dict(probs=True, weight=True, label_smoothing=0.1, bias=True),
]


def run_linear_cases(world, rank, check):
    """vocab_parallel_linear_cross_entropy against torch on the full head, several chunks."""
    from torch_losses.distributed import vocab_parallel_linear_cross_entropy

    index = 0
    for dtype in (torch.float64, torch.float32):
        for reduction in ("mean", "sum", "none"):
            for options in LINEAR_OPTIONS:
                index += 1
                case = dict(index=index, dtype=dtype, reduction=reduction,
                            layout=LAYOUTS[index % 3], batch=(7,) if index % 2 else (3, 3),
                            **options)
                sizes, _, target, weight, ignore_index, grad_output = make_inputs(case, world)
                g = torch.Generator().manual_seed(index)
                hidden = 6
                x = torch.randn(*case["batch"], hidden, generator=g).to(dtype)
                head = torch.randn(sum(sizes), hidden, generator=g).to(dtype)
                bias = torch.randn(sum(sizes), generator=g).to(dtype) if case.get("bias") else None
                start, stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
                xs = x.clone().requires_grad_()
                ws = head[start:stop].clone().requires_grad_()
                bs = None if bias is None else bias[start:stop].clone().requires_grad_()
                probs = bool(case.get("probs"))
                ts = target[..., start:stop].clone().requires_grad_() if probs else target
                loss = vocab_parallel_linear_cross_entropy(
                    xs, ws, ts, bias_shard=bs, vocab_start=start, weight=weight,
                    ignore_index=ignore_index, label_smoothing=case.get("label_smoothing", 0.0),
                    reduction=reduction, z_loss=case.get("z_loss", 0.0),
                    softcap=case.get("softcap"), rows_per_chunk=case.get("rows_per_chunk"),
                    chunk_bytes=16 * 2 * dtype.itemsize)  # a few rows per chunk
                loss.backward(grad_output)
                xr, wr = x.clone().requires_grad_(), head.clone().requires_grad_()
                br = None if bias is None else bias.clone().requires_grad_()
                tr = target.clone().requires_grad_() if probs else target
                ref = reference_loss(case, F.linear(xr, wr, br), tr, weight, ignore_index)
                ref.backward(grad_output)
                if probs:
                    check.close(f"linear [{case}]: grad target", ts.grad,
                                tr.grad[..., start:stop], dtype)
                name = f"linear [{case}]"
                check.close(f"{name}: loss", loss.detach(), ref.detach(), dtype)
                check.close(f"{name}: grad input", xs.grad, xr.grad, dtype)
                check.close(f"{name}: grad weight shard", ws.grad, wr.grad[start:stop], dtype)
                if bias is not None:
                    check.close(f"{name}: grad bias shard", bs.grad, br.grad[start:stop], dtype)


def run_dtensor_cases(world, rank, check):
    """torch_losses' cross_entropy of a DTensor sharded on the class dim, inside and outside
    loss_parallel(), against torch's loss_parallel() (class indices, no label smoothing: what
    it supports) or torch on the full tensor (probabilities, label smoothing)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    import torch_losses

    mesh = init_device_mesh("cpu", (world,))
    index = 0
    for dtype in (torch.float64, torch.float32):
        for shape in ((6, 10), (2, 7, 3)):  # (N, C) and (N, C, d); C uneven over 3 and 4 ranks
            for reduction in ("mean", "sum", "none"):
                for options in (dict(), dict(weight=True), dict(ignore=True),
                                dict(weight=True, ignore=True), dict(probs=True),
                                dict(label_smoothing=0.2, weight=True),
                                dict(probs=True, label_smoothing=0.1), dict(module=True),
                                dict(z_loss=0.01, softcap=3.0, ignore=True),
                                dict(probs=True, z_loss=0.02, softcap=2.0)):
                    index += 1
                    g = torch.Generator().manual_seed(index)
                    full = torch.randn(*shape, generator=g).to(dtype)
                    vocab = shape[1]
                    if options.get("probs"):
                        target = torch.softmax(torch.randn(*shape, generator=g), 1).to(dtype)
                    else:
                        target = torch.randint(vocab, shape[:1] + shape[2:], generator=g)
                        if options.get("ignore"):
                            target.view(-1)[::2] = -100
                    weight = (torch.rand(vocab, generator=g).to(dtype) + 0.1
                              if options.get("weight") else None)
                    smoothing = options.get("label_smoothing", 0.0)
                    # loss_parallel() has no probabilities nor label smoothing, and its
                    # backward fails with a weight and ignored rows (torch 2.13: gathers the
                    # weight at -100): torch on the full tensor is the reference there
                    extras = {k: options[k] for k in ("z_loss", "softcap") if k in options}
                    torch_supports = (not options.get("probs") and smoothing == 0 and
                                      not extras and
                                      not (options.get("weight") and options.get("ignore")))
                    name = f"DTensor {dtype} {shape} {reduction} {options}"

                    def ours(inside):
                        x = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
                        t = (distribute_tensor(target, mesh, [Shard(1)])
                             if options.get("probs") else target)
                        if options.get("module"):
                            fn = torch_losses.CrossEntropyLoss(weight, reduction=reduction)
                        else:
                            def fn(a, b):
                                return torch_losses.functional.cross_entropy(
                                    a, b, weight, reduction=reduction,
                                    label_smoothing=smoothing, **extras)
                        if inside:
                            with loss_parallel():
                                loss = fn(x, t)
                                loss.sum().backward()
                        else:
                            loss = fn(x, t)
                            loss.sum().backward()
                        check.true(f"{name}: replicated DTensor result",
                                   loss.placements == (Replicate(),), str(loss.placements))
                        check.true(f"{name}: sharded gradient",
                                   x.grad.placements == (Shard(1),), str(x.grad.placements))
                        return loss.full_tensor().detach(), x.grad.full_tensor()

                    if torch_supports:
                        x = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
                        with loss_parallel():
                            loss = F.cross_entropy(x, target, weight, reduction=reduction)
                            loss.sum().backward()
                        ref = loss.full_tensor().detach(), x.grad.full_tensor()
                    else:
                        x = full.clone().requires_grad_()
                        loss = ce_extras_reference(x, target, weight, reduction=reduction,
                                                   label_smoothing=smoothing, **extras)
                        loss.sum().backward()
                        ref = loss.detach(), x.grad
                    for inside in (True, False):
                        got = ours(inside)
                        check.close(f"{name} inside={inside}: loss", got[0], ref[0], dtype)
                        check.close(f"{name} inside={inside}: grad", got[1], ref[1], dtype)


def run_dtensor_2d_mesh_cases(world, rank, check):
    """A (2, 2) mesh: batch sharded over mesh dim 0, classes over mesh dim 1, against torch's
    loss_parallel() ('sum' and 'none': what it supports there; torch 2.11's supports 1-D meshes
    only) or torch on the full tensor (probabilities, and where loss_parallel() cannot)."""
    from torch.distributed.tensor import (Partial, Replicate, Shard, distribute_tensor,
                                          init_device_mesh)
    from torch.distributed.tensor.parallel import loss_parallel

    import torch_losses

    mesh = init_device_mesh("cpu", (2, 2))
    for index, (shape, reduction, probs) in enumerate([
            ((6, 10), "sum", False), ((6, 10), "none", False), ((4, 9, 3), "none", False),
            ((4, 9, 3), "sum", False), ((6, 10), "sum", True)]):
        g = torch.Generator().manual_seed(100 + index)
        full = torch.randn(*shape, generator=g, dtype=torch.float64)
        if probs:
            target = torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64), 1)
            target_placements = [Shard(0), Shard(1)]
        else:
            target = torch.randint(shape[1], shape[:1] + shape[2:], generator=g)
            target_placements = [Shard(0), Replicate()]
        weight = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.1
        name = f"DTensor 2-D mesh {shape} {reduction} probs={probs}"

        def run(fn):
            x = distribute_tensor(full, mesh, [Shard(0), Shard(1)]).requires_grad_()
            t = distribute_tensor(target, mesh, target_placements)
            with loss_parallel():
                loss = fn(x, t, weight, reduction=reduction)
                loss.sum().backward()
            return loss.full_tensor().detach(), x.grad.full_tensor(), loss.placements

        ours = run(torch_losses.functional.cross_entropy)
        # loss_parallel()'s placements: Shard on the batch's mesh dim for 'none', Partial there
        # for 'sum'; Replicate on the classes' mesh dim
        placements = (Shard(0) if reduction == "none" else Partial("sum"), Replicate())
        check.true(f"{name}: placements", ours[2] == placements, f"{ours[2]} vs {placements}")
        ref = None
        if not probs:
            try:
                ref = run(F.cross_entropy)
            except ValueError as e:  # torch 2.11's loss_parallel(): 1-D meshes only
                if "one-dimensional DeviceMesh" not in str(e):
                    raise
            else:
                check.true(f"{name}: torch's placements", ref[2] == placements, str(ref[2]))
        if ref is None:
            x = full.clone().requires_grad_()
            loss = F.cross_entropy(x, target, weight, reduction=reduction)
            loss.sum().backward()
            ref = loss.detach(), x.grad, None
        check.close(f"{name}: loss", ours[0], ref[0], torch.float64)
        check.close(f"{name}: grad", ours[1], ref[1], torch.float64)


def run_error_cases(world, rank, check):
    """A target out of bounds raises on every rank: on all ranks, or on one rank only (the
    ranks' targets differ). The group stays usable: every rank ran every collective."""
    from torch_losses.distributed import vocab_parallel_cross_entropy

    vocab_local = 3
    x = torch.randn(4, vocab_local, dtype=torch.float64, requires_grad=True)
    for bad_ranks in ([*range(world)], [world - 1]):
        target = torch.tensor([0, 1, 2, 1])
        if rank in bad_ranks:
            target[2] = vocab_local * world  # one past the last class
        expected = (IndexError, "out of bounds") if len(bad_ranks) == world else (
            RuntimeError, "targets differ across the ranks")
        try:
            vocab_parallel_cross_entropy(x, target, vocab_start=rank * vocab_local)
        except expected[0] as e:
            check.true("error message", expected[1] in str(e), str(e))
        else:
            check.true(f"target out of bounds on ranks {bad_ranks}", False,
                       "no error on this rank")
    loss = vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2, 1]),
                                        vocab_start=rank * vocab_local)
    check.true("a call after the errors", torch.isfinite(loss).item(), str(loss))


def run_timeout_case(world, rank, check):
    """A rank that fails before the collectives (a bad target dtype): the others raise when the
    process group's timeout expires instead of hanging."""
    from torch_losses.distributed import vocab_parallel_cross_entropy

    # The group's timeout also bounds its connection set-up: 10 s, ample on a loaded machine.
    group = dist.new_group(timeout=datetime.timedelta(seconds=10))
    x = torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1])
    if rank == world - 1:
        target = target.double()  # rejected by the argument checks, before any collective
    began = time.monotonic()
    try:
        vocab_parallel_cross_entropy(x, target, group=group, vocab_start=rank * 3)
    except RuntimeError as e:
        if rank != world - 1:
            check.true("raised after the timeout", time.monotonic() - began < 60,
                       f"{time.monotonic() - began:.0f} s")
        else:
            check.true("argument error message", "int64 target" in str(e), str(e))
    else:
        check.true("failing rank", False, "no error on this rank")
    # The failing rank keeps its sockets until the others are done: torn down at once, it closed a
    # connection another rank's new_group was still setting up ("Connection closed by peer").
    dist.barrier()


def worker(rank, world, store_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    check = Checker(rank)
    try:
        for case in cases(world):
            run_case(case, world, rank, check)
        run_derived_start_case(world, rank, check)
        run_linear_cases(world, rank, check)
        run_dtensor_cases(world, rank, check)
        if world == 4:
            run_dtensor_2d_mesh_cases(world, rank, check)
        run_error_cases(world, rank, check)
        if world > 1:
            run_timeout_case(world, rank, check)
    finally:
        # The group's threads are joined here, not in the interpreter's teardown (where a still
        # joinable gloo thread aborted a rank once: "terminate called without an active
        # exception", torch 2.14.1, world 4).
        dist.destroy_process_group()
        if check.failures:
            raise AssertionError(f"{len(check.failures)} failures:\n" +
                                 "\n".join(check.failures[:20]))


def spawn(fn, world, tmp_path):
    """Runs fn(rank, world, store) in `world` processes; fails on an error or a timeout."""
    context = mp.start_processes(fn, args=(world, str(tmp_path / "store")), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"world size {world}: the processes did not finish in "
                        f"{SPAWN_TIMEOUT_S} s")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_vocab_parallel_cross_entropy(world, tmp_path):
    spawn(worker, world, tmp_path)


# Single-process checks of the two ops (no process group).

def _shard_args(dtype, probs):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 4, generator=g).to(dtype)
    if probs:
        target = torch.rand(5, 4, generator=g).to(dtype)
    else:
        target = torch.tensor([3, 4, 9, -100, 6])  # this shard: classes [3, 7)
    weight = (torch.rand(4, generator=g) + 0.5).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    return logits, target, weight


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ops_opcheck(dtype, probs):
    ops = torch.ops.torch_losses
    logits, target, weight = _shard_args(dtype, probs)
    stats_args = (logits, target, weight, 3, -100, 0.1, 2.0)
    torch.library.opcheck(ops.vocab_parallel_ce_stats, stats_args)
    stats = ops.vocab_parallel_ce_stats(*stats_args)
    acc = stats.dtype
    maxima = torch.zeros(3, 5, dtype=torch.float64)
    maxima[0] = stats[:, 0]
    if not probs:
        maxima[1], maxima[2] = target, -target
    sums = stats[:, 1:].clone()
    sums[:, 7] = 1 if probs else sums[:, 7]
    if not probs:
        sums[[2, 3], 7] = 1  # the rows whose target another shard holds (a one-shard test)
    grad_args = (logits, target, weight, maxima, sums, torch.tensor(12.0, dtype=acc),
                 torch.tensor(0.5, dtype=acc), 3, -100, 0.1, 0.01, 2.0, True, probs)
    torch.library.opcheck(ops.vocab_parallel_ce_grad, grad_args)


def test_stats_op_columns():
    """The local statistics of a shard holding classes [3, 7), against torch ops."""
    logits, target, weight = _shard_args(torch.float64, False)
    stats = torch.ops.torch_losses.vocab_parallel_ce_stats(logits, target, weight, 3, -100,
                                                           0.1, 0.0)
    m = logits.max(1).values
    torch.testing.assert_close(stats[:, 0], m)
    torch.testing.assert_close(stats[:, 1], torch.exp(logits - m[:, None]).sum(1))
    owned = torch.tensor([1.0, 1, 0, 0, 1], dtype=torch.float64)
    torch.testing.assert_close(stats[:, 8], owned)
    local = (target - 3).clamp(0, 3)
    gap = m - logits.gather(1, local[:, None]).squeeze(1)
    torch.testing.assert_close(stats[:, 2], gap * owned)
    torch.testing.assert_close(stats[:, 3], weight[local] * owned)
    torch.testing.assert_close(stats[:, 6], weight.sum().expand(5))
    torch.testing.assert_close(stats[:, 7], ((m[:, None] - logits) * weight).sum(1))


def test_without_process_group():
    """No initialized process group: one process holds the whole vocabulary."""
    from torch_losses.distributed import vocab_parallel_cross_entropy

    if dist.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 8, -100, 0])
    loss = vocab_parallel_cross_entropy(x, target, label_smoothing=0.3)
    ref = F.cross_entropy(x, target, label_smoothing=0.3)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(ref, x)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=str)
def test_nonfinite_class_weight_reaches_its_rows_only(bad):
    """Without label smoothing a class weight enters only the rows of its class (torch's
    formulas): spread 0 times an infinite class weight made that class's gradient NaN in every
    row. One process holds the whole vocabulary."""
    from torch_losses.distributed import vocab_parallel_cross_entropy

    if dist.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 1])
    weight = torch.ones(9)
    weight[1] = bad
    for reduction in ("none", "sum"):
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(xo, target, weight=weight, reduction=reduction)
        ref = F.cross_entropy(xt, target, weight=weight, reduction=reduction)
        go, = torch.autograd.grad(ours.sum(), xo)
        gt, = torch.autograd.grad(ref.sum(), xt)
        torch.testing.assert_close(go[[0, 2]], gt[[0, 2]])
        assert not torch.isfinite(go[[1, 3]]).any() and not torch.isfinite(gt[[1, 3]]).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_single_process(dtype):
    """bfloat16 / float16 logits: value and gradient within torch's own error of float64
    (at most twice it, or the dtype's rounding where torch's overflows)."""
    from torch_losses.distributed import vocab_parallel_cross_entropy

    x = torch.randn(64, 1000).to(dtype).requires_grad_()
    target = torch.randint(1000, (64,))
    ours = vocab_parallel_cross_entropy(x, target, label_smoothing=0.1)
    ours_grad, = torch.autograd.grad(ours, x)
    x64 = x.detach().double().requires_grad_()
    exact = F.cross_entropy(x64, target, label_smoothing=0.1)
    exact_grad, = torch.autograd.grad(exact, x64)
    theirs = F.cross_entropy(x, target, label_smoothing=0.1)
    theirs_grad, = torch.autograd.grad(theirs, x)
    assert ours.dtype == dtype
    eps = torch.finfo(dtype).eps
    value_bound = max(2 * (theirs.double() - exact).abs().nan_to_num(posinf=0).item(),
                      eps * exact.abs().item())
    assert (ours.double() - exact).abs().item() <= value_bound
    grad_bound = max(2 * (theirs_grad.double() - exact_grad).abs().max().item(),
                     eps * exact_grad.abs().max().item())
    assert (ours_grad.double() - exact_grad).abs().max().item() <= grad_bound


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_backward_and_no_grad(reduction):
    """retain_graph: a second backward recomputes the gradient (the first one handed its
    buffer to autograd); under no_grad only the loss is computed."""
    from torch_losses.distributed import vocab_parallel_cross_entropy

    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3, 3])
    loss = vocab_parallel_cross_entropy(x, target, reduction=reduction, label_smoothing=0.2)
    ref = F.cross_entropy(x, target, reduction=reduction, label_smoothing=0.2)
    grad_output = torch.rand_like(ref) + 0.5
    expected, = torch.autograd.grad(ref, x, grad_output)
    for _ in range(2):
        got, = torch.autograd.grad(loss, x, grad_output, retain_graph=True)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(
            vocab_parallel_cross_entropy(x, target, reduction=reduction, label_smoothing=0.2),
            ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_single_process(dtype):
    """The CUDA kernels through the Python path (no process group), against torch."""
    from torch_losses.distributed import vocab_parallel_cross_entropy

    x = (3 * torch.randn(37, 1000, dtype=dtype, device="cuda")).requires_grad_()
    target = torch.randint(1000, (37,), device="cuda")
    target[::5] = -100
    weight = torch.rand(1000, dtype=dtype, device="cuda") + 0.5
    for options in (dict(), dict(weight=weight, label_smoothing=0.1)):
        loss = vocab_parallel_cross_entropy(x, target, **options)
        grad, = torch.autograd.grad(loss, x)
        ref = F.cross_entropy(x, target, **options)
        ref_grad, = torch.autograd.grad(ref, x)
        torch.testing.assert_close(loss, ref, **TOLERANCES[dtype])
        torch.testing.assert_close(grad, ref_grad, **TOLERANCES[dtype])

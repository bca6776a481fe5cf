"""The vocab-parallel CUDA kernels (csrc/cuda/vocab_parallel.cu, unchanged) under the CPU
emulator of tests/cuda_emu, against the CPU ops (which tests/test_distributed.py checks against
torch): statistics, per-row loss, gradients, every option and dtype, an empty shard, the
device asserts. See tests/test_cuda_emu.py for what the emulator proves and what it cannot."""
import ctypes

import pytest
import torch

import torch_losses  # noqa: F401  (the CPU ops)
from cuda_emu import DTYPE_CODE, Emulator, EmulatorError, acc_dtype, build

ops = torch.ops.torch_losses
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# CPU and emulated kernels sum in different orders; T-rounded gradients differ by an ulp
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.float16: dict(rtol=2e-3, atol=2e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4)}


@pytest.fixture(scope="module")
def emu():
    e = Emulator(build.build())
    vp, i64, i32, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    e.lib.tl_emu_vocab_parallel_stats.argtypes = [i32, vp, vp, vp, vp, vp, i64, i64, i64, i64,
                                                  dbl, i32]
    e.lib.tl_emu_vocab_parallel_grad.argtypes = [i32, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                                                 vp, i64, i64, i64, i64, dbl, dbl, dbl, i32]
    return e


def _check(s, rc):
    err = s.lib.tl_emu_take_error().decode()
    if rc != 0 or err:
        raise EmulatorError(err or "launch failed")
    s.check_padding()


def emulated(s, logits, target, weight, vocab_start, ignore_index, smoothing, z_loss, softcap,
             maxima, sums, vocab_size, scale, input_grad, target_grad):
    """Both passes on the emulator, with the caller's global statistics for the second."""
    n, v = logits.shape
    dt, acc = logits.dtype, acc_dtype(logits.dtype)
    probs = target.is_floating_point()
    xb, tb = s.copy(logits), s.copy(target)
    wb = None if weight is None else s.copy(weight)
    stats = s.poisoned((n, 9), acc)
    _check(s, s.lib.tl_emu_vocab_parallel_stats(
        DTYPE_CODE[dt], xb.ptr, None if probs else tb.ptr, tb.ptr if probs else None,
        None if wb is None else wb.ptr, stats.ptr, n, v, vocab_start, ignore_index, softcap,
        int(smoothing > 0)))
    mb, sb = s.copy(maxima), s.copy(sums)
    vb, cb = s.copy(vocab_size), s.copy(scale)
    loss = s.poisoned((n,), acc)
    gx = s.poisoned((n, v), dt) if input_grad else None
    gt = s.poisoned((n, v), dt) if target_grad else None
    _check(s, s.lib.tl_emu_vocab_parallel_grad(
        DTYPE_CODE[dt], xb.ptr, None if probs else tb.ptr, tb.ptr if probs else None,
        None if wb is None else wb.ptr, mb.ptr, sb.ptr, vb.ptr, cb.ptr, loss.ptr,
        None if gx is None else gx.ptr, None if gt is None else gt.ptr, n, v, vocab_start,
        ignore_index, smoothing, z_loss, softcap, int(probs)))
    return (stats.t.clone(), loss.t.clone(), None if gx is None else gx.t.clone(),
            None if gt is None else gt.t.clone())


def one_shard_statistics(stats, target, probs):
    """The global statistics of a one-rank group (what the all-reduces give for P = 1)."""
    maxima = torch.zeros(3, stats.shape[0], dtype=torch.float64)
    maxima[0] = stats[:, 0]
    if not probs:
        maxima[1], maxima[2] = target, -target
    return maxima, stats[:, 1:].contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(), dict(weight=True, ignored=True), dict(smoothing=0.2, weight=True),
    dict(probs=True), dict(probs=True, weight=True, smoothing=0.1, target_grad=True),
    dict(z_loss=0.1, softcap=3.0, smoothing=0.1, ignored=True),
    dict(rows=300, v=1000),   # more rows than the emulated grid, rows longer than the block
    dict(v=0),                # an empty shard
    dict(masked=True, smoothing=0.1),  # rows of -inf logits (masked classes)
    dict(weight=True, inf_weight=True),  # an infinite class weight: its rows only
])
def test_vocab_parallel_kernels_match_cpu(emu, dtype, options):
    g = torch.Generator().manual_seed(0)
    n, v = options.get("rows", 6), options.get("v", 37)
    probs = options.get("probs", False)
    logits = (3 * torch.randn(n, v, generator=g)).to(dtype)
    if options.get("masked"):
        logits[::2] = -torch.inf
    if probs:
        target = torch.rand(n, v, generator=g).to(dtype)
    else:
        target = torch.randint(max(v, 1), (n,), generator=g)
        if options.get("ignored"):
            target[::3] = -100
    weight = ((torch.rand(v, generator=g) + 0.5).to(acc_dtype(dtype))
              if options.get("weight") else None)
    if options.get("inf_weight"):
        weight[1] = torch.inf
    smoothing, z_loss = options.get("smoothing", 0.0), options.get("z_loss", 0.0)
    softcap = options.get("softcap", 0.0)
    stats = ops.vocab_parallel_ce_stats(logits, target, weight, 0, -100, smoothing, softcap)
    maxima, sums = one_shard_statistics(stats, target, probs)
    if v == 0 and not probs:  # no shard holds the targets: only ignored rows pass the checks
        target = torch.full((n,), -100)
        maxima[1], maxima[2] = -100, 100
    acc = acc_dtype(dtype)
    vocab_size = torch.tensor(float(max(v, 1)), dtype=acc)
    scale = torch.tensor(0.37, dtype=acc)
    target_grad = options.get("target_grad", False)
    cpu = ops.vocab_parallel_ce_grad(logits, target, weight, maxima, sums, vocab_size, scale,
                                     0, -100, smoothing, z_loss, softcap, True, target_grad)
    with emu.session() as s:
        got = emulated(s, logits, target, weight, 0, -100, smoothing, z_loss, softcap, maxima,
                       sums, vocab_size, scale, True, target_grad)
    tol = TOL[dtype] if dtype in (torch.float64,) else TOL[torch.float32]
    torch.testing.assert_close(got[0], stats, **tol)
    torch.testing.assert_close(got[1], cpu[0], equal_nan=True, **tol)
    torch.testing.assert_close(got[2], cpu[1], equal_nan=True, **TOL[dtype])
    if target_grad:
        torch.testing.assert_close(got[3], cpu[2], **TOL[dtype])


@pytest.mark.parametrize("bad", ["out_of_bounds", "ranks_differ"])
def test_vocab_parallel_grad_device_asserts(emu, bad):
    """The checks that the CPU op raises are device asserts on the GPU."""
    logits = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 3])
    stats = ops.vocab_parallel_ce_stats(logits, target, None, 0, -100, 0.0, 0.0)
    maxima, sums = one_shard_statistics(stats, target, False)
    if bad == "out_of_bounds":
        sums[2, 7] = 0  # no shard holds row 2's target
        message = "lies in no rank's shard"
    else:
        maxima[1, 2] = 4  # another rank's target for row 2
        message = "targets differ across the ranks"
    one = torch.tensor(1.0)
    with emu.session() as s, pytest.raises(EmulatorError, match=message):
        emulated(s, logits, target, None, 0, -100, 0.0, 0.0, 0.0, maxima, sums,
                 torch.tensor(5.0), one, True, False)

"""The CUDA kernels (csrc/cuda, unchanged sources) run on the CPU under the emulator of
tests/cuda_emu, against torch: every launcher, loss and option, every cross-entropy kernel path,
dtypes f64/f32/f16/bf16, sizes around the vector width and the path boundaries, misaligned
pointers, buffers ending at a guard page, several emulated SM counts. No GPU needed.

What this proves: the kernels' arithmetic, indexing, bounds, alignment and barrier/shuffle
structure. What it cannot: real concurrency (fibers switch only at barriers, so races and
memory-ordering bugs do not show), timing, and nvcc's libm (host expf/logf are used)."""
import contextlib
import ctypes
import math

import pytest
import torch
import torch.nn.functional as F

from cuda_emu import NUM_DEVICES, EmulatorError
from tl_helpers import assert_flash_rule, bitwise_equal, ce_extras_reference

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
VEC = {torch.float64: 2, torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # per 16 bytes


def elem(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ==== the emulator itself ======================================================================
def _lib_call(s, name, *args):
    rc = getattr(s.lib, name)(*args)
    err = s.lib.tl_emu_take_error().decode()
    return rc, err


def test_warp_intrinsics_are_cudas(s):
    threads = 64
    out = s.poisoned((threads, 5), torch.int32)
    rc, err = _lib_call(s, "tl_emu_selftest_warp_ops", threads, ctypes.c_void_p(out.ptr))
    assert rc == 0 and not err, err
    o = out.t
    for t in range(threads):
        lane, base = t % 32, t - t % 32
        assert o[t, 0] == base + (lane ^ 1)
        assert o[t, 1] == (t + 3 if lane + 3 < 32 else t)
        assert o[t, 2] == (t - 2 if lane >= 2 else t)
        assert o[t, 3] == base + (lane & ~7) + 7
        ballot = sum(1 << l for l in range(32) if (base + l) % 3 == 0)
        assert o[t, 4] == (ballot if ballot < 2**31 else ballot - 2**32)


def test_shared_memory_is_per_block(s):
    blocks, threads = 5, 256
    out = s.poisoned((blocks,), torch.int32)
    rc, err = _lib_call(s, "tl_emu_selftest_shared", blocks, threads, ctypes.c_void_p(out.ptr))
    assert rc == 0 and not err, err
    for b in range(blocks):
        assert out.t[b] == sum(b * 1000 + i for i in range(threads))


@pytest.mark.parametrize("case,threads,message", [
    (0, 64, "thread (5,0,0): exited while 5 thread(s) wait at __syncthreads"),
    (1, 64, "thread (40,0,0): exited while"),
    (2, 128, "reached __syncthreads at"),
    (3, 32, "exited while"),
    (4, 32, "(same warp) waits at __shfl_down_sync"),
    (5, 32, "whole warps only"),
    (6, 32, "deadlock"),
])
def test_barrier_misuse_is_reported(s, case, threads, message):
    """A thread that skips a barrier, exits while others wait, meets another barrier or
    shuffle, or deadlocks: an error naming the kernel and a thread, never a hang."""
    if s.emu.default_schedule and case in (0, 4):
        pytest.skip("the message names the thread that ascending order runs first")
    out = s.poisoned((2 * threads,), torch.float32)
    rc, err = _lib_call(s, "tl_emu_selftest_barrier", case, 2, threads, ctypes.c_void_p(out.ptr))
    assert rc != 0
    assert "barrier_misuse_kernel" in err and "thread (" in err and message in err, err
    # The error was taken: the next launch runs.
    rc, err = _lib_call(s, "tl_emu_selftest_warp_ops", 32,
                        ctypes.c_void_p(s.poisoned((32, 5), torch.int32).ptr))
    assert rc == 0 and not err, err


def test_read_past_the_end_is_caught(s):
    x = s.copy(torch.rand(1000), "tight")
    out = s.poisoned((128,), torch.float32)
    rc, err = _lib_call(s, "tl_emu_selftest_read", ctypes.c_void_p(x.ptr), 1000, 128,
                        ctypes.c_void_p(out.ptr))
    assert rc == 0 and not err, err
    torch.testing.assert_close(out.t.double().sum(), x.t.double().sum(), rtol=1e-5, atol=0)
    rc, err = _lib_call(s, "tl_emu_selftest_read", ctypes.c_void_p(x.ptr), 1001, 128,
                        ctypes.c_void_p(out.ptr))
    assert rc != 0 and "read_kernel" in err and "0 bytes past the end of the 4000-byte" in err, err


def test_misaligned_vector_load_is_caught(s):
    x = s.copy(torch.rand(16), 4)
    out = s.poisoned((32,), torch.float32)
    rc, err = _lib_call(s, "tl_emu_selftest_vector_load", ctypes.c_void_p(x.ptr),
                        ctypes.c_void_p(out.ptr))
    assert rc != 0 and "misaligned address" in err and "vector_load_kernel" in err, err


def test_device_assert_is_reported(s):
    x = torch.rand(64)
    x[17] = -1
    xb = s.copy(x)
    out = s.poisoned((64,), torch.float32)
    rc, err = _lib_call(s, "tl_emu_selftest_assert", ctypes.c_void_p(xb.ptr),
                        ctypes.c_void_p(out.ptr))
    assert rc != 0 and "device-side assert" in err and "selftest: negative input" in err, err
    assert "thread (17,0,0)" in err, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bfloat16_round_to_nearest_even(s, dtype):
    """Products of two half (bfloat16) values are exact in float32, so the kernel's only
    rounding is float -> half: it must be torch's (round to nearest even), subnormals, overflow
    and NaN included."""
    g = torch.Generator().manual_seed(1)
    n = 40000
    a = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g)))
    b = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g)))
    a, b = a.to(dtype), b.to(dtype)
    a[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    out = s.scale_grad(a, b)
    ref = (a.float() * b.float()).to(dtype)
    assert bitwise_equal(out, ref)


# ==== references ================================================================================
def ce_reference(x, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean", grad_output=None, z_loss=0.0, softcap=None):
    """torch in float64: loss and the gradients (input; target for probabilities) for
    grad_output (1 when None); z_loss/softcap: the composite of tl_helpers."""
    prob = target.is_floating_point()
    x64 = x.double().requires_grad_(True)
    t64 = target.double().requires_grad_(True) if prob else target
    w64 = None if weight is None else weight.double()
    loss = ce_extras_reference(x64, t64, weight=w64, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing,
                               z_loss=z_loss, softcap=softcap)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    grads = torch.autograd.grad(loss, [x64, t64] if prob else [x64], go, allow_unused=True)
    return loss.detach(), grads[0], grads[1] if prob else None


def ce_torch(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
             grad_output=None, z_loss=0.0, softcap=None):
    """torch in x's dtype (for the flash rule): loss and input gradient."""
    prob = target.is_floating_point()
    xl = x.detach().clone().requires_grad_(True)
    tl = target.detach().clone().requires_grad_(True) if prob else target
    w = None if weight is None else weight.to(x.dtype)
    loss = ce_extras_reference(xl, tl, weight=w, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(x.dtype)
    grads = torch.autograd.grad(loss, [xl, tl] if prob else [xl], go)
    return loss.detach(), grads[0], grads[1] if prob else None


def check(name, ours, ref64, lowp, dtype):
    """float64: tight; low precision: no worse than 2x torch's own error (flash-attn rule)."""
    assert ours.dtype == dtype and ours.shape == ref64.shape, (name, ours.dtype, ours.shape)
    if dtype == torch.float64:
        torch.testing.assert_close(ours, ref64, rtol=1e-10, atol=1e-12, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    else:
        # NaN where torch in float64 has NaN (the rule is for the finite values).
        nan = ref64.isnan()
        assert torch.equal(ours.isnan(), nan), f"{name}: NaN positions differ"
        assert_flash_rule(ours[~nan], lowp[~nan], ref64[~nan], name=name)


# ==== cross-entropy =============================================================================
def ce_inputs(N, C, D, dtype, prob, g, scale=2.0, ignore_index=-100):
    shape = (N, C) if D is None else (N, C, D)
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    if prob:
        t = torch.softmax(torch.randn(shape, generator=g) * 3, 1).to(dtype)
    else:
        t = torch.randint(0, max(C, 1), shape[:1] + shape[2:], generator=g)
        if t.numel() > 2:
            t.view(-1)[::5] = ignore_index
    w = torch.rand(C, generator=g) + 0.5
    return x, t, w


# (N, C, D): D None is an (N, C) input. Around every path boundary: the column kernel (C < 64
# or D > 1), warp per row (C / vec <= 128), block per row (held in registers up to 2048
# vectors when the forward writes the gradient); sizes at the vector width +- 1.
def _ce_shapes(dtype):
    v = VEC[dtype]
    shapes = [(0, 5, None), (1, 1, None), (7, 1, None), (37, 5, None), (9, 63, None),
              (9, 64, None), (5, v + 1, None), (5, 64 + v - 1, None), (11, 129, None),
              (5, 128 * v, None), (4, 128 * v + v + 1, None),
              (5, 512 * v, None), (4, 512 * v + v + 1, None), (3, 4097, None),
              (4, 3, 7), (3, 64, 5), (2, 1, 33), (0, 4, 3), (5, 0, 0)]
    return shapes


OPTIONS = {
    "index_mean": dict(prob=False),
    "index_weight_smooth_sum": dict(prob=False, weight=True, label_smoothing=0.1,
                                    reduction="sum"),
    "index_weight_mean": dict(prob=False, weight=True, ignore_index=1),
    "index_smooth_none": dict(prob=False, label_smoothing=0.2, reduction="none"),
    "prob_smooth_mean": dict(prob=True, label_smoothing=0.05),
    "prob_weight_sum": dict(prob=True, weight=True, reduction="sum"),
    "prob_none": dict(prob=True, reduction="none"),
    # issue 9's extras (z-loss, soft-capping below the logits' scale of 2)
    "index_weight_zloss_cap_mean": dict(prob=False, weight=True, ignore_index=1, z_loss=0.1,
                                        softcap=3.0),
    "index_smooth_zloss_sum": dict(prob=False, label_smoothing=0.1, reduction="sum",
                                   z_loss=0.05),
    "index_cap_none": dict(prob=False, reduction="none", softcap=2.5, z_loss=0.02),
    "prob_smooth_zloss_cap_mean": dict(prob=True, label_smoothing=0.05, z_loss=0.1,
                                       softcap=3.0),
    "prob_weight_cap_none": dict(prob=True, weight=True, reduction="none", softcap=2.0),
}


def ce_kwargs(opts, w):
    """The cross_entropy keyword arguments of an OPTIONS entry (w: the class weights drawn)."""
    return dict(weight=w if opts.get("weight") else None,
                ignore_index=opts.get("ignore_index", -100),
                label_smoothing=opts.get("label_smoothing", 0.0),
                reduction=opts.get("reduction", "mean"),
                z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))


def run_ce_case(s, dtype, N, C, D, opts, layout=0, target_layout=None, out_layout=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    prob = opts["prob"]
    x, t, w = ce_inputs(N, C, D, dtype, prob, g, ignore_index=opts.get("ignore_index", -100))
    kw = ce_kwargs(opts, w)
    lay = dict(layout=layout, target_layout=target_layout, out_layout=out_layout)
    name = f"{dtype} {N}x{C}x{D} {opts}"
    # Forward (with the fused gradient for mean/sum, as autograd asks for it).
    fused = kw["reduction"] != "none"
    r = s.cross_entropy(x, t, **kw, want_grad=fused, want_target_grad=fused and prob, **lay)
    ref_loss, ref_gx, ref_gt = ce_reference(x, t, **kw)
    lowp = ce_torch(x, t, **kw) if dtype != torch.float64 else (None, None, None)
    check(name + " loss", r["loss"], ref_loss, lowp[0], dtype)
    if fused:
        check(name + " grad_input", r["grad_input"], ref_gx, lowp[1], dtype)
        if prob:
            check(name + " grad_target", r["grad_target"], ref_gt, lowp[2], dtype)
    # Backward op: grad_output (a scalar, or one per row) with the forward's lse.
    go = (torch.randn(ref_loss.shape, generator=g) if kw["reduction"] == "none"
          else torch.tensor(0.75)).to(dtype)
    rb = s.cross_entropy(x, t, **kw, grad_output=go, row_stats=r["row_stats"], want_grad=True,
                         want_target_grad=prob, **lay)
    ref_loss, ref_gx, ref_gt = ce_reference(x, t, **kw, grad_output=go)
    lowp = ce_torch(x, t, **kw, grad_output=go) if dtype != torch.float64 else (None,) * 3
    check(name + " bwd grad_input", rb["grad_input"], ref_gx, lowp[1], dtype)
    if prob:
        check(name + " bwd grad_target", rb["grad_target"], ref_gt, lowp[2], dtype)


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_matrix(s, dtype, opt):
    for N, C, D in _ce_shapes(dtype):
        if C == 0 and N * (D or 1) > 0:
            continue
        run_ce_case(s, dtype, N, C, D, OPTIONS[opt])


@pytest.mark.parametrize("layout", ["tight", "mixed", "odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_misaligned(s, dtype, layout):
    """Buffers ending at a guard page ("tight": every array equally misaligned, so the vector
    path runs with a head and a tail), or misaligned differently ("mixed": input one element off
    a 16-byte boundary, the rest aligned: the scalar path; "odd": each array its own offset)."""
    e = elem(dtype)
    for N, C, D in [(3, 5, None), (6, 64 + VEC[dtype] + 1, None), (2, 512 * VEC[dtype] + 3, None),
                    (3, 7, 3)]:
        for opt in ("index_weight_smooth_sum", "prob_smooth_mean", "index_smooth_none"):
            # int64 class indices, float32 lse: natural alignment only
            te = (2 * e) % 16 if OPTIONS[opt]["prob"] else 8
            lays = {"tight": ("tight", "tight", "tight"), "mixed": (e, 0, 0),
                    "odd": (e, te, 8 if e < 8 else 0)}[layout]
            run_ce_case(s, dtype, N, C, D, OPTIONS[opt], *lays)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_large_vocabulary(s, dtype):
    for opt in ("index_weight_smooth_sum", "prob_smooth_mean"):
        run_ce_case(s, dtype, 3, 32000, None, OPTIONS[opt])
    run_ce_case(s, dtype, 2, 32000, None, OPTIONS["index_mean"], "tight")


@pytest.mark.parametrize("softcap", [1e4, 1e8, 1e30])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_softcap_far_above_the_logits(s, dtype, softcap):
    """A softcap far above the logits caps nothing: cap tanh(x / cap) ~ x. The bf16/fp16 tanh
    from e^(-2|u|) lost x there ((1 - E) cancels: absolute error ~cap 2^-23, the loss off by 1.7
    at softcap 1e8); its series below |u| = 1/8 keeps it. Rows, columns (D > 1), split rows."""
    for N, C, D in [(7, 300, None), (3, 21, 33), (2, 40000, None)]:
        for opts in (dict(prob=False, softcap=softcap, label_smoothing=0.1),
                     dict(prob=True, softcap=softcap, reduction="none")):
            run_ce_case(s, dtype, N, C, D, opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [7, 300, 5000])
def test_cross_entropy_inplace(s, dtype, C):
    """inplace_backward: the gradient overwrites the logits (grad_input aliases input)."""
    g = torch.Generator().manual_seed(3)
    x, t, w = ce_inputs(9, C, None, dtype, False, g)
    for kw in (dict(), dict(weight=w, label_smoothing=0.1, reduction="sum")):
        r = s.cross_entropy(x, t, **kw, inplace=True)
        r2 = s.cross_entropy(x, t, **kw, want_grad=True)
        assert bitwise_equal(r["loss"], r2["loss"])
        ref_loss, ref_gx, _ = ce_reference(x, t, **kw)
        lowp = ce_torch(x, t, **kw) if dtype != torch.float64 else (None,) * 3
        check(f"inplace {dtype} C={C} {kw}", r["grad_input"], ref_gx, lowp[1], dtype)


def test_cross_entropy_target_out_of_bounds_asserts(s):
    for C, D in [(10, None), (5000, None), (4, 9)]:
        x = torch.randn(4, C) if D is None else torch.randn(4, C, D)
        t = torch.zeros(4, dtype=torch.long) if D is None else torch.zeros(4, D, dtype=torch.long)
        t.view(-1)[2] = C
        for reduction in ("mean", "none"):
            with pytest.raises(EmulatorError, match="target class index out of bounds"):
                s.cross_entropy(x, t, reduction=reduction, want_grad=reduction != "none")


# ==== pointwise losses ==========================================================================
def pw_inputs(kind, n, dtype, g):
    x = torch.randn(n, generator=g)
    y = torch.randn(n, generator=g)
    if kind == "bce":
        x = torch.rand(n, generator=g) * 0.98 + 0.01
        y = torch.rand(n, generator=g)
    elif kind == "bce_with_logits":
        y = torch.rand(n, generator=g)
    elif kind == "hinge":
        y = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    elif kind == "kl_div":
        y = torch.rand(n, generator=g)
        if n > 3:
            y[3] = 0
    return x.to(dtype), y.to(dtype)


def pw_elementwise(kind, x, y, aux, param):
    """Unweighted, unreduced loss of each element, written with torch ops."""
    if kind == "bce_with_logits":
        return F.binary_cross_entropy_with_logits(x, y, pos_weight=aux, reduction="none")
    if kind == "huber":
        return F.huber_loss(x, y, delta=param, reduction="none")
    if kind == "smooth_l1":
        return F.smooth_l1_loss(x, y, beta=param, reduction="none")
    if kind == "mse":
        return F.mse_loss(x, y, reduction="none")
    if kind == "l1":
        return F.l1_loss(x, y, reduction="none")
    if kind == "bce":
        return F.binary_cross_entropy(x, y, reduction="none")
    if kind == "hinge":
        return torch.clamp_min(param - y * x, 0)
    if kind == "kl_div":
        return F.kl_div(x, y, reduction="none")
    return F.kl_div(x, y, reduction="none", log_target=True)


def pw_reduce(l, reduction):
    return l if reduction == "none" else (l.mean() if reduction == "mean" else l.sum())


def pw_run_torch(kind, x, y, w, aux, param, reduction, go, dtype):
    xs = x.to(dtype).detach().requires_grad_(True)
    ys = y.to(dtype).detach().requires_grad_(True)
    a = None if aux is None else aux.to(dtype)
    l = pw_elementwise(kind, xs, ys, a, param)
    if w is not None:
        l = l * w.to(dtype)
    l = pw_reduce(l, reduction)
    gi, gt = torch.autograd.grad(l, [xs, ys], go.to(dtype))
    return l.detach(), gi, gt


PW_PARAMS = {"huber": 0.7, "smooth_l1": 0.5, "hinge": 0.8}
PW_KINDS = ["bce_with_logits", "huber", "smooth_l1", "mse", "l1", "bce", "hinge", "kl_div",
            "kl_div_log_target"]


def run_pw_case(s, kind, dtype, n, reduction, weighted, layouts=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = pw_inputs(kind, n, dtype, g)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype) if weighted else None
    aux = ((torch.rand(n, generator=g) + 0.5).to(dtype)
           if weighted and kind == "bce_with_logits" else None)
    param = PW_PARAMS.get(kind, 0.0)  # BCE-with-logits: the driver passes "pos_weight given"
    name = f"{kind} {dtype} n={n} {reduction} w={weighted} {layouts}"
    go1 = torch.ones(()) if reduction != "none" else torch.ones(n)
    ref = pw_run_torch(kind, x.double(), y.double(), None if w is None else w.double(),
                       None if aux is None else aux.double(), param, reduction, go1,
                       torch.float64)
    lowp = (pw_run_torch(kind, x, y, w, aux, param, reduction, go1, dtype)
            if dtype != torch.float64 else (None,) * 3)
    fused = reduction != "none"
    r = s.pointwise(kind, x, y, w, aux, param, reduction, want_grad_input=fused,
                    want_grad_target=fused, layouts=layouts)
    check(name + " loss", r["loss"], ref[0], lowp[0], dtype)
    if fused:
        check(name + " grad_input", r["grad_input"], ref[1], lowp[1], dtype)
        check(name + " grad_target", r["grad_target"], ref[2], lowp[2], dtype)
    go = (torch.randn(n, generator=g) if reduction == "none" else torch.tensor(-1.5)).to(dtype)
    ref = pw_run_torch(kind, x.double(), y.double(), None if w is None else w.double(),
                       None if aux is None else aux.double(), param, reduction, go.double(),
                       torch.float64)
    lowp = (pw_run_torch(kind, x, y, w, aux, param, reduction, go, dtype)
            if dtype != torch.float64 else (None,) * 3)
    rb = s.pointwise(kind, x, y, w, aux, param, reduction, want_grad_input=True,
                     want_grad_target=True, grad_output=go, layouts=layouts)
    check(name + " bwd grad_input", rb["grad_input"], ref[1], lowp[1], dtype)
    check(name + " bwd grad_target", rb["grad_target"], ref[2], lowp[2], dtype)


@pytest.mark.parametrize("kind", PW_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_matrix(s, kind, dtype):
    v = VEC[dtype]
    chunk = 256 * v * 4
    for n in (0, 1, v - 1, v + 1, 4097, chunk + 3):
        for reduction, weighted in (("mean", False), ("sum", True), ("none", True)):
            run_pw_case(s, kind, dtype, n, reduction, weighted)


@pytest.mark.parametrize("kind", ["bce_with_logits", "huber", "bce", "kl_div_log_target"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_misaligned(s, kind, dtype):
    e = elem(dtype)
    for layouts in (dict.fromkeys(["x", "y", "weight", "aux", "grad_output", "loss",
                                   "grad_input", "grad_target"], "tight"),
                    {"x": e, "grad_target": (16 - e) % 16}, {"loss": e}, {"grad_output": e}):
        for n in (VEC[dtype] + 1, 1027):
            for reduction in ("mean", "none"):
                run_pw_case(s, kind, dtype, n, reduction, True, layouts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_extremes_as_torch(s, dtype):
    """Every pair of operands at the ends of the range, and parameters there, against torch's
    functions in the accumulation type (the kernels' precision; rounded to dtype after): the
    same NaNs and infinities. kl_div rounds both products as torch's xlogy(y, y) - y x
    (contracted, y = 3e38 and x = 88 gave -inf where torch gives nan), and a smooth_l1 beta
    that is 0 in float32 runs l1, torch's beta = 0 (no 0 / 0 at x == y)."""
    sp = torch.tensor([0.0, -0.0, 1e-45, 1e-40, 1.0, -1.0, 88.0, -88.0, 100.0, 1e30, -1e30,
                       3e38, -3e38, math.inf, -math.inf, math.nan])
    x = sp[:, None].expand(16, 16).reshape(-1).to(dtype)
    y = sp[None, :].expand(16, 16).reshape(-1).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cases = [("kl_div", F.kl_div, {}, 0.0), ("mse", F.mse_loss, {}, 0.0),
             ("huber", F.huber_loss, {"delta": 1e-30}, 1e-30),
             # beta 0 in float32 is beta = 0 (l1), as on the CPU (tests/test_pointwise.py)
             ("smooth_l1", F.smooth_l1_loss,
              {"beta": 1e-310 if dtype == torch.float64 else 0.0}, 1e-310),
             ("smooth_l1", F.smooth_l1_loss, {"beta": 1e30}, 1e30)]
    for kind, fn, kw, param in cases:
        for reduction in ("none", "sum"):
            xl = x.to(acc).requires_grad_()
            yl = y.to(acc).requires_grad_()
            loss = fn(xl, yl, reduction=reduction, **kw)
            gx, gy = torch.autograd.grad(loss.sum(), (xl, yl))
            r = s.pointwise(kind, x, y, param=param, reduction=reduction, want_grad_input=True,
                            want_grad_target=True)
            for got, want in ((r["loss"], loss), (r["grad_input"], gx), (r["grad_target"], gy)):
                want = want.detach().to(dtype)
                assert torch.equal(got.isnan(), want.isnan()), (kind, param, reduction)
                assert torch.equal(got.isinf(), want.isinf()), (kind, param, reduction)


@pytest.mark.parametrize("kind,bad", [("bce", "x"), ("bce", "y"), ("hinge", "y")])
def test_pointwise_domain_asserts(s, kind, bad):
    g = torch.Generator().manual_seed(0)
    x, y = pw_inputs(kind, 1000, torch.float32, g)
    (x if bad == "x" else y)[517] = 1.5
    with pytest.raises(EmulatorError, match="device-side assert"):
        s.pointwise(kind, x, y, param=PW_PARAMS.get(kind, 0.0), reduction="sum")


# ==== scale_grad ================================================================================
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_grad(s, dtype):
    g = torch.Generator().manual_seed(0)
    for shape in [(1000, 33), (5,), (4, 7, 5), (6, 300), (3, 64)]:
        grad = torch.randn(shape, generator=g).to(dtype)
        one = torch.tensor(1.0, dtype=dtype)
        assert bitwise_equal(s.scale_grad(grad, one), grad)
        half = torch.tensor(0.5, dtype=dtype)
        assert bitwise_equal(s.scale_grad(grad, half), (grad.double() * 0.5).to(dtype))
        per = torch.randn(shape, generator=g).to(dtype)
        assert bitwise_equal(s.scale_grad(grad, per, "tight"),
                             (grad.double() * per.double()).to(dtype))
        if len(shape) >= 2:
            pos = torch.randn((shape[0],) + shape[2:], generator=g).to(dtype)
            ref = (grad.double() * pos.double().unsqueeze(1)).to(dtype)
            assert bitwise_equal(s.scale_grad(grad, pos), ref)


# ==== grid sizes ================================================================================
def _grid_cases(s):
    """Results of launches whose grid depends on the SM count (and L2 size)."""
    g = torch.Generator().manual_seed(5)
    out = []
    x = torch.randn(300, 700, generator=g)  # 64-thread block per row, held in registers
    t = torch.randint(0, 700, (300,), generator=g)
    r = s.cross_entropy(x, t, label_smoothing=0.1, want_grad=True, reduction="sum")
    out += [r["loss"], r["grad_input"]]
    x = torch.randn(40, 5000, generator=g).bfloat16()  # block per row, held in registers
    t = torch.randint(0, 5000, (40,), generator=g)
    r = s.cross_entropy(x, t, want_grad=True)
    out += [r["loss"], r["grad_input"]]
    out.append(s.cross_entropy(x, t)["loss"])  # without a gradient: the L2-based grid cap
    x = torch.randn(20000, 3, generator=g)  # class-index mean: W by the multi-block sum
    t = torch.randint(0, 3, (20000,), generator=g)
    t[::7] = -100
    r = s.cross_entropy(x, t, weight=torch.rand(3, generator=g) + 0.5, want_grad=True)
    out += [r["loss"], r["grad_input"]]
    x = torch.randn(4, 40000, generator=g).bfloat16()  # split rows, S = 4
    t = torch.randint(0, 40000, (4,), generator=g)
    r = s.cross_entropy(x, t, label_smoothing=0.1, want_grad=True)
    out += [r["loss"], r["grad_input"]]
    x = torch.randn(70000, 2, generator=g)  # column kernel; 70000 row losses: two-stage sum
    t = torch.randint(0, 2, (70000,), generator=g)
    out.append(s.cross_entropy(x, t)["loss"])
    p = torch.softmax(torch.randn(8, 5, 300, generator=g), 1)
    out.append(s.cross_entropy(torch.randn(8, 5, 300, generator=g), p)["loss"])
    x, y = torch.randn(50000, generator=g), torch.randn(50000, generator=g)
    r = s.pointwise("huber", x, y, param=1.0, want_grad_input=True)
    out += [r["loss"], r["grad_input"]]
    out.append(s.scale_grad(torch.randn(30000, generator=g), torch.randn(30000, generator=g)))
    return out


def test_results_bitwise_equal_across_sm_counts(emu):
    """The reductions have a fixed order: every emulated device (1 to 132 SMs, L2 64 KiB to
    50 MiB) gives the same bits."""
    results = []
    for dev in range(NUM_DEVICES):
        with emu.session(dev) as s:
            results.append(_grid_cases(s))
    for dev in range(1, NUM_DEVICES):
        for a, b in zip(results[0], results[dev]):
            assert bitwise_equal(a, b), f"device {dev} ({emu.device_sms(dev)} SMs) differs"


def test_results_bitwise_equal_under_high_first_schedule(emu):
    """The same launches with the block's threads run highest-numbered first (a lower thread
    only when every higher one waits) instead of ascending: the same bits, on an even grid of
    several chunks per block (4 blocks), an odd one (15) and the 132-SM device. Pointwise sums
    of 9 whole chunks and a last one of 100 elements (warps 1-7 have none there). This caught
    the pointwise chunk partials' race: their shared-memory half chosen by the chunk index's
    parity, the same for all of a block's chunks on an even grid, so warps 1-7 wrote the last
    chunk's sums before warp 0 had read the previous ones."""
    g = torch.Generator().manual_seed(8)
    x32, y32 = torch.randn(4096 * 9 + 100, generator=g), torch.randn(4096 * 9 + 100, generator=g)
    x16, y16 = x32.bfloat16(), y32.bfloat16()
    for dev in (6, 7, 0):
        runs = []
        for high_first in (False, True):
            with emu.session(dev) as s, (emu.high_first_schedule() if high_first
                                         else contextlib.nullcontext()):
                out = _grid_cases(s)
                for x, y in ((x32, y32), (x16, y16)):
                    for kind, param in (("huber", 1.0), ("bce_with_logits", 0.0)):
                        r = s.pointwise(kind, x, y, param=param, reduction="sum",
                                        want_grad_input=True)
                        out += [r["loss"], r["grad_input"]]
                runs.append(out)
        for i, (a, b) in enumerate(zip(*runs)):
            assert bitwise_equal(a, b), f"device {dev}: result {i} differs between schedules"
        want = F.huber_loss(x32.double(), y32.double(), reduction="sum")
        assert torch.allclose(runs[1][-8].double(), want, rtol=1e-5), (dev, runs[1][-8], want)


# ==== review and fuzzer defects (each failed before its fix) ===================================
# (C, D, layout): one per kernel path. Vector path with a head (input one element off a 16-byte
# boundary, everything else equally off); scalar path (gradient buffer aligned differently).
NONFINITE_PATHS = {
    "column": (5, 1, 0), "column_d3": (6, 3, 0), "warp_vec": (100, None, "tight"),
    "warp_scalar": (100, None, "mixed"), "block_vec": (3000, None, "tight"),
    "block_scalar": (3000, None, "mixed"),
}


@pytest.mark.parametrize("path", list(NONFINITE_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cross_entropy_nan_inf_at_every_position(s, dtype, path):
    """A NaN or +-inf logit at any class position, on every kernel path: torch's loss and
    gradient (NaN rows stay NaN; fmaxf(-inf, NaN) = -inf once dropped a NaN folded first)."""
    C, D, layout = NONFINITE_PATHS[path]
    e = elem(dtype)
    lay = (("tight",) * 3 if layout == "tight" else (e, 8, 0) if layout == "mixed" else (0,) * 3)
    g = torch.Generator().manual_seed(7)
    v = VEC[dtype]
    positions = (sorted({0, 1, 2, v - 1, v, v + 1, C // 2, C - 2, C - 1}) if C > 16
                 else range(C))
    for special in (float("nan"), float("inf"), -float("inf")):
        for pos in positions:
            shape = (2, C) if D is None else (2, C, D)
            x = (torch.randn(shape, generator=g) * 2).to(dtype)
            t = torch.tensor([2, pos]) if D is None else torch.tensor([[2] * D, [pos] * D])
            x[1, pos] = special
            for kw in (dict(reduction="sum"), dict(label_smoothing=0.1, reduction="sum")):
                r = s.cross_entropy(x, t, **kw, want_grad=True, layout=lay[0],
                                    target_layout=lay[1], out_layout=lay[2])
                rn = s.cross_entropy(x, t, **{**kw, "reduction": "none"}, layout=lay[0],
                                     target_layout=lay[1], out_layout=lay[2])
                ref_loss, ref_gx, _ = ce_reference(x, t, **kw)
                ref_none, _, _ = ce_reference(x, t, **{**kw, "reduction": "none"})
                name = f"{path} {dtype} x[1, {pos}] = {special} {kw}"
                torch.testing.assert_close(rn["loss"].double(), ref_none, equal_nan=True,
                                           rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
                torch.testing.assert_close(r["loss"].double(), ref_loss, equal_nan=True,
                                           rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
                torch.testing.assert_close(r["grad_input"].double(), ref_gx, equal_nan=True,
                                           rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_cross_entropy_nan_first_minimal_case(s):
    """The review's minimal case: x = [NaN, 1, 2, 0.5, -1], y = 2 (column kernel)."""
    x = torch.tensor([[float("nan"), 1, 2, 0.5, -1]])
    r = s.cross_entropy(x, torch.tensor([2]), want_grad=True)
    assert r["loss"].isnan().all() and r["grad_input"].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_weight_smoothing_more_than_65536_classes(s, dtype):
    """The class-weight sum writes one partial per 4096 classes: the scratch must hold them
    (it was sized by rows only, so C > 65536 with one row wrote past its end)."""
    run_ce_case(s, dtype, 1, 70001, None, OPTIONS["index_weight_smooth_sum"])


@pytest.mark.parametrize("C", [300, 5000])
def test_cross_entropy_lanes_agree_on_lse(s, C):
    """Every lane of a row's group must use the same lse: two classes with the same logit get
    bitwise the same gradient. (The online-softmax merge p.s e^(p.m - m) + q.s e^(q.m - m) was
    contracted into an FMA, so the butterfly partners rounded differently.)"""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, C, generator=g) * 3
    cols = [0, 37, 130, 181, C - 1]  # different lanes (and warps for C = 5000)
    x[:, cols] = x[:, :1]
    t = torch.randint(1, 30, (256,), generator=g)
    for kw in (dict(), dict(label_smoothing=0.1)):
        gi = s.cross_entropy(x, t, **kw, want_grad=True)["grad_input"]
        for c in cols[1:]:
            assert torch.equal(gi[:, c], gi[:, 0]), f"class {c} vs 0: lanes disagree ({kw})"


@pytest.mark.parametrize("C,D", [(50, None), (1000, None), (5000, None), (50, 3)])
@pytest.mark.parametrize("target", ["index", "index_smooth", "prob", "prob_weight_smooth"])
def test_cross_entropy_large_logits_float32(s, C, D, target):
    """Logits around 1e4 in float32: the loss is formed from (max - x) and log(sum), never from
    two large numbers, and the softmax from x - max and log(sum) (the backward op reads the
    forward's m and log(sum) apart: lse rounded to float32 is off by up to 5e-4 there); no worse
    than 2x torch's float32 error (plus the project's slack of 1e-6 of the largest value)."""
    g = torch.Generator().manual_seed(13)
    shape = (4, C) if D is None else (4, C, D)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 1e4).float()
    prob = target.startswith("prob")
    if prob:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1).float()
    else:
        t = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
    kw = dict(label_smoothing=0.1 if "smooth" in target else 0.0,
              weight=torch.rand(C, generator=g) + 0.5 if "weight" in target else None)
    for reduction in ("mean", "none"):
        r = s.cross_entropy(x, t, **kw, reduction=reduction, want_grad=reduction == "mean",
                            want_target_grad=prob and reduction == "mean")
        ref = ce_reference(x, t, **kw, reduction=reduction)
        lowp = ce_torch(x, t, **kw, reduction=reduction)
        name = f"{target} C={C} D={D} {reduction}"
        assert_flash_rule(r["loss"], lowp[0], ref[0], name=name + " loss")
        if reduction == "mean":
            assert_flash_rule(r["grad_input"], lowp[1], ref[1], name=name + " grad_input")
        # The backward op (per-row grad_output) from the forward's row statistics.
        go = torch.randn(ref[0].shape, generator=g)
        rb = s.cross_entropy(x, t, **kw, reduction=reduction, grad_output=go,
                             row_stats=r["row_stats"], want_grad=True, want_target_grad=prob)
        ref = ce_reference(x, t, **kw, reduction=reduction, grad_output=go)
        lowp = ce_torch(x, t, **kw, reduction=reduction, grad_output=go)
        assert_flash_rule(rb["grad_input"], lowp[1], ref[1], name=name + " bwd grad_input")
        if prob:
            assert_flash_rule(rb["grad_target"], lowp[2], ref[2], name=name + " bwd grad_target")


# Kernel paths of the backward op: (N, C, D). Split: 2 rows of 20000 classes run 2 blocks each.
BACKWARD_PATHS = {"column": (4, 5, 3), "warp": (4, 100, None), "block": (4, 3000, None),
                  "split": (2, 20000, None)}


@pytest.mark.parametrize("path", list(BACKWARD_PATHS))
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_cross_entropy_backward_reads_the_saved_row_stats(s, path, prob):
    """The forward saves the row max m and log s (and u = sum t for probability targets);
    the backward reads them instead of recomputing: raising m or log s by 1 scales every
    softmax term by e^-1, raising u by 1 adds grad_output * softmax. (The split path's
    backward runs no statistics kernel: merging its unwritten partials would give NaN.)"""
    N, C, D = BACKWARD_PATHS[path]
    if prob and path == "split":
        pytest.skip("probability targets have no split path")
    g = torch.Generator().manual_seed(23)
    x, t, _ = ce_inputs(N, C, D, torch.float32, prob, g)
    x64 = x.double()
    cls = 1
    go = torch.rand(x.shape[:1] + x.shape[2:], generator=g) + 0.5
    gk = go.double().unsqueeze(cls)
    if prob:
        onehot = t.double()
    else:  # ignored rows (every 5th) get zeros
        onehot = F.one_hot(t.clamp(min=0), C).movedim(-1, cls).double()
        gk = gk * (t != -100).unsqueeze(cls)
    stats = s.cross_entropy(x, t, reduction="none")["row_stats"]
    assert stats.shape == (3 if prob else 2,) + tuple(go.shape)
    assert torch.equal(stats[0], x.amax(cls))

    def backward(row_stats):
        return s.cross_entropy(x, t, reduction="none", grad_output=go, row_stats=row_stats,
                               want_grad=True)["grad_input"].double()

    softmax = x64.softmax(cls) * (onehot.sum(cls, keepdim=True) if prob else 1)
    tol = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(backward(stats), gk * (softmax - onehot), **tol)
    for k in (0, 1):
        shifted = stats.clone()
        shifted[k] += 1
        torch.testing.assert_close(backward(shifted), gk * (softmax * math.e ** -1 - onehot),
                                   **tol)
    if prob:
        shifted = stats.clone()
        shifted[2] += 1
        torch.testing.assert_close(backward(shifted), gk * (softmax + x64.softmax(cls) - onehot),
                                   **tol)


@pytest.mark.parametrize("path", list(BACKWARD_PATHS))
def test_cross_entropy_backward_keeps_max_and_log_sum_apart(s, path):
    """Float32 logits near 1e4, one of them 10 above the rest (a softmax of ~0.4): the
    backward op's gradient from the saved (m, log s) is within 2x torch's float32 error of the
    float64 one; from the rounded lse m + log s (5e-4 off there) it is not, so this check
    would catch a backward that used it."""
    N, C, D = BACKWARD_PATHS[path]
    g = torch.Generator().manual_seed(29)
    shape = (N, C) if D is None else (N, C, D)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) + 1e4
    x64[:, 0] += 10
    x = x64.float()
    t = torch.randint(1, C, shape[:1] + shape[2:], generator=g)
    go = torch.rand(t.shape, generator=g) + 0.5
    stats = s.cross_entropy(x, t, reduction="none")["row_stats"]
    folded = torch.stack([stats[0] + stats[1], torch.zeros_like(stats[1])])
    ref = ce_reference(x, t, reduction="none", grad_output=go)[1]
    theirs = ce_torch(x, t, reduction="none", grad_output=go)[1]
    ours = s.cross_entropy(x, t, reduction="none", grad_output=go, row_stats=stats,
                           want_grad=True)["grad_input"]
    assert_flash_rule(ours, theirs, ref, name=f"{path} grad from (m, log s)")
    from_lse = s.cross_entropy(x, t, reduction="none", grad_output=go, row_stats=folded,
                               want_grad=True)["grad_input"]
    with pytest.raises(AssertionError, match="error"):
        assert_flash_rule(from_lse, theirs, ref, name=f"{path} grad from the lse")


@pytest.mark.parametrize("C", [4, 64], ids=["column", "warp"])
@pytest.mark.parametrize("weighted", [False, True], ids=["nw", "w"])
def test_cross_entropy_mean_scale_rounds_once(s, C, weighted):
    """The class-index mean's gradient scale grad_output / W is formed in double and rounded
    once, as on the CPU (and torch): 0.3 / 3 is 0.1f, where float(1/3) * 0.3 is 0.10000001f.
    Logits (0, -inf, ...) with target 1 make the softmax exactly (1, 0, ...), so the gradient
    is that scale times the target's weight, bit for bit what the CPU op forms."""
    x = torch.full((3, C), -math.inf)
    x[:, 0] = 0
    t = torch.ones(3, dtype=torch.long)
    w = torch.ones(C)
    if weighted:
        w[1] = 1.5
    kw = dict(weight=w if weighted else None, reduction="mean")
    go = torch.tensor(0.3)
    stats = s.cross_entropy(x, t, **kw)["row_stats"]
    ours = s.cross_entropy(x, t, **kw, grad_output=go, row_stats=stats,
                           want_grad=True)["grad_input"]
    # As the CPU kernel: the scale rounded once to float, then times the target's weight.
    scale = torch.tensor(go.double().item() * (1.0 / (3 * w[1].double().item())),
                         dtype=torch.float32)
    expected = torch.zeros(3, C)
    expected[:, 0] = scale * w[1]
    expected[:, 1] = -(scale * w[1])
    assert bitwise_equal(ours, expected), (ours[:, :2], expected[:, :2])
    if not weighted:
        assert scale.item() == torch.tensor(0.1, dtype=torch.float32).item()
        assert bitwise_equal(ours, ce_torch(x, t, **kw, grad_output=go)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_one_class_is_exactly_zero(s, dtype):
    """C = 1: log_softmax is exactly 0, so the loss and the gradient are exactly 0 (torch)."""
    g = torch.Generator().manual_seed(17)
    x = (torch.randn(6, 1, generator=g) * 1e3).to(dtype)
    t = torch.zeros(6, dtype=torch.long)
    p = torch.ones(6, 1, dtype=dtype)
    w = torch.tensor([0.7])
    for target, kw in ((t, {}), (t, dict(weight=w, label_smoothing=0.3)), (p, {}),
                       (p, dict(weight=w, label_smoothing=0.2))):
        for reduction in ("mean", "sum", "none"):
            r = s.cross_entropy(x, target, **kw, reduction=reduction,
                                want_grad=reduction != "none")
            assert (r["loss"] == 0).all(), (kw, reduction, r["loss"])
            if reduction != "none":
                assert (r["grad_input"] == 0).all(), (kw, reduction, r["grad_input"])


# (C, layout) per row-kernel path: the thread that walked class y rewrites the target's
# gradient (walk_owner), so the target sits in the scalar head, in vectors of many lanes (and
# warps), in the scalar tail; "mixed": the scalar walk.
TARGET_PATHS = {"warp_vec": (64 + 8 + 3, "tight"), "warp_scalar": (75, "mixed"),
                "block_vec": (8 * 600 + 5, "tight"), "block_scalar": (8 * 600 + 5, "mixed"),
                "column": (40, None), "split_vec": (3 * 8192 + 77, "tight"),
                "split_scalar": (3 * 8192 + 77, "mixed")}


@pytest.mark.parametrize("path", list(TARGET_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_target_at_every_position(s, dtype, path):
    C, layout = TARGET_PATHS[path]
    e = elem(dtype)
    lay = {"tight": ("tight",) * 3, "mixed": (e, 8, 0), None: (0,) * 3}[layout]
    # < 256 rows: the split paths split them (launchers.h: ce_split_count)
    step = max(37, C // 100) | 1
    positions = sorted(set(range(10)) | set(range(C - 10, C)) | set(range(0, C, step)))
    g = torch.Generator().manual_seed(19)
    x = (torch.randn(len(positions), C, generator=g) * 2).to(dtype)
    t = torch.tensor(positions)
    w = torch.rand(C, generator=g) + 0.5
    for kw in (dict(reduction="sum"), dict(weight=w, label_smoothing=0.1)):
        r = s.cross_entropy(x, t, **kw, want_grad=True, layout=lay[0], target_layout=lay[1],
                            out_layout=lay[2])
        ref_loss, ref_gx, _ = ce_reference(x, t, **kw)
        lowp = ce_torch(x, t, **kw)
        name = f"{path} {dtype} {kw}"
        check(name + " loss", r["loss"], ref_loss, lowp[0], dtype)
        check(name + " grad_input", r["grad_input"], ref_gx, lowp[1], dtype)
        go = torch.tensor(0.75).to(dtype)
        rb = s.cross_entropy(x, t, **kw, grad_output=go, row_stats=r["row_stats"], want_grad=True,
                             layout=lay[0], target_layout=lay[1], out_layout=lay[2])
        _, ref_gx, _ = ce_reference(x, t, **kw, grad_output=go)
        lowp = ce_torch(x, t, **kw, grad_output=go)
        check(name + " bwd grad_input", rb["grad_input"], ref_gx, lowp[1], dtype)
        if layout != "mixed":  # in place: input and gradient share one buffer
            ri = s.cross_entropy(x, t, **kw, inplace=True, layout=lay[0],
                                 target_layout=lay[1], out_layout=lay[2])
            assert bitwise_equal(ri["grad_input"], r["grad_input"]), name + " in place"


@pytest.mark.parametrize("opt", ["index_mean", "index_weight_smooth_sum", "index_smooth_none",
                                 "index_weight_zloss_cap_mean", "index_cap_none"])
@pytest.mark.parametrize("layout", [0, "tight", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cross_entropy_split_rows(s, dtype, layout, opt):
    """Few long rows are split in S slices (partials merged in a fixed order): S = 2, 3 (a short
    last slice), 16 (the cap); vector and scalar walks; forward and backward. Device 0 is sm_90:
    a thread-block cluster per row (test_cuda_emu_cluster.py checks it against the two-kernel
    split of sm_80, bit for bit)."""
    lays = {0: (0, 0, 0), "tight": ("tight",) * 3, "mixed": (elem(dtype), 8, 0)}[layout]
    for N, C in [(1, 2 * 8192), (2, 3 * 8192 + 5), (3, 16 * 8192 + 9)]:
        run_ce_case(s, dtype, N, C, None, OPTIONS[opt], *lays)


@pytest.mark.parametrize("path", list(NONFINITE_PATHS) + ["split_vec"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_ignored_row_nonfinite(s, dtype, path):
    """An ignored row's gradient is torch's 0 * softmax: NaN where the softmax is NaN (a NaN,
    +inf, or all -inf logits), zeros otherwise (written without reading the row)."""
    C, D, layout = NONFINITE_PATHS.get(path, (3 * 8192 + 77, None, "tight"))
    e = elem(dtype)
    lay = (("tight",) * 3 if layout == "tight" else (e, 8, 0) if layout == "mixed" else (0,) * 3)
    g = torch.Generator().manual_seed(29)
    shape = (2, C) if D is None else (2, C, D)
    t = torch.tensor([-100, 1]) if D is None else torch.tensor([[-100] * D, [1] * D])
    for special, pos in ((None, 0), (float("nan"), C - 1), (float("inf"), C // 2),
                         (-float("inf"), 0), ("all -inf", 0)):
        x = (torch.randn(shape, generator=g) * 2).to(dtype)
        if special == "all -inf":
            x[0] = -float("inf")
        elif special is not None:
            x[0, pos] = special
        for kw in (dict(reduction="sum"), dict(label_smoothing=0.1, reduction="sum")):
            r = s.cross_entropy(x, t, **kw, want_grad=True, layout=lay[0], target_layout=lay[1],
                                out_layout=lay[2])
            _, ref_gx, _ = ce_reference(x, t, **kw)
            name = f"{path} {dtype} x[0, {pos}] = {special} {kw}"
            torch.testing.assert_close(r["grad_input"].double(), ref_gx, equal_nan=True,
                                       rtol=2e-2, atol=1e-3, msg=lambda m: f"{name}: {m}")


# The row, column, vector column (21 classes x 16 positions) and split-row kernels (the backward
# op's split is ce_split_grad_kernel on every device, sm_90 included).
GRAD_OUTPUT_PATHS = dict(NONFINITE_PATHS, column_vec=(21, 16, 0),
                         split=(2 * 8192 + 77, None, "tight"))
GRAD_OUTPUT_KERNELS = {"column_vec": "ce_column_vec_kernel", "split": "ce_split_grad_kernel"}


@pytest.mark.parametrize("path", list(GRAD_OUTPUT_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_nonfinite_grad_output_as_torch(s, dtype, path):
    """An infinite or NaN grad_output gives torch's NaN and +-inf positions. torch's log-softmax
    backward takes softmax_c times the sum of its incoming gradients from each of them: with
    class indices the target's entry is inf - inf = NaN (ours was go (p_y - 1) = -+inf), with
    label smoothing or probability targets every entry is; the other classes get +-inf p_c, an
    ignored row zeros. The backward op from the forward's statistics: 'none' with a grad_output
    per row (inf, -inf, NaN, 1.5, and inf at an ignored row), 'sum' and 'mean' with inf."""
    C, D, layout = GRAD_OUTPUT_PATHS[path]
    e = elem(dtype)
    lay = (("tight",) * 3 if layout == "tight" else (e, 8, 0) if layout == "mixed" else (0,) * 3)
    g = torch.Generator().manual_seed(31)
    N = 5
    shape = (N, C) if D is None else (N, C, D)
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    index = torch.randint(0, C, shape[:1] + shape[2:], generator=g)
    index[4] = -100
    probs = torch.softmax(torch.randn(shape, generator=g) * 3, 1).to(dtype)
    w = torch.rand(C, generator=g) + 0.5
    per_row = torch.tensor([math.inf, -math.inf, math.nan, 1.5, math.inf])
    per_row = per_row if D is None else per_row[:, None].expand(N, D)
    kernel = GRAD_OUTPUT_KERNELS.get(path)
    for t in (index, probs):
        for opts in (dict(), dict(weight=w, label_smoothing=0.1)):
            for reduction, go in (("none", per_row), ("sum", torch.tensor(math.inf)),
                                  ("mean", torch.tensor(-math.inf))):
                kw = dict(opts, reduction=reduction)
                stats = s.cross_entropy(x, t, **kw, layout=lay[0], target_layout=lay[1],
                                        out_layout=lay[2])["row_stats"]
                probs_target = t.is_floating_point()
                r = s.cross_entropy(x, t, **kw, grad_output=go, row_stats=stats,
                                    want_grad=True, want_target_grad=probs_target,
                                    layout=lay[0], target_layout=lay[1], out_layout=lay[2])
                name = f"{path} {dtype} probs {probs_target} {kw}"
                if kernel is not None and not probs_target:  # (probabilities: no split)
                    assert any(kernel in k for k in r["kernels"]), (name, r["kernels"])
                _, ref_gx, ref_gt = ce_reference(x, t, **kw, grad_output=go)
                # the target's gradient: inf at the row's max too (an FFMA made it NaN)
                for key, ref in (("grad_input", ref_gx), ("grad_target", ref_gt)):
                    if ref is None:
                        continue
                    ours = r[key].double()
                    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
                        assert torch.equal(kind(ours), kind(ref)), f"{name} {key}: {kind}"
                    fin = torch.isfinite(ref)
                    torch.testing.assert_close(ours[fin], ref[fin], rtol=2e-2, atol=1e-3,
                                               msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_backward_into_the_forwards_buffer(emu, dtype):
    """The *_bwd_into_ ops' flag (issue 13, defect 2): with a scalar grad_output of exactly 1
    (read on the device) the kernels leave the forward's gradient buffer untouched (here:
    still the NaN poison); any other grad_output recomputes it with grad_output folded in
    before the one rounding, so a half gradient whose grad_output-1 value overflows is finite
    (mse, x = 200, weight 200, grad_output 0.25: 20000, not 80000 = inf)."""
    x = torch.tensor([200.0, 3.0, -1.0]).to(dtype)
    y = torch.tensor([0.0, 1.0, 2.0]).to(dtype)
    w = torch.tensor([200.0, 1.0, 1.0]).to(dtype)
    logits = torch.randn(4, 70).to(dtype)
    labels = torch.tensor([3, 0, 69, 5])
    with emu.session() as s:
        stats = s.cross_entropy(logits, labels)["row_stats"]
        emu.lib.tl_emu_set_skip_if_grad_output_is_one(1)
        try:
            kept = s.pointwise("mse", x, y, w, reduction="sum", want_grad_input=True,
                               grad_output=torch.tensor(1.0))["grad_input"]
            assert kept.isnan().all(), kept
            ce_kept = s.cross_entropy(logits, labels, want_grad=True, row_stats=stats,
                                      grad_output=torch.tensor(1.0))["grad_input"]
            assert ce_kept.isnan().all()
            into = s.pointwise("mse", x, y, w, reduction="sum", want_grad_input=True,
                               grad_output=torch.tensor(0.25))["grad_input"]
            ce_into = s.cross_entropy(logits, labels, want_grad=True, row_stats=stats,
                                      grad_output=torch.tensor(0.7))["grad_input"]
        finally:
            emu.lib.tl_emu_set_skip_if_grad_output_is_one(0)
        plain = s.pointwise("mse", x, y, w, reduction="sum", want_grad_input=True,
                            grad_output=torch.tensor(0.25))["grad_input"]
        ce_plain = s.cross_entropy(logits, labels, want_grad=True, row_stats=stats,
                                   grad_output=torch.tensor(0.7))["grad_input"]
    assert torch.equal(into, plain) and torch.equal(ce_into, ce_plain)
    assert into[0] == torch.tensor(20000.0).to(dtype)  # finite: the g = 1 value, 80000, overflows half
    ref = torch.func.grad(lambda z: 0.7 * F.cross_entropy(z, labels))(logits.double())
    assert_flash_rule(ce_into, 0.7 * torch.func.grad(
        lambda z: F.cross_entropy(z, labels))(logits.float()).to(dtype), ref, "ce into")


def test_issue13_minimal_cases_on_the_cuda_kernels(s):
    """Issue 13's pointwise defects 3, 4, 5 and 7 through the CUDA kernels (the formulas are
    csrc/losses', shared with the CPU): values and forward-written gradients as torch's."""
    f64 = torch.float64

    def torch_grads(fn, x, y):
        x, y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        loss = fn(x, y)
        return (loss.detach(), *torch.autograd.grad(loss, (x, y)))

    def ours(kind, x, y, aux=None, param=0.0):
        r = s.pointwise(kind, x, y, aux=aux, param=param, reduction="sum",
                        want_grad_input=True, want_grad_target=True)
        return r["loss"], r["grad_input"], r["grad_target"]

    def same(a, b, what):
        for u, v, part in zip(a, b, ("loss", "grad_input", "grad_target")):
            torch.testing.assert_close(u, v, equal_nan=True, msg=f"{what} {part}")

    # 4: smooth_l1 with beta = 0 is l1: a NaN input has gradient 0.
    x, y = torch.tensor([float("nan"), 1.0], dtype=f64), torch.zeros(2, dtype=f64)
    same(ours("smooth_l1", x, y, param=0.0),
         torch_grads(lambda a, b: F.smooth_l1_loss(a, b, beta=0.0, reduction="sum"), x, y),
         "smooth_l1 beta=0")
    # 5: BCE-with-logits at x = -inf with pos_weight: loss inf, target gradient inf.
    x, y, pw = (torch.tensor([-float("inf"), 2.0], dtype=f64), torch.tensor([0.5, 0.3], dtype=f64),
                torch.tensor([0.5, 0.5], dtype=f64))
    same(ours("bce_with_logits", x, y, aux=pw),
         torch_grads(lambda a, b: F.binary_cross_entropy_with_logits(
             a, b, pos_weight=pw, reduction="sum"), x, y), "bce_with_logits -inf")
    # 7: hinge at NaN and infinite inputs: torch autograd's values of clamp_min(1 - y x, 0).
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.25], dtype=f64)
    y = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=f64)
    same(ours("hinge", x, y, param=1.0),
         torch_grads(lambda a, b: (1 - b * a).clamp_min(0).sum(), x, y), "hinge non-finite")
    # 3: a NaN target of BCE is outside [0, 1]: the kernel's device assert, as torch raises.
    with pytest.raises(EmulatorError, match="device-side assert"):
        ours("bce", torch.tensor([0.5], dtype=f64), torch.tensor([float("nan")], dtype=f64))

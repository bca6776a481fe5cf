"""Cross-entropy over the contiguous (N, C, D), D > 1, under the CUDA emulator: the vector column
kernel (one thread per V = 16 / sizeof(T) consecutive d, csrc/cuda/cross_entropy_impl.cuh
ce_column_vec_kernel) vs torch, and vs the scalar column kernel, which the same inputs take when
the logits (and a probability target) are one element off a 16-byte boundary: both vs torch.
The two kernels are not bitwise equal: the vector kernel's pass 1 folds V classes at once per
position (the row kernel's compute<V>: one max per V classes, the instruction budget of issue 8),
the scalar one a class at a time, so their sums of exp round differently (_assert_close_kernels
bounds the difference where torch gives no finite reference). The launch log says which kernel
ran."""
import pytest
import torch

from test_cuda_emu import (DTYPES, OPTIONS, VEC, ce_inputs, ce_kwargs, ce_reference, ce_torch,
                           check)
from tl_helpers import bitwise_equal

VECTOR, SCALAR = "ce_column_vec_kernel<", "ce_column_kernel<"


def _ran(r, kernel):
    return any(kernel in k for k in r["kernels"])


def _fwd_bwd(s, x, t, kw, prob, layout, weight_layout=0):
    """Forward (fused gradients for mean/sum) and the backward op (grad_output not 1)."""
    fused = kw["reduction"] != "none"
    lay = dict(layout=layout, target_layout=layout if prob else 0, out_layout=0,
               weight_layout=weight_layout)
    r = s.cross_entropy(x, t, **kw, want_grad=fused, want_target_grad=fused and prob, **lay)
    go = (torch.randn(r["loss"].shape, generator=torch.Generator().manual_seed(1))
          if kw["reduction"] == "none" else torch.tensor(0.75)).to(x.dtype)
    rb = s.cross_entropy(x, t, **kw, grad_output=go, row_stats=r["row_stats"], want_grad=True,
                         want_target_grad=prob, **lay)
    return r, rb, go


def _check_vs_torch(name, r, rb, go, x, t, kw, prob, dtype):
    fused = kw["reduction"] != "none"
    ref = ce_reference(x, t, **kw)
    lowp = ce_torch(x, t, **kw) if dtype != torch.float64 else (None,) * 3
    check(name + " loss", r["loss"], ref[0], lowp[0], dtype)
    if fused:
        check(name + " grad_input", r["grad_input"], ref[1], lowp[1], dtype)
        if prob:
            check(name + " grad_target", r["grad_target"], ref[2], lowp[2], dtype)
    ref = ce_reference(x, t, **kw, grad_output=go)
    lowp = ce_torch(x, t, **kw, grad_output=go) if dtype != torch.float64 else (None,) * 3
    check(name + " bwd grad_input", rb["grad_input"], ref[1], lowp[1], dtype)
    if prob:
        check(name + " bwd grad_target", rb["grad_target"], ref[2], lowp[2], dtype)


def _assert_close_kernels(name, a, b):
    """Vector vs scalar column kernel on inputs with infinite logits (no finite torch reference
    to hold both to): the same NaN and infinite entries, the finite ones within 4 ulp of their
    dtype (the statistics' sums round differently, see the module's docstring)."""
    for key in ("row_stats", "loss", "grad_input", "grad_target"):
        if a.get(key) is None:
            continue
        u, v = a[key], b[key]
        assert torch.equal(u.isnan(), v.isnan()), f"{name} {key}: NaN positions differ"
        fin = ~u.isnan()
        assert torch.equal(u[u.isinf()], v[u.isinf()]), f"{name} {key}: infinities differ"
        fin &= ~u.isinf()
        eps = torch.finfo(u.dtype).eps
        torch.testing.assert_close(u[fin], v[fin], rtol=4 * eps, atol=4 * eps,
                                   msg=lambda m: f"{name} {key}: {m}")


def run_column_case(s, dtype, N, C, D, opts, x=None, t=None, seed=0, vs_torch=True):
    g = torch.Generator().manual_seed(seed)
    prob = opts["prob"]
    x0, t0, w = ce_inputs(N, C, D, dtype, prob, g, ignore_index=opts.get("ignore_index", -100))
    x = x0 if x is None else x
    t = t0 if t is None else t
    kw = ce_kwargs(opts, w)
    name = f"{dtype} {N}x{C}x{D} {opts}"
    vec = D > 1 and D % VEC[dtype] == 0
    r, rb, go = _fwd_bwd(s, x, t, kw, prob, layout=0)
    for res in (r, rb):
        assert _ran(res, VECTOR) == vec and _ran(res, SCALAR) == (not vec), (name, res["kernels"])
    if vs_torch:
        _check_vs_torch(name, r, rb, go, x, t, kw, prob, dtype)
    if vec:  # the same inputs one element off a 16-byte boundary: the scalar column kernel
        r1, rb1, _ = _fwd_bwd(s, x, t, kw, prob, layout=x.element_size())
        assert _ran(r1, SCALAR) and not _ran(r1, VECTOR), (name, r1["kernels"])
        if vs_torch:
            _check_vs_torch(name + " scalar kernel", r1, rb1, go, x, t, kw, prob, dtype)
        else:
            _assert_close_kernels(name + " fwd", r, r1)
            _assert_close_kernels(name + " bwd", rb, rb1)


DS = [1, 2, 3, 7, 8, 9, 16, 24, 33]


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_small_classes(s, dtype, opt):
    for D in DS:
        for C in (1, 5, 8):  # 8: whole chunks of V classes (bf16), C % V != 0 (double)
            run_column_case(s, dtype, 3, C, D, OPTIONS[opt])


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_many_classes(s, dtype, opt):
    # 70 classes: 35 unrolled pairs of class vectors per thread
    for D in (2, 8, 9, 16):
        run_column_case(s, dtype, 2, 70, D, OPTIONS[opt])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_ignored_groups_and_nonfinite(s, dtype):
    """Whole groups of V ignored positions (their gradient zeros, the row not read), groups mixing
    ignored and counted positions, an ignored position with a NaN logit (its gradient NaN, as
    torch's 0 * softmax); then +-inf logits in counted positions (infinite or NaN losses, where
    the flash rule does not apply: vs the scalar column kernel only)."""
    v = VEC[dtype]
    N, C, D = 2, 6, 4 * v
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(N, C, D, generator=g) * 2).to(dtype)
    t = torch.randint(0, C, (N, D), generator=g)
    t[0, :v] = -100            # a whole group ignored, finite
    t[0, v:2 * v:2] = -100     # half a group ignored
    t[1, :v] = -100            # a whole group ignored, one NaN logit in it
    x[1, 2, 3] = float("nan")
    xinf = x.clone()
    xinf[0, 1, 2 * v + 1] = float("inf")
    xinf[1, 4, 3 * v] = float("-inf")
    for opt in ("index_mean", "index_weight_smooth_sum", "index_smooth_none",
                "index_weight_zloss_cap_mean"):
        opts = dict(OPTIONS[opt], ignore_index=-100)
        run_column_case(s, dtype, N, C, D, opts, x=x, t=t)
        run_column_case(s, dtype, N, C, D, opts, x=xinf, t=t, vs_torch=False)


# Label smoothing with the other options the vector kernel's smoothing loops run under.
SMOOTH_OPTIONS = [dict(reduction="sum"), dict(reduction="mean", z_loss=0.05),
                  dict(reduction="none", softcap=3.0),
                  dict(reduction="mean", softcap=3.0, z_loss=0.1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_smoothing_weight_modes(s, dtype):
    """The vector kernel's smoothing passes load each class's weight once for a thread's V
    positions (pass 1: V classes at a time, then the C % V tail; pass 2: one class at a time),
    three ways: no weights, 16-byte loads from the weights where they are 16-byte aligned, from
    their shifted copies (ce_weight_copies_kernel) where they are not. Each vs torch: the forward
    with its fused gradient and the backward op, every 5th position ignored (its lanes share the
    weights with counted ones), with z-loss, soft-capping and every reduction."""
    v = VEC[dtype]
    off = 8 if dtype == torch.float64 else 4  # weights (accumulation type) off a 16-byte boundary
    for D in (v, 2 * v, 3 * v):  # bf16/fp16: 8, 16, 24
        for C in (v - 1, 19):  # only a tail; whole chunks of V classes and a tail (C % V != 0)
            x, t, w = ce_inputs(2, C, D, dtype, False, torch.Generator().manual_seed(7 + D))
            for weight, weight_layout in ((None, 0), (w, 0), (w, off)):
                for opts in SMOOTH_OPTIONS:
                    kw = dict(weight=weight, label_smoothing=0.1, **opts)
                    r, rb, go = _fwd_bwd(s, x, t, kw, False, 0, weight_layout)
                    assert _ran(r, VECTOR) and _ran(rb, VECTOR), (r["kernels"], rb["kernels"])
                    copied = any("ce_weight_copies_kernel" in k for k in r["kernels"])
                    assert copied == (weight_layout != 0), r["kernels"]
                    name = (f"{dtype} 2x{C}x{D} weight {weight is not None} at "
                            f"+{weight_layout} B {opts}")
                    _check_vs_torch(name, r, rb, go, x, t, kw, False, dtype)


TAIL_OPTIONS = [dict(prob=False, weight=True, label_smoothing=0.1, reduction="sum"),
                dict(prob=True, weight=True, label_smoothing=0.05, reduction="mean"),
                dict(prob=True, reduction="none", softcap=2.5, z_loss=0.02)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_every_tail(s, dtype):
    """Every C % V: pass 1 folds the last C % V classes of a position in chunks of V / 2, ..., 1
    classes (lanes_walk_tail), each chunk loading its class weights once for the V positions (16
    bytes at once for a chunk of 4 float weights, from the weights or their shifted copy), vs
    torch with both gradients: class index and probability targets, label smoothing, class
    weights, soft-capping and z-loss."""
    v = VEC[dtype]
    off = 8 if dtype == torch.float64 else 4  # weights (accumulation type) off a 16-byte boundary
    D = 2 * v
    for C in range(v, 2 * v):
        for opts in TAIL_OPTIONS:
            prob = opts["prob"]
            x, t, w = ce_inputs(2, C, D, dtype, prob, torch.Generator().manual_seed(C))
            for weight_layout in ((0, off) if opts.get("weight") else (0,)):
                kw = ce_kwargs(opts, w)
                r, rb, go = _fwd_bwd(s, x, t, kw, prob, 0, weight_layout)
                assert _ran(r, VECTOR) and _ran(rb, VECTOR), (r["kernels"], rb["kernels"])
                name = f"{dtype} 2x{C}x{D} weight at +{weight_layout} B {opts}"
                _check_vs_torch(name, r, rb, go, x, t, kw, prob, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_in_place(s, dtype):
    """grad_input aliasing the input (the fused forward writes the gradient over the logits)."""
    v = VEC[dtype]
    N, C, D = 2, 5, 2 * v
    for opt in ("index_weight_smooth_sum", "prob_smooth_mean", "index_cap_none"):
        opts = OPTIONS[opt]
        if opts.get("reduction") == "none":
            continue
        x, t, w = ce_inputs(N, C, D, dtype, opts["prob"], torch.Generator().manual_seed(5))
        kw = ce_kwargs(opts, w)
        ref = s.cross_entropy(x, t, **kw, want_grad=True)
        r = s.cross_entropy(x, t, **kw, want_grad=True, inplace=True)
        assert _ran(r, VECTOR)
        assert bitwise_equal(r["grad_input"], ref["grad_input"]), (dtype, opt)
        assert bitwise_equal(r["loss"], ref["loss"]), (dtype, opt)


def test_columns_misaligned_target_takes_the_scalar_kernel(s):
    """A probability target (or gradient) off a 16-byte boundary while the logits are aligned:
    the launch glue must not take the vector kernel (it would fault)."""
    dtype = torch.float32
    x, t, _ = ce_inputs(2, 5, 8, dtype, True, torch.Generator().manual_seed(2))
    r = s.cross_entropy(x, t, want_grad=True, want_target_grad=True, target_layout=4)
    assert _ran(r, SCALAR) and not _ran(r, VECTOR), r["kernels"]
    r = s.cross_entropy(x, t, want_grad=True, out_layout=4)
    assert _ran(r, SCALAR) and not _ran(r, VECTOR), r["kernels"]
    ref = ce_reference(x, t)
    check("misaligned out", r["grad_input"], ref[1], ce_torch(x, t)[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_columns_prob_modes_and_per_position_max(s, dtype):
    """Probability targets on the vector kernel, its pass 1 in each launch mode (class weights
    none or given x label smoothing off or on): a logit of 200 at another class for each
    position (every lane of a thread's V positions, every class of a chunk of V classes and of
    the C % V tail), so that a per-position max (16-bit: packed over the V class vectors) that
    missed its spike would leave exp(200) to overflow; vs torch and the scalar kernel. Then a NaN
    logit at one position and class: the vector and the scalar kernel agree (NaN there only)."""
    v = VEC[dtype]
    N, C, D = 2, 2 * v + 3, 2 * v
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, C, D, generator=g) * 2
    for n in range(N):
        for d in range(D):
            x[n, (d + n * D) % C, d] = 200.0
    x = x.to(dtype)
    xnan = x.clone()
    xnan[0, v - 1, 1] = float("nan")
    for weight in (False, True):
        for eps in (0.0, 0.1):
            opts = dict(prob=True, weight=weight, label_smoothing=eps, reduction="sum")
            run_column_case(s, dtype, N, C, D, opts, x=x)
            run_column_case(s, dtype, N, C, D, opts, x=xnan, vs_torch=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_columns_prob_grad_scales(s, dtype):
    """The vector kernel's 16-bit input gradient of probability targets with class weights takes
    its softmax coefficient sg tw into the exp's exponent where that is finite and of one sign
    (+0 and -0 included) for all V positions of a thread (Pass2Prob's kScaledExp), else the
    plain form. A grad_output per position (reduction 'none'): row 0 positive scales from the
    dtype's tiny to its huge ones (the scaled form); row 1 the same with a negative one in each
    thread's V positions, row 2 negated targets at one position of each (the plain form for
    those threads), row 3 zero targets there (sg tw = +0 without smoothing: the scaled form);
    row 4 row 0's scales negated, -0 at one position of each thread (the negative scaled form).
    Input and target gradients vs torch, position by position (flash rule)."""
    from test_cuda_emu_row_loops import (_GRAD_SCALES, check_prob_grads_at,
                                         prob_backward_vs_torch)
    v = VEC[dtype]
    N, C, D = 5, 2 * v + 3, 2 * v
    g = torch.Generator().manual_seed(27)
    x = (torch.randn(N, C, D, generator=g) * 3).to(dtype)
    t = torch.softmax(torch.randn(N, C, D, generator=g) * 3, 1)
    t[2, :, 1::v] *= -1
    t[3, :, 1::v] = 0
    t = t.to(dtype)
    scales = [abs(c) for c in _GRAD_SCALES[dtype] if c != 0]
    go = torch.tensor([scales[d % len(scales)] for d in range(D)]).repeat(N, 1)
    go[1, ::v] = -2.0
    go[4] = -go[0]
    go[4, 2::v] = -0.0
    go = go.to(dtype)
    w = torch.rand(C, generator=g) + 0.5
    for eps in (0.0, 0.1):
        kw = dict(weight=w, label_smoothing=eps, reduction="none")
        r, torch_grads = prob_backward_vs_torch(s, x, t, kw, go)
        assert _ran(r, VECTOR), r["kernels"]
        for n in range(N):
            for d in range(D):
                name = f"{dtype} eps {eps} position {n, d} grad_output {go[n, d].item():.3g}"
                check_prob_grads_at(name, r, torch_grads, (n, slice(None), d), dtype)

"""Issue 9's LLM-training extras of the cross-entropy losses: z_loss (z lse^2 per non-ignored
position), softcap (logits -> softcap tanh(x / softcap) before the softmax) and return_lse, in
cross_entropy / CrossEntropyLoss / linear_cross_entropy / LinearCrossEntropyLoss, against a
composite of torch ops (tl_helpers.ce_extras_reference) run in float64."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torch_losses as TL
import torch_losses.functional as TLF
from tl_helpers import assert_close, assert_flash_rule, ce_extras_reference, leaf

ops = torch.ops.torch_losses
REDUCTIONS = ["none", "mean", "sum"]
EXTRAS = [dict(z_loss=0.1), dict(softcap=1.5), dict(z_loss=0.05, softcap=2.0)]
EXTRA_IDS = ["z", "cap", "z+cap"]


def _case(kind, device, dtype=torch.float64, scale=2.0):
    """(input, target, kwargs) for a target kind: class indices with ignored positions, class
    weights, label smoothing, (N, C, d) inputs, probability targets."""
    g = torch.Generator().manual_seed(hash(kind) % 1000)

    def randn(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(
            device)

    if kind == "index":
        x, t = randn(6, 5), torch.randint(0, 5, (6,), generator=g).to(device)
        t[2] = -100
        return x, t, {}
    if kind == "index_weight_ignore_smooth":
        x, t = randn(7, 4), torch.randint(0, 4, (7,), generator=g).to(device)
        t[[1, 4]] = 2
        w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
        return x, t, dict(weight=w, ignore_index=2, label_smoothing=0.15)
    if kind == "index_3d":
        x, t = randn(3, 5, 4), torch.randint(0, 5, (3, 4), generator=g).to(device)
        t[0, 1] = -100
        return x, t, dict(label_smoothing=0.1)
    if kind == "index_1d":
        return randn(6), torch.tensor(3, device=device), {}
    if kind == "probs":
        x = randn(5, 6)
        t = torch.softmax(randn(5, 6).double(), 1).to(dtype)
        return x, t, {}
    if kind == "probs_3d_weight_smooth":
        x = randn(2, 4, 3)
        t = torch.softmax(randn(2, 4, 3).double(), 1).to(dtype)
        w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
        return x, t, dict(weight=w, label_smoothing=0.1)
    raise ValueError(kind)


KINDS = ["index", "index_weight_ignore_smooth", "index_3d", "index_1d", "probs",
         "probs_3d_weight_smooth"]


@pytest.mark.parametrize("extras", EXTRAS, ids=EXTRA_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind, reduction, extras, device):
    x, t, kw = _case(kind, device)
    probs = t.is_floating_point()
    inputs = (leaf(x), leaf(t) if probs else t)

    def f(x, t):
        return TLF.cross_entropy(x, t, reduction=reduction, **kw, **extras)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)  # double backward: the composite


@pytest.mark.parametrize("extras", EXTRAS, ids=EXTRA_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_composite(kind, reduction, extras, device):
    """Loss and gradients (input; probability target) for grad_output 1 (the forward's fused
    gradient), 0.7 (recomputed into it) and per position ('none')."""
    x, t, kw = _case(kind, device)
    probs = t.is_floating_point()
    xo, xr = leaf(x), leaf(x)
    to, tr = (leaf(t), leaf(t)) if probs else (t, t)
    ours = TLF.cross_entropy(xo, to, reduction=reduction, **kw, **extras)
    ref = ce_extras_reference(xr, tr, reduction=reduction, **kw, **extras)
    assert_close(ours, ref.detach(), msg="loss")
    for go in [torch.ones_like(ref), torch.full_like(ref, 0.7), torch.rand_like(ref) + 0.2]:
        inputs_o = [xo, to] if probs else [xo]
        inputs_r = [xr, tr] if probs else [xr]
        go_o = torch.autograd.grad(ours, inputs_o, go, retain_graph=True)
        go_r = torch.autograd.grad(ref, inputs_r, go, retain_graph=True)
        for a, b in zip(go_o, go_r):
            assert_close(a, b, msg="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extras", EXTRAS, ids=EXTRA_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["index_weight_ignore_smooth", "index_3d", "probs"])
def test_low_precision_flash_rule(kind, reduction, extras, dtype, device):
    """float32/bf16: error vs the float64 composite no worse than 2x that of the same composite
    run by torch in the dtype (larger logits and rows, so that capping and z-loss matter)."""
    g = torch.Generator().manual_seed(1)
    N, C = 64, 300
    x = (torch.randn(N, C, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
    kw = {}
    if kind == "probs":
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64) * 3, 1)
        t = t.to(dtype).to(device)
    else:
        t = torch.randint(0, C, (N,), generator=g).to(device)
        t[::7] = -100
        if kind == "index_3d":
            x, t = x.reshape(16, 4, C).transpose(1, 2), t.reshape(16, 4)
            kw = dict(label_smoothing=0.1)
        else:
            kw = dict(weight=(torch.rand(C, generator=g) + 0.5).to(dtype).to(device),
                      label_smoothing=0.1)
    probs = t.is_floating_point()

    def run(fn, x, t, kwargs):
        xl = leaf(x)
        tl = leaf(t) if probs else t
        loss = fn(xl, tl, reduction=reduction, **kwargs, **extras)
        go = torch.ones_like(loss)
        return (loss.detach(), *torch.autograd.grad(loss, [xl, tl] if probs else [xl], go))

    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref = run(ce_extras_reference, x.double(), t.double() if probs else t, kw64)
    ours = run(TLF.cross_entropy, x, t, kw)
    theirs = run(ce_extras_reference, x, t, kw)
    for name, a, b, r in zip(["loss", "grad_input", "grad_target"], ours, theirs, ref):
        assert_flash_rule(a, b, r, name=f"{dtype} {kind} {reduction} {extras} {name}")


@pytest.mark.parametrize("kind", ["index", "index_weight_ignore_smooth", "index_3d",
                                  "index_1d", "probs_3d_weight_smooth"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_return_lse(kind, dtype, device):
    """return_lse=True: (loss, lse), lse of the (capped) logits for every position (ignored ones
    included), detached, float32 (float64 for float64), shaped like the 'none' loss; the loss is
    the one without return_lse, bit for bit."""
    x, t, kw = _case(kind, device, dtype)
    for extras in [{}, dict(softcap=1.5, z_loss=0.01)]:
        for reduction in REDUCTIONS:
            xl = leaf(x)
            loss, lse = TLF.cross_entropy(xl, t, reduction=reduction, return_lse=True, **kw,
                                          **extras)
            plain = TLF.cross_entropy(leaf(x), t, reduction=reduction, **kw, **extras)
            assert torch.equal(loss, plain)
            assert loss.requires_grad and not lse.requires_grad
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert lse.dtype == acc
            none_shape = x.shape[:1] + x.shape[2:] if x.dim() > 1 else torch.Size([])
            assert lse.shape == none_shape
            capped = x.double()
            if "softcap" in extras:
                capped = extras["softcap"] * torch.tanh(capped / extras["softcap"])
            expected = torch.logsumexp(capped, 0 if x.dim() == 1 else 1).to(acc)
            # float32 lse; 16-bit rows use the approximate exp (and cap) on a GPU
            tol = {torch.float64: None, torch.float32: 1e-6, torch.bfloat16: 1e-5}[dtype]
            assert_close(lse, expected, dtype=None if tol else dtype, rtol=tol, atol=tol)
            loss.sum().backward()  # the loss still trains


def test_defaults_are_the_plain_loss():
    """The extras off (z_loss=0, softcap=None) give the drop-in loss and gradient, bit for bit."""
    x, t, kw = _case("index_weight_ignore_smooth", "cpu", torch.float32)
    a, b = leaf(x), leaf(x)
    la = TLF.cross_entropy(a, t, **kw)
    lb = TLF.cross_entropy(b, t, **kw, z_loss=0.0, softcap=None)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)
    ref = F.cross_entropy(leaf(x), t, **kw)
    assert_close(la, ref.detach())


def test_z_loss_reduction_semantics():
    """'mean' divides the z-loss sum by the cross-entropy's denominator (summed class weights
    of the non-ignored targets); ignored positions add nothing; no class weighting."""
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0, 2, -100, 1])
    w = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    z = 0.3
    lse = torch.logsumexp(x, 1)
    z_terms = z * lse[[0, 1, 3]] ** 2
    ce_sum = F.cross_entropy(x, t, w, reduction="sum")
    assert_close(TLF.cross_entropy(x, t, w, reduction="sum", z_loss=z), ce_sum + z_terms.sum())
    denominator = w[0] + w[2] + w[1]
    assert_close(TLF.cross_entropy(x, t, w, z_loss=z), (ce_sum + z_terms.sum()) / denominator)
    none = TLF.cross_entropy(x, t, w, reduction="none", z_loss=z)
    assert none[2] == 0
    assert_close(none[[0, 1, 3]], F.cross_entropy(x, t, w, reduction="none")[[0, 1, 3]] + z_terms)
    # probability targets: every row, 'mean' over the rows
    p = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1)
    assert_close(TLF.cross_entropy(x, p, z_loss=z),
                 F.cross_entropy(x, p) + z * (lse ** 2).mean())


def test_softcap_with_infinite_logits():
    """Capping maps +-inf to +-softcap: the loss stays finite, as the composite's."""
    x = torch.tensor([[float("inf"), 0.0, -float("inf")], [1.0, 2.0, 3.0]], dtype=torch.float64)
    t = torch.tensor([1, 2])
    xl = leaf(x)
    loss = TLF.cross_entropy(xl, t, softcap=2.0, z_loss=0.1)
    loss.backward()
    xr = leaf(x)
    ref = ce_extras_reference(xr, t, softcap=2.0, z_loss=0.1)
    ref.backward()
    assert_close(loss, ref.detach())
    assert_close(xl.grad, xr.grad)


def test_probability_targets_with_differentiable_weight():
    """A class weight that requires grad (probability targets) takes the weighted-target route:
    the z-loss stays unweighted, and weight gets the composite's gradient."""
    x, t, kw = _case("probs_3d_weight_smooth", "cpu")
    extras = dict(z_loss=0.1, softcap=2.0, label_smoothing=0.1)
    xo, wo, xr, wr = leaf(x), leaf(kw["weight"]), leaf(x), leaf(kw["weight"])
    loss = TLF.cross_entropy(xo, t, wo, **extras)
    ref = ce_extras_reference(xr, t, wr, **extras)
    assert_close(loss, ref.detach())
    for a, b in zip(torch.autograd.grad(loss, [xo, wo]), torch.autograd.grad(ref, [xr, wr])):
        assert_close(a, b)


def test_no_class():
    """C = 0: nothing to fuse; the composite's result (nan), and an lse of -inf."""
    x, t = torch.randn(4, 0), torch.zeros(4, 0)
    loss, lse = TLF.cross_entropy(x, t, z_loss=0.1, softcap=2.0, return_lse=True)
    ref = ce_extras_reference(x, t, z_loss=0.1, softcap=2.0)
    assert loss.isnan() and ref.isnan()
    assert lse.shape == (4,) and (lse == -math.inf).all()


def test_inplace_backward_with_extras():
    x, t, kw = _case("index_weight_ignore_smooth", "cpu")
    extras = dict(z_loss=0.05, softcap=2.0)
    src = leaf(x)
    logits = src * 1.0  # not a leaf: inplace_backward overwrites it
    TLF.cross_entropy(logits, t, **kw, **extras, inplace_backward=True).mul(0.6).backward()
    xr = leaf(x)
    (0.6 * ce_extras_reference(xr, t, **kw, **extras)).backward()
    assert_close(src.grad, xr.grad)


def test_retained_graph_second_backward():
    """A second backward (retain_graph) recomputes with cross_entropy_bwd: the same gradient."""
    x, t, kw = _case("probs_3d_weight_smooth", "cpu")
    extras = dict(z_loss=0.05, softcap=2.0)
    xl, tl = leaf(x), leaf(t)
    loss = TLF.cross_entropy(xl, tl, **kw, **extras)
    g1 = torch.autograd.grad(loss, [xl, tl], retain_graph=True)
    g2 = torch.autograd.grad(loss, [xl, tl])
    for a, b in zip(g1, g2):
        assert_close(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module(reduction, device):
    x, t, kw = _case("index_weight_ignore_smooth", device)
    m = TL.CrossEntropyLoss(**kw, reduction=reduction, z_loss=0.05, softcap=2.0,
                            return_lse=True)
    assert "z_loss=0.05" in repr(m) and "softcap=2.0" in repr(m)
    xl, xr = leaf(x), leaf(x)
    loss, lse = m(xl, t)
    ref = ce_extras_reference(xr, t, reduction=reduction, **kw, z_loss=0.05, softcap=2.0)
    assert_close(loss, ref.detach())
    assert lse.shape == (x.shape[0],)
    torch.autograd.grad(loss.sum(), xl)
    plain = TL.CrossEntropyLoss(**kw, reduction=reduction)
    assert torch.is_tensor(plain(x, t)) and repr(plain) == repr(torch.nn.CrossEntropyLoss())


@pytest.mark.parametrize("bad, error, match", [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=math.inf), ValueError, "softcap"),
    (dict(softcap=math.nan), ValueError, "softcap"),
    (dict(softcap="1"), TypeError, "softcap"),
    (dict(z_loss=-1e-4), ValueError, "z_loss"),
    (dict(z_loss=math.nan), ValueError, "z_loss"),
    (dict(z_loss=None), TypeError, "z_loss"),
    (dict(return_lse=1), TypeError, "return_lse"),
    (dict(return_lse="yes"), TypeError, "return_lse"),
])
def test_bad_arguments(bad, error, match):
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(error, match=match):
        TLF.cross_entropy(x, t, **bad)
    with pytest.raises(error, match=match):
        TL.CrossEntropyLoss(**bad)
    with pytest.raises(error, match=match):
        TLF.linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), t, **bad)
    with pytest.raises(error, match=match):
        TL.LinearCrossEntropyLoss(2, 4, **bad)


def test_ops_reject_bad_extras():
    x, t = torch.randn(3, 4, 1), torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="z_loss"):
        ops.cross_entropy_fwd(x, t, None, -100, 0.0, 1, False, False, -1.0, None)
    with pytest.raises(ValueError, match="softcap"):
        ops.cross_entropy_fwd(x, t, None, -100, 0.0, 1, False, False, 0.0, 0.0)


@pytest.mark.parametrize("cap", [41.0, 55.0, 30.0])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("D", [None, 37], ids=["rows", "columns"])
def test_saturated_softcap_has_zero_gradient(cap, probs, D, device):
    """A logit far beyond the cap: tanh = 1 exactly in float32, so torch's 1 - tanh^2 is 0.
    The CPU took t = capped x (1 / cap), which for caps such as 41 and 55 is 1 - 2^-24 (a
    factor 1.2e-7 where torch has 0); it divides now. Everything else as the composite."""
    g = torch.Generator().manual_seed(int(cap))
    shape = (4, 6) if D is None else (4, 6, D)
    x = torch.randn(shape, generator=g) * 2
    x[:, 2] = 1e4
    x[:, 4] = -1e4
    x = x.to(device)
    t = (torch.softmax(torch.randn(shape, generator=g), 1) if probs
         else torch.randint(0, 6, shape[:1] + shape[2:], generator=g)).to(device)
    xo, xt = leaf(x), leaf(x)
    lo = TLF.cross_entropy(xo, t, softcap=cap, reduction="sum")
    lt = ce_extras_reference(xt, t, softcap=cap, reduction="sum")
    go = torch.autograd.grad(lo, xo)[0]
    gt = torch.autograd.grad(lt, xt)[0]
    assert torch.equal(gt[:, [2, 4]], torch.zeros_like(gt[:, [2, 4]]))
    assert torch.equal(go[:, [2, 4]], gt[:, [2, 4]])
    assert_close(lo, lt.detach())
    assert_close(go, gt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_softcap_outside_the_accumulation_range(dtype, device):
    """The kernels scale by 1 / softcap in the accumulation type (float32, float64 for float64):
    a subnormal softcap (its reciprocal overflows: NaN at a zero logit) or one beyond the type's
    largest value is a ValueError on every path; the extremes of the normal range still match
    the composite."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tiny, huge = torch.finfo(acc).tiny, torch.finfo(acc).max
    x = torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, 1e-3]], dtype=dtype, device=device)
    t = torch.tensor([0, 2], device=device)
    for cap in (tiny / 4, huge * 2 if acc == torch.float32 else None):
        if cap is None:  # (no finite double above float64's max)
            continue
        with pytest.raises(ValueError, match="softcap must lie in"):
            TLF.cross_entropy(x, t, softcap=cap)
        with pytest.raises(ValueError, match="softcap must lie in"):
            TLF.linear_cross_entropy(x, torch.eye(3, dtype=dtype, device=device), t, softcap=cap)
        with pytest.raises(ValueError, match="softcap must lie in"):
            ops.vocab_parallel_ce_stats(x, t, None, 0, -100, 0.0, cap)
    for cap in (tiny, huge):
        xl, xr = leaf(x), leaf(x.double())
        loss = TLF.cross_entropy(xl, t, softcap=cap)
        ref = ce_extras_reference(xr, t, softcap=cap)
        assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, xl)[0]).all()
        assert_close(loss.double(), ref.detach(), dtype=dtype)


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_opcheck(probs, device):
    g = torch.Generator().manual_seed(0)
    N, C, D = 3, 5, 2
    x = torch.randn(N, C, D, generator=g).to(device)
    if probs:
        t = torch.softmax(torch.randn(N, C, D, generator=g), 1).to(device)
    else:
        t = torch.randint(0, C, (N, D), generator=g).to(device)
        t[0, 0] = -100
    w = (torch.rand(C, generator=g) + 0.5).to(device)
    for z, cap in [(0.1, 2.0), (0.0, 1.5), (0.05, None)]:
        for red in (0, 1, 2):
            opcheck(ops.cross_entropy_fwd, (x, t, w, -100, 0.1, red, True, probs, z, cap))
            _, stats, _, _ = ops.cross_entropy_fwd(x, t, w, -100, 0.1, red, False, False, z, cap)
            go = torch.rand((N, D) if red == 0 else (), device=device)
            opcheck(ops.cross_entropy_bwd, (go, x, t, w, stats, -100, 0.1, red, True, probs, z,
                                            cap))
            if red:
                gx, gt = torch.empty_like(x), torch.empty_like(x) if probs else x.new_empty(0)
                opcheck(ops.cross_entropy_bwd_into_, (gx, gt, go, x, t, w, stats, -100, 0.1, red,
                                                      z, cap))
            if not probs:
                opcheck(ops.cross_entropy_fwd_inplace, (x.clone(), t, w, -100, 0.1, red, z, cap))


def test_torch_compile_fullgraph(device):
    x, t, kw = _case("index_weight_ignore_smooth", device, torch.float32)

    def step(x, t):
        loss, lse = TLF.cross_entropy(x, t, **kw, z_loss=0.05, softcap=2.0, return_lse=True)
        return loss, lse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc, xe = leaf(x), leaf(x)
    lc, lsec = compiled(xc, t)
    le, lsee = step(xe, t)
    assert_close(lc, le)
    assert_close(lsec, lsee)
    lc.backward()
    le.backward()
    assert_close(xc.grad, xe.grad)


# ---- linear_cross_entropy ------------------------------------------------------------------
def _linear_case(device, probs, N=11, H=5, C=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(N, H, generator=g, dtype=torch.float64)).to(dtype).to(device)
    w = (torch.randn(C, H, generator=g, dtype=torch.float64)).to(dtype).to(device)
    b = (torch.randn(C, generator=g, dtype=torch.float64)).to(dtype).to(device)
    if probs:
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1)
        t = t.to(dtype).to(device)
    else:
        t = torch.randint(0, C, (N,), generator=g).to(device)
        t[[1, N - 1]] = 3
    cw = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    return x, w, b, t, cw


@pytest.mark.parametrize("extras", EXTRAS, ids=EXTRA_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_linear_cross_entropy_matches_composite(probs, reduction, extras, device):
    """Chunks of 4 rows (N = 11: the last chunk is short), class weights, label smoothing,
    ignore_index (class indices); grad_output 1, 0.7 and per row; return_lse."""
    x, w, b, t, cw = _linear_case(device, probs)
    kw = dict(weight=cw, label_smoothing=0.1)
    if not probs:
        kw["ignore_index"] = 3
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4) if hasattr(
        torch.nn, "LinearCrossEntropyOptions") else None
    chunking = dict(options=options) if options is not None else dict(chunk_bytes=4 * 7 * 8)
    ours_in = [leaf(x), leaf(w), leaf(b)]
    ref_in = [leaf(x), leaf(w), leaf(b)]
    loss, lse = TLF.linear_cross_entropy(ours_in[0], ours_in[1], t, linear_bias=ours_in[2],
                                         reduction=reduction, return_lse=True, **chunking,
                                         **kw, **extras)
    logits = F.linear(ref_in[0], ref_in[1], ref_in[2])
    ref = ce_extras_reference(logits, t, reduction=reduction, **kw, **extras)
    assert_close(loss, ref.detach(), msg="loss")
    capped = logits.detach()
    if "softcap" in extras:
        capped = extras["softcap"] * torch.tanh(capped / extras["softcap"])
    assert_close(lse, capped.logsumexp(1), msg="lse")
    assert not lse.requires_grad
    for go in [torch.ones_like(ref), torch.full_like(ref, 0.7), torch.rand_like(ref) + 0.2]:
        a = torch.autograd.grad(loss, ours_in, go, retain_graph=True)
        r = torch.autograd.grad(ref, ref_in, go, retain_graph=True)
        for ga, gr in zip(a, r):
            assert_close(ga, gr, msg="grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_gradcheck(reduction, device):
    x, w, b, t, cw = _linear_case(device, False, N=5, H=3, C=4)
    t[2] = -100

    def f(x, w, b):
        return TLF.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction=reduction,
                                        chunk_bytes=2 * 4 * 8, z_loss=0.1, softcap=1.5)

    inputs = (leaf(x), leaf(w), leaf(b))
    # The first backward hands out the forward's gradients, gradcheck's further ones recompute
    # them chunk by chunk: equal up to rounding (as in test_linear_cross_entropy).
    assert torch.autograd.gradcheck(f, inputs, nondet_tol=1e-12)
    assert torch.autograd.gradgradcheck(f, inputs, nondet_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_low_precision(dtype, device):
    x, w, b, t, cw = _linear_case(device, False, N=40, H=16, C=300, dtype=dtype)
    x, w = x * 2, w * 2
    extras = dict(z_loss=0.02, softcap=5.0)

    def run(fn, x, w, b):
        xs = [leaf(x), leaf(w), leaf(b)]
        loss = fn(*xs)
        return (loss.detach(), *torch.autograd.grad(loss, xs))

    def ours(x, w, b):
        return TLF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_bytes=16 * 300 * 4,
                                        **extras)

    def composite(x, w, b):
        return ce_extras_reference(F.linear(x, w, b), t, **extras)

    ref = run(composite, x.double(), w.double(), b.double())
    for name, a, th, r in zip(["loss", "input", "weight", "bias"], run(ours, x, w, b),
                              run(composite, x, w, b), ref):
        assert_flash_rule(a, th, r, name=f"{dtype} {name}")


def test_linear_cross_entropy_module(device):
    module = TL.LinearCrossEntropyLoss(5, 7, bias=True, dtype=torch.float64, z_loss=0.05,
                                       softcap=2.0, return_lse=True, chunk_bytes=3 * 7 * 8)
    module.to(device)
    x, _, _, t, _ = _linear_case(device, False)
    loss, lse = module(x, t)
    logits = module.linear(x)
    ref = ce_extras_reference(logits, t, z_loss=0.05, softcap=2.0)
    assert_close(loss, ref.detach())
    assert lse.shape == (x.shape[0],)
    loss.backward()
    grads = torch.autograd.grad(ref, [module.linear.weight, module.linear.bias])
    assert_close(module.linear.weight.grad, grads[0])
    assert_close(module.linear.bias.grad, grads[1])


def test_linear_cross_entropy_unbatched_return_lse(device):
    x, w, b, t, _ = _linear_case(device, False)
    loss, lse = TLF.linear_cross_entropy(x[0], w, t[0], linear_bias=b, reduction="none",
                                         return_lse=True, softcap=2.0)
    assert loss.shape == () and lse.shape == ()
    assert_close(lse, (2.0 * torch.tanh(F.linear(x[0], w, b) / 2.0)).logsumexp(0))


def test_linear_cross_entropy_compile(device):
    x, w, b, t, cw = _linear_case(device, False, dtype=torch.float32)

    def step(x, w, b):
        return TLF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_bytes=4 * 7 * 4,
                                        z_loss=0.05, softcap=2.0, return_lse=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ins_c, ins_e = [leaf(x), leaf(w), leaf(b)], [leaf(x), leaf(w), leaf(b)]
    (lc, lsec), (le, lsee) = compiled(*ins_c), step(*ins_e)
    assert_close(lc, le)
    assert_close(lsec, lsee)
    lc.backward()
    le.backward()
    for a, e in zip(ins_c, ins_e):
        assert_close(a.grad, e.grad)


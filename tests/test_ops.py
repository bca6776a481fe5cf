"""torch.library.opcheck of every torch_losses op (schema, fake kernel, dispatch), with
several argument combinations each."""
import pytest
import torch
from torch.library import opcheck

import torch_losses  # noqa: F401  (registers the ops)
from torch_losses._autograd import lse_of

ops = torch.ops.torch_losses
# The full opcheck (with test_aot_dispatch_dynamic) costs ~1 s a call on 2 cores: it runs on
# one combination per op; every other combination gets the schema and fake-tensor checks.
FAST = ("test_schema", "test_autograd_registration", "test_faketensor")


def check(op, args, full=False):
    if full:
        opcheck(op, args)
    else:
        opcheck(op, args, test_utils=FAST)
NONE, MEAN, SUM = 0, 1, 2
POINTWISE = {
    # name: (extra args between target and reduction, input maker, target maker)
    "bce_with_logits": lambda x: [[None, None], [torch.rand_like(x) + 0.5, None],
                                  [None, torch.rand_like(x) + 0.5],
                                  [torch.rand_like(x), torch.rand_like(x) + 0.5]],
    "huber": lambda x: [[None, 1.0], [None, 0.3], [torch.rand_like(x), 2.0]],
    "mse": lambda x: [[None], [torch.rand_like(x)]],
    "l1": lambda x: [[None], [torch.rand_like(x)]],
    "smooth_l1": lambda x: [[1.0], [0.0], [0.5]],
    "bce": lambda x: [[None], [torch.rand_like(x)]],
    "hinge": lambda x: [[1.0], [0.5]],
    "kl_div": lambda x: [[False], [True]],
}


def _inputs(name, shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    y = torch.rand(shape, dtype=dtype, device=device)
    if name == "bce":
        x = torch.rand(shape, dtype=dtype, device=device) * 0.9 + 0.05
    if name == "hinge":
        y = (torch.randint(0, 2, shape, device=device) * 2 - 1).to(dtype)
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_ops(name, dtype, device):
    for shape in [(3, 5), ()]:
        x, y = _inputs(name, shape, dtype, device)
        for k, extra in enumerate(POINTWISE[name](x)):
            for reduction in (NONE, MEAN, SUM):
                full = dtype == torch.float32 and shape == (3, 5) and k == 0 and \
                    reduction == MEAN
                for ig, tg in [(True, True), (True, False), (False, False)]:
                    check(getattr(ops, f"{name}_fwd"), (x, y, *extra, reduction, ig, tg),
                          full and ig and tg)
                g = torch.randn(shape if reduction == NONE else (), dtype=dtype, device=device)
                for ig, tg in [(True, True), (True, False), (False, True)]:
                    check(getattr(ops, f"{name}_bwd"), (g, x, y, *extra, reduction, ig, tg),
                          full and ig and tg)


def _ce_inputs(N, C, D, probs, dtype, device):
    x = torch.randn(N, C, D, dtype=dtype, device=device)
    if probs:
        t = torch.randn(N, C, D, dtype=dtype, device=device).softmax(1)
    else:
        t = torch.randint(0, C, (N, D), device=device)
        t[0, 0] = min(1, C - 1)
    return x, t


CE_COMBOS = [
    # (N, C, D, probs, weighted, ignore_index, label_smoothing)
    (4, 7, 1, False, False, -100, 0.0),
    (4, 7, 1, False, True, 1, 0.1),
    (2, 5, 3, False, True, -100, 0.2),
    (2, 5, 3, True, False, -100, 0.0),
    (3, 6, 1, True, True, -100, 0.1),
    (1, 1, 2, False, False, -100, 0.0),
]
# The trailing (z_loss, softcap) arguments: off (the schema's defaults), and on (issue 9).
CE_EXTRAS = [(), (0.1, 2.0)]


@pytest.mark.parametrize("extras", CE_EXTRAS, ids=["plain", "zloss_softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("combo", CE_COMBOS, ids=str)
def test_cross_entropy_ops(combo, dtype, extras, device):
    N, C, D, probs, weighted, ii, ls = combo
    x, t = _ce_inputs(N, C, D, probs, dtype, device)
    w = torch.rand(C, dtype=dtype, device=device) + 0.5 if weighted else None
    for reduction in (NONE, MEAN, SUM):
        full = dtype == torch.float32 and reduction == MEAN and combo in (CE_COMBOS[1],
                                                                          CE_COMBOS[3])
        for ig, tg in [(True, probs), (False, False), (True, False)]:
            check(ops.cross_entropy_fwd, (x, t, w, ii, ls, reduction, ig, tg, *extras),
                  full and ig)
        _, stats, _, _ = ops.cross_entropy_fwd(x, t, w, ii, ls, reduction, False, False,
                                               *extras)
        g = torch.randn((N, D) if reduction == NONE else (), dtype=dtype, device=device)
        for ig, tg in [(True, probs), (True, False), (False, probs)]:
            check(ops.cross_entropy_bwd, (g, x, t, w, stats, ii, ls, reduction, ig, tg, *extras),
                  full and ig and tg == probs)
        if not probs:
            check(ops.cross_entropy_fwd_inplace, (x.clone(), t, w, ii, ls, reduction, *extras),
                  full)


@pytest.mark.parametrize("name", list(POINTWISE) + ["cross_entropy"])
def test_differentiable_twins_opcheck(name, device):
    """The forward ops' differentiable twins (what torch.export's programs hold; see
    tests/test_export.py), with inputs that require grad: the autograd registration, the fake
    kernel, and the formula's backward traced (test_aot_dispatch_dynamic) where the forward
    wrote no gradient. Where it did, backward hands out (scaled in place) those very buffers,
    which opcheck's traced program also returns as the op's outputs: AOTAutograd cannot
    partition that (a compiled function returning a twin's gradient outputs fails the same
    way, loudly); the export tests run that path."""
    if name == "cross_entropy":
        x, t = _ce_inputs(3, 6, 2, True, torch.float32, device)
        for written in (True, False):
            check(ops.cross_entropy_fwd_differentiable,
                  (x.requires_grad_(), t.requires_grad_(), None, -100, 0.1, MEAN, written,
                   written, 0.01, 2.0), full=not written)
        return
    x, y = _inputs(name, (3, 5), torch.float32, device)
    extra = POINTWISE[name](x)[-1]
    target_grad = name != "hinge"
    for written in (True, False):
        check(getattr(ops, f"{name}_fwd_differentiable"),
              (x.requires_grad_(), y.requires_grad_(target_grad), *extra, SUM, written,
               written), full=not written)


def test_cross_entropy_fwd_inplace_writes_torch_gradient(device):
    x, t = _ce_inputs(4, 7, 2, False, torch.float64, device)
    w = torch.rand(7, dtype=torch.float64, device=device)
    buf = x.clone()
    loss, stats = ops.cross_entropy_fwd_inplace(buf, t, w, -100, 0.1, MEAN)
    xr = x.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xr, t, w, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(buf, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats[0], x.amax(1), rtol=0, atol=0)
    torch.testing.assert_close(lse_of(stats), x.logsumexp(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_scale_grad_(dtype, device):
    grad = torch.randn(4, 5, 3, dtype=dtype, device=device)
    cases = [torch.tensor(1.0, dtype=dtype, device=device),
             torch.tensor(0.5, dtype=dtype, device=device),
             torch.randn(4, 5, 3, dtype=dtype, device=device),
             torch.randn(4, 3, dtype=dtype, device=device)]  # per position, over dim 1
    for g in cases:
        check(ops.scale_grad_, (grad.clone(), g), full=dtype == torch.float32)
        out = grad.clone()
        ops.scale_grad_(out, g)
        expected = grad * (g.unsqueeze(1) if g.dim() == 2 else g)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_pointwise_fwd_poisoned_outputs_and_values(device):
    """The fwd op's loss and grads against torch, on outputs nothing was pre-filled into:
    call twice with different inputs to catch stale buffers."""
    for _ in range(2):
        x = torch.randn(2049, dtype=torch.float64, device=device)
        y = torch.randn(2049, dtype=torch.float64, device=device)
        loss, gx, gy = ops.huber_fwd(x, y, None, 0.7, NONE, True, True)
        xr = x.clone().requires_grad_()
        yr = y.clone().requires_grad_()
        ref = torch.nn.functional.huber_loss(xr, yr, reduction="none", delta=0.7)
        ref.sum().backward()
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(gx, xr.grad)
        torch.testing.assert_close(gy, yr.grad)
        loss, gx, gy = ops.huber_fwd(x, y, None, 0.7, MEAN, False, False)
        assert gx.numel() == 0 and gy.numel() == 0
        torch.testing.assert_close(loss, ref.detach().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_bwd_into_ops(name, dtype, device):
    """*_bwd_into_: nothing written when grad_output is exactly 1 (a poisoned buffer stays
    poisoned); else the *_bwd op's gradients, bit for bit, in the given buffers."""
    x, y = _inputs(name, (3, 5), dtype, device)
    into, bwd = getattr(ops, f"{name}_bwd_into_"), getattr(ops, f"{name}_bwd")
    for k, extra in enumerate(POINTWISE[name](x)):
        for reduction in (MEAN, SUM):
            for ig, tg in [(True, True), (True, False), (False, True)]:
                def buffers():
                    return [torch.full_like(x, 7.0) if want else x.new_empty((0,))
                            for want in (ig, tg)]
                one = torch.tensor(1.0, dtype=dtype, device=device)
                check(into, (*buffers(), one, x, y, *extra, reduction),
                      full=dtype == torch.float32 and k == 0 and reduction == MEAN and ig and tg)
                gx, gy = buffers()
                into(gx, gy, one, x, y, *extra, reduction)
                assert all((b == 7).all() for b in (gx, gy))
                g = torch.tensor(0.75, dtype=dtype, device=device)
                gx, gy = buffers()
                into(gx, gy, g, x, y, *extra, reduction)
                ex, ey = bwd(g, x, y, *extra, reduction, ig, tg)
                for got, expected, want in [(gx, ex, ig), (gy, ey, tg)]:
                    if want:
                        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_bwd_expanded_grad_output_is_a_scalar(name, device):
    """reduction 'none' with an expanded grad_output (loss.sum()'s): read as the scalar, the
    same gradients as the materialized one; a 0-dim grad_output means the same."""
    x, y = _inputs(name, (4, 6), torch.float64, device)
    extra = POINTWISE[name](x)[0]
    g = torch.tensor(0.3, dtype=torch.float64, device=device)
    expected = getattr(ops, f"{name}_bwd")(g.expand(4, 6).contiguous(), x, y, *extra, NONE,
                                           True, True)
    for go in (g.expand(4, 6), g):
        got = getattr(ops, f"{name}_bwd")(go, x, y, *extra, NONE, True, True)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    check(getattr(ops, f"{name}_bwd"), (g.expand(4, 6), x, y, *extra, NONE, True, True))


@pytest.mark.parametrize("extras", CE_EXTRAS, ids=["plain", "zloss_softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("combo", CE_COMBOS, ids=str)
def test_cross_entropy_bwd_into_op(combo, dtype, extras, device):
    N, C, D, probs, weighted, ii, ls = combo
    x, t = _ce_inputs(N, C, D, probs, dtype, device)
    w = torch.rand(C, dtype=dtype, device=device) + 0.5 if weighted else None
    for reduction in (MEAN, SUM):
        _, stats, _, _ = ops.cross_entropy_fwd(x, t, w, ii, ls, reduction, False, False,
                                               *extras)
        for ig, tg in [(True, probs), (True, False), (False, probs)]:
            if not (ig or tg):
                continue

            def buffers():
                return [torch.full_like(x, 7.0) if want else x.new_empty((0,))
                        for want in (ig, tg)]
            one = torch.tensor(1.0, dtype=dtype, device=device)
            check(ops.cross_entropy_bwd_into_,
                  (*buffers(), one, x, t, w, stats, ii, ls, reduction, *extras),
                  full=dtype == torch.float32 and reduction == MEAN and combo == CE_COMBOS[3])
            gx, gt = buffers()
            ops.cross_entropy_bwd_into_(gx, gt, one, x, t, w, stats, ii, ls, reduction, *extras)
            assert all((b == 7).all() for b in (gx, gt))
            g = torch.tensor(1.5, dtype=dtype, device=device)
            gx, gt = buffers()
            ops.cross_entropy_bwd_into_(gx, gt, g, x, t, w, stats, ii, ls, reduction, *extras)
            ex, et = ops.cross_entropy_bwd(g, x, t, w, stats, ii, ls, reduction, ig, tg, *extras)
            for got, expected, want in [(gx, ex, ig), (gt, et, tg)]:
                if want:
                    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _pointwise_layouts(name, device):
    """(label, x, y): inputs of shape (2, 3, 4, 5) in the layouts the pointwise ops see."""
    x, y = _inputs(name, (2, 3, 4, 5), torch.float32, device)
    cl = torch.channels_last
    odd_unit = torch.empty_strided((2, 1, 4), (4, 7, 1), device=device)  # size-1 dim, stride 7
    xu, yu = _inputs(name, (2, 1, 4), torch.float32, device)
    return [
        ("channels_last", x.to(memory_format=cl), y.to(memory_format=cl)),
        ("transposed", x.transpose(0, 3), y.transpose(0, 3)),
        ("mixed", x.to(memory_format=cl), y),
        ("sliced", x[:, ::2], y[:, ::2]),
        ("expanded_target", x, y[:1].expand_as(y)),
        ("odd_unit_stride", odd_unit.copy_(xu), yu),
        ("empty_transposed", x[:0].transpose(0, 3), y[:0].transpose(0, 3)),
    ]


def _kept_layout(x):
    """csrc/ops.h pointwise_layout: a non-empty, non-overlapping and dense input keeps its
    strides (a contiguous one gets the standard strides); anything else is made contiguous."""
    dense = x.numel() > 0 and torch.empty_like(x).stride() == x.stride()
    return x.stride() if dense and not x.is_contiguous() else torch.empty(x.shape).stride()


@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise_ops_layouts(name, device):
    """The pointwise ops walk any non-overlapping, dense layout without a copy: the 'none' loss
    and the gradients come in the input's strides (those torch's elementwise losses give the
    'none' loss), the fake kernels say so (opcheck, inductor asserts them), and the values are
    those of the contiguous call."""
    for label, x, y in _pointwise_layouts(name, device):
        extra = POINTWISE[name](x.contiguous())[0]
        extra = [e.transpose(0, -1).contiguous().transpose(0, -1) if torch.is_tensor(e) else e
                 for e in extra]  # a tensor weight in yet another layout
        fwd, bwd = getattr(ops, f"{name}_fwd"), getattr(ops, f"{name}_bwd")
        kept = _kept_layout(x)
        contiguous_args = [e.contiguous() if torch.is_tensor(e) else e for e in extra]
        for reduction in (NONE, MEAN):
            check(fwd, (x, y, *extra, reduction, True, True))
            loss, gx, gy = fwd(x, y, *extra, reduction, True, True)
            ref = fwd(x.contiguous(), y.contiguous(), *contiguous_args, reduction, True, True)
            for got, expected in zip((loss, gx, gy), ref):
                if got.dim() > 0:
                    assert got.stride() == kept, (label, got.stride(), kept)
                torch.testing.assert_close(got, expected, rtol=1e-6 if got.dim() == 0 else 0,
                                           atol=0, equal_nan=True)
            shape = x.shape if reduction == NONE else ()
            for g in (torch.randn(shape, device=device),
                      torch.randn(shape, device=device).transpose(0, -1).contiguous()
                      .transpose(0, -1)):
                check(bwd, (g, x, y, *extra, reduction, True, True))
                got = bwd(g, x, y, *extra, reduction, True, True)
                ref = bwd(g.contiguous(), x.contiguous(), y.contiguous(), *contiguous_args,
                          reduction, True, True)
                for a, b in zip(got, ref):
                    assert a.stride() == kept, (label, a.stride(), kept)
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pointwise_bwd_into_takes_the_forward_layout(device):
    """*_bwd_into_ writes the forward's gradient in its layout; a buffer in another raises."""
    x, y = _inputs("mse", (2, 3, 4, 5), torch.float32, device)
    x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
    _, gx, gy = ops.mse_fwd(x, y, None, MEAN, True, True)
    g = torch.tensor(0.75, device=device)
    check(ops.mse_bwd_into_, (gx.clone(), gy.clone(), g, x, y, None, MEAN))
    ops.mse_bwd_into_(gx, gy, g, x, y, None, MEAN)
    for got, expected in zip((gx, gy), ops.mse_bwd(g, x, y, None, MEAN, True, True)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="must have the input's layout"):
        ops.mse_bwd_into_(gx.contiguous(), gy, g, x, y, None, MEAN)


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "row_slice"])
def test_cross_entropy_ops_non_contiguous_inputs(layout, probs, device):
    """Logits whose classes are contiguous in each row but whose rows are not (CUDA reads them
    in place, the CPU copies): the fake kernels give the real gradients' strides."""
    N, C, D = 2, 5, 3
    if layout == "transposed":  # (N, D, C) seen as (N, C, D)
        x = torch.randn(N, D, C, device=device).transpose(1, 2)
        t = torch.randn(N, D, C, device=device).softmax(2).transpose(1, 2) if probs else \
            torch.randint(0, C, (N, D), device=device)
    else:  # rows of a wider tensor, D = 1
        D = 1
        x = torch.randn(N, C + 3, 1, device=device)[:, :C]
        t = torch.randn(N, C, 1, device=device).softmax(1) if probs else \
            torch.randint(0, C, (N, 1), device=device)
    for reduction in (NONE, MEAN):
        check(ops.cross_entropy_fwd, (x, t, None, -100, 0.1, reduction, True, probs))
        _, stats, _, _ = ops.cross_entropy_fwd(x, t, None, -100, 0.1, reduction, False, False)
        g = torch.randn((N, D) if reduction == NONE else (), device=device)
        check(ops.cross_entropy_bwd, (g, x, t, None, stats, -100, 0.1, reduction, True, probs))

"""The pointwise losses (BCE-with-logits, Huber, MSE, L1, smooth-L1, BCE, hinge, KL) against
torch, through one table of (ours, torch reference, options)."""
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torch_losses as TL
import torch_losses.functional as TLF
from tl_helpers import (LOW_PRECISION, assert_close, assert_deterministic, assert_flash_rule,
                        assert_same_exception, leaf, requires_cuda)

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")


def _reduce(loss, reduction):
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def hinge_reference(input, target, margin=1.0, reduction="mean"):
    """The brief's reference (margin - y x).clamp_min(0), y in {-1, +1}, with the documented
    gradient -y at the kink: torch's clamp_min passed it up to 2.13 and passes 0 from 2.14, so
    the kink takes the identity branch explicitly (NaN and -inf as clamp_min in both)."""
    v = margin - target * input
    return _reduce(torch.where(v >= 0, v, v.clamp_min(0)), reduction)


class TorchHingeLoss(torch.nn.Module):
    def __init__(self, margin=1.0, reduction="mean"):
        super().__init__()
        self.margin, self.reduction = margin, reduction

    def forward(self, input, target):
        return hinge_reference(input, target, self.margin, self.reduction)


# --------------------------------------------------------------------------------------------
# The table


def _away(v, points, gap):
    """Push v at least `gap` away from each kink in points (keeps finite differences honest)."""
    for p in points:
        d = v - p
        v = torch.where(d.abs() < gap, p + torch.where(d >= 0, gap, -gap) * 2, v)
    return v


def _regression_inputs(kinks):
    def make(shape, dtype, device, opts):
        y = torch.randn(shape, dtype=torch.float64, device=device)
        z = torch.randn(shape, dtype=torch.float64, device=device) * 1.5
        k = [opts.get(name) for name in kinks if name in opts]
        z = _away(z, [p for v in k for p in (v, -v)] + [0.0], 0.02)
        return (y + z).to(dtype), y.to(dtype)
    return make


def _bce_logits_inputs(shape, dtype, device, opts):
    x = torch.randn(shape, dtype=torch.float64, device=device) * 3
    y = torch.rand(shape, dtype=torch.float64, device=device)
    return x.to(dtype), y.to(dtype)


def _bce_inputs(shape, dtype, device, opts):
    x = torch.rand(shape, dtype=torch.float64, device=device) * 0.9 + 0.05
    y = torch.rand(shape, dtype=torch.float64, device=device) * 0.8 + 0.1
    return x.to(dtype), y.to(dtype)


def _hinge_inputs(shape, dtype, device, opts):
    margin = opts.get("margin", 1.0)
    y = torch.randint(0, 2, shape, device=device).to(torch.float64) * 2 - 1
    v = _away(torch.randn(shape, dtype=torch.float64, device=device) * 1.5, [0.0], 0.02)
    x = (margin - v) * y  # margin - y x = v, away from the kink
    return x.to(dtype), y.to(dtype)


def _kl_inputs(shape, dtype, device, opts):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    t = torch.randn(shape, dtype=torch.float64, device=device)
    dim = -1 if len(shape) else None
    if dim is None:
        x, t = -x.abs(), -t.abs()  # log-probabilities of a 0-dim "distribution"
    else:
        x, t = x.log_softmax(dim), t.log_softmax(dim)
    y = t if opts.get("log_target") else t.exp()
    return x.to(dtype), y.to(dtype)


@dataclass
class Loss:
    name: str
    ours: object           # our functional
    theirs: object         # torch's functional (or the reference)
    function: object       # our autograd.Function
    make: object           # (shape, dtype, device, opts) -> (input, target)
    grid: list             # functional kwargs; "full"/"last" weights are materialized
    fn_args: object        # (x, y, opts with full-shape tensors, reduction) -> Function args
    elementwise: object    # torch's unreduced loss (weight applied) for Function checks
    modules: tuple         # (ours, torch's) module classes
    module_kwargs: list = field(default_factory=lambda: [{}])
    target_grad: bool = True
    target_gradcheck: bool = True
    reductions: tuple = ("none", "mean", "sum")
    weight_kw: tuple = ()  # which kwargs are weight tensors


LOSSES = [
    Loss("bce_with_logits", TLF.binary_cross_entropy_with_logits,
         F.binary_cross_entropy_with_logits, TL.BCEWithLogitsFunction, _bce_logits_inputs,
         [{}, {"weight": "full"}, {"pos_weight": "last"}, {"weight": "last", "pos_weight": "full"}],
         lambda x, y, o, r: (x, y, o.get("weight"), o.get("pos_weight"), r),
         lambda x, y, o: F.binary_cross_entropy_with_logits(
             x, y, o.get("weight"), reduction="none", pos_weight=o.get("pos_weight")),
         (TL.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss),
         [{}, {"weight": "last"}, {"pos_weight": "last"}],
         weight_kw=("weight", "pos_weight")),
    Loss("huber", TLF.huber_loss, F.huber_loss, TL.HuberFunction,
         _regression_inputs(["delta"]),
         [{"delta": 1.0}, {"delta": 0.5}, {"delta": 2.5}, {"delta": 1.0, "weight": "full"}],
         lambda x, y, o, r: (x, y, o.get("weight"), o["delta"], r),
         lambda x, y, o: F.huber_loss(x, y, reduction="none", delta=o["delta"])
         * (1 if o.get("weight") is None else o["weight"]),
         (TL.HuberLoss, torch.nn.HuberLoss), [{}, {"delta": 0.3}],
         weight_kw=("weight",)),
    Loss("mse", TLF.mse_loss, F.mse_loss, TL.MSEFunction, _regression_inputs([]),
         [{}, {"weight": "full"}],
         lambda x, y, o, r: (x, y, o.get("weight"), r),
         lambda x, y, o: F.mse_loss(x, y, reduction="none")
         * (1 if o.get("weight") is None else o["weight"]),
         (TL.MSELoss, torch.nn.MSELoss), weight_kw=("weight",)),
    Loss("l1", TLF.l1_loss, F.l1_loss, TL.L1Function, _regression_inputs([]),
         [{}, {"weight": "full"}],
         lambda x, y, o, r: (x, y, o.get("weight"), r),
         lambda x, y, o: F.l1_loss(x, y, reduction="none")
         * (1 if o.get("weight") is None else o["weight"]),
         (TL.L1Loss, torch.nn.L1Loss), weight_kw=("weight",)),
    Loss("smooth_l1", TLF.smooth_l1_loss, F.smooth_l1_loss, TL.SmoothL1Function,
         _regression_inputs(["beta"]),
         [{"beta": 1.0}, {"beta": 0.5}, {"beta": 0.0}, {"beta": 2.5}],
         lambda x, y, o, r: (x, y, o["beta"], r),
         lambda x, y, o: F.smooth_l1_loss(x, y, reduction="none", beta=o["beta"]),
         (TL.SmoothL1Loss, torch.nn.SmoothL1Loss), [{}, {"beta": 0.0}, {"beta": 0.4}]),
    Loss("bce", TLF.binary_cross_entropy, F.binary_cross_entropy, TL.BCEFunction, _bce_inputs,
         [{}, {"weight": "full"}, {"weight": "last"}],
         lambda x, y, o, r: (x, y, o.get("weight"), r),
         lambda x, y, o: F.binary_cross_entropy(x, y, o.get("weight"), reduction="none"),
         (TL.BCELoss, torch.nn.BCELoss), [{}, {"weight": "last"}], weight_kw=("weight",)),
    Loss("hinge", TLF.hinge_loss, hinge_reference, TL.HingeFunction, _hinge_inputs,
         [{"margin": 1.0}, {"margin": 0.5}, {"margin": 2.0}],
         lambda x, y, o, r: (x, y, o["margin"], r),
         lambda x, y, o: hinge_reference(x, y, o["margin"], "none"),
         (TL.HingeLoss, TorchHingeLoss), [{}, {"margin": 0.5}],
         target_gradcheck=False),  # targets must stay in {-1, +1}
    Loss("kl_div", TLF.kl_div, F.kl_div, TL.KLDivFunction, _kl_inputs,
         [{"log_target": False}, {"log_target": True}],
         lambda x, y, o, r: (x, y, o["log_target"], r),
         lambda x, y, o: F.kl_div(x, y, reduction="none", log_target=o["log_target"]),
         (TL.KLDivLoss, torch.nn.KLDivLoss), [{}, {"log_target": True}],
         reductions=("none", "mean", "sum", "batchmean")),
]
BY_NAME = {loss.name: loss for loss in LOSSES}
IDS = [loss.name for loss in LOSSES]


def _grid():
    for loss in LOSSES:
        for i, opts in enumerate(loss.grid):
            yield pytest.param(loss, opts, id=f"{loss.name}-{i}")


def materialize(opts, shape, dtype, device, full=False):
    """Replace "full" / "last" markers by positive weights of input's shape / its last dim.
    full=True expands every weight to input's shape (what the Functions take)."""
    out = {}
    for k, v in opts.items():
        if v == "full" or v == "last":
            wshape = shape if v == "full" or len(shape) == 0 else shape[-1:]
            w = (torch.rand(wshape, dtype=torch.float64, device=device) + 0.5).to(dtype)
            out[k] = w.expand(shape).contiguous() if full else w
        else:
            out[k] = v
    return out


def fn_reductions(loss):
    return [r for r in loss.reductions if r != "batchmean"]


# --------------------------------------------------------------------------------------------
# Values and gradients against torch (float64), over options, shapes and reductions

SHAPES = [(), (7,), (5, 13), (2, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("loss,opts", list(_grid()))
def test_values_and_grads_match_torch(loss, opts, shape, device):
    reductions = loss.reductions
    x, y = loss.make(shape, torch.float64, device, opts)
    kw = materialize(opts, shape, torch.float64, device)
    for reduction in reductions:
        xo, yo = leaf(x), leaf(y, loss.target_grad)
        xt, yt = leaf(x), leaf(y, loss.target_grad)
        ours = loss.ours(xo, yo, reduction=reduction, **kw)
        theirs = loss.theirs(xt, yt, reduction=reduction, **kw)
        assert_close(ours, theirs, msg=f"{loss.name} {reduction} value")
        g = torch.randn_like(theirs) + 1.5  # non-uniform for 'none'
        go = torch.autograd.grad(ours, [xo, yo] if loss.target_grad else [xo], g)
        gt = torch.autograd.grad(theirs, [xt, yt] if loss.target_grad else [xt], g)
        for a, b, what in zip(go, gt, ["input", "target"]):
            assert_close(a, b, msg=f"{loss.name} {reduction} grad {what}")


# --------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck of every Function over every option


FN_SHAPES = [(6,), (3, 5)]


@pytest.mark.parametrize("shape", FN_SHAPES, ids=str)
@pytest.mark.parametrize("loss,opts", list(_grid()))
def test_function_gradcheck(loss, opts, shape, device):
    x, y = loss.make(shape, torch.float64, device, opts)
    kw = materialize(opts, shape, torch.float64, device, full=True)
    for reduction in fn_reductions(loss):
        xs = leaf(x)
        ys = leaf(y, loss.target_gradcheck)

        def f(a, b):
            return loss.function.apply(*loss.fn_args(a, b, kw, reduction))

        # Value against torch's unreduced loss, reduced the Function's way.
        expected = _reduce(loss.elementwise(x, y, kw), reduction)
        assert_close(f(x, y), expected, msg=f"{loss.name} {reduction} Function value")
        assert gradcheck(f, (xs, ys), eps=1e-6, atol=1e-6, rtol=1e-5)
        # Explicitly: ours vs torch's gradients for a random grad_output (target included
        # wherever torch gives one, hinge too).
        xo, yo = leaf(x), leaf(y, loss.target_grad)
        xt, yt = leaf(x), leaf(y, loss.target_grad)
        ours = f(xo, yo)
        theirs = _reduce(loss.elementwise(xt, yt, kw), reduction)
        g = torch.randn_like(theirs)
        inputs_o = [xo, yo] if loss.target_grad else [xo]
        inputs_t = [xt, yt] if loss.target_grad else [xt]
        for a, b in zip(torch.autograd.grad(ours, inputs_o, g),
                        torch.autograd.grad(theirs, inputs_t, g)):
            assert_close(a, b, msg=f"{loss.name} {reduction} Function grads")


@pytest.mark.parametrize("loss,opts", list(_grid()))
def test_function_gradgradcheck(loss, opts, device):
    shape = (2, 3)
    x, y = loss.make(shape, torch.float64, device, opts)
    kw = materialize(opts, shape, torch.float64, device, full=True)
    for reduction in fn_reductions(loss):
        def f(a, b):
            return loss.function.apply(*loss.fn_args(a, b, kw, reduction))

        assert gradgradcheck(f, (leaf(x), leaf(y, loss.target_gradcheck)), eps=1e-6,
                             atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Low precision: the flash-attn rule against a float64 reference


def _check_low_precision(loss, opts, dtype, device, scalar_grad_output):
    shape = (37, 53)  # 1961 elements: vector tails
    x64, y64 = loss.make(shape, torch.float64, device, opts)
    x, y = x64.to(dtype), y64.to(dtype)
    kw = materialize(opts, shape, dtype, device)
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    for reduction in loss.reductions:
        try:
            xt, yt = leaf(x), leaf(y, loss.target_grad)
            theirs = loss.theirs(xt, yt, reduction=reduction, **kw)
        except RuntimeError as e:
            pytest.skip(f"torch has no {dtype} {loss.name} on {device}: {e}")
        xo, yo = leaf(x), leaf(y, loss.target_grad)
        ours = loss.ours(xo, yo, reduction=reduction, **kw)
        xr, yr = leaf(x.double()), leaf(y.double(), loss.target_grad)
        ref = loss.theirs(xr, yr, reduction=reduction, **kw64)
        assert_flash_rule(ours, theirs, ref, f"{loss.name} {dtype} {reduction} loss")
        if reduction == "none" or scalar_grad_output:  # random: per element for 'none'
            g = (torch.rand(theirs.shape, dtype=torch.float64, device=device) + 0.5).to(dtype)
        else:
            g = torch.ones((), device=device, dtype=dtype)
        ins = lambda a, b: [a, b] if loss.target_grad else [a]  # noqa: E731
        go = torch.autograd.grad(ours, ins(xo, yo), g)
        gt = torch.autograd.grad(theirs, ins(xt, yt), g)
        gr = torch.autograd.grad(ref, ins(xr, yr), g.double())
        for a, b, c, what in zip(go, gt, gr, ["input", "target"]):
            assert_flash_rule(a, b, c, f"{loss.name} {dtype} {reduction} grad {what}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("loss,opts", list(_grid()))
def test_low_precision(loss, opts, dtype, device):
    """Loss and gradients (grad_output 1 for mean/sum, random for 'none')."""
    _check_low_precision(loss, opts, dtype, device, scalar_grad_output=False)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("loss,opts", list(_grid()))
def test_low_precision_scaled_grad_output(loss, opts, dtype, device):
    """The same with a random scalar grad_output in [0.5, 1.5) for mean/sum (a loss scale):
    half/bfloat16 gradients are recomputed with grad_output folded in, rounded once."""
    _check_low_precision(loss, opts, dtype, device, scalar_grad_output=True)


# --------------------------------------------------------------------------------------------
# Layouts: non-contiguous, expanded, broadcast


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_non_contiguous_inputs(loss, layout, device):
    opts = loss.grid[-1]
    x, y = loss.make((9, 12), torch.float64, device, opts)
    if layout == "transposed":
        x, y = x.t(), y.t()
    elif layout == "sliced":
        x, y = x[::2, 1::3], y[::2, 1::3]
    else:
        x, y = x[:1].expand(5, 12), y[:1].expand(5, 12)
    assert not x.is_contiguous()
    kw = materialize(opts, tuple(x.shape), torch.float64, device)
    for reduction in loss.reductions:
        xo, xt = leaf(x), leaf(x)
        ours = loss.ours(xo, y, reduction=reduction, **kw)
        theirs = loss.theirs(xt, y, reduction=reduction, **kw)
        assert_close(ours, theirs, msg=f"{layout} {reduction}")
        g = torch.randn_like(theirs)
        assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0])
        # A non-contiguous view of a leaf: the gradient flows back through the view.
        base = leaf(x.contiguous())
        base_t = leaf(x.contiguous())
        ours = loss.ours(base.t().t()[:, :], y, reduction=reduction, **kw)
        assert_close(ours, loss.theirs(base_t, y, reduction=reduction, **kw))


@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_dense_layouts_keep_their_strides(loss, layout, device):
    """A channels_last or permuted (non-overlapping, dense) input is read in place: the 'none'
    loss has torch's strides (the input's), and a leaf's .grad comes in the leaf's layout (so
    autograd adopts it rather than copying it into that layout)."""
    opts = loss.grid[-1]
    x, y = loss.make((2, 3, 4, 5), torch.float64, device, opts)
    if layout == "channels_last":
        x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
    else:
        x, y = (t.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2) for t in (x, y))
    assert not x.is_contiguous()
    kw = materialize(opts, tuple(x.shape), torch.float64, device)
    for reduction in loss.reductions:
        xo, xt = leaf(x.clone(memory_format=torch.preserve_format)), leaf(x.clone())
        ours = loss.ours(xo, y, reduction=reduction, **kw)
        theirs = loss.theirs(xt, y, reduction=reduction, **kw)
        assert_close(ours, theirs, msg=f"{layout} {reduction}")
        if reduction == "none":
            assert ours.stride() == theirs.stride() == x.stride()
        g = torch.randn_like(theirs)
        (ours * g).sum().backward()
        (theirs * g).sum().backward()
        assert xo.grad.stride() == x.stride()
        assert_close(xo.grad, xt.grad)


BROADCASTING = ["huber", "mse", "l1", "smooth_l1", "kl_div"]


@pytest.mark.parametrize("case", ["target_row", "input_column"])
@pytest.mark.parametrize("name", BROADCASTING)
def test_broadcasting_warns_and_matches(name, case, device):
    loss = BY_NAME[name]
    opts = loss.grid[0]
    x, y = loss.make((4, 6), torch.float64, device, opts)
    if case == "target_row":
        x, y = x, y[:1]
    else:
        x, y = x[:, :1], y
    for reduction in loss.reductions:
        xo, yo, xt, yt = leaf(x), leaf(y), leaf(x), leaf(y)
        with warnings.catch_warnings(record=True) as ours_w:
            warnings.simplefilter("always")
            ours = loss.ours(xo, yo, reduction=reduction, **opts)
        with warnings.catch_warnings(record=True) as torch_w:
            warnings.simplefilter("always")
            theirs = loss.theirs(xt, yt, reduction=reduction, **opts)
        size_msg = lambda ws: [str(w.message) for w in ws if "target size" in str(w.message)]  # noqa
        assert size_msg(ours_w) == size_msg(torch_w)
        if name != "kl_div":
            assert size_msg(ours_w), "torch warns on a size mismatch"
        assert_close(ours, theirs, msg=f"{case} {reduction}")
        g = torch.randn_like(theirs)
        for a, b in zip(torch.autograd.grad(ours, [xo, yo], g),
                        torch.autograd.grad(theirs, [xt, yt], g)):
            assert_close(a, b, msg=f"{case} {reduction} grads")


def test_broadcast_warning_is_a_user_warning():
    x, y = torch.randn(3, 4), torch.randn(4)
    with pytest.warns(UserWarning, match="target size"):
        TLF.mse_loss(x, y)
    with pytest.warns(UserWarning, match="target size"):
        F.mse_loss(x, y)


# --------------------------------------------------------------------------------------------
# Dtype combinations: whatever torch does (result dtype, or the exception type)

DTYPE_CASES = [
    ("long_target", torch.float32, torch.int64),
    ("bool_target", torch.float32, torch.bool),
    ("double_target", torch.float32, torch.float64),
    ("double_input", torch.float64, torch.float32),
    ("long_input", torch.int64, torch.float32),
    ("half_target", torch.float32, torch.float16),
]


def _mixed_params():
    for name in [n for n in IDS if n != "hinge"]:
        for case, xd, yd in DTYPE_CASES:
            yield pytest.param(name, case, xd, yd, id=f"{name}-{case}")


@pytest.mark.parametrize("name,case,xdtype,ydtype", list(_mixed_params()))
def test_mixed_dtypes_follow_torch(name, case, xdtype, ydtype, device):
    loss = BY_NAME[name]
    opts = loss.grid[0]
    x, y = loss.make((3, 4), torch.float64, device, opts)
    if xdtype == torch.int64:
        x = (x * 3).round()
        if name == "bce":
            x = (x.abs() > 1).double()
    if ydtype in (torch.int64, torch.bool):
        y = (y > y.median()).double()
    x, y = x.to(xdtype), y.to(ydtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs = loss.theirs(x, y, **opts)
        except Exception:  # noqa: BLE001
            assert_same_exception(lambda: loss.ours(x, y, **opts),
                                  lambda: loss.theirs(x, y, **opts))
            return
        ours = loss.ours(x, y, **opts)
    assert ours.dtype == theirs.dtype
    assert_close(ours, theirs, dtype=torch.float16, msg=case)


# --------------------------------------------------------------------------------------------
# Bad arguments raise what torch raises


def _bad_calls(device):
    x, y = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    p, t = torch.rand(3, 4, device=device), torch.rand(3, 4, device=device)
    y5 = torch.randn(3, 5, device=device)
    return {
        "mse_shape": (lambda: TLF.mse_loss(x, y5), lambda: F.mse_loss(x, y5)),
        "l1_shape": (lambda: TLF.l1_loss(x, y5), lambda: F.l1_loss(x, y5)),
        "huber_shape": (lambda: TLF.huber_loss(x, y5), lambda: F.huber_loss(x, y5)),
        "smooth_l1_shape": (lambda: TLF.smooth_l1_loss(x, y5), lambda: F.smooth_l1_loss(x, y5)),
        "kl_shape": (lambda: TLF.kl_div(x, y5), lambda: F.kl_div(x, y5)),
        "bcel_shape": (lambda: TLF.binary_cross_entropy_with_logits(x, y5),
                       lambda: F.binary_cross_entropy_with_logits(x, y5)),
        "bcel_broadcastable_shape": (
            lambda: TLF.binary_cross_entropy_with_logits(x, y[:1]),
            lambda: F.binary_cross_entropy_with_logits(x, y[:1])),
        "bce_shape": (lambda: TLF.binary_cross_entropy(p, t[:, :2]),
                      lambda: F.binary_cross_entropy(p, t[:, :2])),
        "huber_delta_zero": (lambda: TLF.huber_loss(x, y, delta=0.0),
                             lambda: F.huber_loss(x, y, delta=0.0)),
        "huber_delta_negative": (lambda: TLF.huber_loss(x, y, delta=-1.0),
                                 lambda: F.huber_loss(x, y, delta=-1.0)),
        "smooth_l1_beta_negative": (lambda: TLF.smooth_l1_loss(x, y, beta=-0.5),
                                    lambda: F.smooth_l1_loss(x, y, beta=-0.5)),
        "huber_delta_nan": (lambda: TLF.huber_loss(x, y, delta=float("nan")),
                            lambda: F.huber_loss(x, y, delta=float("nan"))),
        "smooth_l1_beta_nan": (lambda: TLF.smooth_l1_loss(x, y, beta=float("nan")),
                               lambda: F.smooth_l1_loss(x, y, beta=float("nan"))),
        "mse_reduction": (lambda: TLF.mse_loss(x, y, reduction="avg"),
                          lambda: F.mse_loss(x, y, reduction="avg")),
        "l1_reduction": (lambda: TLF.l1_loss(x, y, reduction="bogus"),
                         lambda: F.l1_loss(x, y, reduction="bogus")),
        "huber_reduction": (lambda: TLF.huber_loss(x, y, reduction="bogus"),
                            lambda: F.huber_loss(x, y, reduction="bogus")),
        "smooth_l1_reduction": (lambda: TLF.smooth_l1_loss(x, y, reduction="bogus"),
                                lambda: F.smooth_l1_loss(x, y, reduction="bogus")),
        "bcel_reduction": (lambda: TLF.binary_cross_entropy_with_logits(x, t, reduction="x"),
                           lambda: F.binary_cross_entropy_with_logits(x, t, reduction="x")),
        "bce_reduction": (lambda: TLF.binary_cross_entropy(p, t, reduction="x"),
                          lambda: F.binary_cross_entropy(p, t, reduction="x")),
        "kl_reduction": (lambda: TLF.kl_div(x, t, reduction="x"),
                         lambda: F.kl_div(x, t, reduction="x")),
        "hinge_reduction": (lambda: TLF.hinge_loss(x, y.sign(), reduction="x"),
                            lambda: F.l1_loss(x, y, reduction="x")),  # torch's ValueError
        "bce_input_above_1": (lambda: TLF.binary_cross_entropy(p + 1, t),
                              lambda: F.binary_cross_entropy(p + 1, t)),
        "bce_input_below_0": (lambda: TLF.binary_cross_entropy(p - 1, t),
                              lambda: F.binary_cross_entropy(p - 1, t)),
        "bce_input_nan": (lambda: TLF.binary_cross_entropy(p * float("nan"), t),
                          lambda: F.binary_cross_entropy(p * float("nan"), t)),
        "bce_target_above_1": (lambda: TLF.binary_cross_entropy(p, t + 1.5),
                               lambda: F.binary_cross_entropy(p, t + 1.5)),
        "bce_target_below_0": (lambda: TLF.binary_cross_entropy(p, t - 1.5),
                               lambda: F.binary_cross_entropy(p, t - 1.5)),
        "bce_weight_shape": (lambda: TLF.binary_cross_entropy(p, t, weight=torch.rand(5)),
                             lambda: F.binary_cross_entropy(p, t, weight=torch.rand(5))),
        "bcel_weight_shape": (
            lambda: TLF.binary_cross_entropy_with_logits(x, t, weight=torch.rand(5)),
            lambda: F.binary_cross_entropy_with_logits(x, t, weight=torch.rand(5))),
        "bcel_pos_weight_shape": (
            lambda: TLF.binary_cross_entropy_with_logits(x, t, pos_weight=torch.rand(5)),
            lambda: F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.rand(5))),
        "mse_weight_shape": (lambda: TLF.mse_loss(x, y, weight=torch.rand(5)),
                             lambda: F.mse_loss(x, y, weight=torch.rand(5))),
        "huber_weight_shape": (lambda: TLF.huber_loss(x, y, weight=torch.rand(4)),
                               lambda: F.huber_loss(x, y, weight=torch.rand(4))),
        "bcel_weight_requires_grad": (
            lambda: TLF.binary_cross_entropy_with_logits(x, t, weight=torch.rand(4, requires_grad=True)),
            lambda: F.binary_cross_entropy_with_logits(x, t, weight=torch.rand(4, requires_grad=True))),
        "bce_weight_requires_grad": (
            lambda: TLF.binary_cross_entropy(p, t, weight=torch.rand(3, 4, requires_grad=True)),
            lambda: F.binary_cross_entropy(p, t, weight=torch.rand(3, 4, requires_grad=True))),
    }


BAD = list(_bad_calls("cpu"))


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments_raise_like_torch(case, device):
    if device != "cpu" and case.startswith(("bce_input", "bce_target")):
        pytest.skip("CUDA reports BCE domain errors with a device-side assert (kills the context)")
    ours, theirs = _bad_calls(device)[case]
    assert_same_exception(ours, theirs)


@pytest.mark.parametrize("bad", [0.0, 0.5, 2.0, float("nan")])
def test_hinge_target_outside_pm1_raises(bad, device):
    if device != "cpu":
        pytest.skip("CUDA reports the hinge domain error with a device-side assert (kills the "
                    "context); test_cuda.py checks it in a subprocess")
    x = torch.randn(4, 5, device=device)
    y = torch.randint(0, 2, (4, 5), device=device).float() * 2 - 1
    y[1, 2] = bad
    for reduction in ("none", "mean", "sum"):
        with pytest.raises(RuntimeError, match="-1 or 1"):
            TLF.hinge_loss(x, y, reduction=reduction)
        with pytest.raises(RuntimeError):
            TL.HingeFunction.apply(x, y, 1.0, reduction)
    # A valid target on the same call works.
    y[1, 2] = -1
    assert_close(TLF.hinge_loss(x, y), hinge_reference(x, y))


def test_hinge_shape_mismatch_raises(device):
    with pytest.raises((ValueError, RuntimeError)):
        TLF.hinge_loss(torch.randn(3, 4, device=device), torch.ones(3, 5, device=device))


@requires_cuda
@pytest.mark.parametrize("name", IDS)
def test_tensors_on_two_devices_raise(name):
    loss = BY_NAME[name]
    opts = loss.grid[0]
    x, y = loss.make((3, 4), torch.float32, "cuda", opts)
    yc = y.cpu()
    if name == "hinge":
        with pytest.raises(RuntimeError):
            loss.ours(x, yc, **opts)
        return
    assert_same_exception(lambda: loss.ours(x, yc, **opts), lambda: loss.theirs(x, yc, **opts))
    assert_same_exception(lambda: loss.ours(x.cpu(), y, **opts),
                          lambda: loss.theirs(x.cpu(), y, **opts))


@requires_cuda
def test_weight_on_other_device_raises():
    x, y = torch.randn(3, 4, device="cuda"), torch.rand(3, 4, device="cuda")
    w = torch.rand(3, 4)
    assert_same_exception(lambda: TLF.binary_cross_entropy_with_logits(x, y, weight=w),
                          lambda: F.binary_cross_entropy_with_logits(x, y, weight=w))
    assert_same_exception(lambda: TLF.binary_cross_entropy_with_logits(x, y, pos_weight=w),
                          lambda: F.binary_cross_entropy_with_logits(x, y, pos_weight=w))
    assert_same_exception(lambda: TLF.mse_loss(x, y, weight=w),
                          lambda: F.mse_loss(x, y, weight=w))


# --------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_empty_batch(loss, device):
    opts = loss.grid[0]
    x, y = loss.make((0, 4), torch.float64, device, opts)
    for reduction in loss.reductions:
        xo, yo, xt, yt = leaf(x), leaf(y), leaf(x), leaf(y)
        ours = loss.ours(xo, yo, reduction=reduction, **opts)
        theirs = loss.theirs(xt, yt, reduction=reduction, **opts)
        assert_close(ours, theirs, msg=reduction)
        if reduction == "mean":
            assert ours.isnan()
        if reduction == "sum":
            assert ours.item() == 0
        if reduction == "none":
            assert ours.shape == (0, 4)
        g = torch.ones_like(theirs)
        for a, b in zip(torch.autograd.grad(ours, [xo, yo], g),
                        torch.autograd.grad(theirs, [xt, yt], g)):
            assert_close(a, b)


NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("loss", [pytest.param(BY_NAME[n], id=n)
                                  for n in IDS if n not in ("bce", "hinge")])
def test_nan_and_inf_propagate_like_torch(loss, device):
    opts = loss.grid[0]
    x, y = loss.make((3, 8), torch.float64, device, opts)
    for where in ("input", "target"):
        for k, bad in enumerate(NONFINITE):
            xb, yb = x.clone(), y.clone()
            (xb if where == "input" else yb)[k, 2 * k + 1] = bad
            for reduction in loss.reductions:
                xo, yo, xt, yt = leaf(xb), leaf(yb), leaf(xb), leaf(yb)
                ours = loss.ours(xo, yo, reduction=reduction, **opts)
                theirs = loss.theirs(xt, yt, reduction=reduction, **opts)
                assert_close(ours, theirs, msg=f"{where}={bad} {reduction}")
                g = torch.ones_like(theirs)
                for a, b, w in zip(torch.autograd.grad(ours, [xo, yo], g),
                                   torch.autograd.grad(theirs, [xt, yt], g), "xy"):
                    assert_close(a, b, msg=f"{where}={bad} {reduction} grad {w}")


def test_hinge_nan_propagates(device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    y = torch.ones_like(x)
    x[1, 1] = float("nan")
    for reduction in ("none", "sum"):
        ours = TLF.hinge_loss(x, y, reduction=reduction)
        assert_close(ours, hinge_reference(x, y, reduction=reduction))


def test_bce_saturated_probabilities(device):
    """Predictions of exactly 0 and 1: torch clamps the logs at -100 and the gradient's
    denominator at 1e-12."""
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 1e-30, 1 - 1e-12, 0.5], dtype=torch.float64,
                     device=device)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.7, 1.0], dtype=torch.float64, device=device)
    for reduction in ("none", "mean", "sum"):
        xo, xt = leaf(x), leaf(x)
        ours = TLF.binary_cross_entropy(xo, y, reduction=reduction)
        theirs = F.binary_cross_entropy(xt, y, reduction=reduction)
        assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
        g = torch.ones_like(theirs)
        assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0],
                     rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_bce_with_logits_large_logits_finite(dtype, device):
    big = 1e4 if dtype != torch.float16 else 6e4
    x = torch.tensor([-big, -1e3, -100.0, -30.0, 30.0, 100.0, 1e3, big], device=device)
    x = x.to(dtype)
    y = torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0, 1.0, 0.0, 0.5], device=device).to(dtype)
    pw = torch.full_like(x, 3.0)
    for kw in ({}, {"pos_weight": pw}):
        for reduction in ("none", "mean", "sum"):
            xo, xt = leaf(x), leaf(x)
            ours = TLF.binary_cross_entropy_with_logits(xo, y, reduction=reduction, **kw)
            theirs = F.binary_cross_entropy_with_logits(xt, y, reduction=reduction, **kw)
            assert torch.isfinite(ours).all()
            assert_close(ours, theirs, dtype=dtype, rtol=1e-2 if dtype != torch.float64 else None,
                         atol=1e-2 if dtype != torch.float64 else None)
            g = torch.ones_like(theirs)
            go = torch.autograd.grad(ours, xo, g)[0]
            assert torch.isfinite(go).all()
            assert_close(go, torch.autograd.grad(theirs, xt, g)[0], dtype=dtype,
                         rtol=1e-2 if dtype != torch.float64 else None,
                         atol=1e-3 if dtype != torch.float64 else None)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_many_chunks(loss, device):
    """> 2048 * 8 elements: several reduction chunks, ragged last chunk, all threads busy."""
    opts = loss.grid[-1]
    shape = (2048 * 9 + 37,)
    x, y = loss.make(shape, torch.float32, device, opts)
    kw = materialize(opts, shape, torch.float32, device)
    for reduction in ("mean", "sum", "none"):
        xo, xt = leaf(x), leaf(x)
        ours = loss.ours(xo, y, reduction=reduction, **kw)
        theirs = loss.theirs(xt, y, reduction=reduction, **kw)
        ref = loss.theirs(x.double(), y.double(), reduction=reduction,
                          **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
        assert_flash_rule(ours, theirs, ref, f"{loss.name} {reduction}")
        g = torch.rand_like(theirs) + 0.5
        xr = leaf(x.double())
        ref = loss.theirs(xr, y.double(), reduction=reduction,
                          **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
        assert_flash_rule(torch.autograd.grad(ours, xo, g)[0],
                          torch.autograd.grad(theirs, xt, g)[0],
                          torch.autograd.grad(ref, xr, g.double())[0], f"{loss.name} grad")


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_deterministic_and_thread_count_independent(loss, device):
    opts = loss.grid[-1]
    shape = (2048 * 8 + 5,)
    x, y = loss.make(shape, torch.float32, device, opts)
    kw = materialize(opts, shape, torch.float32, device)

    def run():
        xs, ys = leaf(x), leaf(y)
        out = loss.ours(xs, ys, reduction="mean", **kw)
        out.backward()
        return out.detach(), xs.grad, ys.grad

    assert_deterministic(run)


# --------------------------------------------------------------------------------------------
# Modules


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_modules_match_torch(loss, device):
    ours_cls, torch_cls = loss.modules
    if loss.name != "hinge":
        assert issubclass(ours_cls, torch_cls)
    for mk in loss.module_kwargs:
        for reduction in loss.reductions:
            shape = (4, 6)
            kw = materialize(mk, shape, torch.float64, device)
            ours_m = ours_cls(reduction=reduction, **kw)
            torch_m = torch_cls(reduction=reduction, **kw)
            if loss.name != "hinge":
                assert isinstance(ours_m, torch_cls)
                assert repr(ours_m) == repr(torch_m).replace(torch_cls.__name__, ours_cls.__name__)
            x, y = loss.make(shape, torch.float64, device, mk)
            xo, xt = leaf(x), leaf(x)
            ours = ours_m(xo, y)
            theirs = torch_m(xt, y)
            assert_close(ours, theirs, msg=f"{mk} {reduction}")
            g = torch.randn_like(theirs)
            assert_close(torch.autograd.grad(ours, xo, g)[0],
                         torch.autograd.grad(theirs, xt, g)[0])


LEGACY = [(None, False), (False, None), (False, True), (True, False), (True, True),
          (None, True), (True, None), (False, False)]
LEGACY_LOSSES = ["bce_with_logits", "mse", "l1", "smooth_l1", "bce", "kl_div"]


@pytest.mark.parametrize("size_average,reduce", LEGACY, ids=str)
@pytest.mark.parametrize("name", LEGACY_LOSSES)
def test_legacy_size_average_reduce(name, size_average, reduce, device):
    loss = BY_NAME[name]
    ours_cls, torch_cls = loss.modules
    with pytest.warns(UserWarning):
        ours_m = ours_cls(size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning):
        torch_m = torch_cls(size_average=size_average, reduce=reduce)
    assert ours_m.reduction == torch_m.reduction
    x, y = loss.make((3, 5), torch.float64, device, loss.grid[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(ours_m(x, y), torch_m(x, y))
        # The functional form too.
        with_ours = loss.ours(x, y, size_average=size_average, reduce=reduce)
        with_torch = loss.theirs(x, y, size_average=size_average, reduce=reduce)
    assert_close(with_ours, with_torch)
    with pytest.warns(UserWarning):
        loss.ours(x, y, size_average=size_average, reduce=reduce)


@pytest.mark.parametrize("name,attrs", [("bce_with_logits", ("weight", "pos_weight")),
                                        ("bce", ("weight",))])
def test_weight_buffers(name, attrs, device):
    ours_cls, torch_cls = BY_NAME[name].modules
    kw = {a: torch.rand(5) + 0.5 for a in attrs}
    ours_m, torch_m = ours_cls(**kw), torch_cls(**kw)
    assert dict(ours_m.named_buffers()).keys() == dict(torch_m.named_buffers()).keys()
    assert set(attrs) <= set(ours_m.state_dict())
    for a in attrs:
        assert torch.equal(ours_m.state_dict()[a], kw[a])
    ours_m.to(device=device, dtype=torch.float64)
    for a in attrs:
        assert getattr(ours_m, a).device.type == device
        assert getattr(ours_m, a).dtype == torch.float64
    # load_state_dict round trip
    fresh = ours_cls(**{a: torch.zeros(5) for a in attrs})
    fresh.load_state_dict(ours_cls(**kw).state_dict())
    for a in attrs:
        assert torch.equal(getattr(fresh, a), kw[a])
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    y = torch.rand(4, 5, dtype=torch.float64, device=device)
    if name == "bce":
        x = x.sigmoid()
    torch_m.to(device=device, dtype=torch.float64)
    assert_close(ours_m(x, y), torch_m(x, y))


def test_hinge_module_defaults():
    m = TL.HingeLoss()
    assert m.margin == 1.0 and m.reduction == "mean"
    assert isinstance(m, torch.nn.Module)
    with pytest.raises(ValueError):
        TL.HingeLoss(reduction="bogus")(torch.randn(3), torch.ones(3))


# --------------------------------------------------------------------------------------------
# Autograd plumbing


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_retain_graph_second_backward(loss, device):
    opts = loss.grid[-1]
    x, y = loss.make((5, 7), torch.float64, device, opts)
    kw = materialize(opts, (5, 7), torch.float64, device)
    for reduction in ("mean", "none"):
        xo, yo, xt, yt = leaf(x), leaf(y), leaf(x), leaf(y)
        ours = loss.ours(xo * 1.0, yo, reduction=reduction, **kw)
        theirs = loss.theirs(xt * 1.0, yt, reduction=reduction, **kw)
        g = torch.randn_like(theirs)
        ours.backward(g, retain_graph=True)
        theirs.backward(g, retain_graph=True)
        first = xo.grad.clone()
        assert_close(first, xt.grad)
        ours.backward(g)
        theirs.backward(g)
        assert_close(xo.grad, xt.grad)  # doubled, as torch's
        assert_close(xo.grad, 2 * first)
        if loss.name != "hinge":
            assert_close(yo.grad, yt.grad)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_no_grad_forward(loss, device):
    opts = loss.grid[-1]
    x, y = loss.make((5, 7), torch.float64, device, opts)
    kw = materialize(opts, (5, 7), torch.float64, device)
    xs = leaf(x)
    with torch.no_grad():
        ours = loss.ours(xs, y, **kw)
    assert not ours.requires_grad and ours.grad_fn is None
    assert_close(ours, loss.theirs(x, y, **kw))
    # Inputs that need no grad at all.
    assert_close(loss.ours(x, y, **kw), loss.theirs(x, y, **kw))


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_loss_used_twice_in_graph(loss, device):
    opts = loss.grid[-1]
    x, y = loss.make((4, 6), torch.float64, device, opts)
    kw = materialize(opts, (4, 6), torch.float64, device)

    def total(fn, xs):
        h = xs * 0.9  # BCE inputs stay in [0, 1]
        return fn(h, y, reduction="sum", **kw) + 2 * fn(h, y, reduction="mean", **kw)

    xo, xt = leaf(x), leaf(x)
    ours, theirs = total(loss.ours, xo), total(loss.theirs, xt)
    assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    assert_close(xo.grad, xt.grad)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("name", ["huber", "mse", "l1"])
def test_weight_requiring_grad_gets_torch_gradient(name, reduction, device):
    loss = BY_NAME[name]
    opts = {"delta": 0.7} if name == "huber" else {}
    x, y = loss.make((4, 6), torch.float64, device, opts)
    w = torch.rand(4, 6, dtype=torch.float64, device=device) + 0.5
    xo, wo, xt, wt = leaf(x), leaf(w), leaf(x), leaf(w)
    ours = loss.ours(xo, y, reduction=reduction, weight=wo, **opts)
    theirs = loss.theirs(xt, y, reduction=reduction, weight=wt, **opts)
    assert_close(ours, theirs)
    g = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, [xo, wo], g), torch.autograd.grad(theirs, [xt, wt], g)):
        assert_close(a, b)


@pytest.mark.parametrize("name", ["huber", "mse", "l1"])
def test_weight_without_grad_matches_torch(name, device):
    loss = BY_NAME[name]
    x, y = loss.make((4, 6), torch.float64, device, {})
    w = torch.rand(4, 6, dtype=torch.float64, device=device)
    w[0] = 0  # zero weights
    for reduction in ("none", "mean", "sum"):
        xo, xt = leaf(x), leaf(x)
        ours = loss.ours(xo, y, reduction=reduction, weight=w)
        theirs = loss.theirs(xt, y, reduction=reduction, weight=w)
        assert_close(ours, theirs)
        g = torch.randn_like(theirs)
        assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0])


def test_bce_with_logits_pos_weight_broadcast_channels(device):
    """A (B, C, H, W) target takes pos_weight (C, 1, 1)."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device)
    y = torch.rand_like(x)
    pw = torch.rand(3, 1, 1, dtype=torch.float64, device=device) + 0.5
    w = torch.rand(4, 5, dtype=torch.float64, device=device)
    for reduction in ("none", "mean", "sum"):
        xo, xt = leaf(x), leaf(x)
        ours = TLF.binary_cross_entropy_with_logits(xo, y, w, reduction=reduction, pos_weight=pw)
        theirs = F.binary_cross_entropy_with_logits(xt, y, w, reduction=reduction, pos_weight=pw)
        assert_close(ours, theirs)
        g = torch.randn_like(theirs)
        assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0])


def test_kinks_follow_torch(device):
    """At |x - y| == delta/beta, x == y and margin == y x: torch's branch choice and gradient."""
    y = torch.zeros(5, dtype=torch.float64, device=device)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64, device=device)
    for ours_f, torch_f, kw in [(TLF.huber_loss, F.huber_loss, {"delta": 0.5}),
                                (TLF.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.5}),
                                (TLF.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.0}),
                                (TLF.l1_loss, F.l1_loss, {}), (TLF.mse_loss, F.mse_loss, {})]:
        xo, xt = leaf(x), leaf(x)
        ours = ours_f(xo, y, reduction="none", **kw)
        theirs = torch_f(xt, y, reduction="none", **kw)
        assert_close(ours, theirs)
        g = torch.ones_like(theirs)
        assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0],
                     msg=str(ours_f))
    ys = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64, device=device)
    xh = torch.tensor([1.0, -1.0, 0.5, 2.0, -3.0], dtype=torch.float64, device=device)
    xo, xt = leaf(xh), leaf(xh)
    ours = TLF.hinge_loss(xo, ys, reduction="none")
    theirs = hinge_reference(xt, ys, reduction="none")
    assert_close(ours, theirs)
    g = torch.ones_like(theirs)
    assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0])


def test_kl_div_zero_target_like_torch(device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device).log_softmax(-1)
    y = torch.rand(3, 4, dtype=torch.float64, device=device)
    y[0, 1] = 0.0
    for reduction in ("none", "sum", "batchmean"):
        xo, yo, xt, yt = leaf(x), leaf(y), leaf(x), leaf(y)
        ours = TLF.kl_div(xo, yo, reduction=reduction)
        theirs = F.kl_div(xt, yt, reduction=reduction)
        assert_close(ours, theirs)
        g = torch.ones_like(theirs)
        for a, b in zip(torch.autograd.grad(ours, [xo, yo], g),
                        torch.autograd.grad(theirs, [xt, yt], g)):
            assert_close(a, b)


# --------------------------------------------------------------------------------------------
# The minimal cases of issue 13 (a randomized search against torch found them)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_saved_low_precision_gradient_does_not_overflow_before_scaling(dtype, device):
    """mse 'none' with weight 200 at z = 200 and grad_output 0.25 (float16: the unscaled
    gradient -80000 overflows); Huber delta 300, weight 300, grad_output 0.01."""
    x = torch.tensor([200.0], dtype=dtype, device=device)
    w = torch.tensor([200.0], dtype=dtype, device=device)
    for reduction, g in [("none", torch.tensor([0.25])), ("sum", torch.tensor(0.25))]:
        yo, yt = leaf(torch.zeros(1, dtype=dtype, device=device)), leaf(
            torch.zeros(1, dtype=dtype, device=device))
        g = g.to(dtype=dtype, device=device)
        go = torch.autograd.grad(TLF.mse_loss(x, yo, reduction=reduction, weight=w), yo, g)[0]
        gt = torch.autograd.grad(_reduce(F.mse_loss(x, yt, reduction="none") * w, reduction),
                                 yt, g)[0]
        assert torch.isfinite(go).all()
        assert_close(go, gt, msg=reduction)
    x = torch.tensor([600.0], dtype=dtype, device=device)
    w = torch.tensor([300.0], dtype=dtype, device=device)
    g = torch.tensor(0.01, dtype=dtype, device=device)
    yo, yt = leaf(torch.zeros(1, dtype=dtype, device=device)), leaf(
        torch.zeros(1, dtype=dtype, device=device))
    go = torch.autograd.grad(TLF.huber_loss(x, yo, delta=300.0, weight=w), yo, g)[0]
    gt = torch.autograd.grad(F.huber_loss(x, yt, delta=300.0, weight=w), yt, g)[0]
    assert_close(go, gt)
    assert go.item() == -900.0


def test_low_precision_mean_gradient_rounds_once(device):
    """float16 l1 mean over 70,000 elements, grad_output 1000: exact 1000/70000 = 0.0142857;
    torch 0.0142822 (the nearest float16), formerly ours 0.0143051 (scaled twice)."""
    x = torch.randn(70000, device=device).half()
    y = torch.randn(70000, device=device).half()
    xo = leaf(x)
    g = torch.tensor(1000.0, dtype=torch.float16, device=device)
    go = torch.autograd.grad(TLF.l1_loss(xo, y), xo, g)[0]
    xt = leaf(x)
    gt = torch.autograd.grad(F.l1_loss(xt, y), xt, g)[0]
    nearest = torch.tensor(1000.0 / 70000, dtype=torch.float16).item()
    assert set(go.abs().unique().tolist()) <= {0.0, nearest}
    assert_close(go, gt, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_first_backward_equals_retained_second(loss, dtype, device):
    """With grad_output != 1 the first backward (into the forward's buffer) and a retained
    second one (the *_bwd op) compute the same thing: bit for bit."""
    opts = loss.grid[-1]
    x, y = loss.make((7, 33), dtype, device, opts)
    kw = materialize(opts, (7, 33), dtype, device)
    for reduction in ("mean", "sum", "none"):
        xo, yo = leaf(x), leaf(y, loss.target_grad)
        out = loss.ours(xo, yo, reduction=reduction, **kw)
        g = (torch.rand_like(out, dtype=torch.float64) + 0.3).to(dtype)
        ins = [xo, yo] if loss.target_grad else [xo]
        first = torch.autograd.grad(out, ins, g, retain_graph=True)
        second = torch.autograd.grad(out, ins, g)
        for a, b in zip(first, second):
            assert torch.equal(a, b), reduction


def test_bce_nan_target_raises_like_torch(device):
    x = torch.tensor([0.5], device=device)
    y = torch.tensor([float("nan")], device=device)
    if device != "cpu":
        pytest.skip("a device-side assert on CUDA (test_cuda.py checks it in a subprocess)")
    assert_same_exception(lambda: TLF.binary_cross_entropy(x, y),
                          lambda: F.binary_cross_entropy(x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_smooth_l1_beta_zero_nan_gradient_as_l1(dtype, device):
    for reduction in ("sum", "none", "mean"):
        xo = leaf(torch.tensor([float("nan"), 1.0, -2.0, 0.0], dtype=dtype, device=device))
        xt = leaf(xo)
        y = torch.zeros(4, dtype=dtype, device=device)
        lo = TLF.smooth_l1_loss(xo, y, beta=0.0, reduction=reduction)
        lt = F.smooth_l1_loss(xt, y, beta=0.0, reduction=reduction)
        assert_close(lo, lt)
        g = torch.ones_like(lt)
        go = torch.autograd.grad(lo, xo, g)[0]
        gt = torch.autograd.grad(lt, xt, g)[0]
        assert_close(go, gt, rtol=0, atol=0, equal_nan=True)
        assert go[0].item() == 0.0


def test_ops_reject_the_parameters_torch_rejects():
    """The ops check delta and beta themselves (torch's ops do), NaN included: a direct op
    call or the autograd.Function gets torch's error, not a NaN loss."""
    ops = torch.ops.torch_losses
    x, y, g = torch.randn(3), torch.randn(3), torch.tensor(1.0)
    huber = "huber_loss does not support non-positive values for delta"
    smooth = "smooth_l1_loss does not support negative values for beta"
    for delta in (0.0, -1.0, float("nan")):
        with pytest.raises(RuntimeError, match=huber):
            ops.huber_fwd(x, y, None, delta, 1, True, False)
        with pytest.raises(RuntimeError, match=huber):
            ops.huber_bwd(g, x, y, None, delta, 1, True, False)
        with pytest.raises(RuntimeError, match=huber):
            ops.huber_bwd_into_(torch.empty(3), torch.empty(0), g, x, y, None, delta, 1)
        with pytest.raises(RuntimeError, match=huber):
            TL.HuberFunction.apply(x.requires_grad_(), y, None, delta, "mean")
    for beta in (-0.5, float("nan")):
        with pytest.raises(RuntimeError, match=smooth):
            ops.smooth_l1_fwd(x, y, beta, 1, True, False)
        with pytest.raises(RuntimeError, match=smooth):
            ops.smooth_l1_bwd(g, x, y, beta, 1, True, False)
        with pytest.raises(RuntimeError, match=smooth):
            ops.smooth_l1_bwd_into_(torch.empty(3), torch.empty(0), g, x, y, beta, 1)
        with pytest.raises(RuntimeError, match=smooth):
            TL.SmoothL1Function.apply(x.requires_grad_(), y, beta, "mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("beta", [1e-310, 5e-324, 1e-40])
def test_smooth_l1_beta_below_the_accumulation_type(beta, dtype, device):
    """A beta that is 0 in float32 (the accumulation type of float32 and 16-bit input) is
    torch's beta = 0, l1_loss: SmoothL1's z / beta was 0 / 0 at x == y. (torch's own float
    kernel is not consistent there: its scalar loop gives 0 at x == y, its vector loop -1, both
    NaN at a NaN input.) In float64 these are subnormal betas, computed as torch does."""
    x = torch.tensor([0.0, 1e-39, -1e-39, 2.0, -3.0, 0.5] * 4 + [float("nan")],
                     dtype=torch.float64).to(dtype).to(device)
    y = torch.zeros(25, dtype=dtype, device=device)
    zero_in_acc = dtype != torch.float64 and float(torch.tensor(beta).float()) == 0
    for reduction in ("none", "sum", "mean"):
        xo, xt = leaf(x), leaf(x)
        lo = TLF.smooth_l1_loss(xo, y, beta=beta, reduction=reduction)
        lt = F.smooth_l1_loss(xt, y, beta=0.0 if zero_in_acc else beta, reduction=reduction)
        assert_close(lo, lt, rtol=0, atol=0, equal_nan=True)
        g = torch.ones_like(lt)
        go, gt = torch.autograd.grad(lo, xo, g)[0], torch.autograd.grad(lt, xt, g)[0]
        assert_close(go, gt, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("pos_weight", [None, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bce_with_logits_infinite_logits_like_torch(pos_weight, dtype, device):
    """x = -inf, inf, nan with and without pos_weight: loss and both gradients as torch (the
    target gradient at -inf with pos_weight is inf, not inf - inf)."""
    x = torch.tensor([-float("inf"), float("inf"), float("nan"), -3e38, 3e38, 2.0],
                     dtype=dtype, device=device)
    y = torch.tensor([0.5, 0.5, 0.5, 2.0, -1.0, 0.0], dtype=dtype, device=device)
    pw = None if pos_weight is None else torch.full_like(x, pos_weight)
    for reduction in ("none", "sum"):
        xo, yo, xt, yt = leaf(x), leaf(y), leaf(x), leaf(y)
        lo = TLF.binary_cross_entropy_with_logits(xo, yo, reduction=reduction, pos_weight=pw)
        lt = F.binary_cross_entropy_with_logits(xt, yt, reduction=reduction, pos_weight=pw)
        assert_close(lo, lt, msg=reduction)
        g = torch.ones_like(lt)
        for a, b in zip(torch.autograd.grad(lo, [xo, yo], g), torch.autograd.grad(lt, [xt, yt], g)):
            assert_close(a, b, msg=reduction)


def test_bce_with_logits_minimal_case_target_gradient_inf(device):
    x = torch.tensor([-float("inf")], dtype=torch.float64, device=device)
    yo = leaf(torch.tensor([0.5], dtype=torch.float64, device=device))
    pw = torch.tensor([0.5], dtype=torch.float64, device=device)
    loss = TLF.binary_cross_entropy_with_logits(x, yo, pos_weight=pw)
    assert torch.autograd.grad(loss, yo)[0].item() == float("inf")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_hinge_nonfinite_gradients_follow_clamp_min(bad, device):
    """The stated formula clamp_min(margin - y x, 0) differentiated by torch's autograd:
    0 * inf = nan in the target gradient where the clamp is inactive."""
    x = torch.tensor([bad, bad, 0.5, 2.0], device=device)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0], device=device)
    for reduction in ("none", "mean"):
        xo, yo, xt, yt = leaf(x), leaf(y), leaf(x), leaf(y)
        lo = TLF.hinge_loss(xo, yo, reduction=reduction)
        lt = hinge_reference(xt, yt, reduction=reduction)
        assert_close(lo, lt)
        g = torch.ones_like(lt)
        for a, b in zip(torch.autograd.grad(lo, [xo, yo], g), torch.autograd.grad(lt, [xt, yt], g)):
            assert_close(a, b, rtol=0, atol=0)


# Cases the randomized suite (tests/test_fuzz.py) found, kept as fixed tests.


def test_bce_gradient_clamp_is_torchs_float_epsilon(device):
    """At x = 0 or 1 the denominator x (1 - x) is clamped at torch's 1e-12 as a float, in
    float64 too: (0 - 0.5) / float32(1e-12), not / 1e-12."""
    xo = leaf(torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64, device=device))
    xt = leaf(xo)
    y = torch.tensor([0.5, 0.25, 0.3], dtype=torch.float64, device=device)
    go = torch.autograd.grad(TLF.binary_cross_entropy(xo, y, reduction="sum"), xo)[0]
    gt = torch.autograd.grad(F.binary_cross_entropy(xt, y, reduction="sum"), xt)[0]
    assert torch.equal(go, gt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bce_with_logits_pos_weight_one_is_not_none(dtype, device):
    """A pos_weight tensor of 1 follows torch's pos_weight formula ((pw - 1) y + 1 = 0 * inf
    = nan at an infinite target), no pos_weight the plain one; -1e30 logits and 1e30 targets
    overflow (x y - z not fused) as torch's do."""
    x = torch.tensor([2.0, -1e30, -1e30, 1.0], dtype=dtype, device=device)
    y = torch.tensor([float("inf"), -1e30, 1e30, 0.5], dtype=dtype, device=device)
    for pw in (None, torch.ones_like(x), torch.full_like(x, 0.5)):
        lo = TLF.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=pw)
        lt = F.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=pw)
        assert_close(lo, lt, equal_nan=True)


def test_kl_div_log_target_gradient_sums_like_torch(device):
    """exp(y) (y - x) + exp(y): exp(1e4) = inf with y - x < 0 gives torch's inf - inf = nan."""
    x = torch.tensor([float("inf"), 2e4, 0.5], dtype=torch.float64, device=device)
    yo = leaf(torch.tensor([1e4, 1e4, -0.3], dtype=torch.float64, device=device))
    yt = leaf(yo)
    go = torch.autograd.grad(TLF.kl_div(x, yo, reduction="sum", log_target=True), yo)[0]
    gt = torch.autograd.grad(F.kl_div(x, yt, reduction="sum", log_target=True), yt)[0]
    assert_close(go, gt, equal_nan=True)
    assert go[:2].isnan().all()

"""The CPU kernels' own float32 exp, log and log1p (csrc/cpu/vec_math.h), checked through the
losses whose value or gradient is exactly one of them, over every binade of their domains, and
through BCE-with-logits, BCE and KL as wholes: no further from the float64 result than torch
plus 1 ulp, special values as torch."""
import math

import pytest
import torch
import torch.nn.functional as F

import torch_losses.functional as TLF

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")


def _spread(lo, hi, per_binade=4096, seed=0):
    """Positive float32 values in [lo, hi]: per_binade random mantissas in every binade, the
    binade ends and lo, hi themselves."""
    g = torch.Generator().manual_seed(seed)
    e_lo, e_hi = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    exps = torch.arange(e_lo, e_hi + 1, dtype=torch.float64)
    mant = 1 + torch.rand(len(exps), per_binade, generator=g, dtype=torch.float64)
    v = (mant * torch.exp2(exps)[:, None]).flatten()
    v = torch.cat([v, torch.exp2(exps), torch.tensor([lo, hi], dtype=torch.float64)])
    return v.float().clamp(lo, hi).unique()


def _ulp(ref):
    """float32 ulp of each float64 value (subnormal spacing below the normal range)."""
    e = torch.frexp(ref.abs().clamp_min(torch.finfo(torch.float32).tiny))[1]
    return torch.ldexp(torch.ones_like(ref), (e - 24).to(torch.int32))


def _assert_within(ours, theirs, exact, ulps=1.0, scale=None):
    """ours no further from exact (float64) than torch plus `ulps` float32 ulps of scale (the
    largest term the result is formed from; default exact itself); NaN and inf where torch has
    them."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    same_special = ~torch.isfinite(theirs)
    assert torch.equal(ours[same_special].nan_to_num(), theirs[same_special].nan_to_num())
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    fin = torch.isfinite(theirs)
    err_ours = (ours[fin] - exact[fin]).abs()
    err_torch = (theirs[fin] - exact[fin]).abs()
    scale = exact if scale is None else torch.maximum(exact.abs(), scale.double())
    excess = (err_ours - err_torch) / _ulp(scale[fin])
    worst = int(excess.argmax())
    assert excess.max() <= ulps, (
        f"{excess.max():.2f} ulp beyond torch at {exact[fin][worst].item()!r}: ours "
        f"{ours[fin][worst].item()!r}, torch {theirs[fin][worst].item()!r}")


def test_exp_through_kl_log_target():
    # the input gradient of the sum is -exp(y), as the kernel computes it
    y = torch.cat([-_spread(2 ** -30, 104.0), _spread(2 ** -30, 88.5),
                   torch.tensor([0.0, -0.0, -103.9, -87.4, 88.72, 88.73, 89.0, -104.0])])
    x_ours = torch.zeros_like(y, requires_grad=True)
    x_theirs = torch.zeros_like(y, requires_grad=True)
    TLF.kl_div(x_ours, y, reduction="sum", log_target=True).backward()
    F.kl_div(x_theirs, y, reduction="sum", log_target=True).backward()
    _assert_within(x_ours.grad, x_theirs.grad, -torch.exp(y.double()))


def test_log_through_bce_at_target_one():
    # value = -log(x) for target 1 (the other term is 0 * log(1 - x)); x down to the clamp
    x = torch.cat([_spread(2 ** -144, 1.0), torch.tensor([2 ** -149, 1e-44])])
    y = torch.ones_like(x)
    ours = TLF.binary_cross_entropy(x, y, reduction="none")
    theirs = F.binary_cross_entropy(x, y, reduction="none")
    _assert_within(ours, theirs, (-torch.log(x.double())).clamp_max(100))


def test_log1p_through_bce_at_target_zero():
    # value = -log1p(-x) for target 0, x in [0, 1]: log1p over (-1, 0]
    x = torch.cat([_spread(2 ** -149, 1.0), 1 - _spread(2 ** -24, 0.5),
                   torch.tensor([0.0, 1.0])])
    y = torch.zeros_like(x)
    ours = TLF.binary_cross_entropy(x, y, reduction="none")
    theirs = F.binary_cross_entropy(x, y, reduction="none")
    _assert_within(ours, theirs, (-torch.log1p(-x.double())).clamp_max(100))


def test_log_through_kl_div():
    # the target gradient is log(y) + y / y - x; with x = 1 it is log(y) up to 1 rounding
    y = _spread(2 ** -149, 3e38)
    x = torch.ones_like(y, requires_grad=True)
    y_ours, y_theirs = y.clone().requires_grad_(), y.clone().requires_grad_()
    TLF.kl_div(x, y_ours, reduction="sum").backward()
    F.kl_div(x, y_theirs, reduction="sum").backward()
    _assert_within(y_ours.grad, y_theirs.grad, torch.log(y.double()), ulps=1.5)


@pytest.mark.parametrize("target", [0.0, 0.3, 1.0])
def test_bce_with_logits_whole_range(target):
    x = torch.cat([-_spread(2 ** -30, 200.0), _spread(2 ** -30, 200.0),
                   torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan])])
    y = torch.full_like(x, target)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = TLF.binary_cross_entropy_with_logits(xo, y, reduction="none")
    theirs = F.binary_cross_entropy_with_logits(xt, y, reduction="none")
    xd, yd = x.double(), y.double()
    exact = (1 - yd) * xd - F.logsigmoid(xd)
    # Within 2.5 ulps of the largest term, not 1: the formula's own roundings (shared with CUDA,
    # csrc/losses/pointwise.h: log(sigmoid(x)) as min(x, 0) - log1p(e), sigmoid as e / (1 + e)
    # after the exp) differ from torch's by up to 2 ulps, with at::vec's Sleef functions as well.
    _assert_within(ours, theirs, exact, ulps=2.5,
                   scale=torch.maximum(((1 - yd) * xd).abs(), F.logsigmoid(xd).abs()))
    ours.sum().backward()
    theirs.sum().backward()
    _assert_within(xo.grad, xt.grad, torch.sigmoid(xd) - yd, ulps=2.5, scale=torch.sigmoid(xd))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bce_with_logits_low_precision_no_worse_than_torch(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1 << 16, generator=g) * 8).to(dtype)
    y = torch.rand(1 << 16, generator=g).to(dtype)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = TLF.binary_cross_entropy_with_logits(xo, y, reduction="none")
    theirs = F.binary_cross_entropy_with_logits(xt, y, reduction="none")
    xd, yd = x.double(), y.double()
    exact = (1 - yd) * xd - F.logsigmoid(xd)
    # the float32 kernel rounds once to the dtype: never further than torch's composite
    assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()
    ours.sum().backward()
    theirs.sum().backward()
    gexact = torch.sigmoid(xd) - yd
    assert (xo.grad.double() - gexact).abs().max() <= (xt.grad.double() - gexact).abs().max()

"""Randomized differential tests against the installed torch (issue 13).

Every loss, random shapes (0-size, unbatched, (N, C, d1, d2), broadcast targets), layouts
(transposed, expanded, sliced, storage offsets; cross-entropy logits with the classes
innermost), dtypes, options, special values (+-1e4, +-1e30, exact kinks, zeros, NaN/inf at
random places) and grad_outputs (1, 0, other scalars, per element, expanded), compared with
torch on the same inputs:
- the same exception type when torch raises, and no exception when it does not;
- values, dtypes, shapes and gradients, element by element, against the float64 result on the
  same (rounded) inputs: ours no further from it than torch plus 1 ulp of the dtype (8 ulps in
  float64, where torch is the float64 result and only the order of operations differs), plus
  the computation's own rounding bound, with eps of float32 below float64 (so it matters for
  float32 and float64 results only): 4 eps of the value, 16 eps of the terms it is formed
  from (per element; for sums and means ~sqrt(n) sum |terms|; for cross-entropy ~sqrt(C)
  times the largest term). NaN and inf where torch has them. Where torch is not finite and
  the float64 result is, ours may be finite and within 1 ulp of it: half/bfloat16 are
  computed in float32 here, and torch's half/bfloat16 composites overflow (counted and
  reported, accepted).

Profiles (TL_FUZZ_PROFILE): "ci" (default: derandomized, so every run draws the same cases;
part of `make test`, about a minute on 2 cores) and "fuzz" (`make fuzz`: random draws,
TL_FUZZ_EXAMPLES (4000) x (3 pointwise + 2 cross-entropy + 1 invalid-argument) per device;
hypothesis prints a failure's example and a @reproduce_failure blob to replay it).
"""
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import torch_losses.functional as TLF
from tl_helpers import DEVICES, ce_extras_reference

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow, HealthCheck.data_too_large])
# max_examples per test function and device.
settings.register_profile("tl-ci", max_examples=300, derandomize=True, **_COMMON)
settings.register_profile("tl-fuzz", derandomize=False, **_COMMON,
                          max_examples=int(os.environ.get("TL_FUZZ_EXAMPLES", 4000)))
PROFILE = settings.get_profile("tl-" + os.environ.get("TL_FUZZ_PROFILE", "ci"))
# Example counts per test, relative to max_examples (pointwise has the most combinations).
SHARE = {"pointwise": 3, "cross_entropy": 2, "invalid": 1}


def _profile(kind):
    return settings(PROFILE, max_examples=PROFILE.max_examples * SHARE[kind])


LOW = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = (torch.float64,) + LOW
NAN, INF = float("nan"), float("inf")

# Elements where ours is finite and torch is not, while the float64 result is finite.
more_accurate_than_torch = {"elements": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_more_accurate_than_torch(request):
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\ntest_fuzz: {more_accurate_than_torch['elements']} elements where torch "
                "was not finite and ours matched the finite float64 result (accepted)")


# --------------------------------------------------------------------------------------------
# Comparison


def _ulp(r, dtype):
    """The spacing of dtype at |r|, as float64 (0 where r is not finite)."""
    a = r.abs().to(dtype)
    up = torch.nextafter(a, torch.full_like(a, torch.finfo(dtype).max)).double()
    return torch.where(torch.isfinite(r), (up - a.double()).abs(), 0.0)


def assert_matches(ours, theirs, ref, what, scale=None, rounded_sums=None):
    """ours vs torch (`theirs`, same dtype) and the float64 result `ref`, element by element
    (see the module's docstring). scale: the size of the terms a reduced value sums (or a
    cross-entropy gradient's largest term), or per element the size of the terms a difference
    is formed from, for the rounding bound of sums and differences; None: none.
    rounded_sums: per element, an absolute bound for a gradient that autograd sums from
    elements already rounded to the dtype (a broadcast target's), in ours as in torch."""
    assert type(ours) is torch.Tensor, what
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype}, torch {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape}, torch {theirs.shape}"
    if ours.numel() == 0:
        return
    dtype = ours.dtype
    o, t = ours.detach().double().cpu().reshape(-1), theirs.detach().double().cpu().reshape(-1)
    r = ref.detach().double().cpu().reshape(-1)
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    if torch.is_tensor(scale):
        scale = scale.double().cpu().broadcast_to(ours.shape).reshape(-1)
    # the computation's own rounding (eps of float32 below float64): a few eps of the value
    # (a formula's roundings, as a quotient's) and of the terms a sum or difference adds
    slack = acc_eps * (4 * r.abs().nan_to_num(nan=0.0, posinf=0.0) +
                       16 * (0.0 if scale is None else scale))
    if rounded_sums is not None:
        slack = slack + rounded_sums.double().cpu().reshape(-1)
    rd = r.to(dtype).double()  # the float64 result rounded to the dtype
    err_o, err_t = (o - r).abs(), (t - r).abs()
    floor = torch.where(torch.isfinite(rd), (rd - r).abs(), 0.0)
    ulps = 8 if dtype == torch.float64 else 1
    fin_o, fin_t, fin_r = torch.isfinite(o), torch.isfinite(t), torch.isfinite(r)
    ok_nan = o.isnan() & (t.isnan() | r.isnan())
    ok_inf = o.isinf() & ((o == t) | (o == rd) | (o == r))
    # torch's float64 result is inf/nan, ours finite: only where torch in this dtype agrees
    # with ours (a float64 overflow that the dtype's math avoids)
    ok_r_nonfinite = fin_o & ~fin_r & fin_t & ((o - t).abs() <= 8 * _ulp(t, dtype) + slack)
    # torch overflowed (or made a nan) where the float64 result is finite: ours within 1 ulp
    better = fin_o & fin_r & ~fin_t & (err_o <= floor + _ulp(r, dtype) + slack)
    ok_finite = fin_o & fin_r & fin_t & (
        err_o <= torch.maximum(err_t, floor) + ulps * _ulp(r, dtype) + slack)
    bad = ~(ok_nan | ok_inf | ok_r_nonfinite | better | ok_finite)
    more_accurate_than_torch["elements"] += int(better.sum())
    if bad.any():
        idx = bad.nonzero().reshape(-1)[:4].tolist()
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())} of {o.numel()} elements differ; first "
            f"(index, ours, torch, float64): "
            f"{[(i, o[i].item(), t[i].item(), r[i].item()) for i in idx]}")


def run_both(ours_fn, theirs_fn):
    """Runs torch's and our call. Returns (ours, theirs), or None when both raised the same
    exception type (an assertion error when only one raised, or the types differ)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs = theirs_fn()
        except Exception as e:  # noqa: BLE001
            torch_exc = e
        else:
            torch_exc = None
        try:
            ours = ours_fn()
        except Exception as e:  # noqa: BLE001
            if torch_exc is None:
                raise AssertionError(f"ours raised {type(e).__name__}: {e}; torch did not") from e
            assert type(e) is type(torch_exc), (
                f"ours raised {type(e).__name__}: {e}\ntorch raised "
                f"{type(torch_exc).__name__}: {torch_exc}")
            return None
    assert torch_exc is None, (f"torch raised {type(torch_exc).__name__}: {torch_exc}; "
                               "ours did not")
    return ours, theirs


# Known differences in torch_losses/functional.py, kept out of the fuzzer's draws until fixed;
# delete each entry (and its use) then.
KNOWN_FUNCTIONAL_DIFFERENCES = {
    # cross_entropy of a (C) input with a 1-element class-index target: torch's forward takes
    # it without label smoothing, raises with it ("output with shape [] doesn't match the
    # broadcast shape [1]"), and its backward refuses it ("size mismatch"); ours computes all
    # three.
    "unbatched_input_with_1_element_target": True,
    # l1_loss of integer tensors with reduction 'sum' or 'none': torch computes an integer
    # result, ours raises (its dtype probe runs torch's 'mean', which raises).
    "integer_l1_sum_or_none": True,
    # kl_div with a broadcast target: torch forms its xlogy(y, y) term on the target before
    # broadcasting, the functional broadcasts first, so (a) with an empty input and a 0-dim
    # target of 0, torch's target gradient is nan (0 * nan), ours 0 (a sum over nothing);
    # (b) in float16/bfloat16 the target gradient sums per-element gradients already rounded
    # to the dtype (as torch itself does for mse/l1/huber/smooth_l1): with inputs of 1e4 and
    # -1e4 in one broadcast column ours was 0.85 where torch and float64 give -1.9.
    "kl_div_broadcast_target": True,
    # mse_loss / l1_loss with weight= and reduction 'mean' below float64: the functional
    # divides the op's sum by weight.sum() afterwards, so autograd hands the op a grad_output
    # g / sum(w) already rounded to the dtype; the gradient can then be ~2 ulps off the
    # float64 result where torch's own composite happens to land within 1 (seen in float16).
    # The fix: fold 1 / sum(w) into the op's float32 scale.
    "weighted_mean_rounds_grad_output": True,
}


# Where ours differs from torch by design (README, accuracy), kept out of the draws.
DOCUMENTED_DIFFERENCES = {
    # kl_div(log_target=False) with a negative (invalid) target and grad_output exactly 0:
    # torch's target gradient is xlogy(0, y) = 0, ours 0 * log(y) = nan (the kernels apply
    # grad_output after the formula).
    "kl_div_zero_grad_output_negative_target": True,
    # cross-entropy with z-loss and an infinite grad_output: the classes other than the target
    # get +-inf p_c, where the composite reference (tl_helpers.ce_extras_reference) adds two
    # infinite terms, the log-softmax's and logsumexp's, and gets NaN where their signs differ.
    "ce_zloss_nonfinite_grad_output": True,
}


# --------------------------------------------------------------------------------------------
# Building tensors from drawn specs


def _layout_view(values, layout, gen):
    """A tensor equal to `values` in the given memory layout (a view of a larger buffer)."""
    shape = values.shape
    if layout == "transposed" and values.dim() >= 2:
        return values.permute(*reversed(range(values.dim()))).contiguous().permute(
            *reversed(range(values.dim())))
    if layout == "sliced" and values.dim() >= 1:
        big = torch.empty(shape[:-1] + (2 * shape[-1] + 1,), dtype=values.dtype,
                          device=values.device).normal_(generator=gen)
        view = big[..., 1::2]
        view.copy_(values)
        return view
    if layout == "classes_last" and values.dim() >= 3:  # channels_last-like logits
        return values.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "offset":
        k = 3
        flat = torch.empty(values.numel() + k, dtype=values.dtype, device=values.device)
        view = flat[k:].view(shape)
        view.copy_(values)
        return view
    return values.contiguous()


def _expandable(values, layout):
    """For layout 'expanded': the first dim of size > 1 becomes a stride-0 broadcast of row 0."""
    if layout != "expanded":
        return values
    for d, n in enumerate(values.shape):
        if n > 1:
            return values.narrow(d, 0, 1).expand(values.shape)
    return values


SPECIALS = [NAN, INF, -INF, 0.0, 1e4, -1e4]
HUGE = [1e30, -1e30]  # finite in float32 and float64; inf in half/bfloat16 inputs


def _inject(values, rate, gen, specials):
    """Replace a random `rate` fraction of the elements (in place) by random specials."""
    if rate == 0 or values.numel() == 0:
        return values
    flat = values.view(-1)
    mask = torch.rand(flat.shape, generator=gen, dtype=torch.float64) < rate
    pick = torch.randint(0, len(specials), flat.shape, generator=gen)
    table = torch.tensor(specials, dtype=torch.float64)
    flat[mask] = table[pick][mask]
    return values


@st.composite
def pointwise_specs(draw):
    loss = draw(st.sampled_from(["bce_with_logits", "huber", "mse", "l1", "smooth_l1", "bce",
                                 "hinge", "kl_div"]))
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.integers(0, 9)) == 0:
        shape = (draw(st.integers(2040, 4200)),)  # chunk and vector tails
    else:  # up to 4 dims (0: a 0-dim tensor), sometimes a 0-size one
        side = st.integers(0, 6) if draw(st.integers(0, 5)) == 0 else st.integers(1, 6)
        shape = tuple(draw(st.lists(side, min_size=0, max_size=4)))
    spec = dict(loss=loss, dtype=dtype, shape=shape, seed=draw(st.integers(0, 2**31 - 1)))
    spec["reduction"] = draw(st.sampled_from(
        ["none", "mean", "sum"] + (["batchmean"] if loss == "kl_div" else [])))
    spec["layout_x"] = draw(st.sampled_from(["contiguous", "transposed", "sliced", "offset",
                                             "expanded"]))
    spec["layout_y"] = draw(st.sampled_from(["contiguous", "transposed", "sliced", "offset",
                                             "expanded"]))
    spec["broadcast_target"] = (loss in ("huber", "mse", "l1", "smooth_l1", "kl_div")
                                and len(shape) > 0 and draw(st.integers(0, 4)) == 0)
    assume(not (KNOWN_FUNCTIONAL_DIFFERENCES["kl_div_broadcast_target"] and
                loss == "kl_div" and spec["broadcast_target"] and
                (0 in shape or dtype != torch.float64)))
    spec["magnitude"] = draw(st.sampled_from([1.0, 1.0, 3.0, 1e2, 1e4] + (
        [1e30] if dtype in (torch.float32, torch.float64) else [])))
    spec["special_rate"] = draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]))
    spec["kink_rate"] = draw(st.sampled_from([0.0, 0.2, 0.5]))
    spec["want_y"] = draw(st.booleans())  # which of input / target require grad
    spec["want_x"] = draw(st.integers(0, 5)) > 0 or not spec["want_y"]
    # options
    opts = {}
    if loss in ("bce_with_logits", "huber", "mse", "l1", "bce") and draw(st.booleans()):
        opts["weight"] = draw(st.sampled_from(["full", "last"] if loss in
                                              ("bce_with_logits", "bce") else ["full"]))
    if loss == "bce_with_logits" and draw(st.booleans()):
        opts["pos_weight"] = draw(st.sampled_from(["full", "last"]))
    if loss == "huber":
        opts["delta"] = draw(st.sampled_from([1.0, 0.5, 2.5, 1e-3, 300.0]))
    if loss == "smooth_l1":
        opts["beta"] = draw(st.sampled_from([1.0, 0.0, 0.5, 2.5, 1e-3]))
    if loss == "hinge":
        opts["margin"] = draw(st.sampled_from([1.0, 0.0, 0.5, 2.0]))
    if loss == "kl_div":
        opts["log_target"] = draw(st.booleans())
    spec["opts"] = opts
    assume(not (KNOWN_FUNCTIONAL_DIFFERENCES["weighted_mean_rounds_grad_output"] and
                loss in ("mse", "l1") and "weight" in opts and spec["reduction"] == "mean"
                and dtype != torch.float64))
    spec["grad_output"] = draw(st.sampled_from(["one", "one", "random", "big", "small",
                                                "zero", "expanded", "per_element"]))
    assume(not (DOCUMENTED_DIFFERENCES["kl_div_zero_grad_output_negative_target"] and
                loss == "kl_div" and not opts["log_target"] and spec["grad_output"] == "zero"))
    return spec


def _pointwise_values(spec, device):
    """Float64 input and target values (before the dtype cast and the layout)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    loss, shape, mag = spec["loss"], spec["shape"], spec["magnitude"]
    yshape = shape
    if spec["broadcast_target"]:
        yshape = tuple(1 if i % 2 == 0 else n for i, n in enumerate(shape))[1:] or ()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randn(yshape, generator=gen, dtype=torch.float64)
    specials = SPECIALS + (HUGE if spec["dtype"] in (torch.float32, torch.float64) else [])
    if loss == "bce":
        x, y = torch.rand(shape, generator=gen, dtype=torch.float64), torch.rand(
            yshape, generator=gen, dtype=torch.float64)
        kinks = [0.0, 1.0, 0.5]
        x = _inject(x, spec["kink_rate"], gen, kinks)
        y = _inject(y, spec["kink_rate"], gen, kinks)
        # out of [0, 1] or NaN: torch raises (checked on the CPU only: a CUDA device assert)
        if device == "cpu":
            x = _inject(x, spec["special_rate"] / 4, gen, [NAN, 1.5, -0.5])
            y = _inject(y, spec["special_rate"] / 4, gen, [NAN, 1.5, -0.5])
        return x, y
    if loss == "hinge":
        y = torch.randint(0, 2, yshape, generator=gen).double() * 2 - 1
        x = x * mag
        # margin - y x = 0: x = margin * y
        m = spec["opts"]["margin"]
        kink = torch.rand(shape, generator=gen, dtype=torch.float64) < spec["kink_rate"]
        x = torch.where(kink, m * y, x)
        x = _inject(x, spec["special_rate"], gen, specials)
        return x, y
    if loss == "bce_with_logits":
        x = _inject(x * mag, spec["kink_rate"] / 2, gen, [0.0])
        y = torch.rand(yshape, generator=gen, dtype=torch.float64)
        y = _inject(y, spec["kink_rate"] / 2, gen, [0.0, 1.0, 2.0, -1.0])
        return _inject(x, spec["special_rate"], gen, specials), _inject(
            y, spec["special_rate"] / 2, gen, specials)
    if loss == "kl_div":
        dim = -1 if len(shape) else None
        x = x.log_softmax(dim) if dim is not None else -x.abs()
        y = y.softmax(-1) if len(yshape) else y.abs()
        if spec["opts"]["log_target"]:
            y = y.log()
        x = _inject(x, spec["special_rate"], gen, specials)
        y = _inject(y, spec["kink_rate"] / 2, gen, [0.0])
        return x * (1 if mag > 1e3 else mag), _inject(y, spec["special_rate"], gen, specials)
    # regression: x = y + z with z at the kinks sometimes (y = 0 there, so z is exact)
    param = spec["opts"].get("delta", spec["opts"].get("beta", 0.0))
    x = x * mag
    y = y * mag
    kinks = [0.0, param, -param]
    if spec["kink_rate"] and not spec["broadcast_target"]:
        kink = torch.rand(shape, generator=gen, dtype=torch.float64) < spec["kink_rate"]
        pick = torch.randint(0, 3, shape, generator=gen)
        z = torch.tensor(kinks, dtype=torch.float64)[pick]
        y = torch.where(kink, torch.zeros_like(y), y)
        x = torch.where(kink, z, x)
    return _inject(x, spec["special_rate"], gen, specials), _inject(
        y, spec["special_rate"] / 2, gen, specials)


def _weights(spec, shape, dtype, device, gen):
    out = {}
    for name in ("weight", "pos_weight"):
        kind = spec["opts"].get(name)
        if kind is None:
            continue
        wshape = shape if kind == "full" or not shape else shape[-1:]
        w = torch.rand(wshape, generator=gen, dtype=torch.float64) * 2
        w = _inject(w, 0.1, gen, [0.0, 1.0, 300.0])
        out[name] = w.to(dtype).to(device)
    return out


CALLS = {
    "bce_with_logits": (TLF.binary_cross_entropy_with_logits,
                        F.binary_cross_entropy_with_logits),
    "huber": (TLF.huber_loss, F.huber_loss),
    "mse": (TLF.mse_loss, F.mse_loss),
    "l1": (TLF.l1_loss, F.l1_loss),
    "smooth_l1": (TLF.smooth_l1_loss, F.smooth_l1_loss),
    "bce": (TLF.binary_cross_entropy, F.binary_cross_entropy),
    "hinge": (TLF.hinge_loss, None),
    "kl_div": (TLF.kl_div, F.kl_div),
}


def _hinge_torch(input, target, margin=1.0, reduction="mean"):
    """The stated formula (no torch twin): (margin - y x).clamp_min(0), with the documented
    gradient -y at the kink on every torch (2.14's clamp_min passes 0 there)."""
    v = margin - target * input
    loss = torch.where(v >= 0, v, v.clamp_min(0))
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _torch_call(name, x, y, kw):
    return _hinge_torch(x, y, **kw) if name == "hinge" else CALLS[name][1](x, y, **kw)


def _grad_output(kind, like, gen):
    if kind == "one" or like.numel() == 0:
        return torch.ones_like(like)
    if kind == "nonfinite":  # inf, -inf or NaN; per element mixed with finite values
        g = _inject(torch.rand(like.shape, generator=gen, dtype=torch.float64) + 0.5,
                    1.0 if like.dim() == 0 else 0.5, gen, [INF, -INF, NAN])
        return g.to(like.dtype).to(like.device)
    if kind == "zero":
        return torch.zeros_like(like)
    if kind == "expanded":
        return torch.tensor(0.37, dtype=like.dtype, device=like.device).expand(like.shape)
    c = {"random": torch.rand((), generator=gen, dtype=torch.float64).item() + 0.3,
         "big": 1000.0, "small": 0.01}.get(kind)
    if c is not None or like.dim() == 0:
        return torch.full_like(like, 0.75 if c is None else c)
    return (torch.rand(like.shape, generator=gen, dtype=torch.float64) * 2 - 0.5).to(
        like.dtype).to(like.device)


def _term_sizes(x64, y64, kw64):
    """Per element, a bound on the size of the terms a pointwise loss or its gradient adds
    (such as (1 - y) x and log(sigmoid(x)), or sigmoid(x) and y): a difference of them is
    only as exact as eps times their size, in ours and in torch."""
    def finite(t):  # at an infinite input the finite results come from the other terms
        return torch.where(torch.isfinite(t), t, 0.0).abs()

    size = (1 + finite(x64)) * (1 + finite(y64))
    for name in ("weight", "pos_weight"):
        if torch.is_tensor(kw64.get(name)):
            size = size * finite(kw64[name]).clamp_min(1)
    return size.nan_to_num(nan=0.0, posinf=0.0).cpu()


def _abs_scale(name, x64, y64, kw64, reduction):
    """sum |elementwise loss| (mean: / numel): the size of the terms a reduction adds."""
    if reduction == "none":
        return None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            el = _torch_call(name, x64, y64, {**kw64, "reduction": "none"}).abs()
        except Exception:  # noqa: BLE001
            return None
        el = el[torch.isfinite(el)]
        if el.numel() == 0:
            return None
        # a sum of n terms in any order: error ~ sqrt(n) eps sum|terms| (16 eps in the check)
        spread = max(1.0, math.sqrt(el.numel()) / 4)
        return spread * el.sum().item() / (x64.numel() if reduction == "mean" else 1)


def run_pointwise(spec, device):
    name, dtype, reduction = spec["loss"], spec["dtype"], spec["reduction"]
    x64, y64 = _pointwise_values(spec, device)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    kw64 = _weights(spec, tuple(x64.shape), torch.float64, "cpu", gen)
    kw64.update({k: v for k, v in spec["opts"].items() if k not in ("weight", "pos_weight")})
    if name == "kl_div":
        kw64["log_target"] = spec["opts"]["log_target"]
    kw64["reduction"] = reduction
    kw = {k: (v.to(dtype).to(device) if torch.is_tensor(v) else v) for k, v in kw64.items()}
    # the float64 reference sees exactly the (rounded) weights ours and torch get
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    x = _expandable(_layout_view(x64.to(dtype).to(device), spec["layout_x"], gen),
                    spec["layout_x"])
    y = _expandable(_layout_view(y64.to(dtype).to(device), spec["layout_y"], gen),
                    spec["layout_y"])
    # the float64 reference sees exactly the values of the low-precision inputs
    xr64, yr64 = x.double(), y.double()

    def leaves(a, b):
        a = a.detach().clone() if not spec["layout_x"] == "expanded" else a.detach()
        b = b.detach().clone() if not spec["layout_y"] == "expanded" else b.detach()
        return a.requires_grad_(spec["want_x"]), b.requires_grad_(spec["want_y"])

    xo, yo = leaves(x, y)
    xt, yt = leaves(x, y)
    xr, yr = leaves(xr64, yr64)
    both = run_both(lambda: CALLS[name][0](xo, yo, **kw), lambda: _torch_call(name, xt, yt, kw))
    if both is None:
        return
    ours, theirs = both
    with warnings.catch_warnings():  # torch's broadcast warning: checked in test_pointwise
        warnings.simplefilter("ignore")
        ref = _torch_call(name, xr, yr, kw64)
    terms = _term_sizes(xr64, yr64, kw64)
    scale = _abs_scale(name, xr64, yr64, kw64, reduction) if reduction != "none" else terms
    assert_matches(ours, theirs, ref, f"{name} value", scale)
    wanted = [t for t, w in ((0, spec["want_x"]), (1, spec["want_y"])) if w]
    if not wanted or not theirs.requires_grad:
        return
    g = _grad_output(spec["grad_output"], theirs, gen)
    go = torch.autograd.grad(ours, [(xo, yo)[i] for i in wanted], g)
    gt = torch.autograd.grad(theirs, [(xt, yt)[i] for i in wanted], g)
    gr = torch.autograd.grad(ref, [(xr, yr)[i] for i in wanted], g.double())
    # the gradient's terms: the elementwise sizes times grad_output and the mean's factor
    factor = {"mean": 1 / max(x.numel(), 1),
              "batchmean": 1 / max(x.shape[0] if x.dim() else 1, 1)}
    if name in ("mse", "l1") and reduction == "mean" and "weight" in kw64:
        factor["mean"] = 1 / max(kw64["weight"].sum().abs().item(), 1e-300)
    g_terms = terms * g.double().abs().cpu() * factor.get(reduction, 1.0)
    for i, a, b, c in zip(wanted, go, gt, gr):
        # A broadcast target's gradient: autograd sums the per-element gradients, each
        # rounded to the dtype (torch's too), each at most ~2 g_terms in size.
        rounded = None
        if c.shape != theirs.shape and dtype != torch.float64:
            rounded = _ulp(2 * g_terms, dtype).sum_to_size(c.shape)
        assert_matches(a, b, c, f"{name} grad {'input' if i == 0 else 'target'}",
                       g_terms.sum_to_size(c.shape), rounded)


@pytest.mark.parametrize("device", DEVICES)
@_profile("pointwise")
@given(spec=pointwise_specs())
def test_pointwise_against_torch(spec, device):
    run_pointwise(spec, device)


# --------------------------------------------------------------------------------------------
# Cross-entropy

@st.composite
def cross_entropy_specs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["unbatched", "2d", "2d", "3d", "4d", "4d_wide"]))
    big_c = draw(st.integers(0, 7)) == 0
    C = draw(st.sampled_from([511, 512, 513, 1100]) if big_c else st.integers(1, 40))
    if draw(st.integers(0, 20)) == 0:
        C = 0
    N = draw(st.integers(0, 5) if draw(st.integers(0, 9)) == 0 else st.integers(1, 5))
    dims = {"unbatched": [], "2d": [], "3d": [draw(st.integers(1, 3))],
            "4d": [draw(st.integers(0, 3)), draw(st.integers(1, 3))],
            # H W up to 42: the CPU's blocks of 4-16 positions across H W and their tails
            "4d_wide": [draw(st.integers(1, 6)), draw(st.integers(1, 7))]}[kind]
    shape = (C,) if kind == "unbatched" else (N, C, *dims)
    probs = draw(st.integers(0, 3)) == 0
    spec = dict(dtype=dtype, shape=shape, probs=probs, seed=draw(st.integers(0, 2**31 - 1)))
    spec["weighted"] = draw(st.booleans())
    spec["ignore_index"] = draw(st.sampled_from([-100, -100, 0, 1, 3]))
    spec["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, -0.1, 0.33]))
    spec["reduction"] = draw(st.sampled_from(["none", "mean", "sum"]))
    spec["layout"] = draw(st.sampled_from(["contiguous", "transposed", "sliced", "offset",
                                           "expanded", "classes_last"]))
    spec["magnitude"] = draw(st.sampled_from([1.0, 1.0, 5.0, 1e2, 1e4] + (
        [1e30] if dtype in (torch.float32, torch.float64) else [])))
    spec["shift"] = draw(st.sampled_from([0.0, 0.0, 1e4, -1e4]))
    spec["special_rate"] = draw(st.sampled_from([0.0, 0.0, 0.0, 0.02, 0.2]))
    spec["bad_target_rate"] = draw(st.sampled_from([0.0] * 6 + [0.2]))
    spec["target_kind"] = draw(st.sampled_from(["softmax", "softmax", "unnormalized",
                                                "onehot", "special"]))
    spec["want_target"] = probs and draw(st.booleans())
    spec["one_element_target"] = (kind == "unbatched" and not probs and not
                                  KNOWN_FUNCTIONAL_DIFFERENCES[
                                      "unbatched_input_with_1_element_target"]
                                  and draw(st.booleans()))
    spec["grad_output"] = draw(st.sampled_from(["one", "one", "random", "big", "small",
                                                "zero", "expanded", "per_element",
                                                "nonfinite"]))
    # issue 9's extras, against their composite of torch ops (tl_helpers.ce_extras_reference;
    # not with zero classes, where the composite itself fails)
    spec["softcap"] = draw(st.sampled_from([None] * 5 + [1.0, 5.0, 30.0])) if C else None
    spec["z_loss"] = draw(st.sampled_from([0.0] * 5 + [1e-4, 0.1])) if C else 0.0
    assume(not (DOCUMENTED_DIFFERENCES["ce_zloss_nonfinite_grad_output"] and spec["z_loss"]
                and spec["grad_output"] == "nonfinite"))
    return spec


def _ce_extras(spec):
    """softcap / z_loss keywords of a spec, empty for the plain loss."""
    return {k: spec[k] for k in ("softcap", "z_loss") if spec.get(k)}


def _ce_reference(spec, float64=False):
    """torch's cross_entropy, or the composite of the extras when the spec has any (float64:
    the float64 reference's stable lse)."""
    extras = _ce_extras(spec)
    if not extras:
        return F.cross_entropy
    return lambda x, t, w, **kw: ce_extras_reference(x, t, w, **kw, **extras,
                                                     stable_lse=float64)


def _ce_tensors(spec, device):
    gen = torch.Generator().manual_seed(spec["seed"])
    shape, dtype = spec["shape"], spec["dtype"]
    C = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * spec["magnitude"] + spec["shift"]
    specials = SPECIALS + (HUGE if dtype in (torch.float32, torch.float64) else [])
    x = _inject(x, spec["special_rate"], gen, specials)
    cdim = 0 if len(shape) == 1 else 1
    if spec["probs"]:
        kind = spec["target_kind"]
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if kind == "softmax" and C > 0:
            t = t.softmax(cdim)
        elif kind == "unnormalized":
            t = t.abs()
        elif kind == "onehot" and C > 0:
            t = F.one_hot(t.argmax(cdim), C).double().movedim(-1, cdim)
        elif kind == "special":
            t = _inject(t.abs(), 0.2, gen, [0.0, 1.0, NAN, INF, 1e4])
        t = t.to(dtype)
    else:
        tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
        t = torch.randint(0, max(C, 1), tshape, generator=gen)
        if t.numel():
            flat = t.view(-1)
            hit = torch.rand(flat.shape, generator=gen) < 0.2
            flat[hit] = spec["ignore_index"]
            if device == "cpu" and spec["bad_target_rate"]:  # CUDA: a device assert
                bad = torch.rand(flat.shape, generator=gen) < spec["bad_target_rate"]
                flat[bad] = torch.tensor([C, -1, C + 5])[torch.randint(0, 3, flat.shape,
                                                                         generator=gen)][bad]
    if spec["one_element_target"]:
        t = t.reshape(1)
    w = None
    if spec["weighted"]:
        w = _inject(torch.rand(C, generator=gen, dtype=torch.float64) * 2, 0.1, gen, [0.0, 1.0])
    x = _expandable(_layout_view(x.to(dtype).to(device), spec["layout"], gen), spec["layout"])
    return x, t.to(device), w, gen


def run_cross_entropy(spec, device):
    dtype = spec["dtype"]
    x, t, w, gen = _ce_tensors(spec, device)
    kw = dict(ignore_index=spec["ignore_index"], label_smoothing=spec["label_smoothing"],
              reduction=spec["reduction"])
    wd = None if w is None else w.to(dtype).to(device)
    w64 = None if w is None else wd.double()

    def leaves(a, b, floating):
        a = a.detach() if spec["layout"] == "expanded" else a.detach().clone()
        b = b.detach().clone()
        if floating:
            a, b = a.double(), (b.double() if spec["probs"] else b)
        return a.requires_grad_(), b.requires_grad_(spec["want_target"])

    xo, to_ = leaves(x, t, False)
    xt, tt = leaves(x, t, False)
    xr, tr = leaves(x, t, True)
    reference = _ce_reference(spec)
    both = run_both(lambda: TLF.cross_entropy(xo, to_, wd, **kw, **_ce_extras(spec)),
                    lambda: reference(xt, tt, wd, **kw))
    if both is None:
        return
    ours, theirs = both
    ref = _ce_reference(spec, float64=True)(xr, tr, w64, **kw)
    denominator = ce_mean_denominator(spec, x, tr, w64)
    assert_matches(ours, theirs, ref, "cross_entropy value",
                   ce_value_scale(spec, x, xr, tr, w64, kw, ref, denominator))
    wanted = [0] + ([1] if spec["want_target"] else [])
    g = _grad_output(spec["grad_output"], theirs, gen)
    grads = run_both(lambda: torch.autograd.grad(ours, [(xo, to_)[i] for i in wanted], g),
                     lambda: torch.autograd.grad(theirs, [(xt, tt)[i] for i in wanted], g))
    if grads is None:  # both backwards raised alike (torch's own, for zero classes)
        return
    go, gt = grads
    gr = torch.autograd.grad(ref, [(xr, tr)[i] for i in wanted], g.double())
    for i, a, b, c in zip(wanted, go, gt, gr):
        assert_matches(a, b, c, f"cross_entropy grad {'input' if i == 0 else 'target'}",
                       ce_grad_scale(spec, x, tr, w64, g, c, denominator))


def ce_mean_denominator(spec, x, tr, w64):
    """The mean's denominator: rows (probabilities) or sum w_y over rows not ignored; 1 for
    the other reductions."""
    if spec["reduction"] != "mean":
        return 1.0
    if spec["probs"]:
        C = x.shape[0] if x.dim() == 1 else x.shape[1]
        return float(x.numel() // max(C, 1))
    kept = tr[tr != spec["ignore_index"]].cpu()
    return float(kept.numel() if w64 is None else w64.cpu()[kept].sum().item())


def ce_value_scale(spec, x, xr, tr, w64, kw, ref, denominator):
    """The size of the terms a cross-entropy value sums (see assert_matches): a row's loss sums
    C nonnegative terms, ~sqrt(C) eps of its size (ours and torch's)."""
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    per_class = max(1.0, math.sqrt(C) / 4)
    if spec["reduction"] == "none":  # (the log of a sum >= 1: eps absolute at least)
        return per_class * (1 + ref.detach().double().abs().nan_to_num(nan=0.0, posinf=0.0))
    if denominator > 0:
        with torch.no_grad():
            el = _ce_reference(spec, float64=True)(xr, tr, w64,
                                                   **{**kw, "reduction": "none"}).abs()
        el = el[torch.isfinite(el)]
        if el.numel():  # sum |terms| (see _abs_scale), over the mean's denominator
            return (per_class * max(1.0, math.sqrt(el.numel()) / 4) * el.sum().item()
                    / denominator)
    return None


def ce_grad_scale(spec, x, tr, w64, g, ref_grad, denominator):
    """A gradient is a difference of terms up to |grad_output| max(w, 1) (/ the mean's
    denominator) in size, and the softmax divides by a sum over C classes: its error (ours
    and torch's) is ~sqrt(C) eps of that size."""
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    g_finite = g.double().abs().nan_to_num(nan=0.0, posinf=0.0)  # (elsewhere nothing is)
    g_max = g_finite.max().item() if g.numel() else 0.0
    terms = g_max * max(1.0, 0.0 if w64 is None or not w64.numel() else w64.max().item())
    if spec["probs"] and tr.numel():  # the softmax term is sum_c t_c times softmax
        row_sums = tr.detach().abs().nan_to_num(nan=0.0, posinf=0.0).sum(0 if tr.dim() == 1
                                                                         else 1)
        terms *= max(1.0, row_sums.max().item())
    if spec["reduction"] == "mean":
        terms = terms / denominator if denominator > 0 else 0.0
    finite = ref_grad[torch.isfinite(ref_grad)]
    largest = max(terms, finite.abs().max().item() if finite.numel() else 0.0)
    return math.sqrt(C) / 2 * largest


@pytest.mark.parametrize("device", DEVICES)
@_profile("cross_entropy")
@given(spec=cross_entropy_specs())
def test_cross_entropy_against_torch(spec, device):
    run_cross_entropy(spec, device)


# --------------------------------------------------------------------------------------------
# Invalid arguments: the same exception type as torch


INVALID_CASES = ["reduction", "shapes", "nonpositive_param", "bce_out_of_range",
                 "integer_inputs", "mixed_dtypes", "ce_target_dtype", "ce_target_bounds",
                 "ce_smoothing", "ce_weight_shape", "ce_batch", "ce_scalar_input",
                 "ce_probs_ignore_index", "ce_integer_logits"]
POINTWISE_NAMES = ["bce_with_logits", "huber", "mse", "l1", "smooth_l1", "bce", "kl_div"]


@st.composite
def invalid_specs(draw):
    return dict(case=draw(st.sampled_from(INVALID_CASES)),
                loss=draw(st.sampled_from(POINTWISE_NAMES)),
                dtype=draw(st.sampled_from(DTYPES)),
                other_dtype=draw(st.sampled_from(DTYPES + (torch.int64, torch.int32,
                                                           torch.bool))),
                shape=draw(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)),
                seed=draw(st.integers(0, 2**31 - 1)),
                value=draw(st.sampled_from([-1.0, 0.0, -0.5, 1.5, 2.0, NAN, -1e-3])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])))


def _pointwise_pair(spec, gen, device):
    shape, dtype = spec["shape"], spec["dtype"]
    x = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    y = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return x, y


def invalid_calls(spec, device):
    """(ours, torch) zero-argument callables for the drawn invalid case."""
    gen = torch.Generator().manual_seed(spec["seed"])
    case, name, red = spec["case"], spec["loss"], spec["reduction"]
    # On CUDA these are device-side asserts, which end the process's CUDA context
    # (test_cuda.py checks them in a subprocess).
    assume(device == "cpu" or case not in ("bce_out_of_range", "ce_target_bounds"))
    ours_f, theirs_f = CALLS[name]
    x, y = _pointwise_pair(spec, gen, device)
    shape = spec["shape"]
    if case == "reduction":
        bad = ["avg", "", "elementwise_mean_", "Mean"][spec["seed"] % 4]
        return (lambda: ours_f(x, y, reduction=bad)), (lambda: theirs_f(x, y, reduction=bad))
    if case == "shapes":
        y2 = torch.rand(shape[:-1] + (shape[-1] + 1,), dtype=x.dtype, device=device)
        return (lambda: ours_f(x, y2, reduction=red)), (lambda: theirs_f(x, y2, reduction=red))
    if case == "nonpositive_param":
        v = spec["value"] if not math.isnan(spec["value"]) else -1.0
        if name == "huber":
            return (lambda: ours_f(x, y, reduction=red, delta=v)), (
                lambda: theirs_f(x, y, reduction=red, delta=v))
        return (lambda: TLF.smooth_l1_loss(x, y, reduction=red, beta=min(v, -1e-3))), (
            lambda: F.smooth_l1_loss(x, y, reduction=red, beta=min(v, -1e-3)))
    if case == "bce_out_of_range":
        xb, yb = x.clone(), y.clone()
        (xb if spec["seed"] % 2 else yb).view(-1)[spec["seed"] % x.numel()] = spec["value"] \
            if spec["value"] not in (0.0, -1e-3) else 1.5
        return (lambda: TLF.binary_cross_entropy(xb, yb, reduction=red)), (
            lambda: F.binary_cross_entropy(xb, yb, reduction=red))
    if case == "integer_inputs":
        assume(not (KNOWN_FUNCTIONAL_DIFFERENCES["integer_l1_sum_or_none"] and name == "l1"
                    and red != "mean"))
        xi = (x * 4).to(spec["other_dtype"]) if not spec["other_dtype"].is_floating_point \
            else (x * 4).long()
        yi = (y * 4).to(xi.dtype)
        return (lambda: ours_f(xi, yi, reduction=red)), (lambda: theirs_f(xi, yi, reduction=red))
    if case == "mixed_dtypes":
        y2 = y.to(spec["other_dtype"]) if spec["other_dtype"].is_floating_point else y.double()
        return (lambda: ours_f(x, y2, reduction=red)), (lambda: theirs_f(x, y2, reduction=red))
    # cross-entropy
    N, C = shape[0], shape[-1] if len(shape) > 1 else 3
    logits = torch.randn(N, C, generator=gen, dtype=torch.float64).to(spec["dtype"]).to(device)
    t = torch.randint(0, C, (N,), generator=gen).to(device)
    kw = dict(reduction=red)
    if case == "ce_target_dtype":
        t = t.to(spec["other_dtype"]) if spec["other_dtype"] not in (torch.int64,) else \
            t.to(torch.int32)
    elif case == "ce_target_bounds":
        t = t.clone()
        t[spec["seed"] % N] = [C, -1, C + 7, -5][spec["seed"] % 4]
    elif case == "ce_smoothing":
        kw["label_smoothing"] = 1.0 + abs(spec["value"] if not math.isnan(spec["value"])
                                          else 1.0) + 1e-3
    elif case == "ce_weight_shape":
        kw["weight"] = torch.rand(C + 1 + spec["seed"] % 2, dtype=logits.dtype, device=device)
    elif case == "ce_batch":
        t = torch.randint(0, C, (N + 1,), generator=gen).to(device)
    elif case == "ce_scalar_input":
        logits = logits[0, 0]
        t = t[0]
    elif case == "ce_probs_ignore_index":
        t = logits.softmax(1).detach()
        kw["ignore_index"] = spec["seed"] % C
    elif case == "ce_integer_logits":
        logits = (logits * 3).long()
    return (lambda: TLF.cross_entropy(logits, t, **kw)), (lambda: F.cross_entropy(logits, t, **kw))


@pytest.mark.parametrize("device", DEVICES)
@_profile("invalid")
@given(spec=invalid_specs())
def test_invalid_arguments_like_torch(spec, device):
    """Both raise the same exception type, or neither does and the results agree."""
    ours_fn, theirs_fn = invalid_calls(spec, device)
    both = run_both(ours_fn, theirs_fn)
    if both is not None:
        ours, theirs = both
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=1e-2, atol=1e-3)

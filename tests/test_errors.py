"""Invalid arguments raise what the installed torch raises (same exception type; the message
too where ours comes from torch's own check), and the dtype corners of issue 11 and 13 follow
torch's results."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_losses.functional as TLF
from tl_helpers import assert_close, assert_same_exception, leaf

POINTWISE = ["mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss",
             "binary_cross_entropy_with_logits", "kl_div", "binary_cross_entropy"]


def _same_error_and_message(ours, theirs):
    our_exc, torch_exc = assert_same_exception(ours, theirs)
    assert str(our_exc) == str(torch_exc)


@pytest.mark.parametrize("name", POINTWISE)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_inputs_raise_as_torch(name, dtype, device):
    x = torch.ones(3, 4, device=device).to(dtype)
    y = torch.ones(3, 4, device=device).to(dtype)
    ours, theirs = getattr(TLF, name), getattr(F, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs(x, y)
    except Exception:  # noqa: BLE001
        _same_error_and_message(lambda: ours(x, y), lambda: theirs(x, y))
    else:
        # torch computes it (l1_loss of complex): ours says it does not support the dtype.
        with pytest.raises(NotImplementedError, match="floating point"):
            ours(x, y)


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.int64])
def test_float_input_with_integral_target_follows_torch(target_dtype, device):
    x = torch.randn(3, 4, device=device)
    y = (torch.rand(3, 4, device=device) > 0.5).to(target_dtype)
    for name in ["mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss"]:
        ours, theirs = getattr(TLF, name), getattr(F, name)
        try:
            expected = theirs(x, y)
        except Exception:  # noqa: BLE001
            _same_error_and_message(lambda: ours(x, y), lambda: theirs(x, y))
        else:
            assert_close(ours(x, y), expected, msg=name)


CE_BAD_CALLS = {
    # a probability target one class too wide: torch takes it for class indices
    "probabilities_c_plus_1": lambda d: ((torch.randn(4, 3, device=d), torch.rand(4, 4, device=d)),
                                         {}),
    "int32_target": lambda d: ((torch.randn(4, 3, device=d),
                                torch.zeros(4, dtype=torch.int32, device=d)), {}),
    "float_class_indices": lambda d: ((torch.randn(4, 3, device=d), torch.zeros(4, device=d)),
                                      {}),
    "integer_input": lambda d: ((torch.ones(4, 3, dtype=torch.long, device=d),
                                 torch.zeros(4, dtype=torch.long, device=d)), {}),
    "double_weight": lambda d: ((torch.randn(4, 3, device=d),
                                 torch.zeros(4, dtype=torch.long, device=d)),
                                {"weight": torch.rand(3, dtype=torch.float64, device=d)}),
    "weight_wrong_size": lambda d: ((torch.randn(4, 3, device=d),
                                     torch.zeros(4, dtype=torch.long, device=d)),
                                    {"weight": torch.rand(4, device=d)}),
    "batch_mismatch": lambda d: ((torch.randn(4, 3, device=d),
                                  torch.zeros(5, dtype=torch.long, device=d)), {}),
    "spatial_mismatch": lambda d: ((torch.randn(4, 3, 2, device=d),
                                    torch.zeros(4, 3, dtype=torch.long, device=d)), {}),
    "weight_requires_grad": lambda d: ((torch.randn(4, 3, device=d, requires_grad=True),
                                        torch.zeros(4, dtype=torch.long, device=d)),
                                       {"weight": torch.rand(3, device=d, requires_grad=True)}),
    "ignore_index_with_probabilities": lambda d: ((torch.randn(4, 3, device=d),
                                                   torch.rand(4, 3, device=d)),
                                                  {"ignore_index": 1}),
}


@pytest.mark.parametrize("case", list(CE_BAD_CALLS))
def test_cross_entropy_bad_calls_raise_as_torch(case, device):
    args, kwargs = CE_BAD_CALLS[case](device)
    _same_error_and_message(lambda: TLF.cross_entropy(*args, **kwargs),
                            lambda: F.cross_entropy(*args, **kwargs))


def test_cross_entropy_no_classes_raises_index_error_as_torch():
    x, t = torch.randn(3, 0), torch.zeros(3, dtype=torch.long)
    _same_error_and_message(lambda: TLF.cross_entropy(x, t), lambda: F.cross_entropy(x, t))


def test_cross_entropy_unbatched_input_with_one_element_target(device):
    x = torch.randn(3, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    for reduction in ("none", "mean", "sum"):
        assert_close(TLF.cross_entropy(x, t, reduction=reduction),
                     F.cross_entropy(x, t, reduction=reduction))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(5,), (4, 5), (3, 5, 2)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_probability_targets_differentiate_weight(label_smoothing, shape,
                                                                reduction, device):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    p = torch.randn(shape, dtype=torch.float64, device=device).softmax(0 if len(shape) == 1
                                                                       else 1)
    w = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    xo, po, wo, xt, pt, wt = (leaf(t) for t in (x, p, w, x, p, w))
    ours = TLF.cross_entropy(xo, po, wo, reduction=reduction, label_smoothing=label_smoothing)
    theirs = F.cross_entropy(xt, pt, wt, reduction=reduction, label_smoothing=label_smoothing)
    assert_close(ours, theirs)
    g = torch.randn_like(theirs)
    for a, b in zip(torch.autograd.grad(ours, [xo, po, wo], g),
                    torch.autograd.grad(theirs, [xt, pt, wt], g)):
        assert_close(a, b)


@pytest.mark.parametrize("name", ["huber_loss", "mse_loss", "l1_loss"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_weight_dtype_promotes_as_torch(name, reduction, device):
    x = torch.randn(3, 4, device=device)
    y = torch.randn(3, 4, device=device)
    w = torch.rand(3, 4, dtype=torch.float64, device=device)
    ours = getattr(TLF, name)(x, y, reduction=reduction, weight=w)
    theirs = getattr(F, name)(x, y, reduction=reduction, weight=w)
    assert ours.dtype == theirs.dtype
    # torch rounds the elementwise loss to float32 before the float64 weight; ours does not.
    assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size_average,reduce", [(False, None), (True, None), (None, False),
                                                 (None, True), (False, True)])
def test_kl_div_legacy_flags_with_batchmean_as_torch(size_average, reduce, device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device).log_softmax(-1)
    y = torch.randn(4, 5, dtype=torch.float64, device=device).softmax(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = TLF.kl_div(x, y, size_average=size_average, reduce=reduce, reduction="batchmean")
        theirs = F.kl_div(x, y, size_average=size_average, reduce=reduce, reduction="batchmean")
    assert_close(ours, theirs)

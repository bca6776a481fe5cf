"""Under autocast, every loss returns torch's dtype and value (torch casts its losses' inputs,
e.g. to float32 for bfloat16 logits on the CPU); gradients flow back in the inputs' dtype."""
import pytest
import torch
import torch.nn.functional as F

import torch_losses.functional as TLF
from tl_helpers import HAS_CUDA, assert_close

LOSSES = ["cross_entropy", "binary_cross_entropy_with_logits", "huber_loss", "mse_loss",
          "l1_loss", "smooth_l1_loss", "kl_div", "binary_cross_entropy"]


def _case(name, low, device):
    x = torch.randn(8, 6, device=device)
    if name == "cross_entropy":
        y = torch.randint(0, 6, (8,), device=device)
    elif name == "kl_div":
        x, y = x.log_softmax(-1), torch.rand(8, 6, device=device).softmax(-1)
    elif name == "binary_cross_entropy":
        x, y = x.sigmoid(), torch.rand(8, 6, device=device)
    else:
        y = torch.randn(8, 6, device=device)
    x = x.to(low).requires_grad_()
    if y.is_floating_point():
        y = y.to(low)
    return x, y


def _devices():
    yield pytest.param("cpu", torch.bfloat16, id="cpu-bf16")
    yield pytest.param("cuda", torch.float16, id="cuda-fp16",
                       marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))
    yield pytest.param("cuda", torch.bfloat16, id="cuda-bf16",
                       marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))


@pytest.mark.parametrize("device,low", list(_devices()))
@pytest.mark.parametrize("name", LOSSES)
def test_autocast_loss_dtype_value_and_grad_follow_torch(name, device, low):
    x, y = _case(name, low, device)
    xt = x.detach().clone().requires_grad_()
    kwargs = {"reduction": "batchmean"} if name == "kl_div" else {}
    with torch.autocast(device, dtype=low):
        try:
            theirs = getattr(F, name)(xt, y, **kwargs)
        except RuntimeError as e:  # CUDA autocast refuses binary_cross_entropy: ours too
            with pytest.raises(RuntimeError, match=str(e)[:40]):
                getattr(TLF, name)(x, y, **kwargs)
            return
        ours = getattr(TLF, name)(x, y, **kwargs)
    assert ours.dtype == theirs.dtype, f"{name}: {ours.dtype} vs torch's {theirs.dtype}"
    assert_close(ours, theirs, msg=name)
    ours.backward()
    theirs.backward()
    assert x.grad.dtype == xt.grad.dtype == low
    assert_close(x.grad, xt.grad, msg=name)


def test_cpu_autocast_cross_entropy_is_float32_as_torch():
    """The case of the issue: bf16 logits under CPU autocast, loss 2.3156 in float32 (not a
    bf16 2.3125)."""
    x = torch.randn(64, 10, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = TLF.cross_entropy(x, y), F.cross_entropy(x, y)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_outside_autocast_low_precision_is_read_as_is(device):
    x = torch.randn(8, 6, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 6, (8,), device=device)
    assert TLF.cross_entropy(x, y).dtype == F.cross_entropy(x, y).dtype == torch.bfloat16

"""CPU pointwise kernels at sizes where their outputs are faulted in ahead of the writes
(>= 1 MB, csrc/cpu/pointwise_cpu.cpp): every output (loss per element, both gradients) equal to
torch's, and the same bits for 1 and 2 threads."""
import pytest
import torch
import torch.nn.functional as F

import torch_losses.functional as TLF

N = (1 << 19) + 37  # 2 MB of float32 output, a ragged last chunk


def _run(fn, x, y, reduction):
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    loss = fn(x, y, reduction=reduction)
    loss.backward(torch.ones_like(loss) if reduction == "none" else None)
    return loss.detach(), x.grad, y.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("loss", ["bce_with_logits", "huber"])
def test_large_outputs_match_torch_and_thread_counts(loss, reduction, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(N, generator=g) * 4).to(dtype)
    y = torch.rand(N, generator=g).to(dtype)
    ours_fn = {"bce_with_logits": TLF.binary_cross_entropy_with_logits,
               "huber": TLF.huber_loss}[loss]
    torch_fn = {"bce_with_logits": F.binary_cross_entropy_with_logits,
                "huber": F.huber_loss}[loss]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ours = _run(ours_fn, x, y, reduction)
        torch.set_num_threads(1)
        ours_1 = _run(ours_fn, x, y, reduction)
    finally:
        torch.set_num_threads(threads)
    # torch's float32 result on the same inputs, rounded to the dtype: ours computes in float32
    # and rounds once (torch's own bfloat16 composite rounds at every step)
    theirs = [t.to(dtype) for t in _run(torch_fn, x.float(), y.float(), reduction)]
    for a, b, c in zip(ours, ours_1, theirs):
        assert torch.equal(a, b)
        if dtype == torch.float32:
            torch.testing.assert_close(a, c, rtol=1e-4 if a.dim() == 0 else 1.3e-6, atol=1e-5)
        else:  # one bfloat16 ulp
            torch.testing.assert_close(a.float(), c.float(), rtol=2 ** -7, atol=1e-6)

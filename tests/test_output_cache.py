"""The CPU output cache (csrc/cpu/output_cache.cpp): large gradients reuse released blocks,
whatever those blocks held; the size limit, the off switch and empty_cpu_cache work."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import torch_losses
import torch_losses.functional as TLF

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def _ce_step(x, y):
    x.grad = None
    TLF.cross_entropy(x, y).backward()
    return x.grad


def test_released_gradient_is_reused_and_its_old_contents_do_not_leak():
    torch_losses.empty_cpu_cache()
    x = torch.randn(512, 1024, requires_grad=True)  # a 2 MiB gradient
    y = torch.randint(0, 1024, (512,))
    grad = _ce_step(x, y)
    ptr = grad.data_ptr()
    grad.fill_(float("nan"))  # what the reused block holds when it comes back
    x.grad = None
    del grad
    assert torch_losses.cpu_cache_bytes() == 2 * MIB
    again = _ce_step(x, y)
    assert again.data_ptr() == ptr
    assert torch_losses.cpu_cache_bytes() == 0
    expected = torch.autograd.grad(F.cross_entropy(x, y), x)[0]
    torch.testing.assert_close(again, expected)


def test_pointwise_gradient_from_the_cache():
    torch_losses.empty_cpu_cache()
    x = torch.randn(1 << 19, requires_grad=True)  # 2 MiB
    t = torch.randn(1 << 19)
    TLF.mse_loss(x, t).backward()
    ptr = x.grad.data_ptr()
    x.grad.fill_(float("inf"))
    x.grad = None
    TLF.mse_loss(x, t).backward()
    assert x.grad.data_ptr() == ptr
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.mse_loss(x, t), x)[0])


def test_small_outputs_bypass_the_cache():
    torch_losses.empty_cpu_cache()
    x = torch.randn(64, 100, requires_grad=True)
    _ce_step(x, torch.randint(0, 100, (64,)))
    x.grad = None
    assert torch_losses.cpu_cache_bytes() == 0


def test_empty_cpu_cache_returns_the_bytes_it_freed():
    torch_losses.empty_cpu_cache()
    x = torch.randn(512, 1024, requires_grad=True)
    _ce_step(x, torch.randint(0, 1024, (512,)))
    x.grad = None
    assert torch_losses.empty_cpu_cache() == 2 * MIB
    assert torch_losses.cpu_cache_bytes() == 0
    assert torch_losses.empty_cpu_cache() == 0


def test_the_cache_keeps_blocks_of_other_sizes_apart():
    torch_losses.empty_cpu_cache()
    a = torch.randn(512, 1024, requires_grad=True)
    b = torch.randn(1024, 1024, requires_grad=True)
    ga = _ce_step(a, torch.randint(0, 1024, (512,)))
    ptr_a = ga.data_ptr()
    a.grad = None
    del ga
    gb = _ce_step(b, torch.randint(0, 1024, (1024,)))  # 4 MiB: not the 2 MiB block
    assert gb.data_ptr() != ptr_a
    assert torch_losses.cpu_cache_bytes() == 2 * MIB
    torch_losses.empty_cpu_cache()


def _run(code, limit):
    env = dict(os.environ, TORCH_LOSSES_CPU_CACHE_MB=limit, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


_HOLD_THREE = """
import torch, torch_losses, torch_losses.functional as TLF
xs = [torch.randn(512, 1024, requires_grad=True) for _ in range(3)]  # 2 MiB gradients
for x in xs:
    TLF.cross_entropy(x, torch.randint(0, 1024, (512,))).backward()
for x in xs:
    x.grad = None
print(torch_losses.cpu_cache_bytes())
"""


@pytest.mark.parametrize("limit, held", [("0", 0), ("5", 4 * MIB), ("", 6 * MIB)])
def test_the_limit_keeps_the_newest_blocks_that_fit(limit, held):
    out = _run(_HOLD_THREE, limit)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == held


def test_a_bad_limit_is_a_clear_error():
    out = _run(_HOLD_THREE, "lots")
    assert out.returncode != 0
    assert "TORCH_LOSSES_CPU_CACHE_MB must be a whole number of MiB" in out.stderr

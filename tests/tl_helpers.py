"""Helpers shared by the test files (imported as a plain module: tests/ is on sys.path)."""
import warnings

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def assert_same_exception(ours, theirs):
    """Run torch's call and ours; both must raise, with the same exception type. Returns the
    two exceptions (for message checks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            theirs()
        except Exception as e:  # noqa: BLE001
            torch_exc = e
        else:
            raise AssertionError("torch's call did not raise: the test case is wrong")
        try:
            ours()
        except Exception as e:  # noqa: BLE001
            our_exc = e
        else:
            raise AssertionError(f"ours did not raise; torch raised {type(torch_exc).__name__}: "
                                 f"{torch_exc}")
    assert type(our_exc) is type(torch_exc), (
        f"ours raised {type(our_exc).__name__}: {our_exc}\n"
        f"torch raised {type(torch_exc).__name__}: {torch_exc}")
    return our_exc, torch_exc


def _err(a, ref):
    a = a.detach().double()
    ref = ref.detach().double()
    if a.numel() == 0:
        return 0.0
    return (a - ref).abs().max().item()


def assert_flash_rule(ours, theirs, ref64, name="", rel_slack=1e-6):
    """The flash-attn rule: |ours - ref64| <= 2 |torch_lowprec - ref64| + slack, elementwise
    max. `theirs` is torch on the same low-precision inputs, `ref64` torch on their float64
    copies. No implementation can beat rounding the exact result to the output dtype, so the
    torch error is floored at that rounding error (else a lucky exact torch result would
    demand bit-exactness). The slack is rel_slack * max|ref|."""
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != torch's {theirs.shape}"
    ref64 = ref64.detach().double()
    assert torch.isfinite(ref64).all(), f"{name}: the float64 reference is not finite"
    err_ours = _err(ours, ref64)
    err_torch = _err(theirs, ref64)
    err_round = _err(ref64.to(ours.dtype), ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = 2 * max(err_torch, err_round) + rel_slack * scale + 1e-30
    assert err_ours <= bound, (f"{name}: error {err_ours:.3e} vs torch's {err_torch:.3e} "
                               f"(rounding floor {err_round:.3e}, bound {bound:.3e})")


def assert_close(actual, expected, *, dtype=None, rtol=None, atol=None, equal_nan=True,
                 msg=""):
    """assert_close with tolerances fitting the dtype and a shape/dtype check."""
    assert actual.shape == expected.shape, f"{msg} shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{msg} dtype {actual.dtype} != {expected.dtype}"
    dtype = dtype or expected.dtype
    if rtol is None:
        rtol, atol = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-5, 1e-6),
                      torch.bfloat16: (2e-2, 1e-3), torch.float16: (2e-3, 1e-4)}[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan,
                               msg=lambda m: f"{msg}\n{m}")


def grads(out, inputs, grad_out):
    """Gradients of out w.r.t. the inputs that require grad, for a given grad_output."""
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=False)


def leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


def bitwise_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        torch.nan_to_num(a, nan=0.5), torch.nan_to_num(b, nan=0.5)) and torch.equal(
        a.isnan(), b.isnan())


def assert_deterministic(run):
    """run() -> tensors: bitwise the same twice, and with 1 or 2 threads. Returns the first."""
    first, second = run(), run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c, d in zip(first, second, one, two):
        assert bitwise_equal(a, b)
        assert bitwise_equal(c, d)
        assert bitwise_equal(a, c)
    return first


def ce_extras_reference(x, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                        reduction="mean", z_loss=0.0, softcap=None, stable_lse=False):
    """The tests' reference of cross_entropy with z-loss and soft-capping, in torch ops and x's
    dtype: x -> softcap tanh(x / softcap), torch's cross_entropy, plus z_loss logsumexp^2 per
    position whose target is not ignore_index (every position for probability targets), not
    class-weighted; 'mean' divides that sum by torch's own 'mean' denominator.
    stable_lse: the lse as max + logsumexp(x - max), the max detached (the same value and
    gradient), for float64 references at large logits: logsumexp's own backward, exp(x - lse),
    carries the rounding of lse ~ 1e4 into every softmax entry (~1e-12 relative)."""
    import torch.nn.functional as F
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    loss = F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if not z_loss:
        return loss
    class_dim = 0 if x.dim() == 1 else 1
    if stable_lse and x.shape[class_dim] > 0:
        m = x.detach().amax(class_dim, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lse = m.squeeze(class_dim) + torch.logsumexp(x - m, class_dim)
    else:
        lse = torch.logsumexp(x, class_dim)
    if target.is_floating_point():
        counted = torch.ones_like(lse, dtype=torch.bool)
        denominator = x.new_tensor(float(lse.numel()))
    else:
        counted = target != ignore_index
        w = x.new_ones(x.shape[class_dim]) if weight is None else weight
        denominator = (w[target.clamp(0, x.shape[class_dim] - 1)] * counted).sum()
    z = torch.where(counted, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss + z.sum()
    return loss + z.sum() / denominator

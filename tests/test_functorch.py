"""torch.func: grad, vmap and per-sample gradients (vmap of grad, as Opacus-style training uses),
forward-mode AD, jacfwd, jacrev and hessian of every loss against torch's; and which gradients
the forward writes in each mode (eager, no_grad, torch.func), seen through the ops that actually
run."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import torch_losses.functional as TLF
import torch_losses as TL
from tl_helpers import assert_close


def _hinge_torch(x, y):
    return (1 - y * x).clamp_min(0).mean()


def _targets(name, shape, dtype, device):
    if name == "cross_entropy":
        return torch.randint(0, shape[-1], shape[:-1], device=device)
    if name in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
        return torch.rand(shape, dtype=dtype, device=device)
    if name == "hinge_loss":
        return (torch.randint(0, 2, shape, device=device) * 2 - 1).to(dtype)
    if name == "kl_div":
        return torch.randn(shape, dtype=dtype, device=device).softmax(-1)
    return torch.randn(shape, dtype=dtype, device=device)


def _inputs(name, shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    if name == "binary_cross_entropy":
        return x.sigmoid()
    if name == "kl_div":
        return x.log_softmax(-1)
    return x


LOSSES = ["cross_entropy", "binary_cross_entropy_with_logits", "huber_loss", "mse_loss",
          "l1_loss", "smooth_l1_loss", "binary_cross_entropy", "kl_div", "hinge_loss"]


def _pair(name):
    """(ours, torch's), both f(x, y) -> mean-reduced (kl: batchmean) loss."""
    if name == "hinge_loss":
        return TLF.hinge_loss, _hinge_torch
    if name == "kl_div":
        return (lambda x, y: TLF.kl_div(x, y, reduction="batchmean"),
                lambda x, y: F.kl_div(x, y, reduction="batchmean"))
    return getattr(TLF, name), getattr(F, name)


@pytest.mark.parametrize("name", LOSSES)
def test_per_sample_grads_match_torch(name, device):
    """vmap(grad(loss of one sample)) over a batch: every sample's gradient equals torch's."""
    batch, shape = 6, (3, 5)
    x = _inputs(name, (batch, *shape), torch.float64, device)
    y = _targets(name, (batch, *shape), torch.float64, device)
    ours, theirs = _pair(name)
    per_sample_ours = vmap(grad(ours))(x, y)
    per_sample_torch = vmap(grad(theirs))(x, y)
    assert_close(per_sample_ours, per_sample_torch, msg=name)
    # And each equals an ordinary autograd gradient of that sample alone.
    xi = x[2].clone().requires_grad_()
    ours(xi, y[2]).backward()
    assert_close(per_sample_ours[2], xi.grad, msg=f"{name} sample 2 vs eager")


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_vmap_values_match_torch(name, reduction, device):
    x = _inputs(name, (4, 3, 5), torch.float32, device)
    y = _targets(name, (4, 3, 5), torch.float32, device)
    if name == "hinge_loss":
        ours = vmap(lambda a, b: TLF.hinge_loss(a, b, reduction=reduction))(x, y)
        loss = (1 - y * x).clamp_min(0)
        theirs = loss if reduction == "none" else loss.sum(dim=(1, 2))
    else:
        ours = vmap(lambda a, b: getattr(TLF, name)(a, b, reduction=reduction))(x, y)
        theirs = vmap(lambda a, b: getattr(F, name)(a, b, reduction=reduction))(x, y)
    assert_close(ours, theirs, msg=name)


def test_grad_of_probability_target_cross_entropy(device):
    """torch.func.grad with respect to both arguments (soft targets)."""
    x = torch.randn(4, 7, dtype=torch.float64, device=device)
    p = torch.randn(4, 7, dtype=torch.float64, device=device).softmax(-1)
    for argnums in (0, 1, (0, 1)):
        ours = grad(TLF.cross_entropy, argnums=argnums)(x, p)
        theirs = grad(F.cross_entropy, argnums=argnums)(x, p)
        for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (ours, theirs))):
            assert_close(a, b)


def _jacobians(f, x, t):
    """Every derivative torch.func and forward-mode AD give of f at x (tangent t)."""
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
    out = {"jvp": torch.func.jvp(f, (x,), (t,))[1], "dual": dual,
           "jacfwd": torch.func.jacfwd(f)(x), "jacrev": torch.func.jacrev(f)(x)}
    if f(x).dim() == 0:
        out["hessian"] = torch.func.hessian(f)(x)
        out["jacrev_jacrev"] = torch.func.jacrev(torch.func.jacrev(f))(x)
    return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", LOSSES)
def test_forward_mode_jacobians_hessian_match_torch(name, reduction, device):
    """Forward-mode AD (each Function's jvp: the composite of torch ops), jacfwd, jacrev (a
    vmap over the backward) and hessian (jacfwd of jacrev) against torch's."""
    x = _inputs(name, (3, 4), torch.float64, device)
    y = _targets(name, (3, 4), torch.float64, device)
    if name == "hinge_loss":
        def ours(a):
            return TLF.hinge_loss(a, y, reduction=reduction)

        def theirs(a):
            loss = (1 - y * a).clamp_min(0)
            return loss.mean() if reduction == "mean" else loss
    else:
        def ours(a):
            return getattr(TLF, name)(a, y, reduction=reduction)

        def theirs(a):
            return getattr(F, name)(a, y, reduction=reduction)
    tangent = torch.randn_like(x)
    got, want = _jacobians(ours, x, tangent), _jacobians(theirs, x, tangent)
    for what in want:
        assert_close(got[what], want[what], msg=f"{name} {what}")


def test_forward_mode_cross_entropy_options_and_target_tangents(device):
    """Class weights, label smoothing, z-loss and soft-capping, and probability targets that
    move too (a tangent for each argument)."""
    x = torch.randn(4, 6, 2, dtype=torch.float64, device=device)
    p = torch.randn(4, 6, 2, dtype=torch.float64, device=device).softmax(1)
    w = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    tx, tp = torch.randn_like(x), torch.randn_like(p)
    got = torch.func.jvp(lambda a, b: TLF.cross_entropy(a, b, w, label_smoothing=0.1),
                         (x, p), (tx, tp))[1]
    want = torch.func.jvp(lambda a, b: F.cross_entropy(a, b, w, label_smoothing=0.1),
                          (x, p), (tx, tp))[1]
    assert_close(got, want)
    y = torch.randint(0, 6, (4, 2), device=device)

    def ours(a):
        return TLF.cross_entropy(a, y, w, ignore_index=1, z_loss=0.01, softcap=3.0)

    def theirs(a):
        return TL._autograd.cross_entropy_composite(a, y, w, 1, 0.0, "mean", 0.01, 3.0)

    assert_close(torch.func.jvp(ours, (x,), (tx,))[1], torch.func.jvp(theirs, (x,), (tx,))[1])
    assert_close(torch.func.hessian(ours)(x), torch.func.hessian(theirs)(x))


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_forward_mode_linear_cross_entropy(probs, device):
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    w = torch.randn(5, 4, dtype=torch.float64, device=device)
    b = torch.randn(5, dtype=torch.float64, device=device)
    t = (torch.rand(6, 5, dtype=torch.float64, device=device).softmax(1) if probs else
         torch.randint(0, 5, (6,), device=device))
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    got = torch.func.jvp(lambda *a: TLF.linear_cross_entropy(a[0], a[1], t, linear_bias=a[2]),
                         (x, w, b), tangents)[1]
    want = torch.func.jvp(lambda *a: F.cross_entropy(F.linear(*a), t), (x, w, b), tangents)[1]
    assert_close(got, want)


def test_forward_mode_through_function_apply(device):
    """The Functions called directly: under forward-mode AD their subclass with a jvp runs (the
    Functions have none: dynamo cannot trace one that has)."""
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    y = torch.randn(3, 4, dtype=torch.float64, device=device)
    t = torch.randn_like(x)
    got = torch.func.jvp(lambda a: TL.MSEFunction.apply(a, y, None, "sum"), (x,), (t,))[1]
    assert_close(got, torch.func.jvp(lambda a: F.mse_loss(a, y, reduction="sum"), (x,), (t,))[1])
    assert "jvp" not in vars(TL.MSEFunction)


def test_forward_over_forward_raises(device):
    """jacfwd(jacfwd(loss)) would see the loss's tangent as a constant (a silent zero): it
    raises, and names hessian instead."""
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (3,), device=device)
    with pytest.raises(NotImplementedError, match="hessian"):
        torch.func.jacfwd(torch.func.jacfwd(lambda a: TLF.cross_entropy(a, y)))(x)


class _OpLog(TorchDispatchMode):
    """Records each torch_losses op that runs with its input_grad/target_grad flags."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torch_losses":
            name = func.overloadpacket.__name__
            flags = tuple(a for a in args if isinstance(a, bool))[-2:]
            self.calls.append((name, flags))
        return func(*args, **(kwargs or {}))


def test_forward_writes_the_gradients_that_are_needed(device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    y = torch.randn(4, 6, device=device)
    # Eager: the forward writes the input gradient only; backward just hands it out.
    with _OpLog() as log:
        TLF.mse_loss(x, y).backward()
    assert log.calls == [("mse_fwd", (True, False)), ("mse_bwd_into_", ())], log.calls
    assert_close(x.grad, 2 * (x - y).detach() / x.numel())
    # Target requiring grad too.
    yt = y.clone().requires_grad_()
    with _OpLog() as log:
        TLF.mse_loss(x.detach(), yt).backward()
    assert log.calls[0] == ("mse_fwd", (False, True)), log.calls
    # no_grad: loss only, even for inputs that require grad.
    with torch.no_grad(), _OpLog() as log:
        TLF.mse_loss(x, y)
    assert log.calls == [("mse_fwd", (False, False))], log.calls
    # torch.func.grad: the forward sees unwrapped inputs and writes nothing; the gradient
    # comes from backward.
    with _OpLog() as log:
        g = grad(TLF.mse_loss)(x.detach(), y)
    assert log.calls[0] == ("mse_fwd", (False, False)), log.calls
    assert_close(g, 2 * (x - y).detach() / x.numel())


def test_cross_entropy_forward_writes_the_gradients_that_are_needed(device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    y = torch.randint(0, 6, (4,), device=device)
    with _OpLog() as log:
        TLF.cross_entropy(x, y).backward()
    assert [c[0] for c in log.calls] == ["cross_entropy_fwd", "cross_entropy_bwd_into_"], log.calls
    assert log.calls[0][1] == (True, False)
    with torch.no_grad(), _OpLog() as log:
        TLF.cross_entropy(x, y)
    assert log.calls == [("cross_entropy_fwd", (False, False))], log.calls


def test_vmap_over_inputs_that_require_grad_then_backward(device):
    """vmap at the outermost level over tensors that require grad, then ordinary backward:
    the batched forward writes the gradients and the batched backward scales them."""
    x = torch.randn(5, 4, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, 3, device=device, dtype=torch.float64)
    xr = x.detach().clone().requires_grad_()
    w = torch.rand(5, device=device, dtype=torch.float64)
    (vmap(TLF.huber_loss)(x, y) * w).sum().backward()
    (vmap(F.huber_loss)(xr, y) * w).sum().backward()
    assert_close(x.grad, xr.grad)


def test_function_apply_returns_the_loss_in_every_mode(device):
    """The Functions' forwards return (loss, buffers for backward); apply gives the loss, also
    under torch.func (which calls apply again one level down) and torch.compile."""
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    y = torch.randn(3, 4, device=device, dtype=torch.float64)
    expected = F.mse_loss(x, y)
    assert_close(TL.MSEFunction.apply(x, y, None, "mean"), expected)
    assert_close(TL.MSEFunction.apply(x.requires_grad_(), y, None, "mean"), expected)
    assert_close(grad(lambda a: TL.MSEFunction.apply(a, y, None, "mean"))(x.detach()),
                 grad(F.mse_loss)(x.detach(), y))
    compiled = torch.compile(lambda a, b: TLF.mse_loss(a, b), fullgraph=True)
    assert_close(compiled(x.detach(), y), expected)


class _ForwardGradPointers(TorchDispatchMode):
    """Records the storage of the input gradient each torch_losses forward op returns."""

    def __init__(self):
        super().__init__()
        self.pointers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace == "torch_losses" and name.endswith("_fwd"):
            grad_input = out[2] if name == "cross_entropy_fwd" else out[1]
            self.pointers.append(grad_input.data_ptr())
        return out


def test_forward_gradient_becomes_grad_without_a_copy(device):
    """The gradient buffer the forward returns (a non-differentiable output) is adopted as
    .grad: setup_context and backward keep no other reference to it."""
    x = torch.randn(64, 33, device=device, requires_grad=True)
    with _ForwardGradPointers() as log:
        TLF.mse_loss(x, torch.randn(64, 33, device=device)).backward()
    assert x.grad.data_ptr() == log.pointers[-1]
    x.grad = None
    with _ForwardGradPointers() as log:
        TLF.cross_entropy(x, torch.randint(0, 33, (64,), device=device)).backward()
    assert x.grad.data_ptr() == log.pointers[-1]


class _AllOps(TorchDispatchMode):
    """Records the name of every op that runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_backward_fills_no_zero_gradients_for_the_buffer_outputs(device, loss):
    """The forwards return their gradient buffers as non-differentiable outputs: autograd must
    not materialize input-sized zero gradients for them before backward (an extra pass over
    memory; setup_context turns materialization off)."""
    x = torch.randn(8, 5, device=device, requires_grad=True)
    y = torch.randn(8, 5, device=device) if loss == "mse" else torch.randint(0, 5, (8,))
    out = TLF.mse_loss(x, y) if loss == "mse" else TLF.cross_entropy(x, y.to(device))
    with _AllOps() as log:
        out.backward()
    assert not {"zeros", "zeros_like", "fill_", "zero_"} & set(log.names), log.names

"""torch.compile(fullgraph=True) of model + loss forward for every module; .backward() runs
outside the compiled function (dynamo cannot trace it). Loss and parameter gradients must
match eager torch."""
import pytest
import torch
import torch.nn.functional as F

import torch_losses as TL
import torch_losses.functional as TLF
from tl_helpers import assert_close, ce_extras_reference

torch._dynamo.config.cache_size_limit = 64


def _targets(name, out_shape, device):
    if name.startswith("ce"):
        return torch.randint(0, out_shape[1], out_shape[:1], device=device)
    if name in ("bce", "bce_logits"):
        return torch.rand(out_shape, device=device)
    if name == "hinge":
        return (torch.randint(0, 2, out_shape, device=device) * 2 - 1).float()
    if name == "kl":
        return torch.randn(out_shape, device=device).softmax(-1)
    return torch.randn(out_shape, device=device)


# name: (ours module, torch's reference module, output transform of the model)
MODULES = {
    "ce": (lambda: TL.CrossEntropyLoss(label_smoothing=0.1),
           lambda: torch.nn.CrossEntropyLoss(label_smoothing=0.1), None),
    "ce_zloss_softcap": (
        lambda: TL.CrossEntropyLoss(label_smoothing=0.1, z_loss=0.05, softcap=0.5),
        lambda: (lambda x, y: ce_extras_reference(x, y, label_smoothing=0.1, z_loss=0.05,
                                                  softcap=0.5)), None),
    "bce_logits": (lambda: TL.BCEWithLogitsLoss(pos_weight=torch.full((6,), 2.0)),
                   lambda: torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((6,), 2.0)), None),
    "huber": (lambda: TL.HuberLoss(delta=0.5), lambda: torch.nn.HuberLoss(delta=0.5), None),
    "mse": (TL.MSELoss, torch.nn.MSELoss, None),
    "l1": (TL.L1Loss, torch.nn.L1Loss, None),
    "smooth_l1": (lambda: TL.SmoothL1Loss(beta=0.5), lambda: torch.nn.SmoothL1Loss(beta=0.5),
                  None),
    "bce": (TL.BCELoss, torch.nn.BCELoss, torch.sigmoid),
    "kl": (lambda: TL.KLDivLoss(reduction="batchmean"),
           lambda: torch.nn.KLDivLoss(reduction="batchmean"), lambda o: o.log_softmax(-1)),
    "hinge": (TL.HingeLoss, lambda: (lambda x, y: (1 - y * x).clamp_min(0).mean()), None),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_compiled_model_and_loss_match_eager(name, device):
    ours_cls, torch_cls, transform = MODULES[name]
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 6).to(device)
    ref_model = torch.nn.Linear(5, 6).to(device)
    ref_model.load_state_dict(model.state_dict())
    ours_loss = ours_cls()
    ours_loss = ours_loss.to(device) if isinstance(ours_loss, torch.nn.Module) else ours_loss
    torch_loss = torch_cls()
    torch_loss = torch_loss.to(device) if isinstance(torch_loss, torch.nn.Module) else torch_loss
    x = torch.randn(4, 5, device=device)
    y = _targets(name, (4, 6), device)

    def step(m, loss_fn, x, y):
        out = m(x)
        if transform is not None:
            out = transform(out)
        return loss_fn(out, y)

    compiled = torch.compile(lambda x, y: step(model, ours_loss, x, y), fullgraph=True)
    ours = compiled(x, y)
    theirs = step(ref_model, torch_loss, x, y)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cross_entropy", "mse_loss", "binary_cross_entropy_with_logits"])
def test_compiled_functional_reduction_none(name, device):
    x = torch.randn(5, 7, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    if name == "cross_entropy":
        y = torch.randint(0, 7, (5,), device=device)
    else:
        y = torch.rand(5, 7, device=device)
    ours_f, torch_f = getattr(TLF, name), getattr(F, name)
    compiled = torch.compile(lambda a, b: ours_f(a * 2.0, b, reduction="none"), fullgraph=True)
    ours = compiled(x, y)
    theirs = torch_f(xr * 2.0, y, reduction="none")
    assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    g = torch.rand_like(theirs) + 0.5
    ours.backward(g)
    theirs.backward(g)
    assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["huber_loss", "mse_loss", "l1_loss", "smooth_l1_loss"])
@pytest.mark.parametrize("target_shape", [(4, 1), ()], ids=["column", "scalar"])
def test_compiled_broadcast_target_warns_without_graph_break(name, target_shape, device):
    """A broadcast target under fullgraph: torch's loss and ours compile, match, and ours warns
    as in eager (after the graph runs)."""
    x = torch.randn(4, 3, device=device)
    y = torch.randn(target_shape, device=device)
    ours_f, torch_f = getattr(TLF, name), getattr(F, name)
    with pytest.warns(UserWarning, match="Using a target size"):
        ours = torch.compile(lambda a, b: ours_f(a, b), fullgraph=True)(x, y)
    with pytest.warns(UserWarning, match="Using a target size"):
        theirs = torch.compile(lambda a, b: torch_f(a, b), fullgraph=True)(x, y)
    assert_close(ours, theirs)


BAD_CALLS = {
    "ce_probabilities_c_plus_1": lambda f, d: f.cross_entropy(
        torch.randn(4, 3, device=d), torch.rand(4, 4, device=d)),
    "ce_batch_mismatch": lambda f, d: f.cross_entropy(
        torch.randn(4, 3, device=d), torch.zeros(5, dtype=torch.long, device=d)),
    "huber_negative_delta": lambda f, d: f.huber_loss(
        torch.rand(4, device=d), torch.rand(4, device=d), delta=-1.0),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_compiled_validation_errors_as_torch(case, device):
    """Under fullgraph, an invalid call fails as torch's loss fails there: the same exception
    type, carrying torch's message (not dynamo's bare 'Observed exception')."""
    call = BAD_CALLS[case]
    torch._dynamo.reset()
    with pytest.raises(Exception) as theirs:
        torch.compile(lambda: call(F, device), fullgraph=True)()
    with pytest.raises(Exception) as ours:
        torch.compile(lambda: call(TLF, device), fullgraph=True)()
    assert type(ours.value) is type(theirs.value), f"{ours.value}\n---\n{theirs.value}"
    with pytest.raises(Exception) as eager:
        call(F, device)
    assert str(eager.value) in str(ours.value)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name", ["cross_entropy", "mse_loss", "binary_cross_entropy_with_logits",
                                  "huber_loss", "kl_div"])
def test_compiled_non_contiguous_input(name, reduction, device):
    """Channels-last logits / a transposed prediction: the compiled graph's gradient strides
    are those the ops give (a wrong fake stride was an inductor assertion, or silently wrong
    numbers), and the gradients are torch's."""
    if name == "cross_entropy":
        x = torch.randn(2, 5, 3, 4, device=device).to(memory_format=torch.channels_last)
        cases = [(x, torch.randint(0, 5, (2, 3, 4), device=device))]
    else:  # a transposed prediction; channels_last with a contiguous target (the layouts mix)
        cases = [(torch.randn(4, 6, device=device).t(), torch.rand(4, 6, device=device).t()),
                 (torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last),
                  torch.rand(2, 3, 4, 5, device=device))]
    ours_f, torch_f = getattr(TLF, name), getattr(F, name)
    compiled = torch.compile(lambda a, b: ours_f(a, b, reduction=reduction), fullgraph=True)
    for x, y in cases:
        xo = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        xt = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        ours, theirs = compiled(xo, y), torch_f(xt, y, reduction=reduction)
        assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        if reduction == "none" and name != "cross_entropy":
            assert ours.stride() == x.stride()  # the input's layout (csrc/ops.h)
        g = torch.rand_like(theirs) + 0.5
        ours.backward(g)
        theirs.backward(g)
        assert_close(xo.grad, xt.grad, rtol=1e-5, atol=1e-6)

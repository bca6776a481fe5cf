"""torch.export of models whose loss is ours, and the differentiable twins of the forward ops.

torch.export traces through the autograd.Functions and keeps the ops; the exported program
must still train: ep.module()'s forward and backward against the eager model with torch's own
loss (float64), decomposed or not, with a dynamic batch size, compiled, saved and loaded. The
twins (`<op>_differentiable`, what an exported program holds) are differentiable called on
their own: gradcheck through the op, whatever gradients it was asked to write."""
import warnings

import pytest
import torch
import torch.nn as nn

import torch_losses as TL
from tl_helpers import assert_close

ops = torch.ops.torch_losses
C = 5


def _index(n, device):
    t = torch.randint(0, C, (n,), device=device)
    t[0] = 1  # ignored where ignore_index=1
    return t


def _probs(n, device):
    return torch.rand(n, C, dtype=torch.float64, device=device).softmax(1)


def _floats(n, device):
    return torch.rand(n, C, dtype=torch.float64, device=device)


def _signs(n, device):
    return torch.randint(0, 2, (n, C), device=device).double() * 2 - 1


def _weight(device):
    return torch.rand(C, dtype=torch.float64, device=device) + 0.5


# id: (our loss, torch's twin (None: our eager module), target, what the model's logits go
# through first, whether the target is differentiable)
CASES = {
    "ce": (lambda d: TL.CrossEntropyLoss(), lambda d: nn.CrossEntropyLoss(), _index, None,
           False),
    "ce_options": (
        lambda d: TL.CrossEntropyLoss(weight=_weight(d), ignore_index=1, label_smoothing=0.1),
        lambda d: nn.CrossEntropyLoss(weight=_weight(d), ignore_index=1, label_smoothing=0.1),
        _index, None, False),
    "ce_none": (lambda d: TL.CrossEntropyLoss(reduction="none"),
                lambda d: nn.CrossEntropyLoss(reduction="none"), _index, None, False),
    "ce_probs": (lambda d: TL.CrossEntropyLoss(label_smoothing=0.2, reduction="sum"),
                 lambda d: nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum"), _probs,
                 None, True),
    "ce_inplace_backward": (lambda d: TL.CrossEntropyLoss(inplace_backward=True),
                            lambda d: nn.CrossEntropyLoss(), _index, None, False),
    "ce_zloss_softcap": (lambda d: TL.CrossEntropyLoss(z_loss=1e-2, softcap=2.0), None, _index,
                         None, False),
    "bce_with_logits": (lambda d: TL.BCEWithLogitsLoss(pos_weight=_weight(d)),
                        lambda d: nn.BCEWithLogitsLoss(pos_weight=_weight(d)), _floats, None,
                        True),
    "huber": (lambda d: TL.HuberLoss(delta=0.5, reduction="none"),
              lambda d: nn.HuberLoss(delta=0.5, reduction="none"), _floats, None, True),
    "mse": (lambda d: TL.MSELoss(), lambda d: nn.MSELoss(), _floats, None, True),
    "l1": (lambda d: TL.L1Loss(reduction="sum"), lambda d: nn.L1Loss(reduction="sum"),
           _floats, None, True),
    "smooth_l1": (lambda d: TL.SmoothL1Loss(beta=0.5), lambda d: nn.SmoothL1Loss(beta=0.5),
                  _floats, None, True),
    "bce": (lambda d: TL.BCELoss(weight=_weight(d)), lambda d: nn.BCELoss(weight=_weight(d)),
            _floats, torch.sigmoid, True),
    "kl_div": (lambda d: TL.KLDivLoss(reduction="batchmean", log_target=True),
               lambda d: nn.KLDivLoss(reduction="batchmean", log_target=True),
               lambda n, d: _probs(n, d).log(), lambda z: z.log_softmax(1), True),
    "hinge": (lambda d: TL.HingeLoss(margin=0.5), None, _signs, None, True),
}


class Model(nn.Module):
    def __init__(self, loss, squash):
        super().__init__()
        self.linear = nn.Linear(8, C, dtype=torch.float64)
        self.loss, self.squash = loss, squash

    def forward(self, x, target):
        logits = self.linear(x)
        return self.loss(logits if self.squash is None else self.squash(logits), target)


def _run(model, x, target, grad_seed):
    """Loss, then the gradients of the parameters and the target for a random grad_output."""
    model.zero_grad()
    target = target.detach().requires_grad_(target.requires_grad)
    loss = model(x, target)
    grad_output = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed),
                             dtype=loss.dtype).to(loss.device) + 0.5
    loss.backward(grad_output)
    grads = [p.grad for p in model.parameters()]
    return loss.detach(), grads, target.grad


def _check_exported(name, device, decompose=False, dynamic=False, strict=False, compiled=False,
                    saved_to=None):
    """Exports Model(CASES[name]) and trains one step of its program's module (decomposed,
    with a dynamic batch (run at another size), strict, compiled, or saved to and loaded from
    the folder saved_to) against the eager model with torch's loss."""
    ours, theirs, make_target, squash, target_grad = CASES[name]
    model = Model(ours(device), squash).to(device)
    reference = Model((theirs or ours)(device), squash).to(device)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(6, 8, dtype=torch.float64, device=device)
    target = make_target(6, device).requires_grad_(target_grad)
    batch = torch.export.Dim("batch", min=2)
    shapes = {"x": {0: batch}, "target": {0: batch}} if dynamic else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, (x, target), dynamic_shapes=shapes,
                                      strict=strict)
        if decompose:
            program = program.run_decompositions()
        if saved_to is not None:
            torch.export.save(program, saved_to / "model.pt2")
            program = torch.export.load(saved_to / "model.pt2")
        exported = program.module()
        if compiled:
            exported = torch.compile(exported, fullgraph=True)
        n = 9 if dynamic else 6
        x, target = torch.randn(n, 8, dtype=torch.float64, device=device), \
            make_target(n, device).requires_grad_(target_grad)
        got = _run(exported, x, target, 1)
    # torch warns (and hands back no gradient) where a traced op has no autograd kernel
    assert not [w for w in caught if "autograd kernel was not registered" in str(w.message)]
    want = _run(reference, x, target, 1)
    assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[1], want[1]):
        assert g is not None, f"{name}: the exported program gave a parameter no gradient"
        assert_close(g, w, rtol=1e-12, atol=1e-12)
    if target_grad:
        assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("name", list(CASES))
def test_exported_program_trains(name, strict, device):
    """Non-strict export (the default) and strict export (through dynamo, which would run an
    autograd.Function's forward without grad: the functionals call the forward alone)."""
    _check_exported(name, device, strict=strict)


@pytest.mark.parametrize("name", ["ce_options", "ce_probs", "ce_inplace_backward", "huber",
                                  "kl_div"])
def test_exported_program_decomposed_dynamic_batch(name, device):
    _check_exported(name, device, decompose=True, dynamic=True)


@pytest.mark.parametrize("name", list(CASES))
def test_exported_program_compiles(name, device):
    """torch.compile(fullgraph=True) of the exported program's module (the exported graph
    holds no node torch.compile cannot trace)."""
    _check_exported(name, device, compiled=True)


def test_exported_program_saves_and_loads(device, tmp_path):
    """torch.export.save / load: the loaded program (its ops found by name once torch_losses is
    imported) trains as the one saved."""
    _check_exported("ce_options", device, saved_to=tmp_path)


def test_exported_inplace_backward_holds_the_functional_op(device):
    """inplace_backward is an eager memory saving: an exported program holds the functional
    op, whose formula backward uses (the in-place op has none)."""
    model = Model(TL.CrossEntropyLoss(inplace_backward=True), None).to(device)
    x = torch.randn(4, 8, dtype=torch.float64, device=device)
    program = torch.export.export(model, (x, _index(4, device)))
    targets = [str(node.target) for node in program.graph.nodes]
    assert "torch_losses.cross_entropy_fwd_differentiable.default" in targets
    assert not [t for t in targets if "inplace" in t]


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_exported_linear_cross_entropy_trains(probs, strict, device):
    model = TL.LinearCrossEntropyLoss(8, C, bias=True, dtype=torch.float64,
                                      label_smoothing=0.1).to(device)
    reference = nn.Sequential(nn.Linear(8, C, dtype=torch.float64),
                              nn.CrossEntropyLoss(label_smoothing=0.1)).to(device)
    reference[0].load_state_dict(model.linear.state_dict())
    x = torch.randn(7, 8, dtype=torch.float64, device=device)
    target = (_probs if probs else _index)(7, device)
    exported = torch.export.export(model, (x, target), strict=strict).module()
    exported(x, target).mul(3.0).backward()
    reference[1](reference[0](x), target).mul(3.0).backward()
    grads = dict(exported.named_parameters())
    assert_close(grads["linear.weight"].grad, reference[0].weight.grad, rtol=1e-12, atol=1e-12)
    assert_close(grads["linear.bias"].grad, reference[0].bias.grad, rtol=1e-12, atol=1e-12)


# --- the ops on their own -------------------------------------------------------------------

POINTWISE_ARGS = {  # the op's arguments between target and reduction
    "bce_with_logits": lambda x: (torch.rand_like(x) + 0.5, torch.rand_like(x) + 0.5),
    "huber": lambda x: (torch.rand_like(x), 0.7),
    "mse": lambda x: (None,),
    "l1": lambda x: (torch.rand_like(x),),
    "smooth_l1": lambda x: (0.6,),
    "bce": lambda x: (None,),
    "hinge": lambda x: (0.5,),
    "kl_div": lambda x: (True,),
}


def _pointwise_inputs(name, device):
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    y = torch.rand(3, 4, dtype=torch.float64, device=device)
    if name == "bce":
        x = x.sigmoid() * 0.9 + 0.05
    if name == "hinge":
        y = (torch.randint(0, 2, (3, 4), device=device) * 2 - 1).double()
    x = x + 0.03 * (x - y).sign()  # keep the kinks (|x - y| = delta, beta, 0) out of reach
    return x, y


@pytest.mark.parametrize("written", [True, False], ids=["written", "recomputed"])
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("name", list(POINTWISE_ARGS))
def test_pointwise_op_gradcheck(name, reduction, written, device):
    """gradcheck (and gradgradcheck) through the *_fwd op itself, whether it was asked to
    write the gradients in its forward or not."""
    x, y = _pointwise_inputs(name, device)
    args = POINTWISE_ARGS[name](x)
    target_grad = name != "hinge"
    op = getattr(ops, f"{name}_fwd_differentiable")

    def loss(x, y):
        return op(x, y, *args, reduction, written, written and target_grad)[0]

    inputs = (x.requires_grad_(), y.requires_grad_(target_grad))
    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)


@pytest.mark.parametrize("written", [True, False], ids=["written", "recomputed"])
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_cross_entropy_op_gradcheck(probs, reduction, written, device):
    x = torch.randn(3, C, 2, dtype=torch.float64, device=device)
    if probs:
        t = torch.rand(3, C, 2, dtype=torch.float64, device=device).softmax(1)
    else:
        t = torch.randint(0, C, (3, 2), device=device)
        t[0, 0] = 1
    w = _weight(device)

    def loss(x, t):
        return ops.cross_entropy_fwd_differentiable(
            x, t, w, -100 if probs else 1, 0.1, reduction, written, written and probs, 0.01,
            3.0)[0]

    inputs = (x.requires_grad_(), t.requires_grad_(probs))
    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)


def test_op_formula_retained_graph_and_grad_output(device):
    """A second backward through a retained graph, and a grad_output that is not 1, on the
    gradient the op wrote in its forward: the same as torch's."""
    x = torch.randn(4, C, 1, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, C, (4, 1), device=device)
    loss = ops.cross_entropy_fwd_differentiable(x, t, None, -100, 0.0, 1, True, False)[0]
    first, = torch.autograd.grad(loss, x, retain_graph=True)
    second, = torch.autograd.grad(loss, x, torch.tensor(2.5, dtype=torch.float64,
                                                       device=device))
    xr = x.detach().requires_grad_()
    want, = torch.autograd.grad(nn.functional.cross_entropy(xr, t), xr)
    assert_close(first, want, rtol=1e-13, atol=1e-15)
    assert_close(second, 2.5 * want, rtol=1e-13, atol=1e-15)


def test_twins_compute_what_the_plain_ops_do(device):
    """A twin's outputs are its plain op's, bit for bit (the same kernels)."""
    x = torch.randn(4, C, 3, device=device)
    t = torch.randint(0, C, (4, 3), device=device)
    args = (x, t, _weight(device).float(), 1, 0.1, 1, True, False, 0.01, 3.0)
    for got, want in zip(ops.cross_entropy_fwd_differentiable(*args),
                         ops.cross_entropy_fwd(*args)):
        assert torch.equal(got, want)
    y = torch.rand(4, C, 3, device=device)
    for got, want in zip(ops.huber_fwd_differentiable(x, y, None, 0.5, 0, False, False),
                         ops.huber_fwd(x, y, None, 0.5, 0, False, False)):
        assert torch.equal(got, want)

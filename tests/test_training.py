"""Small real models trained for 30 SGD steps twice from the same seed: once with torch's loss,
once with ours. The loss curves and final parameters must match within tight tolerance."""
import pytest
import torch

import torch_losses as TL

STEPS = 30


def _mlp(n_in, n_out, device):
    return torch.nn.Sequential(torch.nn.Linear(n_in, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, n_out)).to(device=device, dtype=torch.float64)


def _train(make_loss, task, device, seed=0):
    torch.manual_seed(seed)
    x, y, n_out, head = task(device)
    model = _mlp(x.shape[-1], n_out, device)
    loss_fn = make_loss()
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    curve = []
    for step in range(STEPS):
        idx = torch.arange(step * 16, step * 16 + 32) % x.shape[0]
        opt.zero_grad()
        loss = loss_fn(head(model(x[idx])), y[idx])
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve, dtype=torch.float64), [p.detach().clone() for p in model.parameters()]


def classification(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 10, generator=g, dtype=torch.float64)
    y = (x[:, :5].argmax(1) + (x[:, 5] > 0).long() * 5) % 7
    return x.to(device), y.to(device), 7, lambda o: o


def regression(device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64)
    y = torch.stack([x[:, 0] * 2 - x[:, 1], x[:, 2].sin() * 3], 1)
    y = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    y[::17] += 5.0  # outliers: exercises the linear branches
    return x.to(device), y.to(device), 2, lambda o: o


def multilabel(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 12, generator=g, dtype=torch.float64)
    y = (x[:, :6] + 0.3 * x[:, 6:] > 0).double()
    return x.to(device), y.to(device), 6, lambda o: o


def multilabel_sigmoid(device):
    x, y, n, _ = multilabel(device)
    return x, y, n, torch.sigmoid


def svm(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 6, generator=g, dtype=torch.float64)
    y = torch.where(x[:, 0] - x[:, 1] > 0, 1.0, -1.0).double().unsqueeze(1)
    return x.to(device), y.to(device), 1, lambda o: o


def distillation(device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 10, generator=g, dtype=torch.float64)
    teacher = torch.randn(10, 8, generator=g, dtype=torch.float64)
    y = (x @ teacher).log_softmax(-1)  # log-probabilities of a fixed teacher
    return x.to(device), y.to(device), 8, lambda o: o.log_softmax(-1)


CASES = {
    "ce": (classification, lambda: TL.CrossEntropyLoss(label_smoothing=0.05),
           lambda: torch.nn.CrossEntropyLoss(label_smoothing=0.05)),
    "ce_weighted": (classification, lambda: TL.CrossEntropyLoss(weight=torch.linspace(
        0.5, 2, 7, dtype=torch.float64)), lambda: torch.nn.CrossEntropyLoss(
        weight=torch.linspace(0.5, 2, 7, dtype=torch.float64))),
    "huber": (regression, lambda: TL.HuberLoss(delta=0.8), lambda: torch.nn.HuberLoss(delta=0.8)),
    "mse": (regression, TL.MSELoss, torch.nn.MSELoss),
    "l1": (regression, TL.L1Loss, torch.nn.L1Loss),
    "smooth_l1": (regression, lambda: TL.SmoothL1Loss(beta=0.5),
                  lambda: torch.nn.SmoothL1Loss(beta=0.5)),
    "bce_logits": (multilabel, lambda: TL.BCEWithLogitsLoss(pos_weight=torch.full(
        (6,), 1.5, dtype=torch.float64)), lambda: torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.full((6,), 1.5, dtype=torch.float64))),
    "bce": (multilabel_sigmoid, TL.BCELoss, torch.nn.BCELoss),
    "kl": (distillation, lambda: TL.KLDivLoss(reduction="batchmean", log_target=True),
           lambda: torch.nn.KLDivLoss(reduction="batchmean", log_target=True)),
    "hinge": (svm, TL.HingeLoss, lambda: (lambda x, y: (1 - y * x).clamp_min(0).mean())),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_curves_match_torch(name, device):
    task, ours, theirs = CASES[name]
    curve_o, params_o = _train(ours, task, device)
    curve_t, params_t = _train(theirs, task, device)
    torch.testing.assert_close(curve_o, curve_t, rtol=1e-9, atol=1e-10)
    for p, q in zip(params_o, params_t):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    assert curve_t[-5:].mean() < curve_t[:5].mean(), "the model learns: a meaningful check"


def test_training_inplace_backward_matches_torch(device):
    curve_o, params_o = _train(lambda: TL.CrossEntropyLoss(inplace_backward=True),
                               classification, device)
    curve_t, params_t = _train(torch.nn.CrossEntropyLoss, classification, device)
    torch.testing.assert_close(curve_o, curve_t, rtol=1e-9, atol=1e-10)
    for p, q in zip(params_o, params_t):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_training_float32_close_to_torch(device):
    """float32: not bitwise, but the curves stay within float32 noise over 30 steps."""
    def task32(device):
        x, y, n, head = classification(device)
        return x.float(), y, n, head

    def train(make_loss):
        torch.manual_seed(0)
        x, y, n_out, head = task32(device)
        model = _mlp(10, n_out, device).float()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = make_loss()
        out = []
        for step in range(STEPS):
            idx = torch.arange(step * 16, step * 16 + 32) % x.shape[0]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out)

    torch.testing.assert_close(train(TL.CrossEntropyLoss), train(torch.nn.CrossEntropyLoss),
                               rtol=1e-4, atol=1e-5)

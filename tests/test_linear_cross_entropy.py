"""torch_losses.functional.linear_cross_entropy and LinearCrossEntropyLoss against the
installed torch's reference path (options=None): values, gradients, errors, chunking,
autocast, torch.compile."""
import itertools
import math
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torch_losses as TL
import torch_losses.functional as TLF
import torch_losses.linear as LIN
from tl_helpers import (LOW_PRECISION, assert_close, assert_deterministic, assert_flash_rule,
                        assert_same_exception, leaf)

REDUCTIONS = ["none", "mean", "sum"]
# The first backward hands out the gradients the forward wrote; gradcheck's further backwards
# (retain_graph) recompute them chunk by chunk: equal up to rounding, not bitwise.
NONDET_TOL = 1e-12


def make(n, h, c, device, dtype=torch.float64, probs=False, bias=True, ignore=None,
         scale=1.0):
    """x (n, h), W (c, h), bias (c) or None, target; with `ignore` set, every third
    class-index target is that value."""
    x = torch.randn(n, h, dtype=torch.float64, device=device).to(dtype)
    w = (torch.randn(c, h, dtype=torch.float64, device=device) * scale / h ** 0.5).to(dtype)
    b = torch.randn(c, dtype=torch.float64, device=device).to(dtype) if bias else None
    if probs:
        t = torch.randn(n, c, dtype=torch.float64, device=device).softmax(-1).to(dtype)
    else:
        t = torch.randint(0, c, (n,), device=device)
        if ignore is not None:
            t[::3] = ignore
    return x, w, b, t


def class_weight(c, device, dtype=torch.float64):
    return torch.rand(c, dtype=torch.float64, device=device).add(0.5).to(dtype)


# torch 2.13 has the reference; an older torch (2.11 on the GPU image) gets the composite
# that torch documents as its definition (class-index and probability targets, no K-dim).
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE,
                                     reason="torch's own linear_cross_entropy (torch >= 2.13)")


def reference(input, linear_weight, target, *, linear_bias=None, ignore_index=None, **kw):
    if HAS_TORCH_LCE:
        return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                      ignore_index=ignore_index, **kw)
    return F.cross_entropy(F.linear(input, linear_weight, linear_bias), target,
                           ignore_index=-100 if ignore_index is None else ignore_index, **kw)


def options(rows):
    if rows is None:
        return None
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows)
    return types.SimpleNamespace(batch_chunk_size=rows)


def both(x, w, b, t, **kw):
    """(ours, torch's reference) on fresh leaves: (loss, inputs) each."""
    rows = kw.pop("rows", None)
    inputs_o = [leaf(x), leaf(w), None if b is None else leaf(b),
                leaf(t) if t.is_floating_point() else t]
    inputs_t = [leaf(x), leaf(w), None if b is None else leaf(b),
                leaf(t) if t.is_floating_point() else t]
    ours = TLF.linear_cross_entropy(inputs_o[0], inputs_o[1], inputs_o[3],
                                    linear_bias=inputs_o[2], options=options(rows), **kw)
    theirs = reference(inputs_t[0], inputs_t[1], inputs_t[3], linear_bias=inputs_t[2], **kw)
    return (ours, inputs_o), (theirs, inputs_t)


def grads_of(loss, inputs, g):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, wanted, g, retain_graph=True)


# --------------------------------------------------------------------------------------------
# float64: gradcheck, and values and gradients against torch


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("weighted", [False, True], ids=["nw", "w"])
@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(probs, weighted, ls, reduction, device):
    x, w, b, t = make(7, 5, 6, device, probs=probs, ignore=None if probs else 2)
    cw = class_weight(6, device) if weighted else None
    ii = None if probs else 2

    def f(x, w, b, t):
        return TLF.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, ignore_index=ii,
                                        reduction=reduction, label_smoothing=ls,
                                        options=options(3))  # chunks of 3, 3 and 1 rows

    inputs = (leaf(x), leaf(w), leaf(b), leaf(t) if probs else t)
    assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, nondet_tol=NONDET_TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_create_graph(reduction, device):
    """create_graph=True differentiates a composite of torch ops: second derivatives work."""
    x, w, b, t = make(5, 4, 6, device)

    def f(x, w, b):
        return TLF.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                        label_smoothing=0.1, options=options(2))

    assert gradgradcheck(f, (leaf(x), leaf(w), leaf(b)), eps=1e-6, atol=1e-5, rtol=1e-4,
                         nondet_tol=NONDET_TOL)


MATCH_CASES = list(itertools.product(
    [0, 1, 7, 37],          # rows (1 = unbatched 1-D input)
    [False, True],          # probability targets
    [False, True],          # class weights
    [None, -100, 3],        # ignore_index (class indices; -100 and 3 with hits)
    [0.0, 0.3],             # label_smoothing
    [None, 5, 64],          # rows per chunk (None: the memory budget)
))


def _match_id(case):
    n, probs, weighted, ii, ls, rows = case
    return f"n{n}-{'p' if probs else 'i'}-{'w' if weighted else 'nw'}-ii{ii}-ls{ls}-r{rows}"


@pytest.mark.parametrize("case", [c for c in MATCH_CASES if not (c[1] and c[3] is not None)],
                         ids=_match_id)
def test_matches_torch_reference(case, device):
    n, probs, weighted, ii, ls, rows = case
    x, w, b, t = make(max(n, 1), 6, 11, device, probs=probs,
                      ignore=None if probs or ii is None else ii)
    if n == 1:  # unbatched
        x, t = x[0], t[0]
    elif n == 0:
        x, t = x[:0], t[:0]
    cw = class_weight(11, device) if weighted else None
    for reduction, bias in itertools.product(REDUCTIONS, [False, True]):
        (ours, io), (theirs, it) = both(x, w, b if bias else None, t, weight=cw,
                                        ignore_index=ii, label_smoothing=ls,
                                        reduction=reduction, rows=rows)
        msg = f"{reduction} bias={bias}"
        assert_close(ours, theirs, msg=msg + " value")
        g = torch.rand_like(theirs) + 0.5
        for a, r in zip(grads_of(ours, io, g), grads_of(theirs, it, g)):
            assert_close(a, r, msg=msg + " grad")
        # a second backward through the retained graph recomputes the chunks
        for a, r in zip(grads_of(ours, io, g), grads_of(theirs, it, g)):
            assert_close(a, r, msg=msg + " second backward")


@needs_torch_lce
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_and_module_match_torch(probs, reduction, device):
    torch.manual_seed(1)
    ours_m = TL.LinearCrossEntropyLoss(24, 50, bias=True, reduction=reduction,
                                       label_smoothing=0.1, device=device,
                                       weight=class_weight(50, device, torch.float32),
                                       options=options(16))
    torch_m = torch.nn.LinearCrossEntropyLoss(24, 50, bias=True, reduction=reduction,
                                              label_smoothing=0.1, device=device,
                                              weight=class_weight(50, device, torch.float32))
    assert isinstance(ours_m, torch.nn.LinearCrossEntropyLoss)
    torch_m.load_state_dict(ours_m.state_dict())
    x, _, _, t = make(45, 24, 50, device, torch.float32, probs=probs)
    xo, xt = leaf(x), leaf(x)
    ours, theirs = ours_m(xo, t), torch_m(xt, t)
    assert_close(ours, theirs)
    g = torch.rand_like(theirs) + 0.5
    ours.backward(g)
    theirs.backward(g)
    assert_close(xo.grad, xt.grad)
    for p, q in zip(ours_m.parameters(), torch_m.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


@needs_torch_lce
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_k_dimensional_loss(probs, device):
    """linear_weight (C, d1, H): logits (N, C, d1), softmax over C per position. Runs the
    reference composite (linear, then our cross_entropy), as torch's chunked path does."""
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    w = torch.randn(6, 3, 5, dtype=torch.float64, device=device)
    b = torch.randn(6, 3, dtype=torch.float64, device=device)
    t = (torch.randn(4, 6, 3, dtype=torch.float64, device=device).softmax(1) if probs
         else torch.randint(0, 6, (4, 3), device=device))
    for reduction in REDUCTIONS:
        (ours, io), (theirs, it) = both(x, w, b, t, reduction=reduction, label_smoothing=0.1)
        assert_close(ours, theirs)
        g = torch.rand_like(theirs)
        for a, r in zip(grads_of(ours, io, g), grads_of(theirs, it, g)):
            assert_close(a, r)
    m = TL.LinearCrossEntropyLoss(5, 6, out_features=(3,), bias=True, device=device,
                                  dtype=torch.float64)
    mt = torch.nn.LinearCrossEntropyLoss(5, 6, out_features=(3,), bias=True, device=device,
                                         dtype=torch.float64)
    mt.load_state_dict(m.state_dict())
    assert_close(m(x, t), mt(x, t))


@needs_torch_lce
def test_probability_target_of_another_dtype_promotes_like_torch(device):
    x, w, b, _ = make(5, 4, 6, device, torch.float32)
    t = torch.randn(5, 6, dtype=torch.float64, device=device).softmax(-1)
    (ours, _), (theirs, _) = both(x, w, b, t)
    assert_close(ours, theirs, dtype=torch.float32)  # float32 logits, float64 loss


# --------------------------------------------------------------------------------------------
# Low precision and autocast


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("rows", [None, 16])
def test_low_precision_flash_rule(dtype, probs, rows, device):
    x64, w64, b64, t64 = make(67, 32, 300, device, probs=probs, scale=4.0)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    t = t64.to(dtype) if probs else t64
    for reduction, ls in itertools.product(REDUCTIONS, [0.0, 0.1]):
        kw = dict(reduction=reduction, label_smoothing=ls)
        (ours, io), (theirs, it) = both(x, w, b, t, rows=rows, **kw)
        ref_in = [leaf(x.double()), leaf(w.double()), leaf(b.double()),
                  leaf(t.double()) if probs else t]
        ref = reference(ref_in[0], ref_in[1], ref_in[3], linear_bias=ref_in[2], **kw)
        name = f"{dtype} {reduction} ls={ls}"
        assert_flash_rule(ours, theirs, ref, name + " loss")
        g = torch.ones((), dtype=dtype, device=device) if reduction != "none" else \
            (torch.rand(theirs.shape, dtype=torch.float64, device=device) + 0.5).to(dtype)
        for k, (a, r, e) in enumerate(zip(grads_of(ours, io, g), grads_of(theirs, it, g),
                                          grads_of(ref, ref_in, g.double()))):
            assert_flash_rule(a, r, e, f"{name} grad {k}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_low_precision_grad_output_not_one(dtype, reduction, device):
    """backward scales the rounded gradients by grad_output: still within 2x torch's error."""
    x64, w64, b64, t = make(67, 32, 300, device, scale=4.0, ignore=-100)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    (ours, io), (theirs, it) = both(x, w, b, t, reduction=reduction, rows=16)
    ref_in = [leaf(x.double()), leaf(w.double()), leaf(b.double())]
    ref = reference(ref_in[0], ref_in[1], t, linear_bias=ref_in[2], reduction=reduction)
    g = torch.tensor(0.7, dtype=dtype, device=device)
    for k, (a, r, e) in enumerate(zip(grads_of(ours, io, g), grads_of(theirs, it, g),
                                      grads_of(ref, ref_in, g.double()))):
        assert_flash_rule(a, r, e, f"grad {k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_many_chunks_accumulate_weight_grad_in_float32(dtype, device):
    """64 chunks: grad_W summed chunk by chunk in the weight's dtype would be ~4x torch's
    error for float16; the float32 accumulator keeps it at torch's."""
    x64, w64, _, t = make(1024, 64, 500, device, scale=4.0, bias=False)
    x, w = x64.to(dtype), w64.to(dtype)
    (ours, io), (theirs, it) = both(x, w, None, t, rows=16)
    ref_in = [leaf(x.double()), leaf(w.double())]
    ref = reference(ref_in[0], ref_in[1], t)
    g = torch.ones((), dtype=dtype, device=device)
    for k, (a, r, e) in enumerate(zip(grads_of(ours, io, g), grads_of(theirs, it, g),
                                      grads_of(ref, ref_in, g.double()))):
        assert_flash_rule(a, r, e, f"grad {k}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bfloat16_cpu(reduction):
    """Under autocast the linear runs in bfloat16 and the loss in float32, as torch's
    composite: the same dtypes, and errors within 2x torch's against float64."""
    x, w, b, t = make(40, 32, 200, "cpu", torch.float32, scale=4.0)
    ref_in = [leaf(x.double()), leaf(w.double()), leaf(b.double())]
    xb, wb, bb = (v.bfloat16().double() for v in (x, w, b))  # what autocast feeds the linear
    ref = reference(xb, wb, t, linear_bias=bb, reduction=reduction)
    ref_grads = torch.autograd.grad(
        reference(*ref_in[:2], t, linear_bias=ref_in[2], reduction=reduction),
        ref_in, torch.ones_like(ref))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (ours, io), (theirs, it) = both(x, w, b, t, reduction=reduction, rows=8)
    assert ours.dtype == theirs.dtype == torch.float32
    assert_flash_rule(ours, theirs, ref, "autocast loss")
    g = torch.ones_like(theirs)
    for k, (a, r, e) in enumerate(zip(grads_of(ours, io, g), grads_of(theirs, it, g),
                                      ref_grads)):
        assert a.dtype == r.dtype == torch.float32
        assert_flash_rule(a, r, e, f"autocast grad {k}", rel_slack=1e-2)


# --------------------------------------------------------------------------------------------
# Chunks and memory


def _record_chunks(monkeypatch):
    """Records every logits chunk; asserts that one chunk's memory is alive at a time: each
    earlier chunk is freed, or lies in the same memory (the reused buffer)."""
    seen, alive = [], []

    def hook(logits):
        storage = logits.untyped_storage().data_ptr()
        assert all(ref() is None or ref().untyped_storage().data_ptr() == storage
                   for ref in alive), "two logits chunks alive at once"
        seen.append((tuple(logits.shape), logits.dtype, logits.nbytes))
        alive.append(weakref.ref(logits))

    monkeypatch.setattr(LIN, "_logits_chunk_hook", hook)
    return seen


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunks_fit_the_budget(probs, dtype, monkeypatch):
    n, h, c, budget = 300, 16, 1000, 40_000
    x, w, b, t = make(n, h, c, "cpu", dtype, probs=probs)
    seen = _record_chunks(monkeypatch)
    x, w = leaf(x), leaf(w)
    loss = TLF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_bytes=budget)
    logit_bytes = dtype.itemsize * (2 if probs else 1)  # probability targets: a gradient too
    sizes = [shape[0] for shape, _, _ in seen]
    max_rows = LIN.chunk_rows(c, logit_bytes, "cpu", budget)
    assert max_rows * c * logit_bytes <= budget < (max_rows + 8) * c * logit_bytes
    assert len(sizes) == math.ceil(n / max_rows) > 1 and sum(sizes) == n
    assert max(sizes) <= max_rows and max(sizes) - min(sizes) <= 8  # near-equal chunks
    seen.clear()
    loss.backward()
    assert seen == []  # mean: backward only scales what the forward wrote
    none = TLF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_bytes=budget,
                                    reduction="none")
    seen.clear()
    none.backward(torch.ones_like(none))  # 'none' recomputes, with a gradient buffer each
    assert len(seen) > 1
    assert all(shape[0] * c * 2 * dtype.itemsize <= budget for shape, _, _ in seen)


def test_options_batch_chunk_size_sets_the_rows(monkeypatch):
    x, w, b, t = make(10, 4, 7, "cpu", torch.float32)
    seen = _record_chunks(monkeypatch)
    TLF.linear_cross_entropy(x, w, t, options=options(4))
    assert [s[0][0] for s in seen] == [4, 4, 2]


def test_no_grad_computes_the_loss_only(monkeypatch):
    x, w, b, t = make(9, 4, 7, "cpu", torch.float32)
    x, w = leaf(x), leaf(w)
    with torch.no_grad():
        ours = TLF.linear_cross_entropy(x, w, t, linear_bias=b)
    assert not ours.requires_grad
    assert_close(ours, reference(x, w, t, linear_bias=b).detach())


def test_deterministic(device):
    x, w, b, t = make(50, 16, 120, device, torch.float32, ignore=-100)

    def run():
        xo, wo, bo = leaf(x), leaf(w), leaf(b)
        loss = TLF.linear_cross_entropy(xo, wo, t, linear_bias=bo, label_smoothing=0.1,
                                        options=options(7))
        return (loss, *torch.autograd.grad(loss, (xo, wo, bo)))

    assert_deterministic(run)


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_fullgraph(reduction, device):
    """The chunk loops are custom ops: one node each in the graph, whatever N."""
    x, w, b, t = make(20, 8, 30, device, torch.float32, ignore=-100)
    ours_in = [leaf(x), leaf(w), leaf(b)]
    ref_in = [leaf(x), leaf(w), leaf(b)]

    opts = options(6)  # made outside: torch 2.11's dynamo cannot trace SimpleNamespace()

    def step(x, w, b, t):
        return TLF.linear_cross_entropy(torch.tanh(x), w, t, linear_bias=b,
                                        reduction=reduction, options=opts)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    ours = compiled(*ours_in, t)
    theirs = reference(torch.tanh(ref_in[0]), ref_in[1], t, linear_bias=ref_in[2],
                       reduction=reduction)
    assert_close(ours, theirs)
    g = torch.rand_like(theirs) + 0.5
    ours.backward(g)
    theirs.backward(g)
    for a, r in zip(ours_in, ref_in):
        assert_close(a.grad, r.grad)


# --------------------------------------------------------------------------------------------
# Bad inputs: torch's exception types


def _bad_cases(device):
    x, w, b, t = make(4, 5, 6, device, torch.float32)
    tp = torch.rand(4, 6, device=device)
    return {
        "input 3-D": (torch.randn(2, 4, 5, device=device), w, t, {}),
        "input 0-D": (torch.randn((), device=device), w, t, {}),
        "weight 1-D": (x, torch.randn(6, device=device), t, {}),
        "weight of the wrong width": (x, torch.randn(6, 4, device=device), t, {}),
        "input float64, weight float32": (x.double(), w, t, {}),
        "bias float64": (x, w, t, {"linear_bias": b.double()}),
        "bias of the wrong shape": (x, w, t, {"linear_bias": torch.randn(5, device=device)}),
        "target out of range": (x, w, torch.tensor([0, 1, 6, 2], device=device), {}),
        "negative target": (x, w, torch.tensor([0, -1, 3, 2], device=device), {}),
        "target batch mismatch": (x, w, t[:3], {}),
        "target int32": (x, w, t.int(), {}),
        "target 2-D indices": (x, w, t[:, None].expand(4, 2), {}),
        "class weight of the wrong size": (x, w, t, {"weight": torch.rand(5, device=device)}),
        "label_smoothing > 1": (x, w, t, {"label_smoothing": 1.5}),
        "bad reduction": (x, w, t, {"reduction": "avg"}),
        "ignore_index with probabilities": (x, w, tp, {"ignore_index": 1}),
        "K-dim weight with unbatched input": (x[0], torch.randn(6, 2, 5, device=device), t[0],
                                              {}),
        "integer input": (x.long(), w.long(), t, {}),
    }


@needs_torch_lce
@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_inputs_raise_like_torch(case, device):
    x, w, t, kw = _bad_cases(device)[case]
    assert_same_exception(lambda: TLF.linear_cross_entropy(x, w, t, **kw),
                          lambda: F.linear_cross_entropy(x, w, t, **kw))


def test_plain_module_for_a_torch_without_one():
    """The module used where torch has no LinearCrossEntropyLoss: torch's constructor,
    parameters, state_dict keys and results."""
    m = LIN.PlainLinearCrossEntropyLoss(6, 9, bias=True, dtype=torch.float64,
                                        label_smoothing=0.1, reduction="sum")
    assert [k for k, _ in m.named_parameters()] == ["linear.weight", "linear.bias"]
    x, _, _, t = make(8, 6, 9, "cpu")
    expected = reference(x, m.linear.weight, t, linear_bias=m.linear.bias,
                         label_smoothing=0.1, reduction="sum")
    assert_close(m(x, t), expected)
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        mt = torch.nn.LinearCrossEntropyLoss(6, 9, bias=True, dtype=torch.float64,
                                             label_smoothing=0.1, reduction="sum")
        mt.load_state_dict(m.state_dict())
        assert set(mt.state_dict()) == set(m.state_dict())
        assert repr(mt).split("(", 1)[1] == repr(m).split("(", 1)[1]
    with pytest.raises(RuntimeError):
        LIN.PlainLinearCrossEntropyLoss(4, 5, weight=torch.rand(3))


@needs_torch_lce
def test_module_constructor_errors_like_torch():
    for kw in [{"weight": torch.rand(3)}, {"label_smoothing": -0.1}]:
        assert_same_exception(lambda: TL.LinearCrossEntropyLoss(4, 5, **kw),
                              lambda: torch.nn.LinearCrossEntropyLoss(4, 5, **kw))


def test_class_weight_requiring_grad_not_implemented():
    x, w, b, t = make(4, 5, 6, "cpu", torch.float32)
    with pytest.raises(NotImplementedError):
        TLF.linear_cross_entropy(x, w, t, weight=torch.rand(6, requires_grad=True))


def test_compile_second_backward():
    """Through a compiled graph a second backward (retain_graph) either raises torch's own
    donated-buffer error (the default) or, with donated buffers off, sums correctly."""
    import torch._functorch.config as functorch_config
    x, w, b, t = make(20, 8, 30, "cpu", torch.float32)

    def run():
        torch._dynamo.reset()
        xo, wo = leaf(x), leaf(w)
        opts = options(6)  # made outside the graph, as in test_compile_fullgraph
        loss = torch.compile(lambda x, w: TLF.linear_cross_entropy(x, w, t, options=opts),
                             fullgraph=True)(xo, wo)
        loss.backward(retain_graph=True)
        loss.backward()
        return wo.grad

    wr = leaf(w)
    reference(x, wr, t).backward()
    try:
        assert_close(run(), 2 * wr.grad)
    except RuntimeError as e:  # AOTAutograd donated a saved buffer to the first backward
        assert "donated buffers" in str(e)
    # torch's own patch API: pytest's monkeypatch (9.2) deletes the attribute on undo, which
    # torch's config module then no longer knows
    with functorch_config.patch(donated_buffer=False):
        assert_close(run(), 2 * wr.grad)


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=REDUCTIONS)
@pytest.mark.parametrize("extras", [(), (0.05, 2.0)], ids=["plain", "zloss_softcap"])
def test_opcheck(probs, reduction, extras, device):
    x, w, b, t = make(9, 4, 7, device, torch.float32, probs=probs)
    cw = class_weight(7, device, torch.float32)
    args = (x, w, t, b, cw, -100, 0.1, reduction, False, 4, True, True, True, probs, *extras)
    torch.library.opcheck(LIN._linear_cross_entropy_fwd, args)
    _, stats, *_ = LIN._linear_cross_entropy_fwd(*args)
    g = torch.rand(9, device=device) if reduction == 0 else torch.rand((), device=device)
    torch.library.opcheck(LIN._linear_cross_entropy_bwd,
                          (g, x, w, t, b, cw, stats, -100, 0.1, reduction, False, 4, True, True,
                           True, probs, *extras))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_func_grad(reduction, device):
    x, w, b, t = make(7, 5, 6, device)

    def loss(fn, x, w, b):
        out = fn(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)
        return out.sum() if reduction == "none" else out

    ours = torch.func.grad(lambda *a: loss(TLF.linear_cross_entropy, *a), argnums=(0, 1, 2))
    theirs = torch.func.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))
    for a, r in zip(ours(x, w, b), theirs(x, w, b)):
        assert_close(a, r)


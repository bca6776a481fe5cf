"""cross_entropy / CrossEntropyLoss / CrossEntropyFunction against torch."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torch_losses as TL
import torch_losses.functional as TLF
from tl_helpers import (LOW_PRECISION, assert_close, assert_deterministic, assert_flash_rule,
                        assert_same_exception, bitwise_equal, ce_extras_reference, leaf,
                        requires_cuda)

CE = TL.CrossEntropyFunction
SHAPES = [(5,), (3, 5), (2, 4, 2, 3)]
SMOOTHING = [0.0, 0.1, 1.0, -0.1]
REDUCTIONS = ["none", "mean", "sum"]


def make_inputs(shape, device, dtype=torch.float64, probs=False, ignore_hit=None):
    """Logits, and class-index targets (with `ignore_hit` placed at two positions) or
    probability targets."""
    x = torch.randn(shape, dtype=torch.float64, device=device) * 2
    C = shape[0] if len(shape) == 1 else shape[1]
    if probs:
        cls_dim = 0 if len(shape) == 1 else 1
        t = torch.randn(shape, dtype=torch.float64, device=device).softmax(cls_dim)
        return x.to(dtype), t.to(dtype)
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = torch.randint(0, C, tshape, device=device)
    if ignore_hit is not None:
        flat = t.view(-1)
        flat[0] = ignore_hit
        if flat.numel() > 2:
            flat[2] = ignore_hit
    return x.to(dtype), t


def ce_cases():
    """(shape, probs, weighted, ignore_index, hit, label_smoothing)."""
    for shape, probs, weighted, ls in itertools.product(SHAPES, [False, True], [False, True],
                                                        SMOOTHING):
        if probs:
            yield shape, probs, weighted, -100, False, ls
        else:
            yield shape, probs, weighted, -100, False, ls   # not hit
            yield shape, probs, weighted, 1, True, ls       # hit (a valid class)
            yield shape, probs, weighted, -1, True, ls      # negative, hit


CASES = list(ce_cases())
CASE_IDS = [f"{s}-{'p' if p else 'i'}-{'w' if w else 'nw'}-ii{ii}{'hit' if h else ''}-ls{ls}"
            for s, p, w, ii, h, ls in CASES]
CASE_PARAMS = [pytest.param(*c, id=i) for c, i in zip(CASES, CASE_IDS)]
# The first backward hands out the gradient the forward wrote; gradcheck's further backwards
# (retain_graph) recompute it with the backward op, equal up to rounding, not bitwise.
NONDET_TOL = 1e-12


def _weight(shape, device, dtype=torch.float64):
    C = shape[0] if len(shape) == 1 else shape[1]
    return torch.rand(C, dtype=torch.float64, device=device).add(0.5).to(dtype)


@pytest.mark.parametrize("shape,probs,weighted,ignore_index,hit,ls", CASE_PARAMS)
def test_function_gradcheck_and_grads(shape, probs, weighted, ignore_index, hit, ls, device):
    x, t = make_inputs(shape, device, probs=probs, ignore_hit=ignore_index if hit else None)
    if len(shape) == 1 and hit and not probs:
        t = torch.tensor(ignore_index, device=device)
    w = _weight(shape, device) if weighted else None
    for reduction in REDUCTIONS:
        def f(a, b):
            return CE.apply(a, b, w, ignore_index, ls, reduction, False)

        expected = F.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=ls)
        got = f(x, t)
        assert_close(got, expected, msg=f"{reduction} value")
        if len(shape) == 1 and hit and not probs and reduction == "mean":
            assert got.isnan()  # the only target is ignored: 0 / 0, as torch
            continue
        inputs = (leaf(x), leaf(t) if probs else t)
        assert gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, nondet_tol=NONDET_TOL)
        xo, xt = leaf(x), leaf(x)
        to, tt = (leaf(t), leaf(t)) if probs else (t, t)
        ours = f(xo, to)
        theirs = F.cross_entropy(xt, tt, w, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=ls)
        g = torch.randn_like(theirs)
        wanted_o = [xo, to] if probs else [xo]
        wanted_t = [xt, tt] if probs else [xt]
        for a, b in zip(torch.autograd.grad(ours, wanted_o, g),
                        torch.autograd.grad(theirs, wanted_t, g)):
            assert_close(a, b, msg=f"{reduction} grads")


GG_CASES = [c for c in CASES if c[0] != (2, 4, 2, 3) and c[5] in (0.0, 0.1)]


@pytest.mark.parametrize("shape,probs,weighted,ignore_index,hit,ls", GG_CASES,
                         ids=[CASE_IDS[CASES.index(c)] for c in GG_CASES])
def test_function_gradgradcheck(shape, probs, weighted, ignore_index, hit, ls, device):
    x, t = make_inputs(shape, device, probs=probs, ignore_hit=ignore_index if hit else None)
    if len(shape) == 1 and hit and not probs:
        return  # all ignored: nan for mean, covered elsewhere
    w = _weight(shape, device) if weighted else None
    for reduction in REDUCTIONS:
        def f(a, b):
            return CE.apply(a, b, w, ignore_index, ls, reduction, False)

        assert gradgradcheck(f, (leaf(x), leaf(t) if probs else t), eps=1e-6, atol=1e-5,
                             rtol=1e-4, nondet_tol=NONDET_TOL)


# --------------------------------------------------------------------------------------------
# The functional and the module against torch


@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 6, 5), (2, 5, 3, 4)], ids=str)
@pytest.mark.parametrize("probs", [False, True])
def test_functional_and_module_match_torch(shape, probs, device):
    x, t = make_inputs(shape, device, probs=probs)
    for weighted, ls, reduction in itertools.product([False, True], [0.0, 0.2],
                                                     REDUCTIONS):
        w = _weight(shape, device) if weighted else None
        kw = dict(weight=w, reduction=reduction, label_smoothing=ls)
        ours_m, torch_m = TL.CrossEntropyLoss(**kw), torch.nn.CrossEntropyLoss(**kw)
        assert isinstance(ours_m, torch.nn.CrossEntropyLoss)
        for ours_f, theirs_f in [(lambda a, b: TLF.cross_entropy(a, b, **kw),
                                  lambda a, b: F.cross_entropy(a, b, **kw)),
                                 (ours_m, torch_m)]:
            xo, xt = leaf(x), leaf(x)
            ours, theirs = ours_f(xo, t), theirs_f(xt, t)
            assert_close(ours, theirs)
            g = torch.randn_like(theirs)
            assert_close(torch.autograd.grad(ours, xo, g)[0],
                         torch.autograd.grad(theirs, xt, g)[0])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("shape", [(67, 13), (3, 29, 7)], ids=str)
def test_low_precision(shape, probs, dtype, device):
    x64, t64 = make_inputs(shape, device, probs=probs, ignore_hit=None)
    x = x64.to(dtype) * 3
    t = t64.to(dtype) if probs else t64
    tr = t.double() if probs else t
    for weighted, ls, reduction in itertools.product([False, True], [0.0, 0.1], REDUCTIONS):
        w = _weight(shape, device, dtype) if weighted else None
        w64 = None if w is None else w.double()
        xo, xt, xr = leaf(x), leaf(x), leaf(x.double())
        ours = TLF.cross_entropy(xo, t, w, reduction=reduction, label_smoothing=ls)
        theirs = F.cross_entropy(xt, t, w, reduction=reduction, label_smoothing=ls)
        ref = F.cross_entropy(xr, tr, w64, reduction=reduction, label_smoothing=ls)
        name = f"{dtype} w={weighted} ls={ls} {reduction}"
        assert_flash_rule(ours, theirs, ref, name + " loss")
        g = (torch.rand(theirs.shape, dtype=torch.float64, device=device) + 0.5).to(dtype) \
            if reduction == "none" else torch.ones((), dtype=dtype, device=device)
        assert_flash_rule(torch.autograd.grad(ours, xo, g)[0],
                          torch.autograd.grad(theirs, xt, g)[0],
                          torch.autograd.grad(ref, xr, g.double())[0], name + " grad")


# --------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("probs", [False, True])
def test_empty_batch(probs, device):
    for shape in [(0, 5), (0, 5, 3), (2, 5, 0)]:
        x, t = make_inputs(shape, device, probs=probs)
        for reduction in REDUCTIONS:
            xo, xt = leaf(x), leaf(x)
            ours = TLF.cross_entropy(xo, t, reduction=reduction)
            theirs = F.cross_entropy(xt, t, reduction=reduction)
            assert_close(ours, theirs, msg=f"{shape} {reduction}")
            if reduction == "mean":
                assert ours.isnan()
            elif reduction == "sum":
                assert ours.item() == 0
            g = torch.ones_like(theirs)
            assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_every_target_ignored(weighted, ls, device):
    for shape in [(4, 6), (2, 6, 3)]:
        x, t = make_inputs(shape, device)
        t = torch.full_like(t, -100)
        w = _weight(shape, device) if weighted else None
        for reduction in REDUCTIONS:
            xo, xt = leaf(x), leaf(x)
            ours = TLF.cross_entropy(xo, t, w, reduction=reduction, label_smoothing=ls)
            theirs = F.cross_entropy(xt, t, w, reduction=reduction, label_smoothing=ls)
            assert_close(ours, theirs)
            if reduction == "mean":
                assert ours.isnan()
            g = torch.ones_like(theirs)
            go, gt = torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0]
            assert_close(go, gt)
            if reduction != "mean":
                assert (go == 0).all()


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_like_torch(bad, probs, device):
    x, t = make_inputs((4, 6), device, probs=probs)
    x[1, 2] = bad
    x[3] = bad  # a whole row
    for reduction in REDUCTIONS:
        xo, xt = leaf(x), leaf(x)
        ours = TLF.cross_entropy(xo, t, reduction=reduction)
        theirs = F.cross_entropy(xt, t, reduction=reduction)
        assert_close(ours, theirs, msg=reduction)
        g = torch.ones_like(theirs)
        assert_close(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_huge_logits_finite(dtype, device):
    x = torch.randn(6, 9, device=device) * 1e4
    x[0] = 1e4
    x[1] = -1e4
    x[2, 3] = 1e4
    x = x.to(dtype)
    t = torch.randint(0, 9, (6,), device=device)
    for ls in (0.0, 0.1):
        xo, xt = leaf(x), leaf(x)
        ours = TLF.cross_entropy(xo, t, reduction="none", label_smoothing=ls)
        theirs = F.cross_entropy(xt, t, reduction="none", label_smoothing=ls)
        assert torch.isfinite(ours).all()
        tol = {} if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
        assert_close(ours, theirs, **tol)
        g = torch.ones_like(theirs)
        go = torch.autograd.grad(ours, xo, g)[0]
        assert torch.isfinite(go).all()
        assert_close(go, torch.autograd.grad(theirs, xt, g)[0], **tol)


@pytest.mark.parametrize("C", [1, 13, 5000])
def test_class_counts(C, device):
    """C = 1, a C that is not a multiple of the vector width, and a large C."""
    x = torch.randn(3, C, device=device)
    t = torch.randint(0, C, (3,), device=device)
    for ls, reduction in itertools.product([0.0, 0.1], REDUCTIONS):
        xo, xt = leaf(x), leaf(x)
        ours = TLF.cross_entropy(xo, t, reduction=reduction, label_smoothing=ls)
        theirs = F.cross_entropy(xt, t, reduction=reduction, label_smoothing=ls)
        ref = F.cross_entropy(x.double(), t, reduction=reduction, label_smoothing=ls)
        assert_flash_rule(ours, theirs, ref, f"C={C} {reduction}")
        g = torch.rand_like(theirs) + 0.5
        xr = leaf(x.double())
        assert_flash_rule(torch.autograd.grad(ours, xo, g)[0],
                          torch.autograd.grad(theirs, xt, g)[0],
                          torch.autograd.grad(F.cross_entropy(xr, t, reduction=reduction,
                                                              label_smoothing=ls),
                                              xr, g.double())[0], f"C={C} grad")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded", "channels_last"])
def test_non_contiguous_logits(layout, device):
    if layout == "transposed":
        x = torch.randn(7, 5, device=device).t()  # (5, 7): N=5, C=7
    elif layout == "sliced":
        x = torch.randn(10, 14, device=device)[::2, 1::2]
    elif layout == "expanded":
        x = torch.randn(1, 7, device=device).expand(5, 7)
    else:
        x = torch.randn(2, 4, 3, 3, device=device).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    C = x.shape[1]
    t = torch.randint(0, C, x.shape[:1] + x.shape[2:], device=device)
    tp = torch.randn(x.shape, device=device).softmax(1)
    for target in (t, tp):
        for reduction in REDUCTIONS:
            xo, xt = leaf(x), leaf(x)
            ours = TLF.cross_entropy(xo, target, reduction=reduction)
            theirs = F.cross_entropy(xt, target, reduction=reduction)
            assert_close(ours, theirs)
            g = torch.randn_like(theirs)
            assert_close(torch.autograd.grad(ours, xo, g)[0],
                         torch.autograd.grad(theirs, xt, g)[0])


def _classes_innermost_logits(layout, C, dtype, device):
    """Logits (2, C, 3, 4) whose classes are innermost in memory (folded to rows)."""
    if layout == "channels_last":
        return torch.randn(2, C, 3, 4, dtype=dtype, device=device).contiguous(
            memory_format=torch.channels_last)
    return torch.randn(2, 3, 4, C, dtype=dtype, device=device).permute(0, 3, 1, 2)


@pytest.mark.parametrize("C", [5, 37])
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("options", [
    {}, {"label_smoothing": 0.2}, {"weight": True, "ignore_index": 1},
    {"z_loss": 0.01, "softcap": 3.0}, {"weight": True, "label_smoothing": 0.1, "z_loss": 0.02}],
    ids=["plain", "smoothing", "weight_ignore", "zloss_softcap", "weight_smoothing_zloss"])
def test_classes_innermost_logits_read_in_place(layout, probs, options, C, device):
    """Logits whose classes are innermost (channels_last (N, C, H, W)) are read as rows, without
    a copy: torch's values and gradients (float64, every option, the probability target's
    gradient too), the gradient in the logits' layout, gradcheck."""
    x = _classes_innermost_logits(layout, C, torch.float64, device)
    assert not x.is_contiguous()
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    if probs:
        if "ignore_index" in options:
            return  # probability targets take no ignore_index (torch)
        target = leaf(torch.randn(x.shape, dtype=torch.float64, device=device).softmax(1))
    else:
        target = torch.randint(0, C, (2, 3, 4), device=device)
        target[0, 0, :2] = options.get("ignore_index", -100)
    inputs = (x, target) if probs else (x,)
    for reduction in REDUCTIONS:
        xo, xt = leaf(x.clone(memory_format=torch.preserve_format)), leaf(x.clone())
        ours = TLF.cross_entropy(xo, target, reduction=reduction, **options)
        theirs = ce_extras_reference(xt, target, reduction=reduction, **options)
        assert_close(ours, theirs)
        g = torch.randn_like(theirs)
        got = torch.autograd.grad(ours, (xo, target) if probs else (xo,), g)
        expected = torch.autograd.grad(theirs, (xt, target) if probs else (xt,), g)
        assert got[0].stride() == x.stride()
        for a, b in zip(got, expected):
            assert_close(a, b)
    assert gradcheck(lambda *a: TLF.cross_entropy(a[0], a[1] if probs else target,
                                                  reduction="sum", **options),
                     tuple(leaf(t.detach().clone(memory_format=torch.preserve_format))
                           for t in inputs))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_classes_innermost_low_precision(dtype, device):
    """Folded rows in float32, bfloat16 and float16: the flash rule against torch's error."""
    C = 64
    x = _classes_innermost_logits("channels_last", C, dtype, device) * 4
    t = torch.randint(0, C, (2, 3, 4), device=device)
    xo, xt, xr = leaf(x), leaf(x), leaf(x.double())
    ours = TLF.cross_entropy(xo, t, label_smoothing=0.1)
    theirs = F.cross_entropy(xt, t, label_smoothing=0.1)
    ref = F.cross_entropy(xr, t, label_smoothing=0.1)
    assert_flash_rule(ours, theirs, ref, "loss")
    g = torch.tensor(0.7, dtype=dtype, device=device)
    assert_flash_rule(torch.autograd.grad(ours, xo, g)[0], torch.autograd.grad(theirs, xt, g)[0],
                      torch.autograd.grad(ref, xr, g.double())[0], "grad")


def _short_rows_case(dtype, C, options, device):
    """(x, options, reduction) of the short-row tests: 5 tiles of 16 rows and 7 rows over,
    rows with +inf, NaN and all -inf; the options with class weights drawn where asked."""
    options = dict(options)
    reduction = options.pop("reduction", "mean")
    if options.pop("weight", False):
        options["weight"] = torch.rand(C, dtype=dtype, device=device) + 0.5
    x = torch.randn(16 * 5 + 7, C, dtype=dtype, device=device) * 3
    x[3, 0], x[20, -1], x[40] = float("inf"), float("nan"), float("-inf")
    return x, options, reduction


@pytest.mark.parametrize("dtype,C", [(torch.float64, C) for C in (2, 21, 63, 64)] +
                         [(torch.float32, C) for C in (5, 100, 200)], ids=str)
@pytest.mark.parametrize("options", [
    {}, {"label_smoothing": 0.2, "weight": True, "ignore_index": 1},
    {"z_loss": 0.01, "softcap": 2.0}, {"reduction": "none"}],
    ids=["plain", "smoothing_weight_ignore", "zloss_softcap", "none"])
def test_short_rows(dtype, C, options, device):
    """Short contiguous rows go through the column sweeps in transposed tiles of 4-16 rows
    (CPU; float64: fewer than 64 classes, 64 take the row path; float32 with AVX-512: fewer
    than 128, 200 the row path), the rows % width left over through the row path: torch's values
    and gradients, non-finite rows included; the loss of a forward without gradient has the
    bits of one that writes it, and a retained second backward the first one's."""
    x, options, reduction = _short_rows_case(dtype, C, options, device)
    t = torch.randint(0, C, (x.shape[0],), device=device)
    t[::9] = options.get("ignore_index", -100)
    xo, xt = leaf(x), leaf(x)
    ours = TLF.cross_entropy(xo, t, reduction=reduction, **options)
    theirs = ce_extras_reference(xt, t, reduction=reduction, **options)
    assert_close(ours, theirs, equal_nan=True)
    with torch.no_grad():
        assert bitwise_equal(TLF.cross_entropy(x, t, reduction=reduction, **options), ours)
    g = torch.rand_like(theirs) + 0.5
    first = torch.autograd.grad(ours, xo, g, retain_graph=True)[0]
    assert_close(first, torch.autograd.grad(theirs, xt, g)[0], equal_nan=True)
    assert bitwise_equal(torch.autograd.grad(ours, xo, g)[0], first)
    if dtype != torch.float64:
        return
    finite = torch.isfinite(x).all(1)
    xf = leaf(x[finite])
    assert gradcheck(lambda a: TLF.cross_entropy(a, t[finite], reduction="sum", **options),
                     (xf,))


@pytest.mark.parametrize("dtype,C", [(torch.float64, C) for C in (2, 21, 63, 64)] +
                         [(torch.float32, C) for C in (5, 100)], ids=str)
@pytest.mark.parametrize("options", [
    {}, {"label_smoothing": 0.2, "weight": True}, {"z_loss": 0.01, "softcap": 2.0},
    {"reduction": "none"}], ids=["plain", "smoothing_weight", "zloss_softcap", "none"])
def test_short_rows_probability_targets(dtype, C, options, device):
    """test_short_rows with probability targets: the target's gradient too."""
    x, options, reduction = _short_rows_case(dtype, C, options, device)
    t = torch.rand(x.shape, dtype=dtype, device=device).softmax(1)
    xo, xt, to, tt = leaf(x), leaf(x), leaf(t), leaf(t)
    ours = TLF.cross_entropy(xo, to, reduction=reduction, **options)
    theirs = ce_extras_reference(xt, tt, reduction=reduction, **options)
    assert_close(ours, theirs, equal_nan=True)
    with torch.no_grad():
        assert bitwise_equal(TLF.cross_entropy(x, t, reduction=reduction, **options), ours)
    g = torch.rand_like(theirs) + 0.5
    first = torch.autograd.grad(ours, (xo, to), g, retain_graph=True)
    for a, b in zip(first, torch.autograd.grad(theirs, (xt, tt), g)):
        assert_close(a, b, equal_nan=True)
    for a, b in zip(torch.autograd.grad(ours, (xo, to), g), first):
        assert bitwise_equal(a, b)
    if dtype != torch.float64:
        return
    finite = torch.isfinite(x).all(1)
    assert gradcheck(lambda a, b: TLF.cross_entropy(a, b, reduction="sum", **options),
                     (leaf(x[finite]), leaf(t[finite])))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("C", [10, 40, 100, 200])
def test_short_rows_low_precision(dtype, C, device):
    """Short rows in float32, bfloat16 and float16, class indices and probabilities (tiles
    below 64 classes, with AVX-512 transposes below 128 (float) or 256 (16-bit), else rows):
    the flash rule against torch's error."""
    x = torch.randn(16 * 8 + 3, C, device=device).to(dtype) * 4
    for t in (torch.randint(0, C, (x.shape[0],), device=device),
              torch.rand(x.shape, device=device).softmax(1).to(dtype)):
        xo, xt, xr = leaf(x), leaf(x), leaf(x.double())
        tr = t.double() if t.is_floating_point() else t
        ours = TLF.cross_entropy(xo, t, label_smoothing=0.1)
        theirs = F.cross_entropy(xt, t, label_smoothing=0.1)
        ref = F.cross_entropy(xr, tr, label_smoothing=0.1)
        assert_flash_rule(ours, theirs, ref, "loss")
        g = torch.tensor(0.7, dtype=dtype, device=device)
        assert_flash_rule(torch.autograd.grad(ours, xo, g)[0],
                          torch.autograd.grad(theirs, xt, g)[0],
                          torch.autograd.grad(ref, xr, g.double())[0], "grad")


def test_many_rows_and_determinism(device):
    """More rows than one parallel grain; bitwise the same twice and with 1 or 2 threads."""
    x = torch.randn(3000, 37, device=device)
    t = torch.randint(0, 37, (3000,), device=device)
    t[::7] = -100
    w = torch.rand(37, device=device) + 0.5

    def run():
        xs = leaf(x)
        out = TLF.cross_entropy(xs, t, w, label_smoothing=0.1)
        out.backward()
        return out.detach(), xs.grad

    first = assert_deterministic(run)
    xt = leaf(x)
    theirs = F.cross_entropy(xt, t, w, label_smoothing=0.1)
    theirs.backward()
    ref = F.cross_entropy(x.double(), t, w.double(), label_smoothing=0.1)
    assert_flash_rule(first[0], theirs.detach(), ref, "3000 rows")
    assert_close(first[1], xt.grad, rtol=1e-5, atol=1e-8)


def test_uint8_target_like_torch(device):
    x = torch.randn(4, 5, device=device)
    t = torch.randint(0, 5, (4,), device=device)
    assert_close(TLF.cross_entropy(x, t.to(torch.uint8)), F.cross_entropy(x, t.to(torch.uint8)))


# --------------------------------------------------------------------------------------------
# Bad arguments


def _bad(device):
    x = torch.randn(4, 5, device=device)
    t = torch.randint(0, 5, (4,), device=device)
    tp = torch.rand(4, 5, device=device)
    return {
        "target_shape": ((x, torch.randint(0, 5, (3,), device=device)), {}),
        "target_extra_dim": ((x, torch.randint(0, 5, (4, 2), device=device)), {}),
        "target_float_indices": ((x, t.float()), {}),
        "target_int32": ((x, t.int()), {}),
        "probs_integer": ((x, tp.long()), {}),
        "target_out_of_range": ((x, torch.tensor([0, 1, 5, 2], device=device)), {}),
        "target_negative": ((x, torch.tensor([0, -3, 1, 2], device=device)), {}),
        "target_out_of_range_4d": ((torch.randn(2, 5, 3, 3, device=device),
                                    torch.full((2, 3, 3), 7, device=device)), {}),
        "weight_size": ((x, t), {"weight": torch.rand(4, device=device)}),
        "weight_2d": ((x, t), {"weight": torch.rand(1, 5, device=device)}),
        "label_smoothing_gt_1": ((x, t), {"label_smoothing": 1.5}),
        "ignore_index_with_probs": ((x, tp), {"ignore_index": 0}),
        "reduction": ((x, t), {"reduction": "bogus"}),
        "reduction_probs": ((x, tp), {"reduction": "avg"}),
        "zero_dim_input": ((torch.tensor(1.0, device=device), torch.tensor(0, device=device)),
                           {}),
        "integer_logits": ((x.long(), t), {}),
    }


@pytest.mark.parametrize("case", list(_bad("cpu")))
def test_bad_arguments_raise_like_torch(case, device):
    if device != "cpu" and case.startswith("target_out_of_range") or (
            device != "cpu" and case == "target_negative"):
        pytest.skip("CUDA reports an out-of-range target with a device-side assert")
    args, kw = _bad(device)[case]
    ours, theirs = assert_same_exception(lambda: TLF.cross_entropy(*args, **kw),
                                         lambda: F.cross_entropy(*args, **kw))
    if case.startswith("target_out_of_range") or case == "target_negative":
        assert isinstance(ours, IndexError)
        bad_value = {"target_out_of_range": "5", "target_negative": "-3",
                     "target_out_of_range_4d": "7"}[case]
        assert bad_value in str(ours)
    # The module raises the same.
    if case not in ("reduction", "reduction_probs", "label_smoothing_gt_1"):
        assert_same_exception(lambda: TL.CrossEntropyLoss(**kw)(*args),
                              lambda: torch.nn.CrossEntropyLoss(**kw)(*args))


def test_weight_requiring_grad_not_implemented(device):
    x = torch.randn(4, 5, device=device, requires_grad=True)
    t = torch.randint(0, 5, (4,), device=device)
    w = torch.rand(5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):  # as torch (class indices)
        TLF.cross_entropy(x, t, w)
    # Detached, or under no_grad, it is torch's value.
    assert_close(TLF.cross_entropy(x, t, w.detach()), F.cross_entropy(x, t, w.detach()))
    with torch.no_grad():
        assert_close(TLF.cross_entropy(x, t, w), F.cross_entropy(x, t, w))


@requires_cuda
def test_tensors_on_two_devices_raise():
    x = torch.randn(4, 5, device="cuda")
    t = torch.randint(0, 5, (4,))
    w = torch.rand(5)
    assert_same_exception(lambda: TLF.cross_entropy(x, t), lambda: F.cross_entropy(x, t))
    assert_same_exception(lambda: TLF.cross_entropy(x, t.cuda(), w),
                          lambda: F.cross_entropy(x, t.cuda(), w))
    assert_same_exception(lambda: TLF.cross_entropy(x.cpu(), t.cuda()),
                          lambda: F.cross_entropy(x.cpu(), t.cuda()))


# --------------------------------------------------------------------------------------------
# Legacy arguments and the module's buffers


@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (False, True),
                                                 (True, False), (True, True), (False, False)])
def test_legacy_size_average_reduce(size_average, reduce, device):
    x, t = make_inputs((4, 6), device)
    with pytest.warns(UserWarning):
        ours_m = TL.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning):
        torch_m = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert ours_m.reduction == torch_m.reduction
    assert_close(ours_m(x, t), torch_m(x, t))
    with pytest.warns(UserWarning):
        ours = TLF.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(ours, F.cross_entropy(x, t, size_average=size_average, reduce=reduce))


def test_module_weight_buffer(device):
    w = torch.rand(6) + 0.5
    ours_m = TL.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    torch_m = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert "weight" in dict(ours_m.named_buffers())
    assert torch.equal(ours_m.state_dict()["weight"], w)
    assert repr(ours_m).replace("CrossEntropyLoss", "") == \
        repr(torch_m).replace("CrossEntropyLoss", "")
    ours_m.to(device=device, dtype=torch.float64)
    torch_m.to(device=device, dtype=torch.float64)
    assert ours_m.weight.device.type == device and ours_m.weight.dtype == torch.float64
    x, t = make_inputs((5, 6), device, ignore_hit=2)
    assert_close(ours_m(x, t), torch_m(x, t))
    fresh = TL.CrossEntropyLoss(weight=torch.zeros(6))
    fresh.load_state_dict(TL.CrossEntropyLoss(weight=w).state_dict())
    assert torch.equal(fresh.weight, w)


# --------------------------------------------------------------------------------------------
# Autograd plumbing


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retain_graph_second_backward(reduction, probs, device):
    x, t = make_inputs((4, 6, 3), device, probs=probs)
    xo, xt = leaf(x), leaf(x)
    to, tt = (leaf(t), leaf(t)) if probs else (t, t)
    ours = TLF.cross_entropy(xo * 1.0, to, reduction=reduction, label_smoothing=0.1)
    theirs = F.cross_entropy(xt * 1.0, tt, reduction=reduction, label_smoothing=0.1)
    g = torch.randn_like(theirs)
    ours.backward(g, retain_graph=True)
    theirs.backward(g, retain_graph=True)
    first = xo.grad.clone()
    assert_close(first, xt.grad)
    ours.backward(g)
    theirs.backward(g)
    assert_close(xo.grad, xt.grad)
    assert_close(xo.grad, 2 * first)
    if probs:
        assert_close(to.grad, tt.grad)


def test_no_grad_forward(device):
    x, t = make_inputs((4, 6), device)
    xs = leaf(x)
    with torch.no_grad():
        out = TLF.cross_entropy(xs, t)
        out_inplace = TLF.cross_entropy(xs, t, inplace_backward=True)
    assert out.grad_fn is None and not out.requires_grad
    assert_close(out, F.cross_entropy(x, t))
    assert_close(out_inplace, F.cross_entropy(x, t))
    assert torch.equal(xs.detach(), x)  # nothing written under no_grad


def test_loss_used_twice(device):
    x, t = make_inputs((5, 7), device)

    def total(fn, xs):
        h = xs * 1.3
        return fn(h, t, reduction="sum") + 2 * fn(h, t, reduction="mean", label_smoothing=0.2)

    xo, xt = leaf(x), leaf(x)
    ours, theirs = total(TLF.cross_entropy, xo), total(F.cross_entropy, xt)
    assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    assert_close(xo.grad, xt.grad)


# --------------------------------------------------------------------------------------------
# inplace_backward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 9), (3, 9, 4)], ids=str)
def test_inplace_backward_through_a_model(shape, reduction, dtype, device):
    torch.manual_seed(1)
    N, C = shape[0], shape[1]
    lin_o = torch.nn.Linear(8, C).to(device=device, dtype=dtype)
    lin_t = torch.nn.Linear(8, C).to(device=device, dtype=dtype)
    lin_t.load_state_dict(lin_o.state_dict())
    h = torch.randn(N, *shape[2:], 8, device=device, dtype=dtype)
    t = torch.randint(0, C, (N,) + shape[2:], device=device)
    t.view(-1)[0] = -100

    def logits(lin):
        out = lin(h)
        return out.movedim(-1, 1).contiguous() if len(shape) > 2 else out

    kw = dict(reduction=reduction, label_smoothing=0.1,
              weight=torch.rand(C, device=device, dtype=dtype) + 0.5)
    ours = TLF.cross_entropy(logits(lin_o), t, inplace_backward=True, **kw)
    theirs = F.cross_entropy(logits(lin_t), t, **kw)
    tol = {} if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    assert_close(ours, theirs, **tol)
    g = torch.rand_like(theirs) + 0.5
    ours.backward(g)
    theirs.backward(g)
    for p_o, p_t in zip(lin_o.parameters(), lin_t.parameters()):
        assert_close(p_o.grad, p_t.grad, **tol)


def test_inplace_backward_bumps_version(device):
    x, t = make_inputs((4, 6), device)
    h = leaf(x)
    logits = h * 2.0
    v = logits._version
    TLF.cross_entropy(logits, t, inplace_backward=True)
    assert logits._version > v


def test_inplace_backward_conflicts_raise(device):
    x, t = make_inputs((4, 6), device)
    # A node that saved the logits (exp saves its output; mul by a tensor saves its inputs).
    h = leaf(x)
    logits = h * 2.0
    other = logits ** 2  # pow saves its input
    loss = TLF.cross_entropy(logits, t, inplace_backward=True) + other.sum()
    with pytest.raises(RuntimeError):
        loss.backward()
    # Two losses on the same logits.
    h = leaf(x)
    logits = h * 2.0
    s = leaf(torch.ones_like(x))
    scaled = logits * s  # saves logits
    loss = TLF.cross_entropy(logits, t, inplace_backward=True) + scaled.sum()
    with pytest.raises(RuntimeError):
        loss.backward()
    h = leaf(x)
    logits = h.exp()  # exp saved its result: the logits themselves
    loss = TLF.cross_entropy(logits, t, inplace_backward=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_inplace_backward_on_leaf_raises(device):
    x, t = make_inputs((4, 6), device)
    xs = leaf(x)
    with pytest.raises(RuntimeError):
        TLF.cross_entropy(xs, t, inplace_backward=True)
    assert torch.equal(xs.detach(), x)


def test_inplace_backward_second_backward_raises_clearly(device):
    x, t = make_inputs((4, 6), device)
    h = leaf(x)
    loss = TLF.cross_entropy(h * 2.0, t, inplace_backward=True)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    xt = leaf(x)
    F.cross_entropy(xt * 2.0, t).backward()
    assert_close(first, xt.grad)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


def test_inplace_backward_rejects_probability_targets(device):
    x, t = make_inputs((4, 6), device, probs=True)
    h = leaf(x)
    with pytest.raises((ValueError, RuntimeError)):
        TLF.cross_entropy(h * 1.0, t, inplace_backward=True)


def test_inplace_backward_module(device):
    x, t = make_inputs((4, 6), device)
    m = TL.CrossEntropyLoss(inplace_backward=True, label_smoothing=0.1)
    h, ht = leaf(x), leaf(x)
    ours = m(h * 3.0, t)
    theirs = F.cross_entropy(ht * 3.0, t, label_smoothing=0.1)
    assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    assert_close(h.grad, ht.grad)


# --------------------------------------------------------------------------------------------
# Issue 13: float32 precision at large logits; issue 7: non-finite logits on the vector path


def _ref_error(ours, theirs, ref):
    return (ours.double() - ref).abs().max().item(), (theirs.double() - ref).abs().max().item()


@pytest.mark.parametrize("shift", [1e2, 1e4, -1e4, 3e5])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("probs", [False, True])
def test_float32_large_logits_precision(probs, ls, shift, device):
    """Logits around 1e4: the loss and softmax gradient from (x - max) and log(sum) kept
    apart, as torch's log_softmax: within 2x torch's error (plus 1e-6 of the largest value:
    a few float32 ulps) of the float64 result on the same inputs (formerly ~450x torch's)."""
    x64 = torch.randn(4, 50, dtype=torch.float64, device=device) + shift
    x = x64.float()
    if probs:
        t = torch.randn(4, 50, dtype=torch.float64, device=device).softmax(1).float()
        t64 = t.double()
    else:
        t = t64 = torch.randint(0, 50, (4,), device=device)
    for reduction in REDUCTIONS:
        xo, xt, xr = leaf(x), leaf(x), leaf(x.double())
        ours = TLF.cross_entropy(xo, t, reduction=reduction, label_smoothing=ls)
        theirs = F.cross_entropy(xt, t, reduction=reduction, label_smoothing=ls)
        ref = F.cross_entropy(xr, t64, reduction=reduction, label_smoothing=ls)
        assert_flash_rule(ours, theirs, ref, f"{reduction} loss")
        g = torch.rand_like(theirs) + 0.5
        assert_flash_rule(torch.autograd.grad(ours, xo, g)[0],
                          torch.autograd.grad(theirs, xt, g)[0],
                          torch.autograd.grad(ref, xr, g.double())[0], f"{reduction} grad")


def test_issue_minimal_case_probability_targets(device):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 50, dtype=torch.float64, generator=gen) + 1e4).to(device)
    p = torch.randn(4, 50, dtype=torch.float64, generator=gen).softmax(1).to(device)
    ours = TLF.cross_entropy(x.float(), p.float()).double()
    theirs = F.cross_entropy(x.float(), p.float()).double()
    ref = F.cross_entropy(x.float().double(), p.float().double())
    assert (ours - ref).abs() <= 2 * (theirs - ref).abs() + 1e-6


def _lse_row_stats(row_stats):
    """Row statistics that hold the rounded lse as the max and 0 as log s: what the backward
    op would see if the forward saved m + log s as one number."""
    folded = row_stats.clone()
    folded[0] = row_stats[0] + row_stats[1]
    folded[1] = 0
    return folded


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("probs", [False, True])
def test_backward_op_keeps_max_and_log_sum_apart(probs, ls, device):
    """The backward op (reduction 'none', per-position grad_output) on float32 logits near
    1e4 reads the forward's max and log-sum apart: within 2x torch's float32 error of the
    float64 gradient. The same op handed the rounded lse instead (up to 5e-4 off there) breaks
    that bound, so the check would catch a backward that used it."""
    ops = torch.ops.torch_losses
    N, C, D = 16, 1000, 1
    x = (torch.randn(N, C, D, dtype=torch.float64, device=device) + 1e4).float()
    x64 = x.double()
    if probs:
        t = torch.randn(N, C, D, dtype=torch.float64, device=device).softmax(1).float()
        t64 = t.double()
    else:
        t = t64 = torch.randint(0, C, (N, D), device=device)
    g = torch.rand(N, D, device=device) + 0.5
    _, stats, _, _ = ops.cross_entropy_fwd(x, t, None, -100, ls, 0, False, False)

    def backward(row_stats):
        return ops.cross_entropy_bwd(g, x, t, None, row_stats, -100, ls, 0, True, False)[0]

    xt, xr = leaf(x), leaf(x64)
    theirs = torch.autograd.grad(F.cross_entropy(xt, t, reduction="none", label_smoothing=ls),
                                 xt, g)[0]
    ref = torch.autograd.grad(F.cross_entropy(xr, t64, reduction="none", label_smoothing=ls),
                              xr, g.double())[0]
    assert_flash_rule(backward(stats), theirs, ref, "grad from (m, log s)")
    with pytest.raises(AssertionError, match="error"):
        assert_flash_rule(backward(_lse_row_stats(stats)), theirs, ref, "grad from the lse")


@pytest.mark.parametrize("probs", [False, True])
def test_backward_ops_read_the_saved_row_stats(probs, device):
    """The backward ops use the forward's row statistics rather than recomputing them: a max
    raised by 1 scales every softmax term by e^-1, so does a log-sum raised by 1, and (for
    probability targets) a target sum u raised by 1 adds grad_output * softmax."""
    ops = torch.ops.torch_losses
    N, C, D = 4, 7, 3
    x = torch.randn(N, C, D, dtype=torch.float64, device=device)
    if probs:
        t = torch.rand(N, C, D, dtype=torch.float64, device=device).softmax(1)
        onehot = t
    else:
        t = torch.randint(0, C, (N, D), device=device)
        onehot = F.one_hot(t, C).movedim(-1, 1).double()
    g = torch.rand(N, D, dtype=torch.float64, device=device) + 0.5
    _, stats, _, _ = ops.cross_entropy_fwd(x, t, None, -100, 0.0, 0, False, False)
    assert stats.shape == (3 if probs else 2, N, D) and stats.dtype == torch.float64
    assert torch.equal(stats[0], x.amax(1))
    assert_close(TL._autograd.lse_of(stats), x.logsumexp(1))
    if probs:
        assert_close(stats[2], t.sum(1))

    def backward(row_stats):
        return ops.cross_entropy_bwd(g, x, t, None, row_stats, -100, 0.0, 0, True, False)[0]

    grad = backward(stats)
    softmax_part = grad + g[:, None] * onehot  # g softmax (u = 1 for probability targets)
    assert_close(grad, g[:, None] * (x.softmax(1) - onehot))
    for k in (0, 1):
        shifted = stats.clone()
        shifted[k] += 1
        assert_close(backward(shifted), softmax_part * torch.e ** -1 - g[:, None] * onehot)
    if probs:
        shifted = stats.clone()
        shifted[2] += 1
        assert_close(backward(shifted), grad + g[:, None] * x.softmax(1))
    # The backward into the forward's buffers (a scalar grad_output other than 1) as well.
    shifted = stats.clone()
    shifted[0] += 1
    into = torch.empty_like(x)
    ops.cross_entropy_bwd_into_(into, x.new_empty(0), g.new_tensor(0.5), x, t, None, shifted,
                                -100, 0.0, 2, 0.0, None)
    assert_close(into, 0.5 * (x.softmax(1) * torch.e ** -1 - onehot))
    with pytest.raises(RuntimeError, match="row_stats"):  # an (N, D) lse is not row_stats
        backward(TL._autograd.lse_of(stats))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_single_class_is_exactly_zero(dtype, device):
    x = leaf((torch.randn(5, 1, dtype=torch.float64, device=device) * 1e4).to(dtype))
    t = torch.zeros(5, dtype=torch.long, device=device)
    for ls in (0.0, 0.1):
        loss = TLF.cross_entropy(x, t, label_smoothing=ls, reduction="none")
        assert (loss == 0).all()
        assert (torch.autograd.grad(loss, x, torch.rand_like(loss) + 0.5)[0] == 0).all()


@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("C", [5, 8, 13, 40])
def test_nonfinite_logit_at_every_class(C, bad, ls, D, device):
    """A NaN or +inf logit at any class position: the whole row's gradient is NaN, as torch
    (the vector path gave [inf, inf, nan, ...])."""
    for pos in range(C):
        x = torch.randn(2, C, D, device=device)
        x[0, pos, 0] = bad
        t = torch.randint(0, C, (2, D), device=device)
        for reduction in REDUCTIONS:
            xo, xt = leaf(x), leaf(x)
            lo = TLF.cross_entropy(xo, t, reduction=reduction, label_smoothing=ls)
            lt = F.cross_entropy(xt, t, reduction=reduction, label_smoothing=ls)
            assert_close(lo, lt, equal_nan=True, msg=f"pos {pos} {reduction}")
            g = torch.ones_like(lt)
            go = torch.autograd.grad(lo, xo, g)[0]
            gt = torch.autograd.grad(lt, xt, g)[0]
            assert torch.equal(go.isnan(), gt.isnan()), f"pos {pos} {reduction}"
            assert_close(go, gt, equal_nan=True, msg=f"pos {pos} {reduction}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("probs", [False, True])
def test_first_backward_equals_retained_second(probs, dtype, device):
    """grad_output != 1: the first backward recomputes into the forward's buffer, a retained
    second one runs cross_entropy_bwd: the same numbers, bit for bit, for every reduction."""
    x, t = make_inputs((6, 11, 3), device, dtype, probs=probs, ignore_hit=None if probs else 2)
    for reduction in REDUCTIONS:
        xo = leaf(x)
        to = leaf(t) if probs else t
        out = TLF.cross_entropy(xo, to, label_smoothing=0.1, reduction=reduction)
        g = (torch.rand_like(out, dtype=torch.float64) + 0.3).to(dtype)
        ins = [xo, to] if probs else [xo]
        first = torch.autograd.grad(out, ins, g, retain_graph=True)
        second = torch.autograd.grad(out, ins, g)
        for a, b in zip(first, second):
            assert torch.equal(a, b), reduction


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [5, 37, 515])  # scalar tail only; vectors and a tail
def test_cpu_half_rows_are_the_float_rows_rounded_once(C, dtype):
    """A 16-bit (N, C) row with a class-index gradient is read and written in its own type
    (converted in registers, no float copies): its loss and gradients are exactly the float32
    kernel's on the same values, rounded once (C % 16 < 8: the same summation order), for the
    forward's gradient and the backward op's recomputed one."""
    x, t = make_inputs((6, C), "cpu", dtype, ignore_hit=1)
    w = _weight((6, C), "cpu", dtype)
    for weight, ls, reduction in itertools.product([None, w], [0.0, 0.1], REDUCTIONS):
        kw = dict(label_smoothing=ls, reduction=reduction, ignore_index=1)
        x16, x32 = leaf(x), leaf(x.float())
        out16 = TLF.cross_entropy(x16, t, weight=weight, **kw)
        out32 = TLF.cross_entropy(x32, t, weight=None if weight is None else weight.float(), **kw)
        assert torch.equal(out16, out32.to(dtype)), kw
        for g in (torch.ones_like(out16), (torch.rand_like(out16.float()) + 0.3).to(dtype)):
            g16 = torch.autograd.grad(out16, x16, g, retain_graph=True)[0]
            g32 = torch.autograd.grad(out32, x32, g.float(), retain_graph=True)[0]
            assert torch.equal(g16, g32.to(dtype)), kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_streamed_gradient_equals_rows_a_few_at_a_time(dtype):
    """A class-index gradient of >= 8 MiB in rows of >= 16 KB is written with non-temporal
    stores from an aligned element on (C odd: every row starts at another alignment): bitwise
    the gradient of the same rows computed four at a time (small outputs, ordinary stores)."""
    C = 65539
    N = (8 << 20) // (C * dtype.itemsize) + 2
    x, t = make_inputs((N, C), "cpu", dtype)
    w = _weight((N, C), "cpu", dtype)
    for weight, ls in [(None, 0.0), (w, 0.1)]:
        xo = leaf(x)
        TLF.cross_entropy(xo, t, weight=weight, label_smoothing=ls, reduction="sum").backward()
        for r in range(0, N, 4):
            xr = leaf(x[r:r + 4])
            TLF.cross_entropy(xr, t[r:r + 4], weight=weight, label_smoothing=ls,
                              reduction="sum").backward()
            assert torch.equal(xo.grad[r:r + 4], xr.grad), (r, ls)


def test_expanded_grad_output_of_none_is_read_as_a_scalar(device):
    """loss.sum() of a 'none' loss hands backward an expanded grad_output: the same gradient
    as a materialized one."""
    x, t = make_inputs((4, 9, 2, 3), device)
    xo, xt = leaf(x), leaf(x)
    TLF.cross_entropy(xo, t, reduction="none").sum().backward()
    g = torch.ones(4, 2, 3, dtype=x.dtype, device=device)
    TLF.cross_entropy(xt, t, reduction="none").backward(g)
    assert torch.equal(xo.grad, xt.grad)
    _, stats, _, _ = torch.ops.torch_losses.cross_entropy_fwd(
        x.reshape(4, 9, 6), t.reshape(4, 6), None, -100, 0.0, 0, False, False)
    bwd = torch.ops.torch_losses.cross_entropy_bwd
    scalar = torch.tensor(0.5, dtype=x.dtype, device=device)
    for go in (scalar.expand(4, 6), scalar):
        got = bwd(go, x.reshape(4, 9, 6), t.reshape(4, 6), None, stats, -100, 0.0, 0, True,
                  False)
        want = bwd(scalar.expand(4, 6).contiguous(), x.reshape(4, 9, 6), t.reshape(4, 6), None,
                   stats, -100, 0.0, 0, True, False)
        assert torch.equal(got[0], want[0])


# Cases the randomized suite (tests/test_fuzz.py) found, kept as fixed tests.


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ignored_row_with_nonfinite_logits_gets_nan_gradient(bad, device):
    """torch's log_softmax backward gives an ignored row 0 * softmax: nan where the softmax is
    nan, 0 elsewhere."""
    x = torch.randn(3, 6, dtype=torch.float64, device=device)
    x[0, 2] = bad
    t = torch.tensor([-100, -100, 1], device=device)
    for reduction in ("sum", "none"):
        xo, xt = leaf(x), leaf(x)
        lo = TLF.cross_entropy(xo, t, reduction=reduction)
        lt = F.cross_entropy(xt, t, reduction=reduction)
        g = torch.ones_like(lt)
        go = torch.autograd.grad(lo, xo, g)[0]
        gt = torch.autograd.grad(lt, xt, g)[0]
        assert torch.equal(go.isnan(), gt.isnan())
        assert go[0].isnan().all() and (go[1] == 0).all()
        assert_close(go, gt, equal_nan=True)


def test_mean_over_zero_total_weight_is_nan_with_smoothing(device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    t = torch.tensor([2, 2, 2, 2], device=device)
    w = torch.ones(5, dtype=torch.float64, device=device)
    w[2] = 0
    for ls in (0.0, 0.1, 1.0):
        xo, xt = leaf(x), leaf(x)
        lo = TLF.cross_entropy(xo, t, w, label_smoothing=ls)
        lt = F.cross_entropy(xt, t, w, label_smoothing=ls)
        assert lo.isnan() and lt.isnan()
        go = torch.autograd.grad(lo, xo)[0]
        gt = torch.autograd.grad(lt, xt)[0]
        assert torch.equal(go.isnan(), gt.isnan())


@pytest.mark.parametrize("ls", [-0.5, float("nan")], ids=str)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_negative_or_nan_label_smoothing_means_none_as_torch(ls, probs, device):
    """torch smooths only where label_smoothing > 0 (it rejects > 1 only): a negative or NaN
    one is no smoothing. The ops' own check let a NaN through too (it raised)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, 3, generator=g, dtype=torch.float64).to(device)
    t = (torch.softmax(torch.randn(5, 4, 3, generator=g, dtype=torch.float64), 1) if probs
         else torch.randint(0, 4, (5, 3), generator=g)).to(device)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(device)
    for reduction in ("none", "mean"):
        xo, xt = leaf(x), leaf(x)
        lo = TLF.cross_entropy(xo, t, w, label_smoothing=ls, reduction=reduction)
        lt = F.cross_entropy(xt, t, w, label_smoothing=ls, reduction=reduction)
        assert_close(lo, lt)
        go = torch.ones_like(lt)
        assert_close(torch.autograd.grad(lo, xo, go)[0], torch.autograd.grad(lt, xt, go)[0])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=str)
@pytest.mark.parametrize("C, D", [(3, 1), (40, 1), (3000, 1), (21, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_class_weight_reaches_its_rows_only(bad, C, D, dtype, device):
    """Without label smoothing a class weight enters only the rows of its class, in torch's
    formulas; a spread (eps / C = 0) times an infinite weight made every row NaN. Forward
    with its gradient and the backward op (grad_output 3 and per position), rows of other
    classes as torch's; rows of the class non-finite as torch's (inf or NaN)."""
    g = torch.Generator().manual_seed(C + D)
    x = (torch.randn(4, C, D, generator=g) * 3).to(dtype).to(device)
    t = torch.tensor([0, 1, 2, 1], device=device)[:, None].expand(4, D).contiguous()
    w = torch.ones(C, dtype=dtype, device=device)
    w[1] = bad
    other = (t != 1)[:, None, :].expand(4, C, D)
    for reduction in ("none", "sum"):
        xo, xt = leaf(x.squeeze(2) if D == 1 else x), leaf(x.squeeze(2) if D == 1 else x)
        tt = t.squeeze(1) if D == 1 else t
        lo = TLF.cross_entropy(xo, tt, w, reduction=reduction)
        lt = F.cross_entropy(xt, tt, w, reduction=reduction)
        for go in (torch.ones_like(lt), 3 * torch.ones_like(lt), torch.rand_like(lt) + 0.5):
            gro = torch.autograd.grad(lo, xo, go, retain_graph=True)[0].reshape(4, C, D)
            grt = torch.autograd.grad(lt, xt, go, retain_graph=True)[0].reshape(4, C, D)
            assert_close(gro[other], grt[other])
            assert not torch.isfinite(gro[~other]).any()
            assert not torch.isfinite(grt[~other]).any()
        if reduction == "none":
            assert_close(lo, lt, equal_nan=True)


@pytest.mark.parametrize("go", [float("inf"), float("-inf"), float("nan")], ids=str)
@pytest.mark.parametrize("C, D", [(4, 1), (40, 1), (3000, 1), (21, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nonfinite_grad_output_as_torch(go, C, D, dtype, device):
    """A non-finite grad_output (GradScaler's overflowing step): torch's NaN and +-inf positions
    and its finite values. torch's log-softmax backward takes softmax_c times the sum of its
    incoming gradients from each: the target's entry is inf - inf = NaN (ours was go (p_y - 1)
    = -+inf), with label smoothing or probability targets every entry is; the other classes get
    go p_c = +-inf (the smoothing term's spread 0 times go made them NaN once), an ignored row
    zeros. Class indices with and without class weights and smoothing, probability targets."""
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(3, C, D, generator=g) * 3).to(dtype).to(device)
    index = torch.randint(0, C, (3, D), generator=g).to(device)
    index[2, ::3] = -100
    probs = torch.softmax(torch.randn(3, C, D, generator=g), 1).to(dtype).to(device)
    w = (torch.rand(C, generator=g) + 0.5).to(dtype).to(device)
    if D == 1:
        x, index, probs = x.squeeze(2), index.squeeze(1), probs.squeeze(2)
    for t, kw in ((index, {}), (index, dict(weight=w, label_smoothing=0.1)),
                  (index, dict(weight=w)), (probs, {}), (probs, dict(label_smoothing=0.2))):
        for reduction in ("none", "sum", "mean"):
            xo, xt, x64 = leaf(x), leaf(x), leaf(x.double())
            lo = TLF.cross_entropy(xo, t, reduction=reduction, **kw)
            lt = F.cross_entropy(xt, t, reduction=reduction, **kw)
            kw64 = {k: v.double() for k, v in kw.items() if k == "weight"}
            l64 = F.cross_entropy(x64, t.double() if t.is_floating_point() else t,
                                  reduction=reduction, **{**kw, **kw64})
            grad_out = torch.full_like(lt, go)
            if reduction == "none":  # a finite grad_output at some positions
                grad_out.view(-1)[::2] = 1.5
            gro = torch.autograd.grad(lo, xo, grad_out)[0]
            grt = torch.autograd.grad(lt, xt, grad_out)[0]
            gr64 = torch.autograd.grad(l64, x64, grad_out.double())[0]
            name = f"probs {t.is_floating_point()} {kw} {reduction}"
            for kind in (torch.isnan, torch.isposinf, torch.isneginf):
                assert torch.equal(kind(gro), kind(grt)), f"{name}: {kind.__name__}"
            finite = torch.isfinite(grt)
            assert_flash_rule(gro[finite], grt[finite], gr64[finite], name=name)


def test_infinite_probability_target_like_torch(device):
    """An infinite target at the max logit: inf * (-log_softmax) = inf, term by term as torch
    (a sum split around the max gave inf * 0 = nan); in the gradient, inf times a softmax
    below float's normal range (1e-42) is inf (the fast exp flushed it to 0: nan)."""
    x = torch.tensor([[3.0, 1.0, -2.0, 0.5, -94.0, 2.0, 0.0, 1.5, -1.0]], device=device)
    t = torch.tensor([[float("inf"), 0.2, 0.0, 0.1, 0.0, 0.3, 0.1, 0.0, 0.2]], device=device)
    for dtype in (torch.float32, torch.float16):
        xo, xt = leaf(x.to(dtype)), leaf(x.to(dtype))
        lo = TLF.cross_entropy(xo, t.to(dtype), reduction="none")
        lt = F.cross_entropy(xt, t.to(dtype), reduction="none")
        assert_close(lo, lt, equal_nan=True)
        assert lo.item() == float("inf")
        go = torch.autograd.grad(lo, xo, torch.ones_like(lo))[0]
        gt = torch.autograd.grad(lt, xt, torch.ones_like(lt))[0]
        assert torch.equal(go.isnan(), gt.isnan()), (go, gt)
        assert_close(go, gt, equal_nan=True)


# Segmentation logits (N, C, H, W): on the CPU, class-index and probability targets go through
# blocks of positions across H W (8 float32, 16 bfloat16/float16, 4 float64 positions per block
# in the AVX2 build; 16 float32 in the AVX-512 class-index sweeps) and the last H W % width
# positions row by row; D = 35 has both.
def _segmentation_options(w64):
    """(class weights, label smoothing, z-loss, soft-capping) of the segmentation tests."""
    return [(None, 0.0, 0.0, None), (w64, 0.1, 0.0, None), (None, 0.1, 0.05, None),
            (w64, 0.0, 0.05, None), (w64, 0.1, 0.0, 2.5), (None, 0.0, 0.05, 2.5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("C", [1, 5, 21])
def test_segmentation_logits_match_torch(C, dtype, device):
    """Loss and input gradient vs torch (float64: close; 16-bit and float32: the flash rule)
    for class weights, a hit ignore_index, label smoothing, z-loss, soft-capping and every
    reduction, with
    grad_output 1 (the forward's fused gradient) and per position or 0.7 (recomputed); the
    first backward equal bit for bit to a retained second one (the backward op from the saved
    statistics); inplace_backward's gradient equal to the ordinary one (mean, sum)."""
    g = torch.Generator().manual_seed(C)
    x64 = torch.randn(3, C, 5, 7, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, C, (3, 5, 7), generator=g)
    ignore = 1 if C > 1 else -100
    if C > 1:
            t[0, 1, 3:] = ignore  # ignore_index hit, in blocks and in the row-by-row tail
    w64 = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    x, t = x64.to(dtype).to(device), t.to(device)
    for weight, ls, z, cap in _segmentation_options(w64):
        for reduction in REDUCTIONS:
            kw = dict(ignore_index=ignore, label_smoothing=ls, reduction=reduction, softcap=cap)
            wd = None if weight is None else weight.to(dtype).to(device)
            xo, xt, xr = leaf(x), leaf(x), leaf(x.double())
            ours = TLF.cross_entropy(xo, t, weight=wd, z_loss=z, **kw)
            theirs = ce_extras_reference(xt, t, weight=wd, z_loss=z, **kw)
            ref = ce_extras_reference(xr, t, weight=None if wd is None else wd.double(),
                                      z_loss=z, **kw)
            name = (f"{dtype} C={C} weight={weight is not None} ls={ls} z={z} cap={cap} "
                    f"{reduction}")
            gos = [torch.ones_like(ref), torch.full_like(ref, 0.7)]
            if reduction == "none":
                gos.append(torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.2)
            for i, go in enumerate(gos):
                go_lp = go.to(dtype).to(device)
                got = torch.autograd.grad(ours, xo, go_lp, retain_graph=True)[0]
                again = torch.autograd.grad(ours, xo, go_lp, retain_graph=True)[0]
                assert torch.equal(got, again), f"{name}: backward {i} recomputed differs"
                want = torch.autograd.grad(theirs, xt, go_lp, retain_graph=True)[0]
                exact = torch.autograd.grad(ref, xr, go_lp.double(), retain_graph=True)[0]
                if dtype == torch.float64:
                    assert_close(got, exact, msg=f"{name} grad {i}")
                else:
                    assert_flash_rule(got, want, exact, name=f"{name} grad {i}")
            if dtype == torch.float64:
                assert_close(ours.detach(), ref.detach(), msg=name)
            else:
                assert_flash_rule(ours.detach(), theirs.detach(), ref.detach(), name=name)
            if z == 0 and reduction != "none":  # 'none': the ordinary forward saves the
                # statistics of its online pass, not those of the gradient's exp sweep
                xi = leaf(x)
                lin = TLF.cross_entropy(xi.clone(), t, weight=wd, inplace_backward=True, **kw)
                (gi,) = torch.autograd.grad(lin, xi, torch.ones_like(lin))
                assert torch.equal(gi, torch.autograd.grad(ours, xo, torch.ones_like(ours))[0]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_segmentation_logits_nonfinite_as_torch(dtype, device):
    """NaN, +inf and -inf logits at single positions, and a position whose logits are all -inf,
    in the blocks across H W and in the row-by-row tail, some of them at ignored positions;
    class-index and probability targets: torch's loss per position and gradient, NaN and inf
    where torch has them."""
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    t = torch.randint(0, 6, (2, 5, 7))
    x[0, 2, 0, 1] = float("nan")
    x[0, 3, 1, 2] = float("inf")
    x[1, 0, 2, 3] = -float("inf")
    x[1, :, 0, 0] = -float("inf")
    x[1, 4, 4, 6] = float("nan")  # position 34: the row-by-row tail
    x[0, 1, 4, 5] = float("inf")
    x[1, 3, 3, 3] = float("inf")
    t[0, 0, 1] = t[0, 4, 5] = t[1, 3, 3] = -100  # ignored: 0 x a NaN softmax is NaN
    x = x.to(dtype).to(device)
    t = t.to(device)
    probs = torch.softmax(torch.randn(2, 6, 5, 7, dtype=torch.float64), 1).to(dtype).to(device)
    for ls, target, cap in ((0.0, t, None), (0.1, t, None), (0.0, probs, None),
                            (0.1, probs, None), (0.1, t, 3.0), (0.0, probs, 3.0)):
        xo, xt = leaf(x), leaf(x)
        ours = TLF.cross_entropy(xo, target, label_smoothing=ls, reduction="none", softcap=cap)
        x64 = xt.double() if cap is None else cap * torch.tanh(xt.double() / cap)
        theirs = F.cross_entropy(x64, target.double() if target.is_floating_point()
                                 else target, label_smoothing=ls, reduction="none")
        go = torch.ones_like(ours)
        got = torch.autograd.grad(ours, xo, go)[0]
        want = torch.autograd.grad(theirs, xt, go.double())[0]
        for a, b, what in ((ours.detach(), theirs.detach(), "loss"), (got, want, "grad")):
            assert torch.equal(a.isnan(), b.isnan()), (
                f"{dtype} ls={ls} cap={cap} {what}: NaN positions")
            fin = b.isfinite()
            inf = ~fin & ~b.isnan()
            assert torch.equal(a[inf].double(), b[inf].double()), what
            assert_close(a[fin].double(), b[fin].double(), dtype=dtype,
                         msg=f"{dtype} ls={ls} cap={cap} {what}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("C", [1, 5, 21])
def test_segmentation_probability_targets_match_torch(C, dtype, device):
    """Probability targets on (N, C, H, W) logits (on the CPU: blocks across H W and a
    row-by-row tail): loss, input and target gradients vs torch for class weights, label
    smoothing, z-loss, soft-capping and every reduction, grad_output 1, 0.7 and per position;
    a retained second backward equal bit for bit to the first."""
    g = torch.Generator().manual_seed(100 + C)
    x64 = torch.randn(3, C, 5, 7, generator=g, dtype=torch.float64) * 3
    t64 = torch.softmax(torch.randn(3, C, 5, 7, generator=g, dtype=torch.float64) * 2, 1)
    t64[1, :, 2, :] = 0  # all-zero targets at some positions
    w64 = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    x, t = x64.to(dtype).to(device), t64.to(dtype).to(device)
    for weight, ls, z, cap in _segmentation_options(w64):
        for reduction in REDUCTIONS:
            kw = dict(label_smoothing=ls, reduction=reduction, softcap=cap)
            wd = None if weight is None else weight.to(dtype).to(device)
            xo, to, xt, tt = leaf(x), leaf(t), leaf(x), leaf(t)
            xr, tr = leaf(x.double()), leaf(t.double())
            ours = TLF.cross_entropy(xo, to, weight=wd, z_loss=z, **kw)
            theirs = ce_extras_reference(xt, tt, weight=wd, z_loss=z, **kw)
            ref = ce_extras_reference(xr, tr, weight=None if wd is None else wd.double(),
                                      z_loss=z, **kw)
            name = (f"{dtype} C={C} weight={weight is not None} ls={ls} z={z} cap={cap} "
                    f"{reduction}")
            gos = [torch.ones_like(ref), torch.full_like(ref, 0.7)]
            if reduction == "none":
                gos.append(torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.2)
            for i, go in enumerate(gos):
                go_lp = go.to(dtype).to(device)
                got = torch.autograd.grad(ours, [xo, to], go_lp, retain_graph=True)
                again = torch.autograd.grad(ours, [xo, to], go_lp, retain_graph=True)
                want = torch.autograd.grad(theirs, [xt, tt], go_lp, retain_graph=True)
                exact = torch.autograd.grad(ref, [xr, tr], go_lp.double(), retain_graph=True)
                for which, a, a2, b, r in zip(["input", "target"], got, again, want, exact):
                    assert torch.equal(a, a2), f"{name}: {which} backward {i} recomputed differs"
                    if dtype == torch.float64:
                        assert_close(a, r, msg=f"{name} {which} grad {i}")
                    else:
                        assert_flash_rule(a, b, r, name=f"{name} {which} grad {i}")
            if dtype == torch.float64:
                assert_close(ours.detach(), ref.detach(), msg=name)
            else:
                assert_flash_rule(ours.detach(), theirs.detach(), ref.detach(), name=name)

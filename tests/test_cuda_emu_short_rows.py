"""Short cross-entropy rows held in registers (issue 8): the forward that writes the gradient
(class index, vector path) loads each thread's share of a row once (RowCache, K vectors per
thread) and computes the statistics and the gradient from those registers. Against torch, and
bit for bit against the uncached row kernel: the forward without a gradient (pass 1) and the
backward op fed the forward's statistics (pass 2) walk the same classes in the same order.
Class counts around every threshold: a warp per row up to 32 K vectors, then a block of 64 ..
512 threads, uncached past 512 K vectors; scalar heads and tails (misaligned rows)."""
import pytest
import torch

from test_cuda_emu import DTYPES, VEC, ce_reference, ce_torch, check

K = 4  # cross_entropy_impl.cuh: kRowCacheVectors


def _row_kernel(r):
    """(kGroup, kW, K) of the row kernel launched, or None (kW: 0 scalar weights, 1 none,
    2 16-byte; K: vectors cached per thread, 0 uncached)."""
    for k in r["kernels"]:
        if "ce_row_kernel<" in k:
            args = [a.strip() for a in k.split("ce_row_kernel<")[1].split(">")[0].split(",")]
            assert args[1] == "false" and args[2] == "true", k  # class index, vector path
            return int(args[3]), int(args[5]), int(args[6]) if len(args) > 6 else 0
    return None


def _expected_group(nvec):
    """launch_main's choice for a forward with gradient: (kGroup, cached). The uncached row
    kernel groups the same way (so the statistics are the same bits)."""
    return (32 if nvec <= 32 * K else 0), nvec <= 512 * K


def _sizes(dtype):
    """Class counts around the thresholds, in vectors of V: the warp's 32 K, the block's
    64 / 128 / 512 threads (K vectors each), and 512 K (uncached above); +- a vector, and a
    scalar tail."""
    v = VEC[dtype]
    sizes = {64, 64 + v - 1, (32 * K - 1) * v + 1}
    for nvec in (32 * K, 64 * K, 128 * K, 256 * K, 512 * K):
        sizes |= {nvec * v, nvec * v + v - 1, (nvec + 1) * v}
    # From 2 x 8192 classes, these few rows would be split across blocks (ce_split_count).
    return sorted(c for c in sizes if c < 16384)


def _misaligned(dtype):
    """A buffer offset past a 16-byte boundary that misaligns the logits (a scalar head) and is
    a whole number of float32 / float64 statistics (the emulator puts them at the same
    offset as the gradient)."""
    return max(torch.empty((), dtype=dtype).element_size(), 4)


def _bits(t):
    return t.reshape(-1).contiguous().view(torch.uint8)


def _run_and_compare(s, x, t, name, dtype, **kw):
    """The cached forward (loss, statistics, gradient) vs torch, and bitwise vs the uncached
    forward (no gradient) and the backward op on its statistics. Returns the kernel flags."""
    reduction = kw.pop("reduction", "sum")
    lay = kw.pop("lay", {})
    inplace = kw.pop("inplace", False)
    r = s.cross_entropy(x, t, **kw, reduction=reduction, want_grad=not inplace, inplace=inplace,
                        **lay)
    plain = s.cross_entropy(x, t, **kw, reduction=reduction, **lay)
    go = torch.ones(x.shape[0]) if reduction == "none" else torch.tensor(1.0)
    back = s.cross_entropy(x, t, **kw, reduction=reduction, grad_output=go,
                           row_stats=r["row_stats"], want_grad=True, **lay)
    gx = r["grad_input"]  # in place: the input's buffer
    ref_loss, ref_gx, _ = ce_reference(x, t, **kw, reduction=reduction)
    lowp = ce_torch(x, t, **kw, reduction=reduction)
    check(name + " loss", r["loss"], ref_loss, None if dtype == torch.float64 else lowp[0], dtype)
    check(name + " grad_input", gx, ref_gx, None if dtype == torch.float64 else lowp[1], dtype)
    assert torch.equal(_bits(r["row_stats"]), _bits(plain["row_stats"])), name + " stats"
    assert torch.equal(_bits(r["loss"]), _bits(plain["loss"])), name + " loss bits"
    assert torch.equal(_bits(gx), _bits(back["grad_input"])), name + " gradient bits"
    kernel = _row_kernel(r)
    # the uncached kernels in both reference runs
    assert _row_kernel(plain)[2] == 0 and _row_kernel(back)[2] == 0, (plain["kernels"],
                                                                    back["kernels"])
    return kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thresholds_and_misalignment(s, dtype):
    """Every class count around a threshold, aligned rows and rows with a scalar head (input
    one element past a 16-byte boundary) and tail; smoothing with 16-byte class weights, and
    plain; one ignored row. The kernel launched is the one launch_main should pick."""
    v = VEC[dtype]
    g = torch.Generator().manual_seed(31)
    for C in _sizes(dtype):
        x = (torch.randn(3, C, generator=g) * 2).to(dtype)
        t = torch.tensor([C - 1, 0, -100])
        w = torch.rand(C, generator=g) + 0.5
        for kw in (dict(weight=w, label_smoothing=0.1), dict()):
            for layout in (0, _misaligned(dtype)):
                name = f"{dtype} C={C} {sorted(kw)} layout {layout}"
                lay = dict(layout=layout, target_layout=0, out_layout=layout)
                kernel = _run_and_compare(s, x, t, name, dtype, lay=lay, **kw)
                group, cached = _expected_group(C // v)
                assert kernel[0] == group and (kernel[2] == K) == cached, (name, kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options_on_cached_rows(s, dtype):
    """Label smoothing with class weights (aligned, or one element off: loaded from their
    shifted copies) and without, z-loss, soft-capping, the three reductions, on a warp row and a
    block row: vs torch and bitwise vs the uncached passes; the cached kernel with each
    class-weight load mode (16-byte loads, none)."""
    v = VEC[dtype]
    g = torch.Generator().manual_seed(32)
    seen = set()
    for C in (200 * v, 1000 * v + 5):  # 16-byte class weights need whole-vector rows
        x = (torch.randn(6, C, generator=g) * 3).to(dtype)
        t = torch.tensor([5, C - 1, -100, 0, 7, -100])
        w = torch.rand(C, generator=g) + 0.5
        cases = [dict(weight=w, label_smoothing=0.2, reduction="mean"),
                 dict(weight=w, label_smoothing=0.2, reduction="none", woff=4),
                 dict(label_smoothing=0.1, reduction="mean"),
                 dict(weight=w, reduction="sum"),
                 dict(z_loss=1e-3, reduction="mean"),
                 dict(softcap=5.0, label_smoothing=0.1, weight=w, reduction="sum"),
                 dict(softcap=3.0, z_loss=1e-2, reduction="none")]
        for kw in cases:
            kw = dict(kw)
            woff = kw.pop("woff", 0)
            if woff and dtype == torch.float64:
                woff = 8
            name = f"{dtype} C={C} {kw.keys()} weight +{woff}"
            kernel = _run_and_compare(s, x, t, name, dtype, lay=dict(weight_layout=woff), **kw)
            assert kernel[2] == K, (name, kernel)
            seen.add(kernel[1])
    assert seen == {1, 2}, seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ignored_rows_finite_and_not(s, dtype):
    """Ignored rows: finite ones get zeros, one with a NaN / +inf logit gets torch's
    0 * softmax (NaN where the softmax is); with the cached kernel, bitwise as uncached."""
    v = VEC[dtype]
    for C in (100 * v, 600 * v + 1):
        for special in (float("nan"), float("inf")):
            x = torch.randn(4, C).to(dtype)
            x[1, C // 3] = special
            x[2, 0] = special
            t = torch.tensor([2, -100, 1, -100])
            r = s.cross_entropy(x, t, reduction="sum", want_grad=True)
            plain = s.cross_entropy(x, t, reduction="sum")
            back = s.cross_entropy(x, t, reduction="sum", grad_output=torch.tensor(1.0),
                                   row_stats=r["row_stats"], want_grad=True)
            assert _row_kernel(r)[2] == K
            assert torch.equal(_bits(r["row_stats"]), _bits(plain["row_stats"]))
            assert torch.equal(_bits(r["grad_input"]), _bits(back["grad_input"]))
            ref_gx = ce_reference(x, t, reduction="sum")[1]
            gx = r["grad_input"]
            assert torch.equal(gx.isnan(), ref_gx.isnan()), (dtype, C, special)
            assert torch.equal(gx[[1, 3]].nan_to_num(7.0) == 0, ref_gx[[1, 3]].nan_to_num(7.0) == 0)
            assert (gx[3] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_gradient(s, dtype):
    """grad_input aliasing the input (the row fully read, into registers, before any write):
    the same bits as the out-of-place cached forward, on a warp row and a block row, with a
    misaligned start."""
    v = VEC[dtype]
    g = torch.Generator().manual_seed(33)
    for C in (64 * v + 1, 900 * v + 3):
        x = (torch.randn(5, C, generator=g) * 2).to(dtype)
        t = torch.tensor([0, C - 1, -100, C // 2, 1])
        for kw in (dict(label_smoothing=0.1), dict(softcap=4.0, z_loss=1e-3)):
            for layout in (0, _misaligned(dtype)):
                lay = dict(layout=layout, target_layout=0)
                r = s.cross_entropy(x, t, **kw, reduction="mean", want_grad=True, **lay)
                ri = s.cross_entropy(x, t, **kw, reduction="mean", inplace=True, **lay)
                assert _row_kernel(ri)[2] == K, ri["kernels"]
                assert torch.equal(_bits(r["grad_input"]), _bits(ri["grad_input"])), (C, kw)

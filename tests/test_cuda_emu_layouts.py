"""Cross-entropy layouts and class-weight loads of the CUDA kernels, under the emulator (issue 8):
logits whose rows are strided (a slice x[:, :C] of a wider tensor, an (N, d, C) tensor seen as
(N, C, d)) read in place by the row kernel (csrc/cuda/ce_layout.h decides, for csrc/ops.h and
here alike), class weights in 16-byte loads or, misaligned, scalar ones; every dtype, smoothing on
and off, class indices and probabilities, against torch."""
import pytest
import torch

from cuda_emu import Emulator, build
from test_cuda_emu import (DTYPES, OPTIONS, VEC, ce_inputs, ce_kwargs, ce_reference, ce_torch,
                           check)


def run_layout_case(s, name, x, t, w, opts, dtype, expect_rows=True, **lay):
    """Forward (fused gradients for mean/sum) and backward op on x, t as laid out, vs torch on
    their values. Returns the forward's result."""
    prob = opts["prob"]
    kw = ce_kwargs(opts, w)
    fused = kw["reduction"] != "none"
    r = s.cross_entropy(x, t, **kw, want_grad=fused, want_target_grad=fused and prob,
                        keep_strides=True, **lay)
    assert r["rows_strided"] == expect_rows, name
    ref_loss, ref_gx, ref_gt = ce_reference(x, t, **kw)
    lowp = ce_torch(x, t, **kw) if dtype != torch.float64 else (None, None, None)
    check(name + " loss", r["loss"], ref_loss, lowp[0], dtype)
    if fused:
        check(name + " grad_input", r["grad_input"], ref_gx, lowp[1], dtype)
        if prob:
            check(name + " grad_target", r["grad_target"], ref_gt, lowp[2], dtype)
    go = (torch.randn(ref_loss.shape, generator=torch.Generator().manual_seed(1))
          if kw["reduction"] == "none" else torch.tensor(0.75)).to(dtype)
    rb = s.cross_entropy(x, t, **kw, grad_output=go, row_stats=r["row_stats"], want_grad=True,
                         want_target_grad=prob, keep_strides=True, **lay)
    ref_loss, ref_gx, ref_gt = ce_reference(x, t, **kw, grad_output=go)
    lowp = ce_torch(x, t, **kw, grad_output=go) if dtype != torch.float64 else (None,) * 3
    check(name + " bwd grad_input", rb["grad_input"], ref_gx, lowp[1], dtype)
    if prob:
        check(name + " bwd grad_target", rb["grad_target"], ref_gt, lowp[2], dtype)
    return r


LAYOUT_OPTIONS = ["index_mean", "index_weight_smooth_sum", "index_smooth_none",
                  "prob_smooth_mean", "prob_weight_sum", "index_weight_zloss_cap_mean"]


def _row_kernel(r):
    """The row kernel's template flags (kProb, kVec, kGroup, kW) from the launch log, or None.
    kW, the class-weight loads: 0 scalar, 1 none, 2 16-byte vectors."""
    for k in r["kernels"]:
        if "ce_row_kernel<" in k:
            args = [a.strip() for a in k.split("ce_row_kernel<")[1].rstrip(">").split(",")]
            return args[1] == "true", args[2] == "true", int(args[3]), int(args[5])
    return None


@pytest.mark.parametrize("opt", LAYOUT_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sliced_rows(s, dtype, opt):
    """x[:, off:off + C] of an (N, W) tensor: the row kernel reads it in place (the storage
    around the slice is NaN: a read outside it shows). Row strides a whole number of vectors
    (the vector path, head included when off > 0) or not (scalar path: per-row misalignment)."""
    v = VEC[dtype]
    opts = OPTIONS[opt]
    g = torch.Generator().manual_seed(3)
    for C, extra, off in [(64 + v + 1, 2 * v - 1, 0), (64 + v + 1, v, 1), (512 * v + 3, v, 0),
                          (512 * v + 3, 3, 2), (37, 5, 1)]:
        N = 5
        W = C + extra
        xw, tw, w = ce_inputs(N, W, None, dtype, opts["prob"], g,
                              ignore_index=opts.get("ignore_index", -100))
        x = xw[:, off:off + C]
        t = tw[:, off:off + C] if opts["prob"] else tw.clamp(max=C - 1)
        r = run_layout_case(s, f"{dtype} slice {N}x{C} of {W} at {off} {opt}", x, t, w[:C],
                            opts, dtype)
        kernel = _row_kernel(r)
        if C < 64:
            assert kernel is None and any("ce_column_kernel" in k for k in r["kernels"])
        else:
            # vector path iff every row of x, t (x's strides) and the dense gradients (when
            # written: mean/sum) is equally misaligned
            fused = opts.get("reduction", "mean") != "none"
            vec = not fused or ((W - C) % v == 0 and off % v == 0)
            assert kernel is not None and kernel[1] == vec, (kernel, W, C, off)


@pytest.mark.parametrize("opt", LAYOUT_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_views(s, dtype, opt):
    """(N, d, C) tensors seen as (N, C, d) (channels-last logits; d not a multiple of the vector
    width), and (N, d1, d2, C) permuted to (N, C, d1, d2) then folded to (N, C, d1 d2): the row
    kernel, one row per position, no copy. Probability targets in the same layout, or the
    contiguous (N, C, d) (ops.h copies those in (n, d, c) order)."""
    v = VEC[dtype]
    opts = OPTIONS[opt]
    g = torch.Generator().manual_seed(4)
    for N, d1, d2, C in [(3, 5, 1, 64 + v + 1), (2, 3, 2, 512 * v + 1), (4, 3, 1, 40)]:
        x4, t4, w = ce_inputs(N * d1 * d2, C, None, dtype, opts["prob"], g,
                              ignore_index=opts.get("ignore_index", -100))
        x = x4.reshape(N, d1, d2, C).permute(0, 3, 1, 2).reshape(N, C, d1 * d2)
        assert x.stride(1) == 1 and not x.is_contiguous()
        if opts["prob"]:
            t = t4.reshape(N, d1, d2, C).permute(0, 3, 1, 2).reshape(N, C, d1 * d2)
            targets = [t, t.contiguous()]
        else:
            targets = [t4.reshape(N, d1 * d2)]
        for t in targets:
            r = run_layout_case(s, f"{dtype} ({N},{d1},{d2},{C}) permuted, target strides "
                                f"{t.stride()} {opt}", x, t, w, opts, dtype)
            kernel = _row_kernel(r)
            if C >= 64:  # rows of x, t and the gradients all at (n d + d) C: the vector path
                assert kernel is not None and kernel[1], kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_class_weights_misaligned(s, dtype):
    """Class weights at every offset past a 16-byte boundary (a slice at an odd offset): always
    the 16-byte weight-load kernel (the emulator checks each load), from the weights themselves
    exactly where every row's vectors meet aligned weights, else from their shifted copies
    (ce_weight_copies_kernel, one launch). Rows aligned (head 0) or one row ending at a guard
    page (a head of C mod V classes, so weight + head decides); several rows of C not a whole
    number of vectors have different heads: copies."""
    v = VEC[dtype]
    acc = 8 if dtype == torch.float64 else 4
    g = torch.Generator().manual_seed(5)
    for opt in ("index_weight_smooth_sum", "prob_weight_sum", "index_weight_zloss_cap_mean"):
        opts = {**OPTIONS[opt], "label_smoothing": 0.1}
        for C in (64 + 4 * v, 512 * v + 8 * v, 64 + 3 * v + 1):
            for N, layout in ((4, 0), (1, "tight")):
                x, t, w = ce_inputs(N, C, None, dtype, opts["prob"], g,
                                    ignore_index=opts.get("ignore_index", -100))
                for woff in range(0, 16, acc):
                    r = run_layout_case(s, f"{dtype} {N}x{C} weight at +{woff} input {layout} "
                                        f"{opt}", x, t, w, opts, dtype, expect_rows=False,
                                        layout=layout, weight_layout=woff)
                    head = 0 if layout == 0 else C % v
                    same_heads = N == 1 or C % v == 0
                    lined_up = same_heads and (woff + head * acc) % 16 == 0
                    assert _row_kernel(r)[1:] == (True, 32 if C // v <= 512 else 0, 2), (
                        r["kernels"], N, C, woff, layout)
                    copies = [k for k in r["kernels"] if "ce_weight_copies_kernel" in k]
                    assert len(copies) == (0 if lined_up else 1), (r["kernels"], N, C, woff)


def test_rows_strided_rule(emu):
    """csrc/cuda/ce_layout.h, the rule ops.h applies to CUDA logits (N, C, D), strides
    (sN, sC, sD): classes contiguous in each row and not the contiguous (N, C, D)."""
    rule = emu.lib.tl_emu_ce_rows_strided
    assert rule(4, 10, 1, 10, 1, 1) == 0      # contiguous (N, C)
    assert rule(1, 10, 1, 99, 1, 1) == 0      # one row: contiguous whatever sN
    assert rule(4, 10, 1, 16, 1, 1) == 1      # x[:, :10] of (4, 16)
    assert rule(4, 10, 3, 30, 1, 10) == 1     # (4, 3, 10) seen as (4, 10, 3)
    assert rule(4, 10, 3, 30, 3, 1) == 0      # contiguous (N, C, D): the column kernel
    assert rule(4, 10, 1, 20, 2, 1) == 0      # class stride 2: copied
    assert rule(4, 1, 3, 3, 1, 1) == 0        # one class: copied
    x = torch.empty(4, 3, 10).transpose(1, 2)
    assert rule(*x.shape, *x.stride()) == 1


def test_column_vec_fits_rule(emu):
    """csrc/cuda/ce_layout.h: the vector column kernel walks a sample's classes with 32-bit
    offsets c D <= C D; (N, C, D) beyond that take the scalar column kernel."""
    fits = emu.lib.tl_emu_ce_column_vec_fits
    limit = 2**31 - 1
    assert fits(1000, 8) == 1
    assert fits(limit // 8, 8) == 1
    assert fits(limit // 8 + 1, 8) == 0
    assert fits(2, limit // 2) == 1
    assert fits(2, limit // 2 + 1) == 0
    assert fits(2**40, 2**30) == 0          # no overflow on the way
    assert fits(1000, 0) == 0


def test_ignoring_the_row_stride_fails(emu):
    """A row kernel that took every row at n C (the contiguous layout) reads the NaN storage
    around a slice: the slice tests catch it (built from a mutated copy of the sources)."""
    lib = build.build(mutations=[(
        "cuda/cross_entropy_impl.cuh",
        "return {n * a.x_stride_n + d * a.x_stride_d,",
        "return {n * a.C + d * a.x_stride_d,")])
    with Emulator(lib).session() as sess:
        xw = torch.randn(5, 80)
        x, t = xw[:, :70], torch.randint(0, 70, (5,))
        r = sess.cross_entropy(x, t, keep_strides=True, reduction="none")
        assert r["rows_strided"]
        assert r["loss"].isnan().any()

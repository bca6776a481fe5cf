"""The class-index row kernel's hot loops under the emulator (issue 8, the SASS budget with class
weights): the online max without a branch for -inf / NaN (while the running max is -inf the sum
takes exp(v - 0): 0 for -inf, NaN for NaN), a vector's max seeded by its first element, bf16
pairs unpacked from 32-bit words, and the vectors walked by class index (c += G V) across the
unrolled loop, its remainder and the scalar head and tail. Class weights in 16-byte loads, from
the weights or from their shifted copies, label smoothing on and off, ignored rows, every dtype,
against torch."""
import pytest
import torch

from test_cuda_emu import DTYPES, VEC, ce_reference, ce_torch, check
from test_cuda_emu_layouts import _row_kernel


def _weight_offsets(dtype):
    """Offsets of the class weights (float32; float64 for float64 logits) past a 16-byte
    boundary: 0, and one element."""
    return (0, 8 if dtype == torch.float64 else 4)


def check_nonfinite(name, ours, ref64, lowp, dtype):
    """The same NaN / +inf / -inf positions as torch in float64; the finite values as `check`."""
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(ours), kind(ref64)), f"{name}: {kind.__name__} positions differ"
    fin = torch.isfinite(ref64)
    if dtype == torch.float64:
        torch.testing.assert_close(ours[fin], ref64[fin], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
    elif fin.any():
        check(name, ours[fin], ref64[fin], lowp[fin], dtype)


# C: warp per row (C / V <= 128) and block per row. Whole vectors per row, aligned: class weights
# at +0 bytes loaded from the weights, at +acc from their shifted copies (16-byte loads, kW = 2,
# either way); C + 3 classes with the buffers ending at a guard page ("tight"): rows with scalar
# heads and tails of their own (so the copies).
def _paths(dtype):
    v = VEC[dtype]
    return {"warp": 64 + 3 * v, "block": 512 * v + 2 * v}


@pytest.mark.parametrize("path", ["warp", "block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_logits_with_class_weights(s, dtype, path):
    """Rows: finite; one NaN / +inf / -inf at a position; -inf everywhere but one finite logit
    (the running max stays -inf for the first vectors, then rebases); all -inf (its target 0,
    and ignored). Smoothing 0 and 0.1, class weights aligned and not (their shifted copies):
    torch's loss per row and gradient, NaN and inf where torch has them."""
    v = VEC[dtype]
    g = torch.Generator().manual_seed(21)
    kernels = set()
    for C, layout in ((_paths(dtype)[path], 0), (_paths(dtype)[path] + 3, "tight")):
        positions = sorted({0, 1, v - 1, v, v + 1, C // 2, C - 3, C - 1})
        for special in (float("nan"), float("inf"), -float("inf")):
            for pos in positions:
                x = (torch.randn(5, C, generator=g) * 2).to(dtype)
                x[1, pos] = special
                x[2] = -float("inf")
                x[2, pos] = 1.5
                x[3:] = -float("inf")
                t = torch.tensor([3, pos, pos, 0, -100])
                w = torch.rand(C, generator=g) + 0.5
                for eps in (0.0, 0.1):
                    for woff in _weight_offsets(dtype):
                        kw = dict(weight=w, label_smoothing=eps)
                        name = (f"{path} {dtype} C={C} {layout} x[1, {pos}] = {special} eps {eps} "
                                f"weight +{woff}")
                        lay = dict(layout=layout, target_layout=layout, out_layout=layout,
                                   weight_layout=woff)
                        rn = s.cross_entropy(x, t, **kw, reduction="none", **lay)
                        r = s.cross_entropy(x, t, **kw, reduction="sum", want_grad=True, **lay)
                        kernels.add(_row_kernel(r))
                        ref_none, _, _ = ce_reference(x, t, **kw, reduction="none")
                        _, ref_gx, _ = ce_reference(x, t, **kw, reduction="sum")
                        lowp_none = ce_torch(x, t, **kw, reduction="none")[0]
                        lowp_gx = ce_torch(x, t, **kw, reduction="sum")[1]
                        check_nonfinite(name + " loss", rn["loss"], ref_none, lowp_none, dtype)
                        check_nonfinite(name + " grad_input", r["grad_input"], ref_gx, lowp_gx,
                                        dtype)
    group = 32 if path == "warp" else 0
    # The vector path: 16-byte class weights with smoothing (2), none read class by class
    # without (1).
    assert {k[1:] for k in kernels} == {(True, group, 2), (True, group, 1)}, kernels


def _walk_sizes(dtype):
    """Class counts around the unrolled loop's trip boundaries: U G V classes per trip (U = 4
    loads in flight, 2 with 16-byte class weights; G = 32 lanes or 512 threads), +- a vector
    and +- one element (the tail), with a scalar head of C mod V ("tight")."""
    v = VEC[dtype]
    sizes = []
    for G, U in ((32, 4), (32, 2)):
        trip = U * G * v
        sizes += [trip - 1, trip, trip + 1, trip + v + 1, 2 * trip - v]
    for G, U in ((512, 4), (512, 2)):
        trip = U * G * v
        sizes += [trip + 1, trip + (U - 1) * G * v + 3]
    # From 2 x 8192 classes, 3 rows are split across blocks (launchers.h, ce_split_count).
    return sorted(c for c in set(sizes) if c < 16384)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_walk_trip_boundaries(s, dtype):
    """Every class visited once: loss and gradient vs torch at class counts around the unrolled
    loop's trip boundaries, warp and block per row, with and without 16-byte class weights,
    smoothing on (one ignored row) and off, an aligned and a misaligned input (head > 0)."""
    g = torch.Generator().manual_seed(22)
    for C in _walk_sizes(dtype):
        x = (torch.randn(3, C, generator=g) * 2).to(dtype)
        t = torch.tensor([C - 1, 0, -100])
        w = torch.rand(C, generator=g) + 0.5
        for kw in (dict(weight=w, label_smoothing=0.1), dict(label_smoothing=0.1),
                   dict(weight=w)):
            for layout in (0, "tight"):
                name = f"{dtype} C={C} {sorted(kw)} eps {kw.get('label_smoothing', 0)} {layout}"
                r = s.cross_entropy(x, t, **kw, reduction="sum", want_grad=True, layout=layout,
                                    target_layout=layout, out_layout=layout)
                ref_loss, ref_gx, _ = ce_reference(x, t, **kw, reduction="sum")
                lowp = ce_torch(x, t, **kw, reduction="sum")
                check(name + " loss", r["loss"], ref_loss,
                      None if dtype == torch.float64 else lowp[0], dtype)
                check(name + " grad_input", r["grad_input"], ref_gx,
                      None if dtype == torch.float64 else lowp[1], dtype)
                assert _row_kernel(r)[1], (name, r["kernels"])  # the vector path


# Probability targets on the vector path: both arrays unpacked by 32-bit words (bf16), pass 2's
# 16-bit input gradient as p (sg tw) - w (ka t + ke), class weights in 16-byte loads whether
# they line up with the rows or not (their shifted copies).
def _prob_rows(dtype, C, g):
    """Rows: moderate logits; logits near +1e4 and near -1e4 (x - m must come first); a target
    with zeros (most classes 0, one row all 0); NaN, +inf and -inf logits at vector edges."""
    v = VEC[dtype]
    x = torch.randn(8, C, generator=g) * 2
    x[1] += 1e4
    x[2] -= 1e4
    x[5, v - 1] = float("nan")
    x[6, v] = float("inf")
    x[7, 1] = -float("inf")
    x[7, C - 1] = -float("inf")
    t = torch.softmax(torch.randn(8, C, generator=g) * 3, 1)
    t[3, torch.rand(C, generator=g) < 0.8] = 0
    t[4] = 0
    return x.to(dtype), t.to(dtype)


@pytest.mark.parametrize("path", ["warp", "block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prob_target_rows(s, dtype, path):
    """Loss, input and target gradients (both, input only, target only) vs torch, per row, for
    the rows of _prob_rows: no class weights, aligned ones and ones off by an element (their
    shifted copies), smoothing 0 and 0.1, soft-capping on and off; NaN and inf where torch has
    them."""
    g = torch.Generator().manual_seed(23)
    C = _paths(dtype)[path]
    kernels = set()
    x, t = _prob_rows(dtype, C, g)
    w = torch.rand(C, generator=g) + 0.5
    for weight, woff in ((None, 0), (w, 0), (w, _weight_offsets(dtype)[1])):
        for eps in (0.0, 0.1):
            for softcap in (None, 30.0):
                kw = dict(weight=weight, label_smoothing=eps, softcap=softcap)
                name = (f"{path} {dtype} C={C} weight {weight is not None} +{woff} eps {eps} "
                        f"softcap {softcap}")
                ref_none, _, _ = ce_reference(x, t, **kw, reduction="none")
                _, ref_gx, ref_gt = ce_reference(x, t, **kw, reduction="sum")
                lowp_none = ce_torch(x, t, **kw, reduction="none")[0]
                lowp = ce_torch(x, t, **kw, reduction="sum")
                rn = s.cross_entropy(x, t, **kw, reduction="none", weight_layout=woff)
                check_nonfinite(name + " loss", rn["loss"], ref_none, lowp_none, dtype)
                for gi, gtg in ((True, True), (True, False), (False, True)):
                    r = s.cross_entropy(x, t, **kw, reduction="sum", want_grad=gi,
                                        want_target_grad=gtg, weight_layout=woff)
                    kernels.add(_row_kernel(r))
                    if gi:
                        check_nonfinite(f"{name} grads {gi, gtg} grad_input", r["grad_input"],
                                        ref_gx, lowp[1], dtype)
                    if gtg:
                        check_nonfinite(f"{name} grads {gi, gtg} grad_target",
                                        r["grad_target"], ref_gt, lowp[2], dtype)
    group = 32 if path == "warp" else 0
    # The vector path with every class-weight mode: none (1), 16-byte (2).
    assert {k[1:] for k in kernels if k and k[0]} == {(True, group, kw) for kw in (1, 2)}, \
        kernels


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("path", ["warp", "block"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vector_max_covers_every_lane(s, dtype, path, prob):
    """One logit of 200 per row, at every lane of the first vectors of a thread's unrolled step
    (c, c + G V for each candidate G) and of the row's end; the others ~N(0, 4). A vector max
    (16-bit rows: packed pairwise maxima) that missed the spike would leave the running max
    ~200 below it and exp(200) overflows float: loss and gradient vs torch, with and without
    label smoothing, class-index and probability targets."""
    v = VEC[dtype]
    g = torch.Generator().manual_seed(24)
    C = _paths(dtype)[path]
    pos = set(range(2 * v)) | set(range(C - 2 * v, C))
    for G in (32, 64, 128, 256, 512):
        pos |= {c for c in range(G * v, G * v + 2 * v) if c < C}
    pos = sorted(pos)
    x = torch.randn(len(pos), C, generator=g) * 2
    x[torch.arange(len(pos)), torch.tensor(pos)] = 200.0
    x = x.to(dtype)
    if prob:
        t = torch.softmax(torch.randn(len(pos), C, generator=g), 1)
        t[::2] = torch.nn.functional.one_hot(torch.tensor(pos[::2]), C).float()
        t = t.to(dtype)
    else:
        t = torch.tensor([p if i % 2 == 0 else (p + 1) % C for i, p in enumerate(pos)])
    kernels = set()
    for eps in (0.0, 0.1):
        name = f"{path} {dtype} C={C} prob {prob} eps {eps}"
        r = s.cross_entropy(x, t, label_smoothing=eps, reduction="none")
        ref, _, _ = ce_reference(x, t, label_smoothing=eps, reduction="none")
        check(name + " loss", r["loss"], ref,
              None if dtype == torch.float64 else ce_torch(x, t, label_smoothing=eps,
                                                           reduction="none")[0], dtype)
        r = s.cross_entropy(x, t, label_smoothing=eps, reduction="sum", want_grad=True)
        _, ref_gx, _ = ce_reference(x, t, label_smoothing=eps, reduction="sum")
        check(name + " grad_input", r["grad_input"], ref_gx,
              None if dtype == torch.float64 else ce_torch(x, t, label_smoothing=eps,
                                                           reduction="sum")[1], dtype)
        kernels.add(_row_kernel(r))
    assert all(k is not None and k[0] == prob and k[1] for k in kernels), kernels


# The 16-bit input gradient's softmax coefficient sg tw taken into the exp's exponent (kScaledExp)
# where it is finite, its sign into the FFMA; the plain form elsewhere (sg tw inf or NaN).
_GRAD_SCALES = {
    torch.bfloat16: (1.0, 2.5, -1.5, 0.0, -0.0, 1e-30, 3e-39, 1e30, -3e-39, -1e30),
    torch.float16: (1.0, 2.5, -1.5, 0.0, -0.0, 1e-4, 6e-8, 1e3, -6e-8, -1e3)}


def prob_backward_vs_torch(s, x, t, kw, go, **launch):
    """The backward op of probability targets (both gradients) from the forward's row
    statistics, and torch's float64 and low-precision gradients for the same grad_output."""
    stats = s.cross_entropy(x, t, **kw)["row_stats"]
    _, ref_gx, ref_gt = ce_reference(x, t, **kw, grad_output=go)
    _, lowp_gx, lowp_gt = ce_torch(x, t, **kw, grad_output=go)
    r = s.cross_entropy(x, t, **kw, grad_output=go, row_stats=stats, want_grad=True,
                        want_target_grad=True, **launch)
    return r, {"grad_input": (ref_gx, lowp_gx), "grad_target": (ref_gt, lowp_gt)}


def check_prob_grads_at(name, r, torch_grads, index, dtype):
    """Both gradients at `index` (a row, a position) as check_nonfinite."""
    for key, (ref64, lowp) in torch_grads.items():
        check_nonfinite(f"{name} {key}", r[key][index], ref64[index], lowp[index], dtype)


@pytest.mark.parametrize("path", ["warp", "block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prob_grad_scales(s, dtype, path):
    """The backward of probability targets, reduction 'none', a grad_output per row: 1, other
    positive scales, negative ones, +-0, the dtype's tiny (a denormal) and huge ones of either
    sign; targets that sum
    to 1, negative ones (tw < 0), all zeros (tw = 0, or the z-loss share alone), and a confident
    row (one logit 12 above the rest, its target the softmax rounded: p - t cancels), each with
    every scale. Class weights (aligned and not) or none; smoothing, z-loss and soft-capping off
    and on: input and target gradients vs torch, row by row (the flash rule per row: the tiny
    rows are not hidden by the huge ones)."""
    g = torch.Generator().manual_seed(26)
    C = _paths(dtype)[path]
    scales = _GRAD_SCALES[dtype]
    S = len(scales)
    t1 = torch.softmax(torch.randn(S, C, generator=g) * 3, 1)
    x = torch.randn(4 * S, C, generator=g) * 3
    x[3 * S:, 5] += 12
    x = x.to(dtype)
    sure = torch.softmax(x[3 * S:].double(), 1)  # the softmax itself: p - t is t's rounding
    t = torch.cat([t1, -t1, torch.zeros_like(t1), sure]).to(dtype)
    go = torch.tensor(scales * 4, dtype=dtype)
    w = torch.rand(C, generator=g) + 0.5
    for weight, woff in ((None, 0), (w, 0), (w, _weight_offsets(dtype)[1])):
        for eps, z, cap in ((0.0, 0.0, None), (0.1, 0.0, None), (0.1, 0.1, None),
                            (0.0, 0.1, 20.0)):
            kw = dict(weight=weight, label_smoothing=eps, z_loss=z, softcap=cap,
                      reduction="none")
            r, torch_grads = prob_backward_vs_torch(s, x, t, kw, go, weight_layout=woff)
            assert _row_kernel(r)[1], r["kernels"]  # the vector path
            for row in range(t.shape[0]):
                name = (f"{path} {dtype} weight {weight is not None} +{woff} eps {eps} z {z} "
                        f"softcap {cap} row {row} grad_output {go[row].item():.3g}")
                check_prob_grads_at(name, r, torch_grads, row, dtype)

"""Pass 1's folded exp under the emulator (csrc/cuda/cross_entropy_impl.cuh, RunningStats): float
rows sum 2^(x log2 e - ml) with ml = m log2 e rounded, one FFMA before the exp, and take the offset
back out once per walk (the max's own term back to exactly 1). The offset grows with |m|: walks
whose max is beyond 2^27 in magnitude discard their sum, and rows (split slices, column
positions) whose max is beyond 2^26 take their sum again unfolded (sum_exp_unfolded). Rows at
those magnitudes, at float's limits (3e38) and with a single huge logit among ordinary ones, on
every kernel that runs pass 1: warp and block per row, rows held in registers, the vector column
kernel, the two-kernel split and the cluster; loss and gradient against torch."""
import pytest
import torch

from test_cuda_emu import ce_reference, ce_torch, check

H100, A100 = 0, 1  # emulated devices: sm_90 (cluster split), sm_80 (two-kernel split)
SPLIT_C = 2 * 8192 + 24  # two slices per row for a few rows (launchers.h: ce_split_count)


def _rows(C, dtype, g, extreme):
    """Rows near the fold's limits; `extreme` adds rows spanning float's range (their label
    smoothing or probability sums overflow, in torch as here, so they run without those)."""
    def around(base, spacing):
        return base + spacing * torch.randint(-3, 1, (C,), generator=g).double()

    rows = [torch.randn(C, generator=g).double() * 2]
    # at the unfolded sum's threshold, past it, past the walks' limit; float32 spacing 8
    for base in (2.0**26, 1.25 * 2.0**26, 1.25 * 2.0**27, -1.25 * 2.0**27, -(2.0**26) + 64):
        spacing = 8.0 if dtype == torch.float32 else abs(base) * 2.0**-7
        rows.append(around(base, spacing))
    if extreme:
        rows.append(around(3.0e38, 3.0e38 * 2.0**-7))
        rows.append(around(-3.0e38, 3.0e38 * 2.0**-7))
        one_huge = torch.randn(C, generator=g).double()
        one_huge[C // 2] = 3.0e38
        rows.append(one_huge)
        for low in (-3.0e38, -1.0e30):  # walks with only these: offsets far beyond 2^8
            one_normal = around(low, -low * 2.0**-7)
            one_normal[C - 1] = 1.5
            rows.append(one_normal)
    return torch.stack(rows).to(dtype)


def _check_vs_torch(name, ours, ref64, lowp, dtype):
    """The same non-finite values as torch in dtype (float64 holds sums that overflow here and
    in torch alike); the finite ones as `check`."""
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(ours), kind(lowp)), f"{name}: {kind.__name__} positions differ"
    fin = torch.isfinite(lowp)
    check(name, ours[fin], ref64[fin], lowp[fin], dtype)


def _run(s, x, t, eps, kernels):
    kw = dict(label_smoothing=eps)
    r = s.cross_entropy(x, t, **kw, reduction="none")
    ref, _, _ = ce_reference(x, t, **kw, reduction="none")
    lowp = ce_torch(x, t, **kw, reduction="none")[0]
    name = f"{x.dtype} {tuple(x.shape)} prob {t.is_floating_point()} eps {eps}"
    _check_vs_torch(name + " loss", r["loss"], ref, lowp, x.dtype)
    kernels.update(r["kernels"])
    r = s.cross_entropy(x, t, **kw, reduction="sum", want_grad=True)
    _, ref_gx, _ = ce_reference(x, t, **kw, reduction="sum")
    lowp_gx = ce_torch(x, t, **kw, reduction="sum")[1]
    _check_vs_torch(name + " grad_input", r["grad_input"], ref_gx, lowp_gx, x.dtype)
    kernels.update(r["kernels"])


def _case(s, C, dtype, prob, D=None, seed=0):
    """Every row kind, class index (label smoothing on and off) and probability targets."""
    g = torch.Generator().manual_seed(seed)
    kernels = set()
    for extreme in (False, True):
        x = _rows(C, dtype, g, extreme)
        if D is not None:  # (N, C, D): each position a row of the C classes
            x = torch.stack([x.roll(k, 0) for k in range(D)], 2).contiguous()
        shape = x.shape[:1] + x.shape[2:]
        if prob:
            if extreme:
                continue
            t = torch.softmax(torch.randn(x.shape, generator=g), 1).to(dtype)
            _run(s, x, t, 0.0, kernels)
            _run(s, x, t, 0.1, kernels)
        else:
            t = torch.randint(0, C, shape, generator=g)
            _run(s, x, t, 0.0, kernels)
            if not extreme:
                _run(s, x, t, 0.1, kernels)
    return kernels


def _names(kernels):
    return {k.split("::")[-1].split("<")[0] for k in kernels}


DTYPES = [torch.float32, torch.bfloat16]  # (float16 stops at 65504; double rows do not fold)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_kernels(s, dtype, prob):
    """Warp per row, block per row, and (the forward writing the gradient) rows held in
    registers."""
    v = 16 // dtype.itemsize
    for C in (64 + 3 * v, 512 * v + 2 * v):
        kernels = _case(s, C, dtype, prob)
        rows = [k for k in kernels if "ce_row_kernel<" in k]
        cached = [k for k in rows if k.rstrip(">").split(",")[-1].strip() != "0"]
        assert rows and (prob or cached), kernels


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_kernel(s, dtype, prob):
    """D > 1: one thread per V positions; C not a whole number of vectors (the scalar tail)."""
    kernels = _case(s, 37, dtype, prob, D=16 // dtype.itemsize * 2)
    assert "ce_column_vec_kernel" in _names(kernels), kernels


@pytest.mark.parametrize("device", [H100, A100], ids=["cluster", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_rows(emu, dtype, device):
    """Rows cut into slices: the cluster kernel (sm_90) and the two-kernel split (sm_80)."""
    with emu.session(device) as s:
        kernels = _names(_case(s, SPLIT_C, dtype, prob=False))
    want = "ce_cluster_kernel" if device == H100 else "ce_split_stats_kernel"
    assert want in kernels, kernels

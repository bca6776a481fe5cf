"""Split rows in a thread-block cluster (sm_90, csrc/cuda/cross_entropy_impl.cuh: ce_cluster_kernel)
under the CPU emulator of tests/cuda_emu: the emulator's clusters themselves (cluster barrier,
distributed shared memory, CUDA's launch rules), which path each device takes, the cluster path
against torch for every option and dtype, and the cluster path against the two-kernel split of
sm_80: the same slices, threads and merge order, so the same bits.

Emulated devices (tests/cuda_emu/runtime.cpp): 0 is H100-like (compute capability 9.0,
227 KiB of opt-in shared memory), 1 A100-like (8.0: the two-kernel split), 4 a 9.0 device with
48 KiB of opt-in shared memory (slices above it fall back to the split), 6 a 9.0 device running
a build without sm_90 code (compute_80 PTX compiled at load time: no clusters)."""
import ctypes

import pytest
import torch

from cuda_emu import EmulatorError
from test_cuda_emu import OPTIONS, ce_inputs, ce_reference, ce_torch, check, run_ce_case
from tl_helpers import bitwise_equal

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
H100, A100, SMALL_SMEM_SM90, SM90_WITH_SM80_CODE = 0, 1, 4, 6
SLICE_MIN = 8192  # launchers.h: kCeSliceMin


def test_emulated_devices(emu):
    assert emu.device_cc(H100) == 90 and emu.device_cc(A100) == 80
    assert emu.device_cc(SMALL_SMEM_SM90) == 90
    assert emu.device_smem_optin(SMALL_SMEM_SM90) == 48 << 10
    assert emu.device_cc(SM90_WITH_SM80_CODE) == 90


def split_count(rows, C):
    """launchers.h: ce_split_count."""
    if rows <= 0 or rows >= 256 or C < 2 * SLICE_MIN:
        return 1
    return min(16, -(-256 // rows), C // SLICE_MIN)


def kernels(log):
    return [name.split("::")[-1].split("<")[0] for name, *_ in log]


# ==== the emulator's clusters ===================================================================
def _selftest(emu, which, clusters, cluster, threads, smem=None, attrs=0, device=H100):
    smem = threads * 4 if smem is None else smem
    with emu.session(device) as s:
        out = s.poisoned((clusters * cluster * threads, 2), torch.int32)
        rc = emu.lib.tl_emu_selftest_cluster(which, clusters, cluster, threads, smem, attrs,
                                             ctypes.c_void_p(out.ptr))
        err = emu.lib.tl_emu_take_error().decode()
        return rc, err, out.t.clone()


@pytest.mark.parametrize("cluster", [1, 2, 3, 8, 16])
def test_cluster_barrier_and_distributed_shared_memory(emu, cluster):
    """Every thread reads its neighbour block's shared memory (rank k + 1 mod S) after the
    cluster barrier: the value that block wrote, in every cluster of the grid."""
    clusters, threads = 3, 64
    rc, err, out = _selftest(emu, 0, clusters, cluster, threads, attrs=2)
    assert rc == 0 and not err, err
    for b in range(clusters * cluster):
        k = b % cluster
        peer = b - k + (k + 1) % cluster
        for t in range(0, threads, 7):
            assert out[b * threads + t].tolist() == [peer * 1000 + t, k], (b, t)


@pytest.mark.parametrize("which,message", [
    (1, "(the dynamic shared memory of block (1,0,0), which has exited)"),
    (2, "wait at a cluster barrier it has not arrived at"),
    (3, "not an address in the block's dynamic shared memory"),
])
def test_cluster_misuse_is_reported(emu, which, message):
    """A read of a block's shared memory after it exited (no second barrier), a thread that
    skips the cluster barrier, cluster_map of a global address: errors, never a hang."""
    rc, err, _ = _selftest(emu, which, 2, 2, 32)
    assert rc != 0 and "cluster_kernel" in err and message in err, err


@pytest.mark.parametrize("device,cluster,smem,attrs,message", [
    (A100, 2, 128, 0, "clusters need compute capability 9.0"),
    (H100, 16, 256, 0, "NonPortableClusterSizeAllowed"),
    (H100, 2, 64 << 10, 0, "MaxDynamicSharedMemorySize"),
    (H100, 17, 256, 2, "cluster of 17 blocks"),
])
def test_cluster_launch_rules(emu, device, cluster, smem, attrs, message):
    """CUDA's rules: clusters need sm_90, more than 8 blocks the non-portable attribute, more
    than 48 KiB of dynamic shared memory the kernel's raised limit; the same launch with the
    attribute runs."""
    rc, err, _ = _selftest(emu, 0, 1, cluster, 32, smem, attrs, device)
    assert rc != 0 and "invalid launch configuration" in err and message in err, err
    if device == H100 and cluster <= 16:
        rc, err, _ = _selftest(emu, 0, 1, cluster, 32, smem, 3, device)
        assert rc == 0 and not err, err


# ==== which path ================================================================================
def _run(emu, device, x, t, **kw):
    """One forward with the fused gradient on `device`; returns the results and kernel names."""
    with emu.session(device) as s:
        emu.launch_log()
        r = s.cross_entropy(x, t, want_grad=True, **kw)
        return r, emu.launch_log()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_path_taken(emu, dtype):
    """Few long rows: a cluster of S blocks per row on sm_90 (device 0), the two-kernel split on
    sm_80 (device 1), on sm_90 with a build lacking sm_90 code (device 6), and on an sm_90
    device whose opt-in shared memory cannot hold the slice (device 4); the same bits
    everywhere."""
    g = torch.Generator().manual_seed(1)
    N, C = 3, 16 * SLICE_MIN + 9
    x, t, _ = ce_inputs(N, C, None, dtype, False, g)
    S = split_count(N, C)
    r0, log = _run(emu, H100, x, t, label_smoothing=0.1)
    assert "ce_cluster_kernel" in kernels(log) and "ce_split_stats_kernel" not in kernels(log)
    launch = next(entry for entry in log if "ce_cluster_kernel" in entry[0])
    assert launch[1] == N * S and launch[3] == S == 16, launch
    for device in (A100, SM90_WITH_SM80_CODE, SMALL_SMEM_SM90):
        r, log = _run(emu, device, x, t, label_smoothing=0.1)
        names = kernels(log)
        if device == SMALL_SMEM_SM90 and launch[4] <= 48 << 10:
            assert "ce_cluster_kernel" in names
        else:
            assert "ce_cluster_kernel" not in names and "ce_split_stats_kernel" in names, names
        for key in ("loss", "lse", "grad_input"):
            assert bitwise_equal(r[key], r0[key]), (device, key)


def test_small_shared_memory_device_falls_back(emu):
    """Device 4 (sm_90, 48 KiB opt-in): 2 slices of 12284 float classes (48 KiB + the reduction
    scratch) do not fit, so the split runs; 2 slices of 8192 (32 KiB) run as a cluster there."""
    g = torch.Generator().manual_seed(2)
    for C, clustered in ((3 * SLICE_MIN - 8, False), (2 * SLICE_MIN, True)):
        x, t, _ = ce_inputs(1, C, None, torch.float32, False, g)
        r4, log = _run(emu, SMALL_SMEM_SM90, x, t)
        assert ("ce_cluster_kernel" in kernels(log)) == clustered, (C, kernels(log))
        r0, log = _run(emu, H100, x, t)
        assert "ce_cluster_kernel" in kernels(log)
        assert bitwise_equal(r4["grad_input"], r0["grad_input"]) and bitwise_equal(
            r4["loss"], r0["loss"])


def test_no_cluster_without_split_shapes(emu):
    """Rows the row kernel handles (many rows of moderate length, or short rows) take no
    cluster, and the probability target never splits."""
    g = torch.Generator().manual_seed(3)
    for N, C, prob in ((300, 2 * SLICE_MIN, False), (4, 5000, False), (2, 3 * SLICE_MIN, True)):
        x, t, _ = ce_inputs(N, C, None, torch.bfloat16, prob, g)
        _, log = _run(emu, H100, x, t)
        names = kernels(log)
        assert "ce_cluster_kernel" not in names and "ce_split_stats_kernel" not in names, names
        assert "ce_row_kernel" in names


# ==== against torch, and against the split ======================================================
# (N, C): S = 2, 3 with a short last slice, 5, 8 (portable maximum), 9 and 16 (non-portable).
SHAPES = [(1, 2 * SLICE_MIN), (2, 3 * SLICE_MIN + 5), (52, 5 * SLICE_MIN + 11),
          (32, 8 * SLICE_MIN + 3), (28, 9 * SLICE_MIN + 1), (3, 16 * SLICE_MIN + 9)]
CLUSTER_OPTIONS = ["index_mean", "index_weight_smooth_sum", "index_weight_mean",
                   "index_smooth_none", "index_weight_zloss_cap_mean", "index_smooth_zloss_sum",
                   "index_cap_none"]


def test_shapes_hit_every_cluster_size_class():
    assert [split_count(N, C) for N, C in SHAPES] == [2, 3, 5, 8, 9, 16]


@pytest.mark.parametrize("opt", CLUSTER_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cluster_against_torch(emu, dtype, opt):
    """The cluster path (device 0) against torch in float64 (low precision: the flash rule),
    forward with the fused gradient and the backward op, for every class-index option; S = 2 and
    3 (a short last slice) here, every size in test_cluster_equals_split."""
    with emu.session(H100) as s:
        for N, C in SHAPES[:2]:
            emu.launch_log()
            run_ce_case(s, dtype, N, C, None, OPTIONS[opt], seed=N)
            assert "ce_cluster_kernel" in kernels(emu.launch_log())


@pytest.mark.parametrize("layout", [0, "tight", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cluster_equals_split(emu, dtype, layout):
    """Every cluster size of SHAPES, aligned, with a scalar head and tail ("tight") and on the
    scalar walk ("mixed": input one element off 16 bytes): the cluster (device 0) gives the
    same bits as the two-kernel split (device 1), loss, lse and gradient, forward and backward
    op, in place included; the first shape also against torch. Every size for bf16 aligned, the
    smallest and largest cluster otherwise (to keep the test's time down)."""
    e = torch.empty((), dtype=dtype).element_size()
    lay = {0: (0, 0, 0), "tight": ("tight",) * 3, "mixed": (e, 8, 0)}[layout]
    lay = dict(layout=lay[0], target_layout=lay[1], out_layout=lay[2])
    g = torch.Generator().manual_seed(7)
    shapes = SHAPES if dtype == torch.bfloat16 and layout == 0 else SHAPES[:2] + SHAPES[-1:]
    for N, C in shapes:
        x, t, w = ce_inputs(N, C, None, dtype, False, g)
        kw = dict(weight=w, label_smoothing=0.1, z_loss=0.01, reduction="sum")
        results = []
        for device in (H100, A100):
            with emu.session(device) as s:
                emu.launch_log()
                r = s.cross_entropy(x, t, **kw, want_grad=True, **lay)
                go = torch.tensor(0.75, dtype=dtype)
                rb = s.cross_entropy(x, t, **kw, grad_output=go, row_stats=r["row_stats"], want_grad=True,
                                     **lay)
                ri = (s.cross_entropy(x, t, **kw, inplace=True, **lay)
                      if layout != "mixed" else None)
                names = kernels(emu.launch_log())
                assert ("ce_cluster_kernel" in names) == (device == H100), (device, names)
                results.append((r, rb, ri))
        (r0, rb0, ri0), (r1, rb1, ri1) = results
        name = f"{dtype} {N}x{C} {layout}"
        for key in ("loss", "lse", "grad_input"):
            assert bitwise_equal(r0[key], r1[key]), f"{name} {key}"
        assert bitwise_equal(rb0["grad_input"], rb1["grad_input"]), f"{name} bwd"
        if ri0 is not None:
            assert bitwise_equal(ri0["grad_input"], r0["grad_input"]), f"{name} in place"
            assert bitwise_equal(ri1["grad_input"], r1["grad_input"]), f"{name} in place split"
        if (N, C) == SHAPES[0]:
            ref_loss, ref_gx, _ = ce_reference(x, t, **kw)
            lowp = ce_torch(x, t, **kw) if dtype != torch.float64 else (None,) * 3
            check(name + " loss", r0["loss"], ref_loss, lowp[0], dtype)
            check(name + " grad_input", r0["grad_input"], ref_gx, lowp[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_smoothing_class_weight_loads(emu, dtype):
    """Label smoothing reads the class weights in each slice's pass 1 (split_pass1): none, or in
    16-byte loads (weights at +0 bytes or one element off 16 bytes); aligned rows and rows with a
    scalar head ("tight"). C is not a whole number of vectors, so the two rows' vectors start at
    different classes: the weights' shifted copies (vec_weights) either way. The cluster (H100)
    and the two-kernel split (A100) agree bit for bit, and both with torch."""
    N, C = 2, 3 * SLICE_MIN + 5
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(N, C, generator=g) * 3).to(dtype)
    t = torch.tensor([5, C - 2])
    w = torch.rand(C, generator=g) + 0.5
    off = 8 if dtype == torch.float64 else 4  # one class weight (float64 for float64 logits)
    for weight, woff in ((None, 0), (w, 0), (w, off)):
        for layout in (0, "tight"):
            kw = dict(weight=weight, label_smoothing=0.1)
            lay = dict(layout=layout, target_layout=layout, out_layout=layout,
                       weight_layout=woff)
            name = f"{dtype} weight {weight is not None} +{woff} B, layout {layout}"
            res = []
            for device in (H100, A100):
                with emu.session(device) as s:
                    emu.launch_log()
                    res.append(s.cross_entropy(x, t, **kw, reduction="sum", want_grad=True, **lay))
                    names = kernels(emu.launch_log())
                    assert ("ce_cluster_kernel" in names) == (device == H100), (name, names)
                    assert ("ce_split_stats_kernel" in names) == (device == A100), (name, names)
                    assert ("ce_weight_copies_kernel" in names) == (weight is not None), names
            for key in ("loss", "lse", "grad_input"):
                assert bitwise_equal(res[0][key], res[1][key]), f"{name} {key}"
            ref_loss, ref_gx, _ = ce_reference(x, t, **kw, reduction="sum")
            lowp = ce_torch(x, t, **kw, reduction="sum") if dtype != torch.float64 else (None,) * 3
            check(name + " loss", res[0]["loss"], ref_loss, lowp[0], dtype)
            check(name + " grad_input", res[0]["grad_input"], ref_gx, lowp[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cluster_target_at_every_slice_edge(emu, dtype):
    """The target at the first and last class of every slice (the owner block's x_y goes to
    the loss through distributed shared memory; its thread fixes the gradient up), and ignored
    rows with a NaN or infinite logit (the gradient is torch's 0 * softmax)."""
    C = 3 * SLICE_MIN + 5
    L = -(-C // 3 // 8) * 8  # split_slice's slice length (a whole number of 16-byte vectors)
    positions = sorted({p for k in range(3) for p in (k * L, min(C, (k + 1) * L) - 1)})
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(len(positions) + 2, C, generator=g) * 2).to(dtype)
    t = torch.tensor(positions + [-100, -100])
    x[-2, 7] = float("nan")
    x[-1, L + 1] = float("inf")
    with emu.session(H100) as s:
        for kw in (dict(reduction="sum"), dict(weight=torch.rand(C, generator=g) + 0.5,
                                                label_smoothing=0.1)):
            emu.launch_log()
            r = s.cross_entropy(x, t, **kw, want_grad=True)
            assert "ce_cluster_kernel" in kernels(emu.launch_log())
            ref_loss, ref_gx, _ = ce_reference(x, t, **kw)
            lowp = ce_torch(x, t, **kw)
            check(f"{dtype} {kw} loss", r["loss"], ref_loss, lowp[0], dtype)
            check(f"{dtype} {kw} grad_input", r["grad_input"], ref_gx, lowp[1], dtype)


def test_target_out_of_bounds_asserts(emu):
    x = torch.randn(2, 2 * SLICE_MIN)
    t = torch.tensor([3, 2 * SLICE_MIN])
    with emu.session(H100) as s:
        with pytest.raises(EmulatorError, match="target class index out of bounds"):
            s.cross_entropy(x, t, want_grad=True)


def test_long_rows_many_rows_cluster(emu):
    """Rows of >= 256 KiB are clustered even when there are many (launchers.h:
    ce_cluster_count): 256 rows of 65536 float classes in clusters of 4 slices of 64 KiB on
    sm_90, the row kernel on sm_80; both against torch."""
    g = torch.Generator().manual_seed(13)
    N, C = 256, 65536
    x, t, _ = ce_inputs(N, C, None, torch.float32, False, g)
    r0, log = _run(emu, H100, x, t)
    launch = next(entry for entry in log if "ce_cluster_kernel" in entry[0])
    assert launch[1] == N * 4 and launch[3] == 4, launch
    r1, log = _run(emu, A100, x, t)
    assert "ce_cluster_kernel" not in kernels(log) and "ce_row_kernel" in kernels(log)
    ref_loss, ref_gx, _ = ce_reference(x, t)
    lowp = ce_torch(x, t)
    for r in (r0, r1):
        check("loss", r["loss"], ref_loss, lowp[0], torch.float32)
        check("grad_input", r["grad_input"], ref_gx, lowp[1], torch.float32)

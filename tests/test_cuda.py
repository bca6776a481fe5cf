"""CUDA-only tests of the CUDA kernels: CUDA graphs, bitwise determinism, 64-bit offsets,
misaligned pointers and odd class counts, device-side asserts. The general suite (parametrized
over devices) covers the semantics against torch; this file covers what only a GPU can show.
Every test here skips cleanly on a machine without CUDA."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torch_losses
import torch_losses.functional as TLF

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cuda"


# ---- losses as (logits -> loss) closures over fixed targets --------------------------------
def _loss_cases(n=64, c=40, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEV)

    idx = torch.randint(0, c, (n,), generator=g).to(DEV)
    idx[::7] = -100
    prob = torch.softmax(r(n, c), dim=1)
    y = r(n, c)
    b = torch.rand(n, c, generator=g).to(DEV)
    pm1 = (torch.randint(0, 2, (n, c), generator=g) * 2 - 1).float().to(DEV)
    w = torch.rand(c, generator=g).to(DEV) + 0.5
    ew = torch.rand(n, c, generator=g).to(DEV)
    pw = torch.rand(c, generator=g).to(DEV) + 0.5
    return {
        "ce": lambda z: TLF.cross_entropy(z, idx),
        "ce_weight_smooth": lambda z: TLF.cross_entropy(z, idx, weight=w, label_smoothing=0.1),
        "ce_sum_x3": lambda z: TLF.cross_entropy(z, idx, reduction="sum") * 3.0,
        "ce_none": lambda z: (TLF.cross_entropy(z, idx, reduction="none") * ew[:, 0]).sum(),
        "ce_prob": lambda z: TLF.cross_entropy(z, prob, label_smoothing=0.05),
        "ce_inplace": lambda z: TLF.cross_entropy(z, idx, inplace_backward=True),
        "bce_logits": lambda z: TLF.binary_cross_entropy_with_logits(z, b, weight=ew,
                                                                      pos_weight=pw),
        "huber": lambda z: TLF.huber_loss(z, y, delta=0.7),
        "mse": lambda z: TLF.mse_loss(z, y),
        "mse_none": lambda z: (TLF.mse_loss(z, y, reduction="none") * ew).sum(),
        "l1": lambda z: TLF.l1_loss(z, y, reduction="sum"),
        "smooth_l1": lambda z: TLF.smooth_l1_loss(z, y, beta=0.5),
        "bce": lambda z: TLF.binary_cross_entropy(torch.sigmoid(z), b),
        "hinge": lambda z: TLF.hinge_loss(z, pm1, margin=0.8),
        "kl_div": lambda z: TLF.kl_div(F.log_softmax(z, 1), prob, reduction="batchmean"),
        "kl_div_log": lambda z: TLF.kl_div(F.log_softmax(z, 1), prob.log(), reduction="sum",
                                           log_target=True),
    }


LOSS_NAMES = ["ce", "ce_weight_smooth", "ce_sum_x3", "ce_none", "ce_prob", "ce_inplace",
              "bce_logits", "huber", "mse", "mse_none", "l1", "smooth_l1", "bce", "hinge",
              "kl_div", "kl_div_log"]


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_cuda_graph_training_step(name):
    """Forward + backward of a tiny model captured in a CUDA graph and replayed (new data copied
    into the static input) gives the eager results: no host sync, no host-read scalar."""
    torch.manual_seed(0)
    fn = _loss_cases()[name]
    w = torch.randn(32, 40, device=DEV, requires_grad=True)
    static_x = torch.randn(64, 32, device=DEV)

    def step():
        z = static_x @ w
        loss = fn(z)
        loss.backward()
        return loss

    # Warm up on a side stream (the documented recipe), then capture.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            w.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    static_grad = w.grad

    for trial in range(3):
        new_x = torch.randn(64, 32, device=DEV)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        # Eager reference with the same data.
        w2 = w.detach().clone().requires_grad_(True)
        z = new_x @ w2
        loss = fn(z)
        loss.backward()
        torch.testing.assert_close(static_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(static_grad, w2.grad, rtol=1e-5, atol=1e-6)


def _run_bits(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    loss = fn(*leaves)
    loss.sum().backward() if loss.dim() else loss.backward()
    return [loss.detach().clone()] + [t.grad.clone() for t in leaves if t.grad is not None]


def _assert_bitwise_reruns(fn, *tensors, reruns=3):
    first = _run_bits(fn, *tensors)
    for _ in range(reruns - 1):
        again = _run_bits(fn, *tensors)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "results differ between identical runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_determinism_cross_entropy(dtype):
    # (N, C) large vocabulary, block-per-row kernel.
    x = torch.randn(512, 32000, device=DEV, dtype=dtype)
    t = torch.randint(0, 32000, (512,), device=DEV)
    t[::5] = -100
    _assert_bitwise_reruns(lambda a: TLF.cross_entropy(a, t, label_smoothing=0.1), x)
    # (N, C) small vocabulary, warp-per-row kernel, weights, sum.
    x = torch.randn(4096, 1000, device=DEV, dtype=dtype)
    t = torch.randint(0, 1000, (4096,), device=DEV)
    w = torch.rand(1000, device=DEV, dtype=dtype)
    _assert_bitwise_reruns(lambda a: TLF.cross_entropy(a, t, weight=w, reduction="sum"), x)
    # (N, C, d1, d2) spatial: column kernel, many rows (two-stage row-loss sum).
    x = torch.randn(8, 21, 96, 96, device=DEV, dtype=dtype)
    t = torch.randint(0, 21, (8, 96, 96), device=DEV)
    _assert_bitwise_reruns(lambda a: TLF.cross_entropy(a, t, weight=w[:21]), x)
    # Few long rows: split in 16 slices (two kernels, partials merged in a fixed order).
    x = torch.randn(16, 256000, device=DEV, dtype=dtype)
    t = torch.randint(0, 256000, (16,), device=DEV)
    _assert_bitwise_reruns(lambda a: TLF.cross_entropy(a, t, label_smoothing=0.1), x)
    # Probability targets, spatial.
    p = torch.softmax(torch.randn(8, 21, 32, 32, device=DEV), 1).to(dtype)
    _assert_bitwise_reruns(lambda a, b: TLF.cross_entropy(a, b, label_smoothing=0.2),
                           x[:, :, :32, :32].contiguous(), p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_determinism_pointwise_large(dtype):
    n = 1 << 24
    x = torch.randn(n, device=DEV, dtype=dtype)
    y = torch.randn(n, device=DEV, dtype=dtype)
    b = torch.rand(n, device=DEV, dtype=dtype)
    _assert_bitwise_reruns(lambda a, c: TLF.mse_loss(a, c), x, y)
    _assert_bitwise_reruns(lambda a: TLF.huber_loss(a, y, reduction="sum"), x)
    _assert_bitwise_reruns(lambda a: TLF.binary_cross_entropy_with_logits(a, b), x)
    # The same values in a buffer whose address is not 16-byte aligned: scalar path.
    buf = torch.empty(n + 1, device=DEV, dtype=dtype)
    buf[1:].copy_(x)
    xm = buf[1:]
    _assert_bitwise_reruns(lambda a, c: TLF.mse_loss(a, c), xm, y)
    torch.testing.assert_close(TLF.mse_loss(xm, y).float(), TLF.mse_loss(x, y).float(),
                               rtol=1e-5, atol=0)


def _ce_ref64_rows(x, t, rows):
    """float64 loss and gradient (grad_output 1, reduction none) of a few rows."""
    xr = x[rows].double()
    lse = torch.logsumexp(xr, 1)
    loss = lse - xr.gather(1, t[rows, None]).squeeze(1)
    grad = torch.softmax(xr, 1)
    grad[torch.arange(len(rows)), t[rows]] -= 1
    return loss, grad


def test_cross_entropy_more_than_2_31_elements():
    n, c = 16385, 131072  # n*c = 2^31 + 2^17
    free, _ = torch.cuda.mem_get_info()
    need = 2 * n * c * 2 + (1 << 30)
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    x = torch.empty(n, c, device=DEV, dtype=torch.bfloat16)
    x.normal_()
    t = torch.randint(0, c, (n,), device=DEV)
    t[-1] = c - 1  # the very last element of the tensor
    t[-2] = 0
    xg = x.requires_grad_(True)
    loss = TLF.cross_entropy(xg, t, reduction="none")
    loss.sum().backward()
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device=DEV)
    ref_loss, ref_grad = _ce_ref64_rows(x.detach(), t, rows)
    torch.testing.assert_close(loss[rows].double(), ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(xg.grad[rows].double(), ref_grad, rtol=2e-2, atol=1e-6)
    # mean over all rows vs a float64 chunked sum of the per-row losses
    mean = TLF.cross_entropy(x.detach(), t)
    ref_mean = sum(
        (torch.logsumexp(x[i:i + 1024].double(), 1)
         - x[i:i + 1024].double().gather(1, t[i:i + 1024, None]).squeeze(1)).sum()
        for i in range(0, n, 1024)) / n
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("c", [1, 7, 33, 64, 1000, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_misaligned_odd_classes(c, dtype, reduction):
    n = 37
    buf = torch.randn(n * c + 1, device=DEV).to(dtype)
    x = buf[1:].view(n, c)  # one element off every 16-byte boundary
    t = torch.randint(0, c, (n,), device=DEV)
    t[3] = -100
    w = torch.rand(c, device=DEV, dtype=dtype) + 0.5
    for kwargs in ({}, {"weight": w, "label_smoothing": 0.1}):
        xa = x.detach().clone().requires_grad_(True)  # aligned copy for torch
        xo = x.detach().requires_grad_(True)
        ours = TLF.cross_entropy(xo, t, reduction=reduction, **kwargs)
        theirs = F.cross_entropy(xa.double(), t, reduction=reduction,
                                 **{k: (v.double() if torch.is_tensor(v) else v)
                                    for k, v in kwargs.items()})
        ours.sum().backward()
        theirs.sum().backward()
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(ours.double(), theirs.detach(), **tol)
        torch.testing.assert_close(xo.grad.double(), xa.grad.double(), **tol)


@pytest.mark.parametrize("c", [7, 50257])
def test_cross_entropy_probability_targets_mixed_alignment(c):
    n = 9
    buf = torch.randn(n * c + 1, device=DEV)
    x = buf[1:].view(n, c)  # misaligned input, aligned target: scalar path
    p = torch.softmax(torch.randn(n, c, device=DEV), 1).requires_grad_(True)
    xo = x.detach().requires_grad_(True)
    ours = TLF.cross_entropy(xo, p, label_smoothing=0.1)
    ours.backward()
    xr = x.detach().double().requires_grad_(True)
    pr = p.detach().double().requires_grad_(True)
    ref = F.cross_entropy(xr, pr, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xo.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p.grad.double(), pr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,fn,ref", [
    ("mse", TLF.mse_loss, F.mse_loss),
    ("huber", TLF.huber_loss, F.huber_loss),
    ("bce_logits", TLF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
])
@pytest.mark.parametrize("n", [1, 7, 33, 4099])
def test_pointwise_misaligned(name, fn, ref, n):
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.rand(2 * n + 3, device=DEV).to(dtype)
        x = buf[1:n + 1]
        y = buf[n + 3:]
        for reduction in ("mean", "sum", "none"):
            xo = x.detach().requires_grad_(True)
            yo = y.detach().requires_grad_(True)
            ours = fn(xo, yo, reduction=reduction)
            xr = x.detach().double().requires_grad_(True)
            yr = y.detach().double().requires_grad_(True)
            theirs = ref(xr, yr, reduction=reduction)
            ours.sum().backward()
            theirs.sum().backward()
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2,
                                                                                atol=1e-2)
            torch.testing.assert_close(ours.double(), theirs.detach(), **tol)
            torch.testing.assert_close(xo.grad.double(), xr.grad, **tol)
            torch.testing.assert_close(yo.grad.double(), yr.grad, **tol)


def _run_script(body):
    script = textwrap.dedent("""
        import sys, torch, torch_losses
        ops = torch.ops.torch_losses
        try:
    """) + textwrap.indent(textwrap.dedent(body), "    ") + textwrap.dedent("""
            torch.cuda.synchronize()
        except Exception as e:
            print("RAISED:", type(e).__name__, e)
            sys.exit(3)
        print("NO ERROR")
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("case,body,message", [
    ("ce_target_high", """
        x = torch.randn(4, 10, device="cuda")
        t = torch.tensor([1, 2, 10, 3], device="cuda")
        ops.cross_entropy_fwd(x.view(4, 10, 1), t.view(4, 1), None, -100, 0.0, 1, True, False)
     """, "target class index out of bounds"),
    ("ce_target_negative_sum", """
        x = torch.randn(3, 5000, device="cuda", dtype=torch.bfloat16)
        t = torch.tensor([1, -3, 2], device="cuda")
        ops.cross_entropy_fwd(x.view(3, 5000, 1), t.view(3, 1), None, -100, 0.0, 2, False, False)
     """, "target class index out of bounds"),
    ("ce_target_spatial", """
        x = torch.randn(2, 4, 9, device="cuda")
        t = torch.zeros(2, 9, dtype=torch.long, device="cuda"); t[1, 5] = 4
        ops.cross_entropy_fwd(x, t, None, -100, 0.0, 0, True, False)
     """, "target class index out of bounds"),
    ("bce_input", """
        x = torch.rand(1000, device="cuda"); x[517] = 1.5
        y = torch.rand(1000, device="cuda")
        ops.bce_fwd(x, y, None, 1, True, False)
     """, "between 0 and 1"),
    ("hinge_target", """
        x = torch.randn(100, device="cuda")
        y = torch.ones(100, device="cuda"); y[3] = 0.5
        ops.hinge_fwd(x, y, 1.0, 1, False, False)
     """, "target values must be -1 or 1"),
])
def test_device_side_asserts(case, body, message):
    """Out-of-domain values stop the kernel with a device-side assert naming the check (never
    silent garbage or an out-of-bounds access). Run in a subprocess: the assert poisons the
    CUDA context of the process that hits it."""
    rc, out = _run_script(body)
    assert rc != 0, f"{case}: no error was raised:\n{out}"
    assert message in out, f"{case}: the assert message is missing:\n{out}"
    assert "device-side assert" in out or "RAISED" in out, out


def test_valid_targets_do_not_assert():
    rc, out = _run_script("""
        x = torch.randn(4, 10, device="cuda")
        t = torch.tensor([1, -100, 9, 0], device="cuda")
        ops.cross_entropy_fwd(x.view(4, 10, 1), t.view(4, 1), None, -100, 0.0, 1, True, False)
        ops.hinge_fwd(torch.randn(8, device="cuda"), torch.ones(8, device="cuda"), 1.0, 1, True, True)
    """)
    assert rc == 0 and "NO ERROR" in out, out


def test_scale_grad_scalar_one_and_other():
    g = torch.randn(1000, 33, device=DEV)
    ref = g.clone()
    torch.ops.torch_losses.scale_grad_(g, torch.tensor(1.0, device=DEV))
    assert torch.equal(g, ref)
    torch.ops.torch_losses.scale_grad_(g, torch.tensor(0.5, device=DEV))
    torch.testing.assert_close(g, ref * 0.5)
    # per position (cross-entropy 'none' over (N, C, D))
    g3 = torch.randn(4, 7, 5, device=DEV, dtype=torch.bfloat16)
    go = torch.randn(4, 5, device=DEV, dtype=torch.bfloat16)
    ref3 = (g3.float() * go.float()[:, None, :]).to(torch.bfloat16)
    torch.ops.torch_losses.scale_grad_(g3, go)
    torch.testing.assert_close(g3, ref3, rtol=0, atol=0)
    g2 = torch.randn(6, 300, device=DEV)
    go2 = torch.randn(6, device=DEV)
    ref2 = g2 * go2[:, None]
    torch.ops.torch_losses.scale_grad_(g2, go2)
    torch.testing.assert_close(g2, ref2)


# ---- the review's and the fuzzer's cross-entropy defects, on the GPU (the emulator suite,
# tests/test_cuda_emu.py, runs the same kernels on the CPU in CI) ---------------------------------
def _misaligned_copy(x):
    buf = torch.empty(x.numel() + 1, device=DEV, dtype=x.dtype)
    buf[1:].copy_(x.reshape(-1))
    return buf[1:].view(x.shape)


@pytest.mark.parametrize("path,C,D,misaligned", [
    ("column", 5, None, False), ("column_d3", 6, 3, False), ("warp", 100, None, False),
    ("warp_misaligned", 100, None, True), ("block", 3000, None, False),
    ("block_misaligned", 3000, None, True)])
def test_cross_entropy_nan_inf_at_every_position(path, C, D, misaligned):
    """NaN and +-inf at every class position on every kernel path: torch's loss and gradient
    (a NaN folded first by a thread was dropped by fmaxf(-inf, NaN))."""
    positions = sorted({0, 1, 2, 3, 4, 7, 8, 9, C // 2, C - 1}) if C > 16 else range(C)
    for special in (float("nan"), float("inf"), -float("inf")):
        for pos in positions:
            shape = (2, C) if D is None else (2, C, D)
            x = torch.randn(shape, device=DEV)
            x[1, pos] = special
            t = torch.tensor([2, pos], device=DEV)
            if D is not None:
                t = t[:, None].expand(2, D).contiguous()
            if misaligned:
                x = _misaligned_copy(x)
            for ls in (0.0, 0.1):
                xo = x.detach().requires_grad_(True)
                ours = TLF.cross_entropy(xo, t, label_smoothing=ls, reduction="sum")
                ours.backward()
                xr = x.detach().double().requires_grad_(True)
                ref = F.cross_entropy(xr, t, label_smoothing=ls, reduction="sum")
                ref.backward()
                msg = f"{path} x[1, {pos}] = {special} ls={ls}"
                torch.testing.assert_close(ours.double(), ref.detach(), equal_nan=True,
                                           rtol=1e-5, atol=1e-5, msg=msg)
                torch.testing.assert_close(xo.grad.double(), xr.grad, equal_nan=True,
                                           rtol=1e-5, atol=1e-6, msg=msg)
                none = TLF.cross_entropy(x, t, label_smoothing=ls, reduction="none")
                ref_none = F.cross_entropy(x.double(), t, label_smoothing=ls, reduction="none")
                torch.testing.assert_close(none.double(), ref_none, equal_nan=True, rtol=1e-5,
                                           atol=1e-5, msg=msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_weight_smoothing_more_than_65536_classes(dtype):
    """The class-weight sum's partials (one per 4096 classes) fit the scratch."""
    c = 70001
    x = torch.randn(2, c, device=DEV, dtype=dtype)
    t = torch.randint(0, c, (2,), device=DEV)
    w = torch.rand(c, device=DEV) + 0.5
    xo = x.detach().requires_grad_(True)
    ours = TLF.cross_entropy(xo, t, weight=w.to(dtype), label_smoothing=0.1, reduction="sum")
    ours.backward()
    xr = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(xr, t, weight=w.to(dtype).double(), label_smoothing=0.1,
                          reduction="sum")
    ref.backward()
    torch.cuda.synchronize()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(ours.double(), ref.detach(), **tol)
    torch.testing.assert_close(xo.grad.double(), xr.grad, **tol)


@pytest.mark.parametrize("c", [50, 1000, 5000])
@pytest.mark.parametrize("target", ["index", "index_smooth", "prob_smooth"])
def test_cross_entropy_large_logits_float32(c, target):
    """Logits near 1e4 in float32: no worse than 2x torch's float32 error (ref: float64)."""
    from tl_helpers import assert_flash_rule
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(4, c, generator=g, dtype=torch.float64) + 1e4).float().to(DEV)
    if target.startswith("prob"):
        t = torch.softmax(torch.randn(4, c, generator=g, dtype=torch.float64), 1).float()
    else:
        t = torch.randint(0, c, (4,), generator=g)
    t = t.to(DEV)
    ls = 0.1 if "smooth" in target else 0.0
    for reduction in ("mean", "none"):
        res = []  # ours (float32), torch (float32), torch (float64)
        for fn, xx in ((TLF.cross_entropy, x), (F.cross_entropy, x), (F.cross_entropy, x.double())):
            tt = t.to(xx.dtype) if t.is_floating_point() else t
            xg = xx.detach().requires_grad_(True)
            loss = fn(xg, tt, label_smoothing=ls, reduction=reduction)
            go = torch.linspace(-1, 1, loss.numel(), device=DEV).view(loss.shape) + 0.1
            (grad,) = torch.autograd.grad(loss, [xg], go.to(loss.dtype))
            res.append((loss.detach(), grad))
        (ours_l, ours_g), (torch_l, torch_g), (ref_l, ref_g) = res
        assert_flash_rule(ours_l, torch_l, ref_l, name=f"{target} {c} {reduction} loss")
        assert_flash_rule(ours_g, torch_g, ref_g, name=f"{target} {c} {reduction} grad")


@pytest.mark.parametrize("c", [300, 5000])
def test_cross_entropy_lanes_agree_on_lse(c):
    """Two classes with the same logit in different lanes get bitwise the same gradient (the
    butterfly merge must not be contracted into an FMA)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, c, generator=g) * 3
    cols = [0, 37, 130, 181, c - 1]
    x[:, cols] = x[:, :1]
    t = torch.randint(1, 30, (256,), generator=g)
    x, t = x.to(DEV), t.to(DEV)
    for ls in (0.0, 0.1):
        xo = x.detach().requires_grad_(True)
        TLF.cross_entropy(xo, t, label_smoothing=ls).backward()
        for col in cols[1:]:
            assert torch.equal(xo.grad[:, col], xo.grad[:, 0]), (col, ls)


@pytest.mark.parametrize("n,c,scale", [(16, 256000, 2.0), (3, 40001, 8.0), (512, 32000, 8.0),
                                       (256, 1000, 30.0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cross_entropy_fast_exp_and_split_rows(n, c, scale, dtype):
    """The hot loops' exp2 (ex2.approx.ftz for 16-bit rows, exp2f for float32) over logits
    spread wide (scale up to 30: softmax terms down to the float range's end), on the split-row
    path (16 and 3 rows) and the row kernels: no worse than 2x torch's error (ref: float64).
    The target sits at the first and last class and inside, and in-place gives the same bits."""
    from tl_helpers import assert_flash_rule
    g = torch.Generator().manual_seed(23)
    x = (torch.randn(n, c, generator=g) * scale).to(dtype).to(DEV)
    t = torch.randint(0, c, (n,), generator=g)
    t[0], t[-1] = 0, c - 1
    t = t.to(DEV)
    w = (torch.rand(c, generator=g) + 0.5).to(DEV)
    for kw in ({}, {"weight": w, "label_smoothing": 0.1}):
        res = []  # ours, torch (same dtype), torch (float64)
        for fn, xx in ((TLF.cross_entropy, x), (F.cross_entropy, x),
                       (F.cross_entropy, x.double())):
            kk = {k: (v.to(xx.dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
            xg = xx.detach().requires_grad_(True)
            loss = fn(xg, t, reduction="sum", **kk)
            (grad,) = torch.autograd.grad(loss, [xg])
            res.append((loss.detach(), grad))
        (ours_l, ours_g), (torch_l, torch_g), (ref_l, ref_g) = res
        name = f"{dtype} {n}x{c} scale {scale} {list(kw)}"
        assert_flash_rule(ours_l, torch_l, ref_l, name=name + " loss")
        assert_flash_rule(ours_g, torch_g, ref_g, name=name + " grad")
        xi = x.detach().clone().requires_grad_(True)
        xc = xi.clone()
        TLF.cross_entropy(xc, t, reduction="sum", inplace_backward=True,
                          **{k: (v.to(dtype) if torch.is_tensor(v) else v)
                             for k, v in kw.items()}).backward()
        assert torch.equal(xi.grad, ours_g), name + " in place"

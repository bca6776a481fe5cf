"""Linear + cross-entropy (an LLM head), forward + backward: torch_losses'
linear_cross_entropy against torch's reference path (options=None; on a torch without
linear_cross_entropy, e.g. the GPU image's 2.11, F.cross_entropy(F.linear(...)), what that path
computes), torch's chunked path (options=LinearCrossEntropyOptions()) and Liger-Kernel's fused linear cross-entropy (CUDA, when
it imports). Time and peak extra memory of each, in the same run.

Time: the median of reps fwd+bwd steps, the implementations taking turns rep by rep in one
subprocess (after a warm-up each), so that load from other processes falls on all alike; the
process CPU time per step is kept too (on a shared machine it varies less than wall time).
Peak extra memory, each implementation in a fresh subprocess: CUDA, max_memory_allocated() over
one step minus the memory held before it; CPU, the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) over one step minus the RSS before it, with glibc's mmap threshold pinned
low so that freed tensors go back to the OS instead of hiding in the heap. Both count everything
the step allocates, the .grad tensors included.
"""
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ["eager", "chunked", "ours", "liger"]
TITLE = {"eager": "torch eager (options=None)", "chunked": "torch chunked (LinearCrossEntropyOptions)",
         "ours": "torch_losses", "liger": "Liger-Kernel fused linear CE"}
# (N tokens, hidden H, vocabulary V, dtype) per device; --quick runs a tiny one.
SIZES = {"cpu": (2048, 1024, 32000, "float32"), "cuda": (8192, 4096, 128256, "bfloat16")}
QUICK_SIZE = (256, 128, 2048)
# The targets: CPU relative to eager; CUDA absolute (set for an H200).
TARGETS = {
    "cpu": [("time ours/eager", "<=", 1.0), ("memory ours/eager", "<=", 0.25)],
    "cuda": [("time ours ms", "<=", 40.0), ("memory ours MiB", "<=", 1.1 * 1024)],
}


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _has_torch_linear_ce():
    import torch
    return hasattr(torch.nn.functional, "linear_cross_entropy")


def _title(impl):
    if impl == "eager" and not _has_torch_linear_ce():
        return "torch eager (F.linear + F.cross_entropy)"
    return TITLE[impl]


def _loss_fn(impl):
    import torch
    import torch.nn.functional as F
    if impl == "eager":
        if not _has_torch_linear_ce():  # torch < 2.13 (the GPU image's 2.11): the composite,
            return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)  # what options=None does
        return lambda x, w, t: F.linear_cross_entropy(x, w, t)
    if impl == "chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)
    if impl == "ours":
        import torch_losses.functional as TLF
        return lambda x, w, t: TLF.linear_cross_entropy(x, w, t)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t)
    raise ValueError(impl)


def _inputs(device, n, h, v, dtype_name):
    import torch
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    return x, w, t


def _step(loss_fn, x, w, t):
    x.grad = w.grad = None
    loss = loss_fn(x, w, t)
    loss.backward()
    return loss


def _measure_memory(impl, device, n, h, v, dtype_name):
    """Peak extra bytes of one fwd+bwd step after two warm-ups (run in a fresh process)."""
    import torch
    x, w, t = _inputs(device, n, h, v, dtype_name)
    loss_fn = _loss_fn(impl)
    for _ in range(2):
        _step(loss_fn, x, w, t)
    x.grad = w.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(loss_fn, x, w, t)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    import torch_losses
    torch_losses.empty_cpu_cache()  # counted as extra when the step takes its blocks again
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    _step(loss_fn, x, w, t)
    return (_rss_kib("VmHWM") - before) * 1024


def _relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _measure_times(impls, device, n, h, v, dtype_name, reps, warmup):
    """The implementations take turns, rep by rep; also ours vs eager on the first step."""
    import torch
    x, w, t = _inputs(device, n, h, v, dtype_name)
    fns = {impl: _loss_fn(impl) for impl in impls}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {}
    for impl, fn in fns.items():
        loss = _step(fn, x, w, t)
        results[impl] = (loss.detach(), x.grad, w.grad)
    (le, gxe, gwe), (lo, gxo, gwo) = results["eager"], results["ours"]
    tol = 1e-4 if dtype_name == "float32" else 2e-2
    errors = {"loss": _relative_error(lo, le), "grad_input": _relative_error(gxo, gxe),
              "grad_weight": _relative_error(gwo, gwe)}
    check = {"ok": all(e <= tol for e in errors.values()), "tol": tol, **errors}
    del results
    for _ in range(warmup):
        for fn in fns.values():
            _step(fn, x, w, t)
    times = {impl: {"wall": [], "cpu": []} for impl in impls}
    for _ in range(reps):
        for impl, fn in fns.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(fn, x, w, t)
            sync()
            times[impl]["wall"].append(1e3 * (time.perf_counter() - start))
            times[impl]["cpu"].append(1e3 * (time.process_time() - start_cpu))
    return {"times_ms": times, "check": check}


def _unavailable(impl, device):
    """Why an implementation cannot run here, or None."""
    import torch
    if impl == "liger":
        if device != "cuda":
            return "Liger's kernels are Triton: CUDA only"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel is not installed"
    if impl == "chunked" and not (_has_torch_linear_ce() and
                                  hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"torch {torch.__version__} has no linear_cross_entropy options"
    return None


def _child(*args):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "benchmarks"),
                                         env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "tlbench.linear_ce", *map(str, args)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(device, quick, reps, warmup, dtype_name=None, size=None):
    """One benchmark row: every available implementation's median time, CPU time and peak
    extra memory, ours vs eager checked, and the device's targets evaluated."""
    n, h, v, default_dtype = SIZES[device]
    if quick:
        n, h, v = QUICK_SIZE
    if size:
        n, h, v = size
    dtype_name = dtype_name or default_dtype
    impls, skipped = [], {}
    for impl in IMPLS:
        why = _unavailable(impl, device)
        if why:
            skipped[impl] = why
        else:
            impls.append(impl)
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
    row = {"name": f"linear+CE {n}x{h} -> {v} {short.get(dtype_name, dtype_name)}",
           "device": device, "shape": [n, h, v], "dtype": dtype_name, "reps": reps,
           "skipped": skipped, "ms": {}, "cpu_ms": {}, "peak_extra_mib": {}, "checks": []}
    if "ours" not in impls or "eager" not in impls:
        row["check"] = {"ok": False, "error": "; ".join(skipped.values())}
        return row
    shape = [device, n, h, v, dtype_name]
    for impl in impls:
        row["peak_extra_mib"][impl] = _child("memory", *shape, impl) / 2**20
    timed = _child("time", reps, warmup, *shape, *impls)
    row["check"] = timed["check"]
    for impl in impls:
        row["ms"][impl] = statistics.median(timed["times_ms"][impl]["wall"])
        row["cpu_ms"][impl] = statistics.median(timed["times_ms"][impl]["cpu"])
    row["times_ms"] = timed["times_ms"]
    values = {"time ours/eager": row["ms"]["ours"] / row["ms"]["eager"],
              "memory ours/eager": row["peak_extra_mib"]["ours"] /
              max(row["peak_extra_mib"]["eager"], 1e-9),
              "time ours ms": row["ms"]["ours"],
              "memory ours MiB": row["peak_extra_mib"]["ours"]}
    for metric, op, threshold in TARGETS[device]:
        value = values[metric]
        status = "PASS" if value <= threshold else "FAIL"
        if quick or size or dtype_name != default_dtype:
            status += "*"  # the target is defined at the default size and dtype
        row["checks"].append({"target": f"{metric} {op} {threshold:g}", "value": value,
                              "status": status})
    return row


def table(row):
    """The markdown lines of a linear + CE row."""
    lines = [f"Linear + cross-entropy (LLM head), {row['name']}, forward + backward, median of "
             f"{row['reps']} (peak extra memory: one step in a fresh process):", "",
             "| implementation | ms | process CPU ms | peak extra MiB | time / ours | memory / ours |",
             "|---|---|---|---|---|---|"]
    ours_ms, ours_mib = row["ms"].get("ours"), row["peak_extra_mib"].get("ours")
    for impl in IMPLS:
        if impl in row["skipped"]:
            lines.append(f"| {_title(impl)} | skipped: {row['skipped'][impl]} | | | | |")
            continue
        if impl not in row["ms"]:
            continue
        ms, mib = row["ms"][impl], row["peak_extra_mib"][impl]
        lines.append(f"| {_title(impl)} | {ms:.1f} | {row['cpu_ms'][impl]:.1f} | {mib:.1f} | "
                     f"{ms / ours_ms:.2f}x | {mib / max(ours_mib, 1e-9):.2f}x |")
    check = row.get("check", {})
    verdicts = "; ".join(f"{c['target']}: {c['value']:.3g} {c['status']}" for c in row["checks"])
    lines += ["", f"Check (ours vs eager, relative max error of loss and gradients): "
              f"{'ok' if check.get('ok') else 'MISMATCH ' + json.dumps(check)}. "
              f"Targets: {verdicts or '-'}."]
    return lines


def main(argv):
    mode, *rest = argv
    if mode == "memory":
        device, n, h, v, dtype_name, impl = rest
        print(json.dumps(_measure_memory(impl, device, int(n), int(h), int(v), dtype_name)))
    elif mode == "time":
        reps, warmup, device, n, h, v, dtype_name, *impls = rest
        print(json.dumps(_measure_times(impls, device, int(n), int(h), int(v), dtype_name,
                                        int(reps), int(warmup))))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

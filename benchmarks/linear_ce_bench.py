"""Linear + cross-entropy, forward + backward: torch_losses.functional.linear_cross_entropy
against torch's reference path (options=None), torch's chunked path
(options=LinearCrossEntropyOptions()) and Liger-Kernel's fused linear cross-entropy when it
imports and a GPU is present.

Time: the median of --reps fwd+bwd steps, the implementations taking turns rep by rep in
one subprocess (after a warm-up each), so that load from other processes falls on all alike.
The process CPU time per step is printed too: on a machine shared with other work it varies
less than the wall time (it counts OpenMP spin-waits, though).
Peak extra memory, each implementation in a fresh subprocess: CUDA, torch.cuda.max_memory_allocated() over one step
minus the memory held before it; CPU, the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) over one step minus the RSS before it, with glibc's mmap threshold
pinned low so that freed tensors go back to the OS instead of hiding in the heap. Both count
everything the step allocates, the .grad tensors included.

    python benchmarks/linear_ce_bench.py                 # CPU: 2048x1024 -> 32000 fp32
    python benchmarks/linear_ce_bench.py --json out.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ["torch_eager", "torch_chunked", "torch_losses", "liger"]
SIZES = {"cpu": (2048, 1024, 32000, "float32"), "cuda": (8192, 4096, 128256, "bfloat16")}


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss_fn(impl):
    import torch
    import torch.nn.functional as F
    if impl == "torch_eager":
        return lambda x, w, t: F.linear_cross_entropy(x, w, t)
    if impl == "torch_chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)
    if impl == "torch_losses":
        import torch_losses.functional as TLF
        return lambda x, w, t: TLF.linear_cross_entropy(x, w, t)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t)
    raise ValueError(impl)


def _inputs(device, n, h, v, dtype_name):
    import torch
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, h, device=device, dtype=dtype) / h ** 0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    return x, w, t


def _step(loss_fn, x, w, t):
    x.grad = w.grad = None
    loss_fn(x, w, t).backward()


def measure_memory(impl, device, n, h, v, dtype_name):
    """In a fresh subprocess: peak extra bytes of one fwd+bwd step after two warm-ups."""
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
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    _step(loss_fn, x, w, t)
    return (_rss_kib("VmHWM") - before) * 1024


def measure_times(impls, device, n, h, v, dtype_name, reps):
    """In one subprocess: the implementations take turns, rep by rep (after a warm-up
    each), so that load from other processes falls on all of them alike."""
    import torch
    x, w, t = _inputs(device, n, h, v, dtype_name)
    fns = {impl: _loss_fn(impl) for impl in impls}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        _step(fn, x, w, t)
    times = {impl: {"wall": [], "cpu": []} for impl in impls}
    for _ in range(reps):
        for impl, fn in fns.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(fn, x, w, t)
            sync()
            times[impl]["wall"].append(time.perf_counter() - start)
            times[impl]["cpu"].append(time.process_time() - start_cpu)
    return times


def _available(impl, device):
    if impl == "liger":
        if device != "cuda":
            return "Liger's kernels are Triton: CUDA only"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger_kernel is not installed"
    if impl == "torch_chunked":
        import torch
        if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return "this torch has no LinearCrossEntropyOptions"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, and cpu always")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=3, metavar=("N", "H", "V"), default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, device, n, h, v, dtype, *impls = args.child
        shape = (device, int(n), int(h), int(v), dtype)
        if mode == "memory":
            print(json.dumps(measure_memory(impls[0], *shape)))
        else:
            print(json.dumps(measure_times(impls, *shape, args.reps)))
        return

    import torch
    devices = [args.device] if args.device else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    results = []
    for device in devices:
        n, h, v, dtype = SIZES[device]
        if args.size:
            n, h, v = args.size
        dtype = args.dtype or dtype
        print(f"{device}: linear {n}x{h} -> {v} {dtype}, fwd+bwd, median of {args.reps}")
        impls = []
        for impl in IMPLS:
            why_not = _available(impl, device)
            if why_not:
                print(f"  {impl:14s} skipped: {why_not}")
            else:
                impls.append(impl)
        shape = [device, str(n), str(h), str(v), dtype]

        def child(*extra):
            cmd = [sys.executable, os.path.abspath(__file__), "--reps", str(args.reps),
                   "--child", *extra]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(extra)} failed:\n{out.stderr[-3000:]}")
            return json.loads(out.stdout.strip().splitlines()[-1])

        memory = {impl: child("memory", *shape, impl) for impl in impls}
        times = child("time", *shape, *impls)
        for impl in impls:
            r = {"impl": impl, "device": device, "shape": [n, h, v], "dtype": dtype,
                 "median_ms": 1e3 * statistics.median(times[impl]["wall"]),
                 "times_ms": [1e3 * s for s in times[impl]["wall"]],
                 "median_cpu_ms": 1e3 * statistics.median(times[impl]["cpu"]),
                 "peak_extra_bytes": memory[impl], "threads": torch.get_num_threads()}
            results.append(r)
            print(f"  {impl:14s} {r['median_ms']:9.1f} ms (process CPU time "
                  f"{r['median_cpu_ms']:9.1f} ms)   peak extra "
                  f"{r['peak_extra_bytes'] / 2**20:8.1f} MiB")
        eager = next((r for r in results if r["impl"] == "torch_eager"
                      and r["device"] == device), None)
        ours = next((r for r in results if r["impl"] == "torch_losses"
                     and r["device"] == device), None)
        if eager and ours:
            print(f"  torch_losses / eager: time {ours['median_ms'] / eager['median_ms']:.2f}x, "
                  f"memory {ours['peak_extra_bytes'] / eager['peak_extra_bytes']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

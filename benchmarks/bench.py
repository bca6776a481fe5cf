#!/usr/bin/env python
"""Benchmark torch_losses against torch eager, torch.compile and Liger-Kernel.

Every case times forward + backward of the mean-reduced loss, `loss = f(x, y); loss.backward()`,
on fresh leaf inputs that require grad (the same inputs for every implementation). CUDA: CUDA
events, L2 flushed (a 256 MB write) before each rep, median of reps. CPU: time.perf_counter,
median of reps. The device's copy bandwidth is measured in the same run.

    python benchmarks/bench.py                       # default suite (CUDA if present, else CPU)
    python benchmarks/bench.py --quick               # smoke test: tiny sizes, few reps
    python benchmarks/bench.py --loss ce --dtype bfloat16 --sizes 8192x128256
    python benchmarks/bench.py --loss mse,huber --sizes 2^24 --no-compile

Writes <out>/results.json (everything + environment), <out>/results.md (the table) and
<out>/results.png (ratios; needs matplotlib). Default <out>: benchmarks/results/<machine-tag>/
(<machine-tag>-quick for --quick, so a smoke test never overwrites measured numbers).
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

import torch_losses
import torch_losses.functional as TLF

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# kl_div(reduction='mean') warns on every call (torch's and ours): the benchmark means it.
warnings.filterwarnings("ignore", message="reduction: 'mean' divides the total loss")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64"}
POINTWISE = ["bce_logits", "huber", "mse", "l1", "smooth_l1", "bce", "kl_div", "hinge"]
ALL_LOSSES = ["ce"] + POINTWISE
TITLES = {"ce": "CE", "bce_logits": "BCE-with-logits", "huber": "Huber", "mse": "MSE",
          "l1": "L1", "smooth_l1": "smooth-L1", "bce": "BCE", "kl_div": "KL", "hinge": "hinge"}
IMPLS = ["ours", "eager", "compile", "liger"]


# ----------------------------------------------------------------------------- the losses
def _hinge_torch(x, y, margin=1.0):
    return (margin - y * x).clamp_min(0).mean()


# (ours, torch reference); both called as f(x, y) and return the mean-reduced loss.
LOSS_FNS = {
    "ce": (lambda x, y: TLF.cross_entropy(x, y), lambda x, y: F.cross_entropy(x, y)),
    "bce_logits": (lambda x, y: TLF.binary_cross_entropy_with_logits(x, y),
                   lambda x, y: F.binary_cross_entropy_with_logits(x, y)),
    "huber": (lambda x, y: TLF.huber_loss(x, y), lambda x, y: F.huber_loss(x, y)),
    "mse": (lambda x, y: TLF.mse_loss(x, y), lambda x, y: F.mse_loss(x, y)),
    "l1": (lambda x, y: TLF.l1_loss(x, y), lambda x, y: F.l1_loss(x, y)),
    "smooth_l1": (lambda x, y: TLF.smooth_l1_loss(x, y), lambda x, y: F.smooth_l1_loss(x, y)),
    "bce": (lambda x, y: TLF.binary_cross_entropy(x, y),
            lambda x, y: F.binary_cross_entropy(x, y)),
    "kl_div": (lambda x, y: TLF.kl_div(x, y, reduction="mean"),
               lambda x, y: F.kl_div(x, y, reduction="mean")),
    "hinge": (lambda x, y: TLF.hinge_loss(x, y), _hinge_torch),
}


def make_inputs(loss, shape, dtype, device, seed=0):
    """Returns (x, y): x a fresh leaf that requires grad, y the target in the loss's domain."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    kw = dict(device=device, generator=g)
    if loss == "ce":
        n, c = shape
        x = torch.randn(n, c, dtype=dtype, **kw)
        y = torch.randint(0, c, (n,), dtype=torch.long, **kw)
    else:
        (n,) = shape
        if loss == "kl_div":
            # log-probabilities over rows of 1024 (one row when n is not a multiple)
            cols = 1024 if n % 1024 == 0 else n
            shp = (n // cols, cols)
            x = torch.log_softmax(torch.randn(shp, dtype=torch.float32, **kw), -1).to(dtype)
            y = torch.softmax(torch.randn(shp, dtype=torch.float32, **kw), -1).to(dtype)
        else:
            x = torch.randn(n, dtype=dtype, **kw)
            if loss in ("bce_logits", "bce"):
                y = torch.rand(n, dtype=dtype, **kw)
            elif loss == "hinge":
                y = (torch.randint(0, 2, (n,), **kw) * 2 - 1).to(dtype)
            else:
                y = torch.randn(n, dtype=dtype, **kw)
            if loss == "bce":
                x = torch.sigmoid(x.float()).clamp_(0.01, 0.99).to(dtype)  # in (0, 1)
    return x.requires_grad_(True), y


def min_bytes(loss, shape, dtype):
    es = torch.empty((), dtype=dtype).element_size()
    if loss == "ce":
        n, c = shape
        return 2 * n * c * es + n * 8  # read logits, write grad; targets
    return 3 * shape[0] * es  # read x, y; write grad


# ----------------------------------------------------------------------------- the suites
def default_suite(device, quick):
    f32, bf16 = torch.float32, torch.bfloat16
    if device == "cuda":
        ce_shapes = [((4096, 32000), bf16), ((8192, 128256), bf16), ((8192, 32000), f32),
                     ((1024, 256000), bf16), ((65536, 1000), f32)]
        pw = [(loss, (1 << 27,), dt) for loss in POINTWISE for dt in (f32, bf16)]
        if quick:
            ce_shapes = [((256, 4096), bf16), ((256, 4096), f32)]
            pw = [(loss, (1 << 20,), dt) for loss, _, dt in pw]
    else:
        ce_shapes = [((4096, 32000), f32), ((4096, 32000), bf16)]
        pw = []
        for loss in POINTWISE:
            pw.append((loss, (1 << 24,), f32))
            if loss in ("bce_logits", "huber"):
                pw.append((loss, (1 << 24,), bf16))
        if quick:
            ce_shapes = [((256, 2048), f32), ((256, 2048), bf16)]
            pw = [(loss, (1 << 16,), dt) for loss, _, dt in pw]
    return [("ce", s, dt) for s, dt in ce_shapes] + pw


def parse_size(tok):
    tok = tok.strip().lower()
    if "x" in tok:
        return tuple(parse_size(t)[0] for t in tok.split("x"))
    m = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", tok)
    return (int(m.group(1)) ** int(m.group(2)),) if m else (int(tok),)


def build_cases(args, device):
    cases = default_suite(device, args.quick)
    losses = ALL_LOSSES if args.loss in (None, "all") else [s.strip() for s in args.loss.split(",")]
    for loss in losses:
        if loss not in ALL_LOSSES:
            sys.exit(f"unknown loss {loss!r}; choose from {','.join(ALL_LOSSES)}")
    dtypes = None
    if args.dtype:
        dtypes = []
        for name in args.dtype.split(","):
            if name.strip() not in DTYPES:
                sys.exit(f"unknown dtype {name!r}; choose from {','.join(DTYPES)}")
            dtypes.append(DTYPES[name.strip()])
    if args.sizes:
        sizes = [parse_size(t) for t in args.sizes.split(",") if t.strip()]
        ce_sizes = [s for s in sizes if len(s) == 2]
        pw_sizes = [s for s in sizes if len(s) == 1]
        if any(len(s) not in (1, 2) for s in sizes):
            sys.exit("--sizes: use NxC for ce and a single element count for pointwise losses")
        new = []
        for loss in ALL_LOSSES:
            override = ce_sizes if loss == "ce" else pw_sizes
            old = [c for c in cases if c[0] == loss]
            if not override:
                new += old
                continue
            dts = list(dict.fromkeys(dt for _, _, dt in old))
            new += [(loss, s, dt) for s in override for dt in dts]
        cases = new
    out = []
    for loss in losses:
        mine = [c for c in cases if c[0] == loss]
        if dtypes is not None:
            kept = [c for c in mine if c[2] in dtypes]
            if not kept and args.loss not in (None, "all"):
                # an explicitly requested loss in a dtype the suite lacks: run it at suite sizes
                shapes = list(dict.fromkeys(s for _, s, _ in mine))
                kept = [(loss, s, dt) for s in shapes for dt in dtypes]
            mine = kept
        out += mine
    return out


# ----------------------------------------------------------------------------- targets
# (device, loss, dtype, shape the target is defined at, metric, threshold)
TARGETS = [
    ("cpu", "ce", torch.float32, (4096, 32000), "eager/ours", 2.0),
    ("cpu", "ce", torch.bfloat16, (4096, 32000), "eager/ours", 2.0),
    ("cpu", "bce_logits", torch.float32, (1 << 24,), "eager/ours", 2.0),
    ("cpu", "huber", torch.float32, (1 << 24,), "eager/ours", 1.5),
] + [("cpu", loss, torch.float32, (1 << 24,), "eager/ours", 1.5)
     for loss in ("mse", "l1", "smooth_l1", "bce", "kl_div", "hinge")] + [
    ("cuda", "ce", torch.bfloat16, (8192, 128256), "compile/ours", 2.9),
    ("cuda", "ce", torch.bfloat16, (8192, 128256), "liger/ours", 1.8),
    ("cuda", "ce", torch.float32, (8192, 32000), "compile/ours", 1.5),
    ("cuda", "bce_logits", torch.bfloat16, (1 << 27,), "compile/ours", 2.6),
    ("cuda", "bce_logits", torch.float32, (1 << 27,), "compile/ours", 2.2),
    ("cuda", "huber", torch.bfloat16, (1 << 27,), "compile/ours", 1.6),
    ("cuda", "huber", torch.float32, (1 << 27,), "compile/ours", 1.8),
]


def targets_for(device, loss, shape, dtype):
    """[(metric, threshold, spec_shape)] for one case. A target applies to the case at its
    size, and also (flagged '*' in the results) to a case of the same loss and dtype at a size
    outside the default suite (--quick, --sizes); never to another default-suite size."""
    suite = {tuple(s) for l_, s, dt in default_suite(device, False) if l_ == loss and dt == dtype}
    t = [(metric, thr, spec) for dev, l_, dt, spec, metric, thr in TARGETS
         if dev == device and l_ == loss and dt == dtype
         and (shape == spec or shape not in suite)]
    if device == "cuda":
        t.append(("copy_frac", 0.8, None))  # every CUDA case: >= 80% of copy bandwidth
    return t


def evaluate_targets(row):
    checks = []
    for metric, thr, spec in row["targets"]:
        if metric == "copy_frac":
            val = row.get("ours_copy_bw_frac")
            label = f">={thr:.0%} copy BW"
        else:
            val = row["ratios"].get(metric.split("/")[0])
            label = f"{metric}>={thr:g}x"
        off_spec = spec is not None and tuple(row["shape"]) != tuple(spec)
        if val is None:
            status = "n/a"
        else:
            status = "PASS" if val >= thr else "FAIL"
            if off_spec:
                status += "*"  # measured at another size than the target's
        checks.append({"target": label, "metric": metric, "threshold": thr, "value": val,
                       "status": status, "spec_shape": list(spec) if spec else None,
                       "off_spec_size": off_spec})
    return checks


# ----------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device):
        self.device = device
        self.flush = None
        if device == "cuda":
            self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")

    def run(self, step, setup, reps, warmup):
        """Median ms of step() over reps after warmup; setup() runs before each, untimed."""
        (ms, times), = self.run_interleaved({"step": (step, setup)}, reps, warmup).values()
        return ms, times

    def run_interleaved(self, steps, reps, warmup):
        """{name: (step, setup)} -> {name: (median ms, times)}. The implementations take turns,
        rep by rep, so that drifts of the machine (a fresh process faulting in memory, clock
        changes) fall on all of them alike instead of on whichever runs first."""
        for _ in range(warmup):
            for step, setup in steps.values():
                setup()
                step()
        times = {name: [] for name in steps}
        if self.device == "cuda":
            torch.cuda.synchronize()
            events = {name: [] for name in steps}
            for _ in range(reps):
                for name, (step, setup) in steps.items():
                    setup()
                    self.flush.zero_()  # evict L2
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    events[name].append((start, end))
            torch.cuda.synchronize()
            for name, pairs in events.items():
                times[name] = [s.elapsed_time(e) for s, e in pairs]
        else:
            for _ in range(reps):
                for name, (step, setup) in steps.items():
                    setup()
                    t0 = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        return {name: (statistics.median(t), t) for name, t in times.items()}


def copy_bandwidth(timer, device, nbytes, reps, warmup):
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = timer.run(lambda: dst.copy_(src), lambda: None, reps, warmup)
    gbs = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    return gbs, ms


def peak_extra_mb(step, setup):
    """CUDA only: peak memory allocated during one step beyond what existed before it."""
    setup()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------- one case
def liger_ce():
    try:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception:
        return None
    mod = LigerCrossEntropyLoss(reduction="mean")

    def f(x, y):
        out = mod(x, y)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "loss", out)
    return f


def check_against_eager(ours, eager, x, y):
    """One fwd+bwd of each on the same inputs: relative max error of loss and grad."""
    x.grad = None
    lo = ours(x, y)
    lo.backward()
    go = x.grad
    x.grad = None
    le = eager(x, y)
    le.backward()
    ge = x.grad
    x.grad = None
    lerr = (abs(lo.double() - le.double()) / le.double().abs().clamp_min(1e-12)).item()
    gerr = ((go.double() - ge.double()).abs().max() /
            ge.double().abs().max().clamp_min(1e-30)).item()
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    ok = lerr <= tol and gerr <= tol
    return {"loss_rel_err": lerr, "grad_rel_err": gerr, "tol": tol, "ok": ok}


def run_case(loss, shape, dtype, device, timer, args, copy_gbs, liger_fn, compile_ok=True):
    name = f"{TITLES[loss]} {'x'.join(map(str, shape))} {SHORT[dtype]}"
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    reps, warmup = args.reps, args.warmup
    x, y = make_inputs(loss, shape, dtype, device)
    ours_fn, torch_fn = LOSS_FNS[loss]
    impls = {"ours": ours_fn, "eager": torch_fn}
    row = {"loss": loss, "name": name, "shape": list(shape), "dtype": DTYPE_NAMES[dtype],
           "device": device, "reps": reps, "warmup": warmup, "ms": {}, "times_ms": {},
           "extra_mb": {}, "errors": {}, "compile_s": None}
    try:
        row["check"] = check_against_eager(ours_fn, torch_fn, x, y)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        row["check"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if not row["check"]["ok"]:
        print(f"[bench]   WARNING {name}: ours vs eager mismatch {row['check']}", file=sys.stderr)
    if not args.no_compile and not compile_ok:
        row["errors"]["compile"] = "skipped: --quick compile-time budget spent"
    elif not args.no_compile:
        torch._dynamo.reset()
        cfn = torch.compile(torch_fn, dynamic=False)  # mode default
        t0 = time.perf_counter()
        try:  # compile forward and backward once, outside the timing
            x.grad = None
            cfn(x, y).backward()
            x.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
            impls["compile"] = cfn
        except Exception as e:  # noqa: BLE001
            row["errors"]["compile"] = f"{type(e).__name__}: {e}"
            print(f"[bench]   torch.compile failed: {row['errors']['compile']}", file=sys.stderr)
        row["compile_s"] = time.perf_counter() - t0
    x_pristine = None
    if loss == "ce" and liger_fn is not None:
        impls["liger"] = liger_fn
        x_pristine = x.detach().clone()  # Liger writes the gradient over the logits

    steps = {}
    for impl, fn in impls.items():
        def step(fn=fn):
            fn(x, y).backward()

        def setup():
            x.grad = None
            if x_pristine is not None:  # Liger overwrote the logits on its last turn
                with torch.no_grad():
                    x.copy_(x_pristine)

        try:  # one untimed call: an implementation that fails is reported and left out
            setup()
            step()
            steps[impl] = (step, setup)
        except Exception as e:  # noqa: BLE001
            row["errors"][impl] = f"{type(e).__name__}: {e}"
            print(f"[bench]   {impl} failed: {row['errors'][impl]}", file=sys.stderr)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    for impl, (ms, times) in timer.run_interleaved(steps, reps, warmup).items():
        row["ms"][impl], row["times_ms"][impl] = ms, times
    if device == "cuda":
        for impl, (step, setup) in steps.items():
            row["extra_mb"][impl] = peak_extra_mb(step, setup)
        x.grad = None
    if liger_fn is not None and loss == "ce":
        with torch.no_grad():
            x.copy_(x_pristine)
    del x, y, x_pristine
    if device == "cuda":
        torch.cuda.empty_cache()

    ours = row["ms"].get("ours")
    row["ratios"] = {k: (row["ms"][k] / ours if ours and k in row["ms"] else None)
                     for k in ("eager", "compile", "liger")}
    row["min_bytes"] = min_bytes(loss, shape, dtype)
    row["ours_gbs"] = row["min_bytes"] / (ours * 1e-3) / 1e9 if ours else None
    row["copy_gbs"] = copy_gbs
    row["ours_copy_bw_frac"] = row["ours_gbs"] / copy_gbs if row["ours_gbs"] else None
    row["targets"] = targets_for(device, loss, tuple(shape), dtype)
    row["checks"] = evaluate_targets(row)
    return row


# ----------------------------------------------------------------------------- environment
def slug(s):
    s = re.sub(r"\((r|tm)\)|\b\d+-core\b", "", s, flags=re.I)
    s = re.sub(r"\b(cpu|processor)\b.*?(@.*)?$", "", s, flags=re.I) or s
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def machine_tag(device):
    if device == "cuda":
        return slug(torch.cuda.get_device_name())
    return f"cpu-{slug(cpu_model()) or 'unknown'}-{cpu_count()}c"


def git_commit():
    def git(*a):
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain"))
    except Exception:  # noqa: BLE001
        return None, None


def environment(device, args):
    commit, dirty = git_commit()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "torch_losses": getattr(torch_losses, "__version__", None),
        "python": platform.python_version(), "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu_model": cpu_model(), "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "args": vars(args),
    }
    try:
        import importlib.metadata as md
        env["liger_kernel"] = md.version("liger-kernel")
    except Exception:  # noqa: BLE001
        env["liger_kernel"] = None
    return env


# ----------------------------------------------------------------------------- output
def fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def table(rows, device, env):
    has_liger = any("liger" in r["ms"] for r in rows)
    head = ["case", "ours ms", "eager ms", "compile ms"] + (["liger ms"] if has_liger else [])
    head += ["eager/ours", "compile/ours"] + (["liger/ours"] if has_liger else [])
    head += ["ours GB/s", "% copy BW", "extra MB ours/eager/compile" +
             ("/liger" if has_liger else ""), "check", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms, ra = r["ms"], r["ratios"]
        cells = [r["name"]]
        impls = ["ours", "eager", "compile"] + (["liger"] if has_liger else [])
        for k in impls:
            err = r["errors"].get(k)
            cells.append(("skip" if err.startswith("skipped") else "err") if err
                         else fmt(ms.get(k)))
        for k in impls[1:]:
            cells.append(fmt(ra.get(k), ".2f") + ("x" if ra.get(k) is not None else ""))
        cells.append(fmt(r["ours_gbs"], ".1f"))
        cells.append(fmt(r["ours_copy_bw_frac"] and 100 * r["ours_copy_bw_frac"], ".0f"))
        if device == "cuda":
            cells.append("/".join(fmt(r["extra_mb"].get(k), ".0f") for k in impls))
        else:
            cells.append("n/a")
        chk = r.get("check", {})
        cells.append("ok" if chk.get("ok") else "MISMATCH")
        cells.append("; ".join(c["target"] for c in r["checks"]) or "-")
        cells.append("; ".join(c["status"] for c in r["checks"]) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    n_pass = sum(c["status"].startswith("PASS") for r in rows for c in r["checks"])
    n_fail = sum(c["status"].startswith("FAIL") for r in rows for c in r["checks"])
    n_na = sum(c["status"] == "n/a" for r in rows for c in r["checks"])
    notes = [
        "",
        f"Device: {env['device_name']} ({device}); torch {env['torch']}; threads "
        f"{env['torch_threads']}; commit {(env['git_commit'] or '?')[:10]}"
        f"{' (dirty)' if env['git_dirty'] else ''}; {env['date']}.",
        f"Copy bandwidth (read + write): {env['copy_gbs']:.1f} GB/s. Forward + backward, mean "
        "reduction, median ms. GB/s = minimal bytes (CE: 2*N*C*elem; pointwise: 3*n*elem) / "
        "time." + ("" if device == "cuda" else " Extra memory: not measured on CPU."),
        ("torch.compile skipped for some cases: --quick compile-time budget spent.\n"
         if any(r["errors"].get("compile", "").startswith("skipped") for r in rows) else "") +
        f"Targets: {n_pass} PASS, {n_fail} FAIL, {n_na} n/a. '*' = measured at a size other "
        "than the one the target is defined at (see results.json).",
    ]
    return "\n".join(lines + notes)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return "matplotlib not importable: no chart written"
    keys = [k for k in ("eager", "compile", "liger") if any(r["ratios"].get(k) for r in rows)]
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows) + 2), 5))
    for i, k in enumerate(keys):
        vals = [r["ratios"].get(k) or 0.0 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=f"{k} / ours")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["name"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("time ratio (higher = ours faster)")
    ax.set_title("torch_losses speedup, forward + backward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", help="comma list filter: float32,bfloat16,float16,float64")
    p.add_argument("--loss", help="comma list filter: " + ",".join(ALL_LOSSES))
    p.add_argument("--sizes", help="override sizes, comma list: NxC for ce (4096x32000), "
                                   "element counts for pointwise (16777216 or 2^24)")
    p.add_argument("--reps", type=int, help="timed reps (default: CUDA 20, CPU 5, quick 3)")
    p.add_argument("--warmup", type=int, help="warmup reps (default: CUDA 5, CPU 2, quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few reps")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--out", help="output folder (default benchmarks/results/<machine-tag>/)")
    args = p.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    if args.reps is None:
        args.reps = 3 if args.quick else (20 if device == "cuda" else 5)
    if args.warmup is None:
        args.warmup = 1 if args.quick else (5 if device == "cuda" else 2)
    if args.reps < 1 or args.warmup < 0:
        sys.exit("--reps must be >= 1 and --warmup >= 0")
    cases = build_cases(args, device)
    if not cases:
        sys.exit("no case left after the --loss/--dtype/--sizes filters")
    tag = machine_tag(device)
    out = args.out or os.path.join(HERE, "results", tag + ("-quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)

    env = environment(device, args)
    env["machine_tag"] = tag
    timer = Timer(device)
    copy_mb = 32 if args.quick else (1024 if device == "cuda" else 256)
    env["copy_gbs"], env["copy_ms"] = copy_bandwidth(timer, device, copy_mb << 20,
                                                     max(args.reps, 5), max(args.warmup, 1))
    env["copy_bytes"] = 2 * (copy_mb << 20)
    print(f"[bench] {device}: {env['device_name']}, copy bandwidth {env['copy_gbs']:.1f} GB/s",
          file=sys.stderr)
    liger_fn = liger_ce() if device == "cuda" else None
    env["liger_used"] = liger_fn is not None

    rows = []
    t_start = time.perf_counter()
    # --quick must stay a < 60 s smoke test on 2 cores even with a cold inductor cache (about
    # 3-12 s per case there): once this much time went to compiling, later cases skip compile.
    compile_budget_s = 25.0 if args.quick else math.inf
    for loss, shape, dtype in cases:
        spent = sum(r["compile_s"] or 0.0 for r in rows)
        try:
            rows.append(run_case(loss, shape, dtype, device, timer, args, env["copy_gbs"],
                                 liger_fn, compile_ok=spent < compile_budget_s))
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            traceback.print_exc()
            print(f"[bench] case {loss} {shape} {dtype} failed: {e}", file=sys.stderr)
    # copy bandwidth again at the end: the run's spread is part of the record
    env["copy_gbs_end"], _ = copy_bandwidth(timer, device, copy_mb << 20,
                                            max(args.reps, 5), max(args.warmup, 1))
    env["total_s"] = time.perf_counter() - t_start

    md = table(rows, device, env)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"environment": env, "cases": rows}, fh, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(md + "\n")
    note = plot(rows, os.path.join(out, "results.png"))
    print(f"[bench] wrote {out}/results.json, results.md"
          + (f"; {note}" if note else ", results.png"), file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

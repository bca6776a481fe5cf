"""One benchmark case: check ours against eager, compile the torch.compile baseline, time every
implementation interleaved, derive ratios, bandwidth and target verdicts."""
import sys
import time

import torch

from .cases import DTYPE_NAMES, LOSS_FNS, SHORT, TITLES, make_inputs, min_bytes
from .peers import compiled_baseline
from .targets import evaluate_targets, targets_for
from .timing import peak_extra_mb


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
        cfn = compiled_baseline(loss, torch_fn)
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
    if loss == "ce" and liger_fn is not None and len(shape) == 2:  # Liger's CE takes (N, C)
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
    if x_pristine is not None:
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

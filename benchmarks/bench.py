#!/usr/bin/env python
"""Benchmark torch_losses against torch eager, torch.compile and Liger-Kernel.

Every case times forward + backward of the mean-reduced loss, `loss = f(x, y); loss.backward()`,
on fresh leaf inputs that require grad (the same inputs for every implementation). CUDA: CUDA
events, L2 flushed (a 256 MB write) before each rep, median of reps. CPU: time.perf_counter,
median of reps. The device's copy bandwidth is measured in the same run.

    python benchmarks/bench.py                       # default suite (CUDA if present, else CPU)
    python benchmarks/bench.py --quick               # smoke test: tiny sizes, few reps
    python benchmarks/bench.py --distributed --world 2 --sizes 2048x32000  # vocab-parallel CE
    python benchmarks/bench.py --loss ce --dtype bfloat16 --sizes 8192x128256
    python benchmarks/bench.py --loss ce --sizes 16x21x512x512    # segmentation logits (N, C, H, W)
    python benchmarks/bench.py --loss mse,huber --sizes 2^24 --no-compile
    python benchmarks/bench.py --loss linear_ce --sizes 2048x1024x32000   # the LLM head row

Writes <out>/results.json (everything + environment) and <out>/results.md (the table) after
every case, and <out>/results.png (ratios; needs matplotlib) at the end. Default <out>:
benchmarks/results/<machine-tag>/ (<machine-tag>-quick for --quick, so a smoke test never
overwrites measured numbers). Cases with a target run first; the linear + cross-entropy row
(time and peak extra memory, tlbench/linear_ce.py) runs last.

The code lives in benchmarks/tlbench/, one module per concern (cases, targets, timing, peers,
machine, runner, report); this file is the command line on top.
"""
import argparse
import math
import os
import sys
import time
import traceback

import torch

from tlbench import linear_ce
from tlbench.cases import ALL_LOSSES, LINEAR_CE, build_cases, linear_ce_request
from tlbench.machine import environment, machine_tag
from tlbench.peers import liger_ce
from tlbench.report import write
from tlbench.runner import run_case
from tlbench.targets import compare_with_fp32, targets_for
from tlbench.timing import Timer, copy_bandwidth, write_bandwidths

HERE = os.path.dirname(os.path.abspath(__file__))


def targets_first(cases, device):
    """The cases a target is set for run first (a run cut short keeps the verdicts); the order
    is otherwise kept."""
    def has_target(case):
        loss, shape, dtype = case
        return any(metric != "copy_frac" for metric, *_ in
                   targets_for(device, loss, tuple(shape), dtype))
    return sorted(cases, key=lambda case: not has_target(case))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", help="comma list filter: float32,bfloat16,float16,float64")
    p.add_argument("--loss", help="comma list filter: " + ",".join(ALL_LOSSES + [LINEAR_CE]))
    p.add_argument("--sizes", help="override sizes, comma list: NxC or NxCxHxW for ce "
                                   "(4096x32000, 16x21x512x512), element counts for pointwise "
                                   "(16777216 or 2^24), NxHxV for linear_ce (2048x1024x32000)")
    p.add_argument("--reps", type=int, help="timed reps (default: CUDA 20, CPU 5, quick 3)")
    p.add_argument("--warmup", type=int, help="warmup reps (default: CUDA 5, CPU 2, quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few reps")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--out", help="output folder (default benchmarks/results/<machine-tag>/)")
    p.add_argument("--distributed", action="store_true",
                   help="vocab-parallel cross-entropy over --world ranks against gathering the "
                        "full logits (tlbench/distributed.py; writes <out> only when given)")
    p.add_argument("--world", type=int, help="--distributed: ranks (CPU default 2; CUDA: the "
                                             "visible GPUs)")
    args = p.parse_args(argv)
    if args.distributed:
        from tlbench.distributed import run
        return run(args)

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
    want_linear_ce, linear_ce_size, linear_ce_dtype = linear_ce_request(args)
    if not cases and not want_linear_ce:
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
    env["fresh_write_gbs"], env["kept_write_gbs"] = write_bandwidths(
        timer, device, copy_mb << 20, max(args.reps, 5), max(args.warmup, 1))
    print(f"[bench] {device}: {env['device_name']}, copy bandwidth {env['copy_gbs']:.1f} GB/s",
          file=sys.stderr)
    liger_fn = liger_ce() if device == "cuda" else None
    env["liger_used"] = liger_fn is not None

    rows = []
    t_start = time.perf_counter()
    # --quick must stay a < 60 s smoke test on 2 cores even with a cold inductor cache (about
    # 3-12 s per case there): once this much time went to compiling, later cases skip compile.
    compile_budget_s = 25.0 if args.quick else math.inf
    for loss, shape, dtype in targets_first(cases, device):
        spent = sum(r["compile_s"] or 0.0 for r in rows)
        try:
            rows.append(run_case(loss, shape, dtype, device, timer, args, env["copy_gbs"],
                                 liger_fn, compile_ok=spent < compile_budget_s))
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            traceback.print_exc()
            print(f"[bench] case {loss} {shape} {dtype} failed: {e}", file=sys.stderr)
            continue
        compare_with_fp32(rows)
        write(out, env, rows, device, final=False)
    linear_row = None
    if want_linear_ce:
        print(f"[bench] linear + cross-entropy ...", file=sys.stderr, flush=True)
        try:
            # one warm-up step each: a CPU step of the default size takes seconds
            linear_row = linear_ce.run(device, args.quick, args.reps, min(args.warmup, 1),
                                       linear_ce_dtype, linear_ce_size)
        except Exception as e:  # noqa: BLE001 - reported, the other rows are kept
            traceback.print_exc()
            print(f"[bench] linear + cross-entropy failed: {e}", file=sys.stderr)
    # copy bandwidth again at the end: the run's spread is part of the record
    env["copy_gbs_end"], _ = copy_bandwidth(timer, device, copy_mb << 20,
                                            max(args.reps, 5), max(args.warmup, 1))
    env["total_s"] = time.perf_counter() - t_start

    md, note = write(out, env, rows, device, final=True, linear_row=linear_row)
    print(f"[bench] wrote {out}/results.json, results.md"
          + (f"; {note}" if note else ", results.png"), file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

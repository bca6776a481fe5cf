"""Performance targets: the speed ratios the project set for itself, per device, loss, dtype
and size, and their evaluation on a measured case."""
import torch

from .cases import default_suite

# (device, loss, dtype, shape the target is defined at, metric, threshold)
TARGETS = [
    ("cpu", "ce", torch.float32, (4096, 32000), "eager/ours", 2.0),
    ("cpu", "ce", torch.float32, (4096, 32000), "copy_frac", 0.6),
    ("cpu", "ce", torch.bfloat16, (4096, 32000), "eager/ours", 2.0),
    ("cpu", "ce", torch.bfloat16, (4096, 32000), "fp32/ours", 1.0),
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
# The CPU: ours at least as fast as torch.compile of torch's loss on every case of the suite.
TARGETS += [("cpu", loss, dtype, tuple(shape), "compile/ours", 1.0)
            for loss, shape, dtype in default_suite("cpu", False)]


# What each kind of target asks, in words for the printed verdicts.
MEANING = {
    "eager/ours": "ours is at least this many times faster than torch's own loss (eager)",
    "compile/ours": "ours is at least this many times faster than torch.compile of torch's loss",
    "liger/ours": "ours is at least this many times faster than Liger-Kernel's cross-entropy",
    "copy_frac": "ours moves its minimal bytes at this fraction of the measured copy bandwidth",
    "fp32/ours": "ours in this dtype is at least this many times faster than ours in float32 "
                 "(same loss and size, same run)",
}

# Where the targets were set, and what that means for another machine.
SET_ON = {
    "cpu": "the project's CPU targets; the eager ratios were all met on a 2-core AMD EPYC VM "
           "with torch 2.13.0+cpu (benchmarks/results/cpu-amd-epyc-2c/)",
    "cuda": "the project's GPU goals for an H100/H200, from the kernel design (no GPU run has "
            "checked them yet)",
}


def explain(device):
    """The paragraph printed under the table: what PASS/FAIL means to someone running this."""
    kinds = sorted({metric for dev, *_, metric, _ in TARGETS if dev == device}
                   | ({"copy_frac"} if device == "cuda" else set()))
    lines = [f"Targets ({SET_ON[device]}):"]
    lines += [f"  {kind}>=N: {MEANING[kind]}" for kind in kinds]
    lines.append(
        "PASS/FAIL compares this run's ratio with the target. A ratio depends on the machine "
        "(cores, vector units, memory bandwidth, other load) and on torch's version: another or "
        "busier machine can miss a target with nothing wrong. The 'check' column is what must "
        "say ok: ours computed the same loss and gradient as torch.")
    return "\n".join(lines)


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
        elif metric == "fp32/ours":
            val = row.get("fp32_over_ours")
            label = f"fp32/ours>={thr:g}x"
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


def compare_with_fp32(rows):
    """Sets fp32_over_ours on each non-float32 row that has a float32 row of the same loss and
    shape in the run, and evaluates the targets again."""
    fp32 = {(r["loss"], tuple(r["shape"])): r["ms"].get("ours") for r in rows
            if r["dtype"] == "float32"}
    for r in rows:
        ref = fp32.get((r["loss"], tuple(r["shape"])))
        ours = r["ms"].get("ours")
        if r["dtype"] != "float32" and ref and ours:
            r["fp32_over_ours"] = ref / ours
            r["checks"] = evaluate_targets(r)

"""The results: the markdown table with the verdicts, the JSON record and the plot, written
after every case so that an interrupted run keeps what it measured."""
import json
import os

from . import linear_ce
from .targets import explain

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
        "reduction, median ms. GB/s = minimal bytes (CE: 2 x logits x elem + 8 per target; "
        "pointwise: 3*n*elem) / time." + ("" if device == "cuda" else " Extra memory: not measured on CPU."),
        f"Writing a tensor allocated in the step (as every fresh gradient is): "
        f"{env['fresh_write_gbs']:.1f} GB/s; into one allocated before: "
        f"{env['kept_write_gbs']:.1f} GB/s (the difference is first-touch page faults)."
        if "fresh_write_gbs" in env else "",
        ("torch.compile skipped for some cases: --quick compile-time budget spent.\n"
         if any(r["errors"].get("compile", "").startswith("skipped") for r in rows) else "") +
        f"Targets: {n_pass} PASS, {n_fail} FAIL, {n_na} n/a. '*' = measured at a size other "
        "than the one the target is defined at (see results.json).",
        "",
        explain(device),
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


def write(out, env, rows, device, final, linear_row=None):
    """results.json and results.md now (after each case); results.png at the end."""
    md = table(rows, device, env) if rows else ""
    if linear_row is not None:
        md += "\n\n" + "\n".join(linear_ce.table(linear_row))
    if not final:
        md += f"\n\n(partial: {len(rows)} cases so far; the run is still going or was stopped)"
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({"environment": env, "cases": rows, "linear_ce": linear_row,
                   "complete": final}, fh, indent=1,
                  default=str)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(md + "\n")
    note = plot(rows, os.path.join(out, "results.png")) if final and rows else None
    return md, note

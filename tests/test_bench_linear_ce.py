"""The linear + cross-entropy benchmark (benchmarks/tlbench/linear_ce.py) measures ours against
torch on every tested torch: on one without F.linear_cross_entropy (the GPU image's 2.11) its
eager reference is F.cross_entropy(F.linear(...)), and the row still has ours, eager and the
check."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from tlbench import linear_ce  # noqa: E402


def test_quick_row_measures_ours_and_eager():
    row = linear_ce.run("cpu", quick=True, reps=1, warmup=0)
    assert row["check"]["ok"], row["check"]
    assert {"ours", "eager"} <= set(row["ms"]) and {"ours", "eager"} <= set(row["peak_extra_mib"])
    assert "eager" not in row["skipped"]
    title = "torch eager (options=None)" if linear_ce._has_torch_linear_ce() else \
        "torch eager (F.linear + F.cross_entropy)"
    assert any(line.startswith(f"| {title} | ") for line in linear_ce.table(row))

"""The CPU cross-entropy runs its class-index rows' sweeps in AVX-512 where torch's own kernels
run AVX-512 (csrc/cpu/ce_rows_avx512.h) and in AVX2 elsewhere. The suite exercises the sweeps
this machine picks; on an AVX-512 machine this test runs the cross-entropy suites again on the
AVX2 sweeps (ATEN_CPU_CAPABILITY=avx2, in a subprocess), the randomized ones included."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_cross_entropy_suites_on_the_avx2_sweeps():
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the main suite already runs the AVX2 sweeps here")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    # The switch the extension reads (at::get_cpu_capability) is the one torch reports.
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "AVX2", probe.stderr
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_cross_entropy.py", "tests/test_zloss_softcap.py",
         "tests/test_fuzz.py::test_cross_entropy_against_torch"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

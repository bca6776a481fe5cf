"""Loads a CUDA build of torch_losses without a GPU and checks that every op with a CPU kernel
has its CUDA kernel too (make cuda-build: the wheel unpacked into SITE).

Usage: python scripts/check_cuda_build.py SITE
"""
import os
import sys

site = os.path.abspath(sys.argv[1])
sys.path.insert(0, site)
os.chdir(site)  # not the clone's root, whose torch_losses/ would shadow the wheel's

import torch  # noqa: E402
import torch_losses  # noqa: E402,F401
from torch._C import _dispatch_has_kernel_for_dispatch_key as has_kernel  # noqa: E402

if not torch_losses.__file__.startswith(site):
    sys.exit(f"check_cuda_build: imported {torch_losses.__file__}, not the wheel in {site}")
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("torch_losses::"))
cpu = [n for n in ops if has_kernel(n, "CPU")]
missing = [n for n in cpu if not has_kernel(n, "CUDA")]
if not cpu or missing:
    sys.exit(f"check_cuda_build: {len(cpu)} ops with a CPU kernel; without a CUDA kernel: "
             f"{missing}")
print(f"check_cuda_build: torch {torch.__version__}: all {len(cpu)} ops with a CPU kernel have "
      f"a CUDA kernel")

"""Builds the emulator library: csrc/cuda/*.cu (unchanged) + runtime.cpp + entry.cpp, compiled
by the host C++ compiler against the shim headers of include/, one object per source in
parallel, each cached under build/cuda_emu/ by a hash of its inputs (so an edit of one .cu
rebuilds that file only).

    python tests/cuda_emu/build.py [--jobs N]     prints the library path
"""
import argparse
import concurrent.futures
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CXX = os.environ.get("CXX", "g++")


def _flags(csrc):
    # -ffp-contract=fast (+ FMA instructions where the CPU has them): products are contracted
    # into FMAs as nvcc does by default, so code that must not be contracted has to say so.
    # _FORTIFY_SOURCE off: its longjmp check rejects jumps between fiber stacks.
    flags = ["-std=c++17", "-O2", "-fPIC", "-ffp-contract=fast", "-U_FORTIFY_SOURCE",
             "-D_FORTIFY_SOURCE=0", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
             "-Wno-maybe-uninitialized",
             "-I", os.path.join(HERE, "include"), "-I", csrc]
    if platform.machine() in ("x86_64", "AMD64") and _cpu_has("fma"):
        flags.append("-mfma")
    return flags


def _cpu_has(feature):
    try:
        with open("/proc/cpuinfo") as f:
            return any(feature in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _digest(parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
    return h.hexdigest()[:16]


def _mutated_csrc(mutations, into):
    """A copy of csrc/ with the (path under csrc, old, new) replacements applied."""
    dst = os.path.join(into, "csrc")
    shutil.copytree(os.path.join(REPO, "csrc"), dst)
    for path, old, new in mutations:
        full = os.path.join(dst, path)
        text = _read(full).decode()
        if text.count(old) != 1:
            raise ValueError(f"mutation: {old!r} occurs {text.count(old)} times in {path}")
        with open(full, "w") as f:
            f.write(text.replace(old, new))
    return dst


def build(jobs=None, mutations=(), verbose=False):
    """Returns the path of the library, building what is missing. mutations: (path under csrc,
    old, new) text replacements, each of a unique string, applied to a copy of csrc/ (to show
    that the tests catch a broken kernel)."""
    out_dir = os.path.join(REPO, "build", "cuda_emu")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        csrc = _mutated_csrc(mutations, tmp) if mutations else os.path.join(REPO, "csrc")
        return _build(csrc, out_dir, jobs, verbose)


def _build(csrc, out_dir, jobs, verbose):
    flags = _flags(csrc)
    compiler = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    headers = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cuh")) +
                     glob.glob(os.path.join(csrc, "cuda", "*.h")) +
                     glob.glob(os.path.join(csrc, "losses", "*.h")) +
                     glob.glob(os.path.join(HERE, "include", "*.h")))
    # Flags name the folder of csrc (a temporary one for mutants): hashed without it.
    common = [compiler, " ".join(flags).replace(csrc, "CSRC")]
    common += [os.path.relpath(h, csrc).encode() + _read(h) for h in headers]
    srcs = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    srcs += [os.path.join(HERE, f) for f in ("runtime.cpp", "entry.cpp", "selftest.cu")]

    def obj_for(src):
        key = _digest(common + [os.path.basename(src), _read(src)])
        obj = os.path.join(out_dir, f"{os.path.basename(src)}.{key}.o")
        if os.path.exists(obj):
            return obj
        tmp = f"{obj}.{os.getpid()}.tmp"
        t0 = time.time()
        proc = subprocess.run([CXX, *flags, "-x", "c++", "-c", "-o", tmp, src],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src} failed:\n{proc.stderr}")
        if proc.stderr.strip():
            print(proc.stderr, file=sys.stderr)
        os.replace(tmp, obj)
        if verbose:
            print(f"compiled {os.path.basename(src)} in {time.time() - t0:.1f}s", file=sys.stderr)
        return obj

    jobs = jobs or int(os.environ.get("TL_EMU_JOBS", "0")) or os.cpu_count() or 1
    # Longest first: the cross_entropy_<dtype>.cu files (short, but each compiles the kernels of
    # cross_entropy_impl.cuh), then by size.
    order = sorted(srcs, key=lambda s: (not os.path.basename(s).startswith("cross_entropy_"),
                                        -os.path.getsize(s)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = dict(zip(order, pool.map(obj_for, order)))
    objs = [objs[s] for s in srcs]
    lib = os.path.join(out_dir, f"libtl_cuda_emu.{_digest(objs)}.so")
    if not os.path.exists(lib):
        tmp = f"{lib}.{os.getpid()}.tmp"
        proc = subprocess.run([CXX, "-shared", "-o", tmp, *objs], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"linking failed:\n{proc.stderr}")
        os.replace(tmp, lib)
    return lib


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args()
    t0 = time.time()
    lib = build(args.jobs, verbose=True)
    print(lib)
    print(f"built in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()

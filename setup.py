"""Build of torch_losses._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and a
CUDA toolkit is found.

Environment switches:
  TORCH_LOSSES_CUDA=0|1     force the CUDA part off or on (default: auto)
  TORCH_CUDA_ARCH_LIST      CUDA targets (default: the visible GPU, else "8.0;9.0")
  TORCH_LOSSES_CPU_ISA      avx2 | default (default: avx2 when the build machine has it)
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit folder that holds lib64/libcudart.so. nvcc on PATH may be a link or a wrapper
    script outside the toolkit, from which torch would guess the wrong folder."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for folder in filter(None, candidates):
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if os.path.exists(os.path.join(folder, lib, "libcudart.so")) and os.path.exists(
                os.path.join(folder, "bin", "nvcc")
            ):
                return folder
    return None


cuda_switch = os.environ.get("TORCH_LOSSES_CUDA", "auto").lower()
cuda_home = find_cuda_home() if cuda_switch != "0" else None
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home


def system_site_packages_visible():
    """A venv made with --system-site-packages sees the base Python's packages."""
    try:
        with open(os.path.join(sys.prefix, "pyvenv.cfg")) as f:
            return any(line.replace(" ", "").lower() == "include-system-site-packages=true"
                       for line in f.read().splitlines())
    except OSError:
        return False


def import_installed_torch():
    """The extension must be compiled against the torch it will be loaded into. Under pip's
    build isolation (a plain `pip install .`) that torch is hidden: pyproject.toml does not list
    torch as a build requirement (pip would fetch another one, maybe a CUDA build of another
    version), so look for it in this interpreter's site-packages, which isolation only hides."""
    import sysconfig

    try:
        import torch
        return torch
    except ImportError:
        pass
    schemes = [{}]  # this environment's site-packages
    if sys.prefix != sys.base_prefix and system_site_packages_visible():
        schemes.append({"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    for scheme in schemes:
        for key in ("purelib", "platlib"):
            folder = sysconfig.get_paths(vars=scheme)[key]
            if os.path.isdir(os.path.join(folder, "torch")) and folder not in sys.path:
                sys.path.append(folder)
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "torch_losses compiles against the installed torch, and none was found. Install "
            "torch first (`pip install torch`), then build with:\n"
            "    pip install --no-build-isolation -e .") from None
    print(f"torch_losses: building against the installed torch {torch.__version__} "
          f"({os.path.dirname(torch.__file__)})")
    return torch


torch = import_installed_torch()
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = cuda_switch == "1" or (
    cuda_switch == "auto" and torch.version.cuda is not None and cuda_home is not None
)
if cuda_switch == "1" and (torch.version.cuda is None or cuda_home is None):
    raise RuntimeError(
        "TORCH_LOSSES_CUDA=1 but "
        + ("this torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit was found")
        + " (set CUDA_HOME to the folder that holds lib64/libcudart.so)"
    )


def cpu_isa_flags():
    isa = os.environ.get("TORCH_LOSSES_CPU_ISA")
    if isa is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(f.read().split())
            isa = "avx2" if {"avx2", "fma", "f16c"} <= flags else "default"
        except OSError:
            isa = "default"
    if isa == "avx2":
        # at::vec picks its AVX2 implementation (and torch's Sleef exp/log) from these macros.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def cuda_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"


sources = [os.path.join("csrc", "torch_losses.cpp")] + sorted(glob.glob("csrc/cpu/*.cpp"))
# No -std: torch.utils.cpp_extension picks the standard its headers need (C++17 or C++20).
# -fopenmp: at::parallel_for is inline OpenMP code; without the flag it runs on one thread.
# -ffp-contract=off: no fused multiply-adds the source does not ask for, as torch's own CPU
# kernels; a contracted x * y - z skips the overflow of x * y, where torch gives inf - inf = nan
# (issue 13's fuzzer), and the vector and scalar paths would round differently.
cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"] + cpu_isa_flags()
link_flags = ["-fopenmp"]
include_dirs = [os.path.join(HERE, "csrc")]

if with_cuda:
    cuda_arch_list()
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/*_cuda.cpp"))
    extension = CUDAExtension(
        "torch_losses._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        },
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension(
        "torch_losses._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


def write_build_info(package_dir):
    """_build_info.py in package_dir: the torch this build compiles against, read at import to
    name both versions when they differ (instead of a loader error)."""
    path = os.path.join(package_dir, "_build_info.py")
    text = ('"""Written by setup.py at build time (not in git)."""\n'
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"TORCH_CUDA = {torch.version.cuda!r}\n"
            f"WITH_CUDA_KERNELS = {bool(with_cuda)!r}\n")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:  # an unchanged file keeps its timestamp: nothing to reinstall
        with open(path, "w") as f:
            f.write(text)


class BuildPyWithBuildInfo(build_py):
    """Writes _build_info.py into the package being built: the source folder for an editable
    install (which imports from there), the build folder for a wheel, so that building a wheel
    (make cuda-build's, against another torch) leaves the clone's own build working."""

    def run(self):
        super().run()
        root = HERE if self.editable_mode else self.build_lib
        write_build_info(os.path.join(root, "torch_losses"))


class PersistentBuildExtension(BuildExtension):
    """Keeps ninja's object files in build/temp-<torch>-<python>[-cuda]/ instead of the temporary
    folder that `pip install -e .` passes, so a reinstall recompiles only the sources that changed
    (one folder per torch version and CUDA switch: switching does not discard the other's
    objects, e.g. make cuda-build's beside the CPU-only build of the same torch)."""

    def finalize_options(self):
        super().finalize_options()
        tag = (f"{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
               f"{'-cuda' if with_cuda else ''}")
        self.build_temp = os.path.join(HERE, "build", f"temp-{tag}")


setup(
    name="torch-losses",
    packages=find_packages(include=["torch_losses", "torch_losses.*"]),
    ext_modules=[extension],
    cmdclass={"build_ext": PersistentBuildExtension, "build_py": BuildPyWithBuildInfo},
)

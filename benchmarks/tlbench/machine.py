"""The machine and software a run measured: CPU/GPU names, the folder tag of its results,
the git commit, versions."""
import datetime
import os
import platform
import re
import subprocess

import torch

import torch_losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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

"""Import-time checks: load the compiled extension (torch_losses._C) with messages that say what
went wrong and how to fix it, instead of a loader error.

- A source folder without the compiled extension (typically: Python started in the clone's root
  after a non-editable `pip install .`, so ./torch_losses shadows the installed package).
- An extension compiled against another torch than the running one (typically: a plain
  `pip install .` that built against a torch pip fetched into an isolated build environment, or
  a torch upgraded after the build). C++ extensions have no stable ABI across torch versions, so
  this is an ImportError naming both versions and the rebuild command.
- A running torch outside the range the test suite ran on: a warning (newer torches usually work;
  the warning says that nobody checked).
"""
import glob
import importlib
import os
import warnings

import torch
from torch.torch_version import TorchVersion

# The oldest and the newest torch the test suite passed on (.ci/run runs both, and 2.13.0).
TESTED_TORCH_RANGE = ("2.11.0", "2.14.1")
REBUILD_COMMAND = "pip install --no-build-isolation -e ."

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UntestedTorchWarning(UserWarning):
    """The running torch is outside the range torch_losses' test suite ran on."""


def _release(version):
    """'2.14.1+cu130' -> TorchVersion('2.14.1') (local build tags do not change the API)."""
    return TorchVersion(str(version).split("+")[0])


def built_with_torch():
    """The torch version the extension was compiled against (None for a build that predates the
    record, or a source folder)."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info.TORCH_VERSION


def _no_extension_message():
    return (
        f"torch_losses was imported from {PACKAGE_DIR}, a source folder that holds no compiled "
        "extension (torch_losses/_C*.so).\n"
        "- After `pip install .`: this folder (the clone's root on sys.path, e.g. Python started "
        "in the clone) shadows the installed package; run Python from another folder.\n"
        f"- To use the clone itself: build it with `{REBUILD_COMMAND}` (or `python setup.py "
        "build_ext --inplace`), with torch installed first.")


def _mismatch_message(built, running):
    return (
        f"torch_losses was compiled against torch {built}, but torch {running} is running. A C++ "
        "extension must be compiled against the torch it is loaded into. Rebuild it from the "
        f"clone's root with:\n    {REBUILD_COMMAND}\n"
        "(--no-build-isolation makes pip compile against the installed torch; without it pip "
        "fetches another torch into a temporary build environment.)")


def check_torch_range(running=None):
    """Warn when the running torch is outside the tested range. Returns the warning text or
    None."""
    running = running or torch.__version__
    oldest, newest = TESTED_TORCH_RANGE
    release = _release(running)
    if oldest <= release <= newest:
        return None
    side = "older" if release < oldest else "newer"
    message = (
        f"torch {running} is {side} than the torch versions torch_losses' test suite ran on "
        f"({oldest} to {newest}). It will probably work; `make test` runs the suite against it.")
    warnings.warn(message, UntestedTorchWarning, stacklevel=3)
    return message


def load_extension():
    """Import torch_losses._C (registers the ops), or raise an ImportError that says why not."""
    if not glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")) and not glob.glob(
            os.path.join(PACKAGE_DIR, "_C*.pyd")):
        raise ImportError(_no_extension_message())
    built = built_with_torch()
    if built is not None and built != torch.__version__:
        raise ImportError(_mismatch_message(built, torch.__version__))
    try:
        importlib.import_module("torch_losses._C")
    except (ImportError, OSError) as e:
        raise ImportError(
            f"torch_losses' compiled extension failed to load ({e}). "
            + _mismatch_message(built or "an unknown torch", torch.__version__)) from e
    check_torch_range()

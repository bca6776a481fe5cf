"""The import-time checks: a clear ImportError (both torch versions and the rebuild command)
instead of a loader error, a clear message for a source folder without the compiled extension
(instead of a circular-import error), and a warning outside the tested torch range."""
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import torch_losses
from torch_losses import _version_check

PACKAGE_DIR = os.path.dirname(torch_losses.__file__)


def test_extension_built_for_the_running_torch():
    assert _version_check.built_with_torch() in (None, torch.__version__)


def test_other_torch_names_both_versions_and_the_rebuild_command(monkeypatch):
    monkeypatch.setattr(_version_check, "built_with_torch", lambda: "2.11.0+cu128")
    with pytest.raises(ImportError) as e:
        _version_check.load_extension()
    message = str(e.value)
    assert "2.11.0+cu128" in message and torch.__version__ in message
    assert "pip install --no-build-isolation -e ." in message


def test_loader_error_becomes_a_clear_import_error(monkeypatch):
    def fail(name):
        raise ImportError("libc10_cuda.so: cannot open shared object file: No such file")

    monkeypatch.setattr(_version_check.importlib, "import_module", fail)
    with pytest.raises(ImportError) as e:
        _version_check.load_extension()
    assert "libc10_cuda.so" in str(e.value)
    assert "pip install --no-build-isolation -e ." in str(e.value)


def test_source_folder_without_extension_says_so(tmp_path):
    """Python started in a clone's root after a non-editable install: ./torch_losses shadows
    the installed package and has no _C."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "torch_losses",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    run = subprocess.run([sys.executable, "-c", "import torch_losses"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "holds no compiled extension" in run.stderr
    assert "circular import" not in run.stderr


@pytest.mark.parametrize("version,warns", [
    ("2.10.1+cu126", True), ("2.99.0", True),
    (_version_check.TESTED_TORCH_RANGE[0], False), (_version_check.TESTED_TORCH_RANGE[1], False),
    (_version_check.TESTED_TORCH_RANGE[1] + "+cu130", False)])
def test_torch_outside_the_tested_range_warns(version, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _version_check.check_torch_range(version)
    ours = [w for w in caught if issubclass(w.category, _version_check.UntestedTorchWarning)]
    assert len(ours) == (1 if warns else 0)
    if warns:
        assert version in str(ours[0].message)


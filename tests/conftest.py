"""Shared fixtures: the device list, seeding, and the helpers in tl_helpers.py."""
import atexit
import os
import random
import shutil
import tempfile

# torch.compile's on-disk caches (in /tmp, shared by every checkout) do not notice a change of a
# custom op's fake kernel: a cached graph of an older torch_losses then fails with shape or
# stride mismatches. Each test session compiles into its own folder.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="torch_losses-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from tl_helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test that takes `device` runs once per device present ("cpu", and "cuda" when
    torch sees a GPU)."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield

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


# The CUDA emulator (tests/cuda_emu), for the tests/test_cuda_emu*.py files; a module may
# override `emu` (extra ctypes signatures, state to restore) and `s` then uses its own.
@pytest.fixture(scope="module")
def emu():
    """The emulator's library, built (or taken from its cache) once per test module."""
    from cuda_emu import Emulator, build
    return Emulator(build.build())


@pytest.fixture
def s(emu):
    """A session of the emulator: fresh emulated devices per test."""
    with emu.session() as sess:
        yield sess

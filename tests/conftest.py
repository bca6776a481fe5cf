"""Shared fixtures: the device list, seeding, and the helpers in tl_helpers.py."""
import random

import pytest
import torch

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

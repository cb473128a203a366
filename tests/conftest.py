"""Shared test fixtures: the devices present, and hypothesis settings.

Every test that takes the `device` fixture runs once per device: always on "cpu", and on
"gpu" when CuPy and a CUDA device are present (otherwise that case is skipped with the reason).
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minidl import backend, device_checks

settings.register_profile(
    "minidl", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "25")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.load_profile("minidl")

GPU_PRESENT = backend.gpu_available()
GPU_SKIP_REASON = "no GPU: CuPy is not installed or sees no CUDA device"
DEVICES = [
    "cpu",
    pytest.param("gpu", marks=pytest.mark.skipif(not GPU_PRESENT, reason=GPU_SKIP_REASON)),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu", then "gpu" where one is present."""
    return request.param


@pytest.fixture
def xp(device):
    """The array module of the device under test (numpy or cupy)."""
    return backend.array_module(device)


@pytest.fixture(autouse=True)
def _forget_deferred_checks():
    """A check of GPU data that no read has raised yet (minidl.device_checks) belongs to the
    test that made it, not to the next test's first read."""
    yield
    device_checks.take()


def to_numpy(a):
    return backend.to_numpy(a)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), rtol=rtol, atol=atol)

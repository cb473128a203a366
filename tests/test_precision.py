"""minidl.set_float32_matmul_precision / get_float32_matmul_precision (PyTorch's names)."""
import numpy as np
import pytest

import minidl
from minidl import precision


@pytest.fixture(autouse=True)
def restore():
    yield
    minidl.set_float32_matmul_precision("highest")


def test_default_is_highest():
    assert minidl.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("value", ["high", "highest"])
def test_set_get(value, device):
    minidl.set_float32_matmul_precision(value)
    assert minidl.get_float32_matmul_precision() == value
    assert precision.cublas_math_mode() == (3 if value == "high" else 0)
    if device == "gpu":     # the cuBLAS handle CuPy's matmuls use carries the mode
        assert precision.get_cublas_math_mode() == precision.cublas_math_mode()
        a = minidl.randn(64, 64, device=device)
        b = minidl.randn(4, 64, 64, device=device)        # batched, as conv's GEMMs
        got = minidl.matmul(a, b).numpy()
        exact = a.numpy().astype(np.float64) @ b.numpy().astype(np.float64)
        # TF32 rounds operands to 2^-11 relative: 64 terms stay within 64 * 2^-10 of sum |a||b|
        tol = (2.0 ** -10 if value == "high" else 2.0 ** -20) * 64 * 8
        assert np.max(np.abs(got - exact)) < tol


def test_cpu_result_unchanged_by_setting():
    a = minidl.randn(8, 8)
    before = minidl.matmul(a, a).numpy()
    minidl.set_float32_matmul_precision("high")
    np.testing.assert_array_equal(minidl.matmul(a, a).numpy(), before)


@pytest.mark.parametrize("bad", ["medium", "HIGH", None, 1])
def test_bad_value(bad):
    with pytest.raises(ValueError, match="precision must be 'highest' or 'high'"):
        minidl.set_float32_matmul_precision(bad)
    assert minidl.get_float32_matmul_precision() == "highest"

"""bfloat16 rounding (autocast's casts): each bundle's round_bfloat16 against the NumPy
reference, and the reference against ml_dtypes' bfloat16 where that is installed."""
import importlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

import kernels

from conftest import to_numpy

ref = importlib.import_module("kernels.reference")

SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38,
                    1e-40, -1e-40, 1.00390625, 1.01171875, 65504.0], dtype=np.float32)


def bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@given(seed=st.integers(0, 2 ** 31), shape=st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4)]))
def test_round_bfloat16_matches_reference(device, xp, seed, shape):
    rng = np.random.default_rng(seed)
    # Random bit patterns reach every exponent, ties, denormals, infinities and NaNs.
    a = rng.integers(0, 2 ** 32, size=shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
    out = kernels.for_array(xp.zeros(1)).round_bfloat16(xp.asarray(a))
    got, expected = bits(to_numpy(out)), bits(ref.round_bfloat16(a))
    nan = np.isnan(a)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    assert np.isnan(np.asarray(got.view(np.float32))[nan]).all()


def test_round_bfloat16_special_values(device, xp):
    out = kernels.for_array(xp.zeros(1)).round_bfloat16(xp.asarray(SPECIAL))
    out = to_numpy(out)
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even, 1; 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
    assert out[11] == 1.0 and out[12] == 1.015625
    assert np.isinf(out[7]) and np.isinf(out[8]) and out[7] > 0 > out[8]     # past bf16's max
    assert np.isnan(out[6]) and np.array_equal(out[:6], SPECIAL[:6])
    assert np.signbit(out[1])


def test_reference_equals_ml_dtypes_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is the independent oracle")
    a = np.random.default_rng(0).integers(0, 2 ** 32, size=4096, dtype=np.uint64)
    a = np.concatenate([a.astype(np.uint32).view(np.float32), SPECIAL])
    with np.errstate(invalid="ignore"):          # NaNs cast to bfloat16 warn in ml_dtypes
        expected = a.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = ref.round_bfloat16(a)
    nan = np.isnan(a)
    np.testing.assert_array_equal(bits(got)[~nan], bits(expected)[~nan])
    assert np.isnan(got[nan]).all()

"""The target check of cross_entropy / nll_loss as kernels: each bundle's class_targets and
class_targets_record against the NumPy reference (kernels/reference.py), on every device
present, and the loss with GPU targets against the same loss with host targets."""
import importlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

import kernels
import minidl
from minidl import backend, device_checks, functional as F

from conftest import assert_close, to_numpy

ref = importlib.import_module("kernels.reference")


def bundle(xp):
    return kernels.for_array(xp.zeros(1))


# Ids in [-3, c + 2], with -100 (the default ignore_index) among them.
ids = st.lists(st.sampled_from([-100, -3, -1, 0, 1, 2, 3, 4, 5]), min_size=1, max_size=24)


@given(values=ids, c=st.integers(1, 4), ignore_index=st.sampled_from([-100, 0, 2]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_class_targets_match_reference(device, xp, values, c, ignore_index, dtype):
    target = np.array(values, dtype=np.int64).reshape(1, -1)
    safe, valid = bundle(xp).class_targets(xp.asarray(target), c, ignore_index, dtype)
    ref_safe, ref_valid = ref.class_targets(target, c, ignore_index, dtype)
    np.testing.assert_array_equal(to_numpy(safe), ref_safe)
    assert to_numpy(valid).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(to_numpy(valid), ref_valid)
    den = valid.sum()
    record, safe_den = bundle(xp).class_targets_record(xp.asarray(target), c, ignore_index, den)
    ref_record, ref_den = ref.class_targets_record(target, c, ignore_index, to_numpy(den))
    np.testing.assert_array_equal(to_numpy(record), ref_record)
    assert float(to_numpy(safe_den)) == float(ref_den)


def test_class_targets_record_finds_the_first_bad_id_and_keeps_an_old_failure(device, xp):
    target = np.array([[0, 9, 1, -5, 7]])
    k = bundle(xp)
    safe, valid = k.class_targets(xp.asarray(target), 3, -100, np.float32)
    record, den = k.class_targets_record(xp.asarray(target), 3, -100, valid.sum())
    np.testing.assert_array_equal(to_numpy(record), [1, 9])
    assert float(to_numpy(den)) == 2.0
    # A clean batch after it: its own record is clean, unless the unread old one failed.
    clean = xp.asarray(np.array([[0, 1]]))
    _, valid = k.class_targets(clean, 3, -100, np.float32)
    fresh, _ = k.class_targets_record(clean, 3, -100, valid.sum())
    np.testing.assert_array_equal(to_numpy(fresh), [0, 0])
    _, valid = k.class_targets(clean, 3, -100, np.float32)
    kept, _ = k.class_targets_record(clean, 3, -100, valid.sum(), old=record)
    np.testing.assert_array_equal(to_numpy(kept), [1, 9])


def test_every_target_ignored_gives_a_denominator_of_one(device, xp):
    target = np.full((2, 3), -100)
    k = bundle(xp)
    _, valid = k.class_targets(xp.asarray(target), 2, -100, np.float64)
    record, den = k.class_targets_record(xp.asarray(target), 2, -100, valid.sum())
    np.testing.assert_array_equal(to_numpy(record), [0, 0])
    assert float(to_numpy(den)) == 1.0


def test_class_targets_refuses_integer_weights_on_the_gpu():
    gpu = importlib.import_module("kernels.gpu")
    with pytest.raises(TypeError, match="float32 or float64 weights"):
        gpu.class_targets(np.zeros(3, np.int64), 2, -100, np.int32)


@given(seed=st.integers(0, 999), weighted=st.booleans(), pixel=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), ignore_index=st.sampled_from([-100, 1]))
def test_cross_entropy_with_device_targets_equals_host_targets(device, seed, weighted, pixel,
                                                               reduction, ignore_index):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 2, 3))
    target = rng.integers(0, 3, (2, 2, 3))
    target[0, 0, 0] = ignore_index
    weight = rng.uniform(0.5, 2, 3) if weighted else None
    pw = rng.uniform(0.5, 2, (2, 2, 3)) if pixel else None
    expected = [F.cross_entropy(minidl.tensor(x, device=device), target, weight=weight,
                                ignore_index=ignore_index, reduction=reduction, pixel_weight=pw),
                F.nll_loss(F.log_softmax(minidl.tensor(x, device=device), 1), target,
                           weight=weight, ignore_index=ignore_index, reduction=reduction)]
    on_device = backend.to_device(target, device)
    got = [F.cross_entropy(minidl.tensor(x, device=device), on_device, weight=weight,
                           ignore_index=ignore_index, reduction=reduction, pixel_weight=pw),
           F.nll_loss(F.log_softmax(minidl.tensor(x, device=device), 1), on_device,
                      weight=weight, ignore_index=ignore_index, reduction=reduction)]
    for a, b in zip(got, expected):
        assert_close(to_numpy(a.data), to_numpy(b.data), rtol=1e-12, atol=1e-12)
    assert device_checks.pending() == []


def test_a_bad_weight_shape_leaves_no_half_made_check(device):
    x = minidl.tensor(np.zeros((1, 3, 2), np.float32), device=device)
    bad = backend.to_device(np.array([[5, 0]]), device)
    with pytest.raises(ValueError, match="class weight of shape \\(2,\\)"):
        F.cross_entropy(x, bad, weight=np.ones(2, np.float32))
    # The next loss of clean ids reads clean: nothing of the refused call is left over.
    clean = backend.to_device(np.array([[1, 0]]), device)
    assert F.cross_entropy(x, clean).item() == pytest.approx(np.log(3))

"""Philox4x32-10, the counter-based generator of GPU dropout: the NumPy reference against the
known answers of the Random123 library, and kernels/gpu.py's kernels (run as emulated threads
in a shuffled order, tests/gpu_emulation.py) against the reference, bit for bit."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import kernels.gpu as gpu
import kernels.reference as ref
from test_gpu_source import emu, host_lib  # noqa: F401  (fixtures: kernels.gpu on the host)

# Known-answer vectors of philox4x32 with 10 rounds: counter (4 words), key (2 words) ->
# output (4 words). Source: Random123 (D. E. Shaw Research), examples/kat_vectors.
KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def u32(words):
    return np.array(words, dtype=np.uint64).astype(np.uint32)


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_gives_the_known_answers(counter, key, expected):
    np.testing.assert_array_equal(ref.philox4x32(u32(counter), u32(key)), u32(expected))


def test_reference_is_vectorised_over_counters():
    counters = np.stack([u32(c) for c, _, _ in KNOWN_ANSWERS])
    keys = np.stack([u32(k) for _, k, _ in KNOWN_ANSWERS])
    np.testing.assert_array_equal(ref.philox4x32(counters, keys),
                                  np.stack([u32(e) for _, _, e in KNOWN_ANSWERS]))


def test_stream_layout_and_offsets():
    seed, offset = 2 ** 40 + 7, 2 ** 32 - 1        # both 64-bit halves of key and counter used
    words = ref.philox_uint32(seed, offset, 10)     # Q = 3 blocks, word j of block b at b + 3j
    for b in range(3):
        block = ref.philox4x32(u32([(offset + b) & 0xFFFFFFFF, (offset + b) >> 32, 0, 0]),
                               u32([seed & 0xFFFFFFFF, seed >> 32]))
        np.testing.assert_array_equal(words[b::3], block[:len(words[b::3])])
    # The same blocks, laid out for Q = 2 instead of 4; the next draw (offset + 2) shares none.
    first, after = ref.philox_uint32(seed, 0, 8), ref.philox_uint32(seed, 2, 8)
    assert first.tolist() == ref.philox_uint32(seed, 0, 16)[[0, 1, 4, 5, 8, 9, 12, 13]].tolist()
    assert not set(first.tolist()) & set(after.tolist())
    assert not np.array_equal(ref.philox_uint32(1, 0, 8), ref.philox_uint32(2, 0, 8))


def test_reference_mask_keeps_about_one_minus_p():
    mask = ref.dropout_mask(5, 0, (200, 100), 0.3, np.float32)
    assert mask.dtype == np.float32 and mask.shape == (200, 100)
    assert set(np.unique(mask).tolist()) == {0.0, np.float32(1 / 0.7)}
    assert abs((mask > 0).mean() - 0.7) < 0.02
    assert ref.keep_threshold(0.0) == 0 and ref.keep_threshold(0.5) == 2 ** 23


def _state(seed, offset):
    return np.array([seed, offset], dtype=np.int64)


@given(seed=st.integers(0, 2 ** 63 - 1), offset=st.integers(0, 2 ** 40), n=st.integers(0, 37))
def test_bits_kernel_matches_reference_and_advances_the_offset(emu, seed, offset, n):
    state = _state(seed, offset)
    out = gpu.philox_uint32(state, n)
    assert out.dtype == np.uint32 and out.shape == (n,)
    np.testing.assert_array_equal(out, ref.philox_uint32(seed, offset, n))
    assert state.tolist() == [seed, offset + ref.philox_blocks(n)]


@given(seed=st.integers(0, 2 ** 63 - 1), offset=st.integers(0, 2 ** 33),
       shape=st.sampled_from([(1,), (5,), (3, 7), (2, 3, 1, 1), (2, 2, 3, 3)]),
       p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), dtype=st.sampled_from([np.float32, np.float64]))
def test_dropout_mask_kernel_matches_reference(emu, seed, offset, shape, p, dtype):
    state = _state(seed, offset)
    mask = gpu.dropout_mask(state, shape, p, dtype)
    expected = ref.dropout_mask(seed, offset, shape, p, dtype)
    assert mask.dtype == expected.dtype and mask.shape == expected.shape
    np.testing.assert_array_equal(mask, expected)
    q = ref.philox_blocks(int(np.prod(shape)))
    assert state.tolist() == [seed, offset + q]
    # The next draw continues the stream: the reference at the advanced offset.
    np.testing.assert_array_equal(gpu.dropout_mask(state, shape, p, dtype),
                                  ref.dropout_mask(seed, offset + q, shape, p, dtype))


def test_other_dtypes_are_drawn_as_float32_and_cast(emu):
    mask = gpu.dropout_mask(_state(3, 0), (4, 5), 0.25, np.float16)
    assert mask.dtype == np.float16
    np.testing.assert_array_equal(mask, ref.dropout_mask(3, 0, (4, 5), 0.25, np.float32)
                                  .astype(np.float16))


def test_a_bad_state_array_is_refused(emu):
    with pytest.raises(TypeError, match=r"Philox state must be a \(2,\) int64 device array"):
        gpu.dropout_mask(np.zeros(2, np.int32), (3,), 0.5, np.float32)
    with pytest.raises(TypeError, match="Philox state"):
        gpu.philox_uint32(np.zeros(3, np.int64), 4)

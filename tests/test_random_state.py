"""minidl.get_rng_state / set_rng_state: saved with minidl.save, restored, the same next draws."""
import sys
import types

import numpy as np
import pytest

import minidl
import minidl.random as mrandom
from minidl import backend
from minidl import functional as F


def _draws(device):
    """The kinds of random numbers training uses: randn, dropout masks, rand, randint."""
    x = minidl.ones(4, 6, device=device)
    return [backend.to_numpy(a) for a in (
        minidl.randn(3, 5, device=device).data,
        F.dropout(x, p=0.5, training=True).data,
        F.dropout2d(minidl.ones(2, 3, 4, 4, device=device), p=0.5, training=True).data,
        minidl.rand(7, device=device).data,
        minidl.randint(0, 1000, size=(5,), device=device).data,
    )]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def test_state_round_trips_through_save_and_load(tmp_path, device):
    minidl.manual_seed(5)
    _draws(device)                         # move away from the freshly seeded position
    state = minidl.get_rng_state()
    # Only arrays, numbers, strings and None: what minidl.save stores without pickle.
    assert all(v is None or isinstance(v, (np.ndarray, int, str)) for v in _leaves(state))
    minidl.save({"model": {"w": np.zeros(3, np.float32)}, "rng": state}, tmp_path / "ckpt.npz")
    expected = _draws(device)
    minidl.manual_seed(123)               # another seed, and more draws: all must be undone
    _draws(device)
    minidl.set_rng_state(minidl.load(tmp_path / "ckpt.npz")["rng"])
    _assert_same(_draws(device), expected)
    assert mrandom.initial_seed() == 5


def test_the_state_moves_with_every_draw_and_restores_twice(device):
    minidl.manual_seed(0)
    state = minidl.get_rng_state()
    first = _draws(device)
    second = _draws(device)
    assert not np.array_equal(first[0], second[0])   # the streams move on
    for _ in range(2):                               # a state can be restored more than once
        minidl.set_rng_state(state)
        _assert_same(_draws(device), first)


def test_pcg64_words_hold_the_exact_128_bit_state():
    minidl.manual_seed(9)
    minidl.randn(3)
    state = minidl.get_rng_state()["numpy"]
    raw = mrandom.generator(np).bit_generator.state
    assert state["bit_generator"] == raw["bit_generator"] == "PCG64"
    for key in ("state", "inc"):
        words = state["state"][key]
        assert words.dtype == np.uint64 and words.shape == (2,)
        assert (int(words[0]) << 64) | int(words[1]) == raw["state"][key]


def test_older_checkpoints_with_plain_integers_still_restore():
    """seg.train's earlier checkpoints kept the raw bit_generator state (Python ints) as JSON."""
    minidl.manual_seed(2)
    raw = mrandom.generator(np).bit_generator.state
    expected = minidl.randn(4).numpy()
    minidl.set_rng_state({"seed": 2, "numpy": raw})
    np.testing.assert_array_equal(minidl.randn(4).numpy(), expected)


@pytest.mark.parametrize("state, message", [
    ("seed=3", "needs the dict returned by minidl.get_rng_state"),
    ({"seed": 1}, "with a 'numpy' entry"),
    ({"seed": -1, "numpy": {"bit_generator": "PCG64"}}, "must be a non-negative integer or None"),
    ({"seed": 1, "numpy": {"bit_generator": "MT19937", "state": {}}}, "for a 'MT19937' generator"),
    ({"seed": 1, "numpy": {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                           "state": {"state": np.zeros(3, np.uint64), "inc": np.zeros(2, np.uint64)}}},
     "must be 2 uint64 words"),
])
def test_bad_states_are_refused_with_one_sentence(state, message):
    with pytest.raises(ValueError, match=message):
        minidl.set_rng_state(state)


# ----------------------------------------------------------------------------- the CuPy part

class _StandInRandomState:
    """cupy.random.RandomState's sampling methods over NumPy (the stream's position is hidden,
    as cuRAND's is)."""

    def __init__(self, seed=None):
        self._rs = np.random.RandomState(None if seed is None else int(seed) % 2**32)

    def random_sample(self, size=None, dtype=float):
        return self._rs.random_sample(size).astype(dtype)

    def standard_normal(self, size=None, dtype=float):
        return self._rs.standard_normal(size).astype(dtype)


@pytest.fixture
def standin_cupy(monkeypatch):
    """A module named "cupy" in sys.modules, and minidl.random's module state saved/restored."""
    cp = types.ModuleType("cupy")
    cp.random = types.SimpleNamespace(RandomState=_StandInRandomState)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    for name, value in (("_generators", {}), ("_seed", None), ("_cupy_seed", None), ("_cupy_drawn", False),
                        ("_philox", {}), ("_philox_key", None)):
        monkeypatch.setattr(mrandom, name, value)
    return cp


def test_cupy_state_restores_the_gpu_stream(standin_cupy, tmp_path):
    cp = standin_cupy
    minidl.manual_seed(4)
    mrandom.uniform(cp, (5,))                       # GPU numbers drawn: the position is unknown
    state = minidl.get_rng_state()
    assert set(state["cupy"]) == {"seed"} and isinstance(state["cupy"]["seed"], int)
    assert minidl.get_rng_state()["cupy"] == state["cupy"]   # no draw in between: same state
    expected = [mrandom.uniform(cp, (6,)), mrandom.normal(cp, (3,))]
    minidl.save({"rng": state}, tmp_path / "rng.npz")
    mrandom.uniform(cp, (9,))
    minidl.set_rng_state(minidl.load(tmp_path / "rng.npz")["rng"])
    _assert_same([mrandom.uniform(cp, (6,)), mrandom.normal(cp, (3,))], expected)


def test_cupy_reseeding_is_the_same_in_every_seeded_run(standin_cupy):
    def run():
        minidl.manual_seed(11)
        seeds = []
        for _ in range(3):
            mrandom.uniform(standin_cupy, (4,))
            seeds.append(minidl.get_rng_state()["cupy"]["seed"])
        return seeds, mrandom.uniform(standin_cupy, (4,))

    (seeds_a, after_a), (seeds_b, after_b) = run(), run()
    assert seeds_a == seeds_b and len(set(seeds_a)) == 3
    np.testing.assert_array_equal(after_a, after_b)


def test_a_state_without_a_cupy_part_restarts_the_gpu_stream_from_the_seed(standin_cupy):
    minidl.manual_seed(8)
    fresh = mrandom.uniform(standin_cupy, (5,))
    mrandom.uniform(standin_cupy, (5,))
    state = minidl.get_rng_state()
    del state["cupy"]                          # e.g. saved by a run that never loaded CuPy
    minidl.set_rng_state(state)
    np.testing.assert_array_equal(mrandom.uniform(standin_cupy, (5,)), fresh)

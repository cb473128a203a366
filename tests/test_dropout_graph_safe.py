"""Dropout on every device, and graph-safe on the GPU: masks from a Philox stream whose
(seed, offset) lives in a device array (minidl.random.philox_state), so a CUDA graph of a
step with dropout draws new masks on every replay. The CPU keeps NumPy's generator."""
import numpy as np
import pytest

import kernels.reference as ref
import minidl
import minidl.random as mrandom
from minidl import backend, cuda, nn, optim
from minidl import functional as F
from conftest import GPU_PRESENT, to_numpy
from hypothesis import given, strategies as st
from strategies import values

GPU_ONLY = pytest.mark.skipif(not GPU_PRESENT, reason="draws on the GPU: needs CuPy and a "
                              "device, or the host emulation (-p fake_cupy)")


def ones(shape, device, dtype=np.float32):
    return minidl.tensor(np.ones(shape, dtype), device=device)


def test_keep_fraction_scale_and_fresh_masks(device):
    minidl.manual_seed(0)
    x = ones((64, 100), device)
    first = to_numpy(F.dropout(x, p=0.3).data)
    second = to_numpy(F.dropout(x, p=0.3).data)
    for y in (first, second):
        assert set(np.unique(y).tolist()) <= {0.0, np.float32(1 / 0.7)}
        assert abs((y > 0).mean() - 0.7) < 0.03
        assert abs(y.mean() - 1.0) < 0.05          # inverted dropout keeps the expectation
    assert not np.array_equal(first, second)        # consecutive calls: new masks


def test_reseeding_repeats_the_masks(device):
    def masks():
        minidl.manual_seed(42)
        return [to_numpy(F.dropout(ones((5, 7), device), 0.5).data),
                to_numpy(F.dropout2d(ones((2, 6, 3, 3), device), 0.5).data)]
    a, b = masks(), masks()
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    minidl.manual_seed(43)
    assert not np.array_equal(to_numpy(F.dropout(ones((5, 7), device), 0.5).data), a[0])


def test_dropout2d_drops_whole_channels(device):
    minidl.manual_seed(1)
    y = to_numpy(F.dropout2d(ones((8, 16, 3, 5), device), 0.5).data)
    planes = y.reshape(8 * 16, -1)
    assert all(len(set(p.tolist())) == 1 for p in planes)
    kept = (planes[:, 0] > 0).mean()
    assert 0.3 < kept < 0.7 and set(np.unique(y).tolist()) == {0.0, 2.0}


def test_cpu_masks_are_numpys_as_before():
    # The CPU path draws exactly what it drew before the GPU got Philox.
    minidl.manual_seed(9)
    y = F.dropout(ones((4, 6), "cpu"), 0.25).data
    expected = (np.random.default_rng(9).random((4, 6), dtype=np.float32)
                >= np.float32(0.25)) * np.float32(1 / 0.75)
    np.testing.assert_array_equal(y, expected)


@given(seed=st.integers(0, 2 ** 31))
def test_dropout_gradcheck_on_every_device(device, seed):
    x = minidl.tensor(values(seed, (3, 4)), device=device, requires_grad=True)

    def fn(x):
        minidl.manual_seed(seed)               # the same masks on every evaluation
        return F.dropout(x, 0.4) + F.dropout2d(x.reshape(1, 3, 2, 2), 0.4).reshape(3, 4)
    assert minidl.gradcheck(fn, [x])


@GPU_ONLY
def test_gpu_masks_are_philox_at_the_seed_and_the_offset_moves_on_the_device():
    minidl.manual_seed(7)
    y = F.dropout(ones((3, 10), "gpu"), 0.4).data
    np.testing.assert_array_equal(to_numpy(y), ref.dropout_mask(7, 0, (3, 10), 0.4, np.float32))
    state = mrandom.philox_state(backend.require_cupy())
    assert to_numpy(state).tolist() == [7, ref.philox_blocks(30)]
    z = F.dropout2d(ones((2, 3, 4, 4), "gpu", np.float64), 0.5).data
    assert z.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(z)[:, :, 0, 0],
                                  ref.dropout_mask(7, 8, (2, 3), 0.5, np.float64).reshape(2, 3))
    assert to_numpy(state).tolist() == [7, 8 + 2]


@GPU_ONLY
def test_rng_state_holds_the_philox_offset(tmp_path):
    minidl.manual_seed(5)
    F.dropout(ones((10, 10), "gpu"), 0.5)
    state = minidl.get_rng_state()
    assert state["philox"] == {"seed": 5, "offset": 25}
    minidl.save({"rng": state}, tmp_path / "rng.npz")
    expected = to_numpy(F.dropout(ones((6, 6), "gpu"), 0.5).data)
    minidl.manual_seed(1)
    F.dropout(ones((6, 6), "gpu"), 0.5)
    minidl.set_rng_state(minidl.load(tmp_path / "rng.npz")["rng"])
    np.testing.assert_array_equal(to_numpy(F.dropout(ones((6, 6), "gpu"), 0.5).data), expected)
    # A state saved without the GPU stream restarts it from the seed, as manual_seed does.
    del state["philox"]
    minidl.set_rng_state(state)
    np.testing.assert_array_equal(to_numpy(F.dropout(ones((10, 10), "gpu"), 0.5).data),
                                  ref.dropout_mask(5, 0, (10, 10), 0.5, np.float32))


@GPU_ONLY
def test_a_restored_offset_reaches_a_stream_made_after_the_restore(monkeypatch):
    """A resumed run restores the RNG state before its first GPU dropout, i.e. before its
    process has a Philox stream: the stream made then starts at the restored offset (it
    once started at 0, so a killed-and-resumed run drew other masks than an unbroken one)."""
    minidl.manual_seed(5)
    state = dict(minidl.get_rng_state(), philox={"seed": 5, "offset": 40})
    monkeypatch.setattr(mrandom, "_philox", {})        # a fresh process: no stream yet
    minidl.set_rng_state(state)
    assert minidl.get_rng_state()["philox"] == {"seed": 5, "offset": 40}
    np.testing.assert_array_equal(to_numpy(F.dropout(ones((10, 10), "gpu"), 0.5).data),
                                  ref.dropout_mask(5, 40, (10, 10), 0.5, np.float32))


def test_a_bad_philox_entry_is_refused_and_changes_nothing():
    minidl.manual_seed(2)
    state = minidl.get_rng_state()
    minidl.manual_seed(0)
    expected = minidl.rand(3).data
    minidl.manual_seed(0)
    for bad, message in [({"seed": -1, "offset": 0}, r"seed and offset .* in \[0, 2\^63\)"),
                         ({"seed": 1}, "a dict with 'seed' and 'offset'")]:
        with pytest.raises(ValueError, match=message):
            minidl.set_rng_state(dict(state, philox=bad))
    np.testing.assert_array_equal(minidl.rand(3).data, expected)     # still seed 0's stream


# ------------------------------------------------------------------------ in a CUDA graph
def _net():
    minidl.manual_seed(5)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 3, 1), nn.Dropout2d(0.3)).to("gpu")


def _batches(n):
    rng = np.random.default_rng(0)
    return [(minidl.tensor(rng.normal(size=(2, 2, 6, 6)).astype(np.float32), device="gpu"),
             minidl.tensor(rng.integers(0, 3, size=(2, 6, 6)), device="gpu")) for _ in range(n)]


def _step(model, opt):
    def step(x, y):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        return loss, out
    return step


@GPU_ONLY
def test_graphed_step_with_dropout_captures_and_draws_new_masks_per_replay():
    model = _net()
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = _batches(5)
    graphed = cuda.make_graphed_step(_step(model, opt), data[0], optimizer=opt, warmup=2)
    assert graphed.graphed and graphed.reason is None
    state = mrandom.philox_state(backend.require_cupy())
    per_step = ref.philox_blocks(2 * 4 * 6 * 6) + ref.philox_blocks(2 * 3)
    offsets = [int(to_numpy(state)[1])]
    assert offsets[0] == 2 * per_step                 # the warm-up steps; the capture drew none
    outputs = []
    for x, y in data[1:]:
        outputs.append(to_numpy(graphed(x, y)[1].data).copy())
        offsets.append(int(to_numpy(state)[1]))
    assert np.diff(offsets).tolist() == [per_step] * 4   # each replay moved the offset
    # The same batch replayed again: other masks, so another output.
    assert not np.array_equal(to_numpy(graphed(*data[4])[1].data), outputs[-1])
    # Each replay drew the masks an eager step would have drawn there: the same outputs.
    eager_model = _net()
    eager_step = _step(eager_model, optim.SGD(eager_model.parameters(), lr=0.05, momentum=0.9))
    eager = [to_numpy(eager_step(x, y)[1].data) for x, y in [data[0], data[0]] + data[1:]]
    for got, want in zip(outputs, eager[2:]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

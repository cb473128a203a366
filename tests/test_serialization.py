"""save / load: round trips, atomic writes, refusing pickled content, clear errors."""
import os

import numpy as np
import pytest

import minidl
from minidl import nn, optim, serialization
from conftest import to_numpy


def model():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip_gives_identical_outputs(tmp_path, device, suffix):
    minidl.manual_seed(0)
    net = model().to(device)
    x = minidl.randn(5, 3, device=device)
    path = tmp_path / ("net" + suffix)
    minidl.save(net.state_dict(), path)
    restored = model().to(device)
    restored.load_state_dict(minidl.load(path))
    assert np.array_equal(to_numpy(net(x).data), to_numpy(restored(x).data))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_nested_checkpoint_keeps_structure_types_and_order(tmp_path, suffix):
    net = model()
    opt = optim.Adam(net.parameters(), lr=0.01)
    net(minidl.randn(2, 3)).sum().backward()
    opt.step()
    ckpt = {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "best": 0.25,
            "name": "unet", "done": False, "note": None, "sizes": [1, (2, 3)], "empty": {},
            "scalar_array": np.float32(1.5)}
    path = tmp_path / ("ckpt" + suffix)
    minidl.save(ckpt, path)
    back = minidl.load(path)
    assert list(back) == list(ckpt)
    assert list(back["model"]) == list(ckpt["model"])
    assert back["epoch"] == 3 and type(back["epoch"]) is int
    assert back["best"] == 0.25 and back["name"] == "unet" and back["done"] is False
    assert back["note"] is None and back["sizes"] == [1, (2, 3)] and back["empty"] == {}
    assert back["scalar_array"].dtype == np.float32
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(back["optimizer"]["state"]) == {0, 1, 2, 3}           # integer keys come back
    for key, value in ckpt["model"].items():
        assert back["model"][key].dtype == value.dtype and np.array_equal(back["model"][key], value)
    for i, state in ckpt["optimizer"]["state"].items():
        assert np.array_equal(back["optimizer"]["state"][i]["exp_avg"], state["exp_avg"])


def test_failure_mid_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    minidl.save({"w": np.arange(5.0), "epoch": 1}, path)
    before = path.read_bytes()
    calls = []
    real_write = serialization._write_member

    def failing_write(archive, name, array):
        calls.append(name)
        if len(calls) == 2:          # the first array is already in the temporary file
            raise OSError("disk full")
        real_write(archive, name, array)

    monkeypatch.setattr(serialization, "_write_member", failing_write)
    with pytest.raises(OSError, match="disk full"):
        minidl.save({"w": np.zeros(1000), "b": np.ones(3), "epoch": 2}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]                # no temporary file left behind
    assert minidl.load(path)["epoch"] == 1


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, weights=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ValueError, match="refusing to load .*object arrays"):
        minidl.load(path)
    with pytest.raises(TypeError, match="object array"):
        minidl.save({"bad": np.array([1, "a", None], dtype=object)}, tmp_path / "x.npz")


def test_missing_and_damaged_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        minidl.load(missing)
    good = tmp_path / "good.npz"
    minidl.save({"w": np.ones(100)}, good)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="damaged.npz.*damaged"):
        minidl.load(damaged)
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    with pytest.raises(ValueError, match="single array"):
        minidl.load(single)


def test_bad_inputs_to_save(tmp_path):
    with pytest.raises(TypeError, match="needs a dict"):
        minidl.save([1, 2], tmp_path / "a.npz")
    with pytest.raises(ValueError, match="must not contain '/'"):
        minidl.save({"a/b": np.ones(1)}, tmp_path / "a.npz")
    with pytest.raises(TypeError, match="cannot store 'f'"):
        minidl.save({"f": object()}, tmp_path / "a.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        minidl.save({"a": 1}, tmp_path / "missing_dir" / "a.npz")


def test_plain_npz_files_load_as_nested_dicts(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, **{"encoder/w": np.ones(2), "bias": np.zeros(1)})
    back = minidl.load(path)
    assert np.array_equal(back["encoder"]["w"], np.ones(2)) and np.array_equal(back["bias"], [0.0])


# ----------------------------------------------------------------------------- .safetensors
def test_safetensors_file_is_readable_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file
    net = model()
    path = tmp_path / "net.safetensors"
    minidl.save({"model": net.state_dict(), "epoch": 4, "name": "mlp"}, path)
    tensors = load_file(str(path))
    assert set(tensors) == {f"model/{k}" for k in net.state_dict()}   # numbers live in metadata
    np.testing.assert_array_equal(tensors["model/0.weight"], net.state_dict()["0.weight"])
    back = minidl.load(path)
    assert back["epoch"] == 4 and back["name"] == "mlp"


def test_foreign_safetensors_file_loads_flat(tmp_path):
    from safetensors.numpy import save_file
    # As torch's safetensors.torch.save_file(model.state_dict()) writes it: dotted names,
    # no minidl layout in the metadata.
    arrays = {"features.0.weight": np.ones((4, 3, 3, 3), np.float32),
              "features.0.bias": np.zeros(4, np.float32),
              "bn.num_batches_tracked": np.array(7, np.int64)}
    path = tmp_path / "w.safetensors"
    save_file(arrays, str(path), metadata={"format": "pt"})
    back = minidl.load(path)
    assert set(back) == set(arrays)
    assert back["bn.num_batches_tracked"] == 7 and back["features.0.weight"].dtype == np.float32
    assert set(serialization.read_arrays(path)) == set(arrays)


def test_safetensors_keeps_what_a_training_checkpoint_holds(tmp_path):
    from seg.train import save_checkpoint
    net = model()
    opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(minidl.randn(2, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt.npz", net, opt, meta={"epoch": 2, "config": {"model": "mlp"}})
    state = minidl.load(tmp_path / "ckpt.npz")
    state["labels"] = np.array([["cat", "dog"], ["ant", "bee"]])      # text arrays as well
    minidl.save(state, tmp_path / "ckpt.safetensors")
    back = minidl.load(tmp_path / "ckpt.safetensors")

    def same(a, b):
        if isinstance(a, dict):
            return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        return type(a) is type(b) and a == b
    assert same(state, back)


def test_safetensors_errors_name_the_problem(tmp_path):
    with pytest.raises(TypeError, match="holds arrays of numbers, booleans and text only"):
        minidl.save({"raw": np.array([b"\x00\x01"])}, tmp_path / "a.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="damaged or not a .safetensors file"):
        minidl.load(damaged)
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "a.safetensors").exists()


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "w.safetensors"
    minidl.save({"w": np.arange(3.0)}, path)
    before = path.read_bytes()

    def half_then_fail(f):
        f.write(b"partial")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        serialization.write_atomically(str(path), half_then_fail)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]

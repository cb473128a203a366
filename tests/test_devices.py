"""Device handling that can be checked without a GPU.

* normalize_device's spelling rules;
* without CuPy, every way of asking for the GPU fails with one sentence saying how to install
  it (CuPy hidden with sys.modules["cupy"] = None, and the loader's cache in kernels/cuda.py
  reset), the dense CRF included;
* `import minidl` / `import kernels.gpu` never import CuPy and work without it;
* with a *fake* CuPy (a module named cupy whose arrays keep NumPy storage but whose type lives
  in a module called "cupy", which is how minidl.backend recognises device arrays), tensors
  move to "gpu" and back, and an op given a "cpu" and a "gpu" tensor refuses with an error
  naming both devices.
"""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import kernels
import kernels.cuda
import kernels.gpu
import minidl
from minidl import backend
from minidl import functional as F


# ---------------------------------------------------------------------------- helpers
class FakeGpuArray:
    """Stands in for cupy.ndarray: NumPy storage, but `type(a).__module__` starts with "cupy".

    It deliberately has no __array__ method, so code that hands it to NumPy by accident
    fails loudly instead of quietly computing on the host.
    """
    __module__ = "cupy._core.core"

    def __init__(self, array):
        self._a = np.asarray(array)

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)

    def get(self):
        return self._a.copy()

    def astype(self, dtype, copy=True):
        return FakeGpuArray(self._a.astype(dtype, copy=copy))


def _fake_cupy(device_count=1):
    cp = types.ModuleType("cupy")
    cp.ndarray = FakeGpuArray

    def asarray(a, dtype=None):
        if isinstance(a, FakeGpuArray):
            a = a._a
        return FakeGpuArray(np.asarray(a, dtype=dtype))

    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    cp.asarray = asarray
    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    return cp


@pytest.fixture
def fake_cupy(monkeypatch):
    """Install a fake CuPy reporting one device, as if `import cupy` had worked."""
    cp = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(kernels.cuda, "_cupy", cp)
    monkeypatch.setattr(kernels.cuda, "_cupy_error", None)
    return cp


@pytest.fixture
def no_cupy(monkeypatch):
    """Make `import cupy` fail (as on a machine without it) and forget any cached import."""
    monkeypatch.setitem(sys.modules, "cupy", None)   # None in sys.modules: import raises ImportError
    monkeypatch.setattr(kernels.cuda, "_cupy", None)
    monkeypatch.setattr(kernels.cuda, "_cupy_error", None)


def _one_sentence(message):
    """The error text is one sentence: one line, ending with a full stop."""
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    assert message.rstrip().endswith("."), f"error message is not a finished sentence: {message!r}"


# ---------------------------------------------------------------------------- normalize_device
@pytest.mark.parametrize("given, expected", [
    (None, "cpu"), ("cpu", "cpu"), ("CPU", "cpu"), ("gpu", "gpu"), ("GPU", "gpu"),
    ("cuda", "gpu"), ("cuda:0", "gpu"), ("CUDA:1", "gpu"),
])
def test_normalize_device_spellings(given, expected):
    assert backend.normalize_device(given) == expected


@pytest.mark.parametrize("bad", ["tpu", "mps", "", "gpu0", "cud"])
def test_normalize_device_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match=r"unknown device .*use 'cpu' or 'gpu'") as err:
        backend.normalize_device(bad)
    _one_sentence(str(err.value))


def test_cpu_arrays_are_on_the_cpu():
    a = np.zeros(3)
    assert backend.device_of(a) == "cpu"
    assert backend.get_array_module(a) is np
    assert backend.array_module("cpu") is np
    assert backend.to_device(a, "cpu") is a
    assert kernels.for_array(a).__name__ == "kernels.cpu"


# ---------------------------------------------------------------------------- without CuPy
def test_require_cupy_without_cupy_says_how_to_install(no_cupy):
    assert backend.gpu_available() is False
    with pytest.raises(RuntimeError, match=r"needs CuPy.*pip install") as err:
        backend.require_cupy()
    _one_sentence(str(err.value))
    assert "gpu" in str(err.value) and "cpu" in str(err.value)


@pytest.mark.parametrize("how", ["Tensor.to", "tensor(device=)", "zeros(device=)", "array_module",
                                 "Module.to", "kernels.gpu", "CRF lattice", "DenseCRF"])
def test_every_way_to_the_gpu_without_cupy_gives_the_install_message(no_cupy, how):
    from seg.crf import DenseCRF
    t = minidl.tensor([1.0, 2.0])
    calls = {
        "Tensor.to": lambda: t.to("gpu"),
        "tensor(device=)": lambda: minidl.tensor([1.0], device="cuda"),
        "zeros(device=)": lambda: minidl.zeros(2, 3, device="gpu"),
        "array_module": lambda: backend.array_module("gpu"),
        "Module.to": lambda: minidl.nn.Conv2d(1, 2, 3).to("gpu"),
        "kernels.gpu": lambda: kernels.gpu.im2col(np.zeros((1, 1, 3, 3), np.float32),
                                                  1, 1, 1, 1, 0, 0, 1, 1, 3, 3),
        "CRF lattice": lambda: kernels.gpu.PermutohedralLattice(np.zeros((4, 2))),
        "DenseCRF": lambda: DenseCRF(3, 2, 2, device="gpu"),
    }
    with pytest.raises(RuntimeError, match=r"needs CuPy.*pip install") as err:
        calls[how]()
    _one_sentence(str(err.value))


def test_cupy_without_a_device_says_so(monkeypatch):
    cp = _fake_cupy(device_count=0)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(kernels.cuda, "_cupy", cp)
    monkeypatch.setattr(kernels.cuda, "_cupy_error", None)
    assert backend.gpu_available() is False
    with pytest.raises(RuntimeError, match=r"needs a CUDA device.*run with device 'cpu'") as err:
        minidl.tensor([1.0]).to("gpu")
    _one_sentence(str(err.value))


def test_cupy_whose_driver_fails_says_so(monkeypatch):
    cp = _fake_cupy(device_count=RuntimeError("cudaErrorInsufficientDriver: CUDA driver version "
                                              "is insufficient"))
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(kernels.cuda, "_cupy", cp)
    monkeypatch.setattr(kernels.cuda, "_cupy_error", None)
    assert backend.gpu_available() is False
    with pytest.raises(RuntimeError, match=r"needs a CUDA device.*InsufficientDriver"):
        backend.require_cupy()


def test_imports_do_not_need_or_load_cupy():
    """A fresh interpreter with CuPy unimportable can import minidl and every kernel bundle,
    and importing them does not pull in CuPy where it is installed either."""
    code = (
        "import sys\n"
        "sys.modules['cupy'] = None\n"
        "import minidl, kernels, kernels.gpu, kernels.reference\n"
        "from minidl import backend\n"
        "assert not backend.gpu_available()\n"
        "del sys.modules['cupy']\n"
        "import importlib\n"
        "for name in ('minidl', 'kernels.gpu'):\n"
        "    importlib.reload(importlib.import_module(name))\n"
        "assert 'cupy' not in sys.modules, 'importing minidl / kernels.gpu imported cupy'\n"
        "print('ok')\n"
    )
    # Without tests/fake_site (the GPU check's dry run puts it on PYTHONPATH to install the
    # fake CuPy in every process, which is what this test must not see).
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.basename(os.path.normpath(p)) != "fake_site"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ---------------------------------------------------------------------------- with a fake CuPy
def test_tensor_moves_to_fake_gpu_and_back(fake_cupy):
    t = minidl.tensor([[1.0, 2.0], [3.0, 4.0]])
    g = t.to("gpu")
    assert g.device == "gpu" and isinstance(g.data, FakeGpuArray)
    assert g.dtype == np.float32
    assert backend.get_array_module(g.data) is fake_cupy
    assert kernels.for_array(g.data) is kernels.gpu
    back = g.to("cpu")
    assert back.device == "cpu" and isinstance(back.data, np.ndarray)
    np.testing.assert_array_equal(back.numpy(), t.numpy())
    np.testing.assert_array_equal(g.numpy(), t.numpy())   # numpy() copies from the device
    assert minidl.tensor([1.0], device="cuda:0").device == "gpu"


@pytest.mark.parametrize("op", ["add", "radd", "sub", "mul", "div", "matmul", "maximum", "cat",
                                "stack", "where", "conv2d", "linear", "mse_loss"])
def test_mixing_cpu_and_gpu_tensors_names_both_devices(fake_cupy, op):
    a = minidl.tensor(np.ones((1, 1, 3, 3), np.float32))
    b = minidl.tensor(np.ones((1, 1, 3, 3), np.float32)).to("gpu")
    a2, b2 = a.reshape(3, 3), minidl.tensor(np.ones((3, 3), np.float32)).to("gpu")
    calls = {
        "add": lambda: a + b, "radd": lambda: b + a, "sub": lambda: a - b, "mul": lambda: b * a,
        "div": lambda: a / b, "matmul": lambda: a2 @ b2, "maximum": lambda: minidl.maximum(a, b),
        "cat": lambda: minidl.cat([a, b], axis=1), "stack": lambda: minidl.stack([b, a]),
        "where": lambda: minidl.where(np.ones((1, 1, 3, 3), bool), a, b),
        "conv2d": lambda: F.conv2d(a, b),
        "linear": lambda: F.linear(a2, b2),
        "mse_loss": lambda: F.mse_loss(a, b),
    }
    with pytest.raises(RuntimeError, match=r"two devices, 'cpu' and 'gpu'.*\.to\(") as err:
        calls[op]()
    _one_sentence(str(err.value))


def test_backward_seed_gradient_follows_the_tensor_device(fake_cupy):
    # grad= given as a host array for a "gpu" tensor is moved to the tensor's device.
    x = minidl.tensor([1.0, 2.0], requires_grad=True)
    g = x.to("gpu")
    assert g.requires_grad and g.device == "gpu"
    # backward through ToDevice: the gradient arrives on the host as a NumPy array.
    g.backward(FakeGpuArray(np.array([3.0, 4.0], np.float32)))
    assert isinstance(x.grad, np.ndarray)
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])


def test_random_generator_is_per_device(fake_cupy, monkeypatch):
    # minidl.random asks the array module for its generator: numpy gets numpy's, and a
    # module named "cupy" gets cupy.random.RandomState seeded with the manual seed.
    from minidl import random as mrandom
    seeds = []
    fake_cupy.random = types.SimpleNamespace(RandomState=lambda seed: seeds.append(seed) or "rs")
    monkeypatch.setattr(mrandom, "_generators", {})
    monkeypatch.setattr(mrandom, "_seed", mrandom._seed)
    monkeypatch.setattr(mrandom, "_philox", {})    # earlier tests' GPU dropout streams
    monkeypatch.setattr(mrandom, "_philox_key", mrandom._philox_key)
    mrandom.manual_seed(123)
    assert mrandom.generator(fake_cupy) == "rs" and seeds[-1] == 123

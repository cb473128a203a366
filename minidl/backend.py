"""The backend seam: the one place that decides between NumPy (device "cpu") and CuPy ("gpu").

Every other module asks this one for the array module that matches its arrays
(`get_array_module(x)`), so an op written once with `xp.` runs on both devices.
CuPy is imported lazily (kernels/cuda.py): a CPU-only machine never needs it.
"""
import numpy

# The CuPy loader lives at the bottom of the layers (kernels < minidl < seg), where the GPU
# kernels need it too; it is re-exported here so that `backend.require_cupy()` reads naturally.
from kernels.cuda import gpu_available, load_cupy, require_cupy  # noqa: F401

from . import device_checks

DEVICES = ("cpu", "gpu")


def normalize_device(device):
    """Accept "cpu", "gpu" (and the PyTorch spelling "cuda"); None means "cpu"."""
    if device is None:
        return "cpu"
    device = str(device).lower()
    if device == "cuda" or device.startswith("cuda:"):
        device = "gpu"
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'gpu'.")
    return device


def array_module(device):
    """numpy for "cpu", cupy for "gpu"."""
    return numpy if normalize_device(device) == "cpu" else require_cupy()


def is_gpu_array(a):
    # Checked by type name first so that a CPU-only run never imports CuPy.
    return type(a).__module__.startswith("cupy")


def get_array_module(*arrays):
    """numpy or cupy, whichever the given arrays live on (numpy when none are device arrays)."""
    for a in arrays:
        if is_gpu_array(a):
            return load_cupy()
    return numpy


def device_of(a):
    return "gpu" if is_gpu_array(a) else "cpu"


def to_device(a, device):
    """Move (or keep) an array on `device`; a no-op when it is already there."""
    device = normalize_device(device)
    if device == "cpu":
        return to_numpy(a)
    cp = require_cupy()
    return a if is_gpu_array(a) else cp.asarray(a)


def is_out_of_memory(exc):
    """Whether `exc` says the GPU ran out of memory (CuPy's pool, cuBLAS or the CUDA runtime).

    Checked by type name and message, so that a CPU-only run never imports CuPy.
    """
    kind = type(exc)
    if kind.__name__ == "OutOfMemoryError" and kind.__module__.startswith("cupy"):
        return True
    text = str(exc)
    return kind.__module__.startswith("cupy") and (
        "out of memory" in text.lower() or "ALLOC_FAILED" in text
        or "cudaErrorMemoryAllocation" in text)


def to_numpy(a):
    """A numpy.ndarray holding `a`'s values (copied from the GPU when needed)."""
    if is_gpu_array(a):
        device_checks.check()       # a host read anyway: read the deferred checks with it
        return a.get()
    return numpy.asarray(a)


def gpu_peak_memory(fn):
    """Run fn() once on the GPU and return (result, peak bytes in use in CuPy's memory pool).

    The peak is sampled after every allocation by a CuPy memory hook, so it is the real
    high-water mark of one call (benchmarks use it; the pool's total also counts cached blocks).
    """
    cp = require_cupy()
    pool = cp.get_default_memory_pool()

    class PeakHook(cp.cuda.MemoryHook):
        name = "minidl_peak"

        def __init__(self):
            self.peak = pool.used_bytes()

        def malloc_postprocess(self, **kwargs):
            self.peak = max(self.peak, pool.used_bytes())

    hook = PeakHook()
    with hook:
        result = fn()
    cp.cuda.Stream.null.synchronize()
    return result, hook.peak

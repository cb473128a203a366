"""The backend seam: the one place that decides between NumPy (device "cpu") and CuPy ("gpu").

Every other module asks this one for the array module that matches its arrays
(`get_array_module(x)`), so an op written once with `xp.` runs on both devices.
CuPy is imported lazily: a CPU-only machine never needs it.
"""
import numpy

DEVICES = ("cpu", "gpu")
_cupy = None
_cupy_error = None


def _load_cupy():
    """Import CuPy once; remember why it failed so the error can say so."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy
            _cupy = cupy
        except Exception as exc:  # ImportError, or a CUDA library that will not load
            _cupy_error = exc
    return _cupy


def gpu_available():
    """True when CuPy imports and at least one CUDA device is visible."""
    cp = _load_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def require_cupy():
    """Return the cupy module, or raise one clear sentence saying how to get it."""
    cp = _load_cupy()
    if cp is None:
        raise RuntimeError(
            "device 'gpu' needs CuPy, which could not be imported "
            f"({type(_cupy_error).__name__}: {_cupy_error}); install it with "
            "`pip install -e \".[gpu]\"` (cupy-cuda12x; use cupy-cuda13x for CUDA 13) "
            "or run with device 'cpu'.")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise RuntimeError(f"device 'gpu' needs a CUDA device, but CuPy found none ({exc}); "
                           "run with device 'cpu' or on a machine with an NVIDIA GPU.") from None
    if count == 0:
        raise RuntimeError("device 'gpu' needs a CUDA device, but CuPy found none; "
                           "run with device 'cpu' or on a machine with an NVIDIA GPU.")
    return cp


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
            return _load_cupy()
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

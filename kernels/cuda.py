"""The CuPy loader: the one place that imports CuPy, at the bottom of the layers.

kernels < minidl < seg: the GPU kernels (kernels/gpu.py, kernels/permutohedral_gpu.py) need
CuPy, and so does minidl.backend, which re-exports `gpu_available` and `require_cupy` from
here. CuPy is imported on first use, so a CPU-only machine never needs it.
"""
_cupy = None        # the cupy module once imported
_cupy_error = None  # why `import cupy` failed, kept so that every later error can say so


def load_cupy():
    """Import CuPy once and return it, or None when it cannot be imported (the reason is kept)."""
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
    cp = load_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def require_cupy():
    """Return the cupy module, or raise RuntimeError with one sentence saying how to get it."""
    cp = load_cupy()
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

"""Float32 matmul precision, PyTorch's way: torch.set_float32_matmul_precision's two settings.

    minidl.set_float32_matmul_precision("high")     # GEMMs may use TF32 tensor cores
    minidl.get_float32_matmul_precision()           # -> "high"

"highest" (the default, as in PyTorch): every float32 GEMM is exact float32.
"high": every GEMM the engine issues on the GPU, 2-D and batched (conv's im2col products are
batched), may round its operands to TF32 (10-bit mantissa) on the tensor cores and accumulate
in float32. It is set as the cuBLAS math mode (CUBLAS_TF32_TENSOR_OP_MATH) of the current
device's cuBLAS handle, which every cuBLAS routine CuPy calls on that device reads; CuPy's own
CUPY_TF32 environment variable reaches only its 2-D matmul. The setting applies to the device
that is current when it is set (minidl uses one GPU).

On the CPU the setting is recorded and has no effect: NumPy/OpenBLAS have no TF32.
"""
from . import backend

_PRECISIONS = ("highest", "high")
_CUBLAS_DEFAULT_MATH = 0           # cublasMath_t values (cublas_api.h)
_CUBLAS_TF32_TENSOR_OP_MATH = 3
_precision = "highest"


def get_float32_matmul_precision():
    """The current setting: "highest" or "high"."""
    return _precision


def set_float32_matmul_precision(precision):
    """Let float32 GEMMs use TF32 tensor cores ("high") or keep them exact ("highest")."""
    global _precision
    if precision not in _PRECISIONS:
        raise ValueError(f"set_float32_matmul_precision: precision must be 'highest' or 'high', "
                         f"got {precision!r}.")
    _precision = precision
    if backend.gpu_available():
        set_cublas_math_mode(cublas_math_mode())


def cublas_math_mode():
    """The cublasMath_t value for the current setting."""
    return _CUBLAS_TF32_TENSOR_OP_MATH if _precision == "high" else _CUBLAS_DEFAULT_MATH


def set_cublas_math_mode(mode):
    """Set the math mode of the current device's cuBLAS handle (CuPy's, used by its matmul)."""
    cp = backend.require_cupy()
    from cupy_backends.cuda.libs import cublas
    cublas.setMathMode(cp.cuda.device.get_cublas_handle(), mode)


def get_cublas_math_mode():
    """The math mode of the current device's cuBLAS handle (for tests and the benchmark)."""
    cp = backend.require_cupy()
    from cupy_backends.cuda.libs import cublas
    return cublas.getMathMode(cp.cuda.device.get_cublas_handle())

"""minidl: a small deep-learning engine written from scratch on NumPy (CuPy on the GPU).

Start reading at tensor.py (the graph and backward), then function.py (how one op is
written), then ops/ (the ops), nn/ (layers) and optim/ (optimizers).
"""
import os as _os

# Thread policy, set here and nowhere else: OpenBLAS keeps its default (one thread per
# core) and the Numba kernels run on one thread, unless the environment says otherwise.
# Measured with examples/benchmark.py on the 2-core machine (docs/PERFORMANCE.md): BLAS on
# both cores makes the big U-Net's training step 25% faster than one thread, while a Numba
# thread team on top of it (im2col, pooling, ...) spins against the BLAS threads and makes a
# step 1.2-13x slower. Must run before Numba loads; an explicit NUMBA_NUM_THREADS wins
# (OPENBLAS_NUM_THREADS=1 is the safer choice on a machine crowded with other jobs).
_os.environ.setdefault("NUMBA_NUM_THREADS", "1")

# Memory policy, also process-wide: freed big arrays stay in the process for the next step
# instead of going back to the kernel (minidl/allocator.py says why and how to opt out).
from .allocator import keep_freed_memory as _keep_freed_memory  # noqa: E402
_keep_freed_memory()

from .backend import gpu_available  # noqa: E402
from .grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from .tensor import Tensor, tensor
from .function import Function
from .dtypes import (double, float16, float32, float64, half, int8, int16, int32,  # noqa: E402
                     int64, long, uint8)
from .ops.shape import cat, chunk, gather, permute, split, stack, transpose
from .ops.arithmetic import abs, clip, matmul, maximum, minimum, pow, where, exp, log, sqrt  # noqa: A004
from .ops.arithmetic import clip as clamp
from .ops.reduction import amax, amin, argmax, argmin, max, mean, min, norm, std, sum, var  # noqa: A004
from .ops.activation import relu, sigmoid, softmax, log_softmax, tanh
from .creation import (arange, as_tensor, empty, from_numpy, full, full_like, linspace, ones,
                       ones_like, rand, rand_like, randint, randn, randn_like, zeros, zeros_like)
from .random import get_rng_state, manual_seed, set_rng_state
from .serialization import load, save
from .gradcheck import gradcheck
from .precision import get_float32_matmul_precision, set_float32_matmul_precision
from . import amp, backends, dtypes, cuda, distributed, functional, nn, onnx, optim, random
from .receptive_field import receptive_field  # noqa: E402  (a function; shadows the module name)


def __getattr__(name):
    # minidl.bfloat16 is looked up on first use (see minidl/dtypes.py: ml_dtypes is slow to import).
    if name == "bfloat16":
        return dtypes.bfloat16
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

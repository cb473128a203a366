"""minidl: a small deep-learning engine written from scratch on NumPy (CuPy on the GPU).

Start reading at tensor.py (the graph and backward), then function.py (how one op is
written), then ops/ (the ops), nn/ (layers) and optim/ (optimizers).
"""
from .backend import gpu_available
from .grad_mode import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from .tensor import Tensor, tensor
from .function import Function
from .ops.shape import cat, stack
from .ops.arithmetic import matmul, maximum, minimum, where, exp, log, sqrt
from .ops.activation import relu, sigmoid, softmax, log_softmax, tanh
from .creation import (arange, empty, full, full_like, ones, ones_like, rand, rand_like, randint,
                       randn, randn_like, zeros, zeros_like)
from .random import manual_seed
from .serialization import load, save
from .gradcheck import gradcheck
from . import functional, nn, optim, random
from .receptive_field import receptive_field  # noqa: E402  (a function; shadows the module name)

"""Element-wise arithmetic and matrix product, each op's backward beside its forward.

Binary ops broadcast like NumPy; their backward sums the gradient back down to each
input's own shape (`sum_to_shape`).
"""
import numbers

import numpy

from .. import backend
from ..function import Function, sum_to_shape
from ..tensor import Tensor


def _lift(x, like):
    """A Python number next to a tensor becomes a NumPy scalar of the tensor's dtype,
    so float32 stays float32 (as `tensor * 2.0` does in PyTorch). A NumPy scalar works
    next to NumPy and CuPy arrays alike, so no device transfer is needed."""
    if isinstance(x, Tensor) or hasattr(x, "shape"):   # tensors, arrays, NumPy scalars
        return x
    ref = like.data if isinstance(like, Tensor) else like
    dtype = getattr(ref, "dtype", None)
    if dtype is not None and isinstance(x, (int, float)) and not isinstance(x, bool):
        if dtype.kind == "f" or (dtype.kind in "iu" and isinstance(x, int)):
            return dtype.type(x)
    return numpy.asarray(x)[()]


def _binary(cls, a, b):
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        a = Tensor(a)
    return cls.apply(_lift(a, b), _lift(b, a))


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):
        need_a, need_b = self.needs_input_grad
        return (sum_to_shape(gy, self.shapes[0]) if need_a else None,
                sum_to_shape(gy, self.shapes[1]) if need_b else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):
        need_a, need_b = self.needs_input_grad
        return (sum_to_shape(gy, self.shapes[0]) if need_a else None,
                sum_to_shape(-gy, self.shapes[1]) if need_b else None)


class Mul(Function):
    def forward(self, a, b):
        # Save only the factor whose partner needs a gradient.
        need_a, need_b = self.needs_input_grad or (False, False)
        self.a = a if need_b else None
        self.b = b if need_a else None
        self.shapes = a.shape, b.shape
        return a * b

    def backward(self, gy):
        ga = sum_to_shape(gy * self.b, self.shapes[0]) if self.b is not None else None
        gb = sum_to_shape(gy * self.a, self.shapes[1]) if self.a is not None else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        a, b = self.a, self.b
        need_a, need_b = self.needs_input_grad
        ga = sum_to_shape(gy / b, a.shape) if need_a else None
        gb = sum_to_shape(-gy * a / (b * b), b.shape) if need_b else None
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        return -gy


class PowScalar(Function):
    """a ** p for a constant exponent p."""
    def forward(self, a):
        self.a = a
        return a ** self.p

    def backward(self, gy):
        p = self.p
        return gy * p * self.a ** (p - 1)


class Pow(Function):
    """a ** b with both as tensors: d/db = a^b log a (defined for a > 0)."""
    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a ** b
        return self.y

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        a, b, y = self.a, self.b, self.y
        need_a, need_b = self.needs_input_grad
        ga = sum_to_shape(gy * b * a ** (b - 1), a.shape) if need_a else None
        gb = sum_to_shape(gy * y * xp.log(xp.where(a > 0, a, 1)), b.shape) if need_b else None
        return ga, gb


class MatMul(Function):
    """a @ b for operands with >= 2 dims (batched dims broadcast)."""
    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        a, b = self.a, self.b
        need_a, need_b = self.needs_input_grad
        ga = sum_to_shape(gy @ b.swapaxes(-1, -2), a.shape) if need_a else None
        gb = sum_to_shape(a.swapaxes(-1, -2) @ gy, b.shape) if need_b else None
        return ga, gb


class Exp(Function):
    def forward(self, a):
        self.y = backend.get_array_module(a).exp(a)
        return self.y

    def backward(self, gy):
        return gy * self.y


class Log(Function):
    def forward(self, a):
        self.a = a
        return backend.get_array_module(a).log(a)

    def backward(self, gy):
        return gy / self.a


class Sqrt(Function):
    def forward(self, a):
        self.y = backend.get_array_module(a).sqrt(a)
        return self.y

    def backward(self, gy):
        return gy / (2 * self.y)


class Abs(Function):
    def forward(self, a):
        xp = backend.get_array_module(a)
        self.sign = xp.sign(a)
        return xp.abs(a)

    def backward(self, gy):
        return gy * self.sign


class Clip(Function):
    """Clamp to [low, high]; the gradient passes only where the value was inside."""
    def forward(self, a):
        xp = backend.get_array_module(a)
        self.inside = xp.ones(a.shape, dtype=bool)
        if self.low is not None:
            self.inside &= a >= self.low
        if self.high is not None:
            self.inside &= a <= self.high
        return xp.clip(a, self.low, self.high)

    def backward(self, gy):
        return gy * self.inside


class Maximum(Function):
    """Element-wise maximum; ties send half the gradient to each side (as PyTorch)."""
    pick_max = True

    def forward(self, a, b):
        xp = backend.get_array_module(a, b)
        self.shapes = a.shape, b.shape
        first = (a > b) if self.pick_max else (a < b)
        self.share_a = first + 0.5 * (a == b)
        return xp.maximum(a, b) if self.pick_max else xp.minimum(a, b)

    def backward(self, gy):
        share_a = self.share_a.astype(gy.dtype)
        need_a, need_b = self.needs_input_grad
        return (sum_to_shape(gy * share_a, self.shapes[0]) if need_a else None,
                sum_to_shape(gy * (1 - share_a), self.shapes[1]) if need_b else None)


class Minimum(Maximum):
    pick_max = False


class Where(Function):
    """where(cond, a, b): cond is a constant boolean array."""
    def forward(self, a, b):
        xp = backend.get_array_module(self.cond, a, b)
        self.shapes = a.shape, b.shape
        return xp.where(self.cond, a, b)

    def backward(self, gy):
        zero = gy.dtype.type(0)
        xp = backend.get_array_module(gy)
        need_a, need_b = self.needs_input_grad
        return (sum_to_shape(xp.where(self.cond, gy, zero), self.shapes[0]) if need_a else None,
                sum_to_shape(xp.where(self.cond, zero, gy), self.shapes[1]) if need_b else None)


class Cast(Function):
    def forward(self, a):
        self.source = a.dtype
        return a.astype(self.dtype)

    def backward(self, gy):
        return gy.astype(self.source)


# ---------------------------------------------------------------------- public functions
def add(a, b): return _binary(Add, a, b)
def sub(a, b): return _binary(Sub, a, b)
def mul(a, b): return _binary(Mul, a, b)
def div(a, b): return _binary(Div, a, b)
def neg(a): return Neg.apply(a)
def exp(a): return Exp.apply(a)
def log(a): return Log.apply(a)
def sqrt(a): return Sqrt.apply(a)
def abs(a): return Abs.apply(a)  # noqa: A001 - mirrors torch.abs
def maximum(a, b): return _binary(Maximum, a, b)
def minimum(a, b): return _binary(Minimum, a, b)


def pow(a, b):  # noqa: A001 - mirrors torch.pow
    if isinstance(b, numbers.Number):
        return PowScalar.apply(a, p=b)
    return _binary(Pow, a, b)


def clip(a, min=None, max=None):  # noqa: A002 - torch.clamp's argument names
    if min is None and max is None:
        raise ValueError("clip() needs at least one of min and max.")
    return Clip.apply(a, low=min, high=max)


def where(condition, a, b):
    """Take a where condition is true, else b (condition: bool array or Tensor)."""
    cond = condition.data if isinstance(condition, Tensor) else condition
    a, b = _lift(a, b), _lift(b, a)
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        a = Tensor(a)
    return Where.apply(a, b, cond=cond)


def cast(a, dtype):
    return Cast.apply(a, dtype=numpy.dtype(dtype))


def matmul(a, b):
    """a @ b with NumPy's rules for 1-D operands (a vector is promoted, then squeezed)."""
    a = a if isinstance(a, Tensor) else Tensor(a)
    b = b if isinstance(b, Tensor) else Tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul() needs operands with at least one dimension; use * for scalars.")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul() shapes {a.shape} and {b.shape} do not fit: the last dimension "
                         "of the first must equal the second-to-last of the second.")
    if a.ndim == 1:
        return matmul(a.reshape(1, -1), b).reshape(*(b.shape[:-2] + b.shape[-1:]))
    if b.ndim == 1:
        return matmul(a, b.reshape(-1, 1)).reshape(*a.shape[:-1])
    return MatMul.apply(a, b)

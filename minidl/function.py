"""`Function`: one differentiable operation, forward and backward side by side.

A subclass implements

    forward(self, *arrays) -> array          # plain ndarrays in, ndarray out
    backward(self, gy)     -> grad or tuple  # one gradient per forward input (None allowed)

and saves on `self` only what backward needs. `MyOp.apply(x, w, stride=2)` builds the op
with its parameters, runs forward on the tensors' arrays and, when a gradient is wanted,
links the output tensor to the op so that `Tensor.backward()` can find it.
"""
import numpy

from . import backend
from .grad_mode import is_grad_enabled
from .tensor import Tensor

# While minidl.onnx.export records a forward pass it sets this to a callable that is told of
# every op run: recorder(op, inputs, output). None otherwise (one test per op).
recorder = None

# Set by minidl.amp.autocast while it is active: hook(cls, inputs, params) runs the op instead
# of apply, casting the inputs by the op's mixed-precision rule (the rules live in amp.py).
autocast_hook = None


class Function:
    freed = False
    parents = ()
    # needs_input_grad[i]: whether input i wants a gradient; forward can use it to skip
    # saving what a backward would need.
    needs_input_grad = ()

    def __init__(self, **params):
        self.__dict__.update(params)

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **params):
        if autocast_hook is not None:
            return autocast_hook(cls, inputs, params)
        return cls(**params)(*inputs)

    def __call__(self, *inputs):
        # This runs once per op, so it is written for speed (plain loops, no generators): the
        # device check only when there are several inputs, the graph bookkeeping only when
        # a gradient is wanted.
        grad_on = is_grad_enabled()
        arrays, needs, any_need = [], [], False
        for x in inputs:
            if isinstance(x, Tensor):
                arrays.append(x.data)
                need = grad_on and x.requires_grad
                any_need = any_need or need
            else:
                arrays.append(x)
                need = False
            needs.append(need)
        if len(arrays) > 1:
            _check_one_device(self, arrays)
        if any_need:
            self.needs_input_grad = tuple(needs)
        out = Tensor._wrap(self.forward(*arrays))
        if any_need:
            # Parents: the leaf tensor itself (its .grad is filled), the node that made a
            # non-leaf tensor, or None for inputs that need no gradient.
            parents = []
            for x, need in zip(inputs, needs):
                parents.append(None if not need else x if x._node is None else x._node)
            self.parents = tuple(parents)
            out.requires_grad = True
            out._node = self
        if recorder is not None:
            recorder(self, inputs, out)
        return out

    def release(self):
        """Drop everything saved for backward; called after backward unless retain_graph."""
        self.__dict__.clear()
        self.freed = True

    def __repr__(self):
        return f"<{type(self).__name__}>"


def _check_one_device(op, arrays):
    """Refuse inputs that live on two devices (a NumPy scalar is fine next to either)."""
    on_cpu = on_gpu = False
    for a in arrays:
        if isinstance(a, numpy.ndarray):
            on_cpu = True
        elif backend.is_gpu_array(a):
            on_gpu = True
    if on_cpu and on_gpu:
        raise RuntimeError(f"{type(op).__name__} got inputs on two devices, 'cpu' and 'gpu'; "
                           "move them to one device with .to('cpu') or .to('gpu').")


def sum_to_shape(g, shape):
    """Undo broadcasting: sum gradient g down to `shape` (the input's shape before broadcasting)."""
    if g.shape == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(shape) if n == 1 and g.shape[i + extra] != 1)
    g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)

"""`Tensor`: an ndarray plus what reverse-mode autograd needs.

A tensor made by an operation remembers the operation (`_node`, a `Function`), and the
operation remembers its parents. `backward()` walks that graph once, in reverse topological
order, handing each node the gradient of its output and collecting the gradients of its
inputs. The graph holds *nodes*, not tensors, so an intermediate tensor's array is freed as
soon as nothing but the graph refers to it, unless its node saved it for backward.
"""
import numpy

from . import backend
from .grad_mode import is_grad_enabled


def _as_array(data, dtype=None, device=None):
    """Turn `data` (Tensor, ndarray, list, scalar) into a backend array.

    Python floats and lists become float32, as in PyTorch; existing arrays keep their dtype.
    """
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_gpu_array(data) or isinstance(data, numpy.ndarray):
        array = data
    elif isinstance(data, numpy.generic):   # a NumPy scalar keeps its dtype
        array = numpy.asarray(data)
    else:
        array = numpy.asarray(data)
        if dtype is None and array.dtype == numpy.float64:
            array = array.astype(numpy.float32)
    if dtype is not None and array.dtype != numpy.dtype(dtype):
        array = array.astype(dtype)
    if device is not None:
        array = backend.to_device(array, device)
    return array


class Tensor:
    """An n-dimensional array that can record the operations applied to it.

    data: the backend ndarray (numpy on "cpu", cupy on "gpu").
    grad: an ndarray of data's shape after backward() (None before).
    """
    __slots__ = ("data", "grad", "requires_grad", "_node", "_grad_hooks", "__weakref__")
    # Makes `ndarray + Tensor` call Tensor.__radd__ instead of broadcasting element-wise.
    __array_priority__ = 1000

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        self.data = _as_array(data, dtype, device)
        if requires_grad and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype "
                            f"{self.data.dtype}; convert it first, e.g. tensor(x, dtype='float32').")
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None

    @classmethod
    def _wrap(cls, array):
        """Fast path for ops: wrap an array that is already right (no conversion)."""
        t = object.__new__(cls)
        if isinstance(array, numpy.generic):
            array = numpy.asarray(array)
        t.data, t.grad, t.requires_grad, t._node = array, None, False, None
        return t

    # ------------------------------------------------------------------ properties
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._node is None)
    grad_fn = property(lambda self: self._node)
    T = property(lambda self: self.transpose())

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        extra = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='gpu'" if self.device == "gpu" else ""
        return f"tensor({backend.to_numpy(self.data)!r}{dev}{extra})"

    # ------------------------------------------------------------------ conversions
    def numpy(self):
        """A numpy copy of the values (from the GPU when needed)."""
        return numpy.array(backend.to_numpy(self.data), copy=True)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}.")
        return self.data.reshape(()).item()

    def tolist(self):
        return backend.to_numpy(self.data).tolist()

    def detach(self):
        """The same values, cut from the graph (shares memory, like PyTorch)."""
        return Tensor(self.data)

    def to(self, device=None, dtype=None):
        """A copy on `device` ("cpu" or "gpu") and/or with `dtype`, differentiable."""
        from .ops.shape import to_device_op
        out = self
        if dtype is not None and out.dtype != numpy.dtype(dtype):
            out = out.astype(dtype)
        if device is not None and backend.normalize_device(device) != out.device:
            out = to_device_op(out, device)
        return out

    def cpu(self):
        return self.to("cpu")

    def gpu(self):
        return self.to("gpu")

    def astype(self, dtype):
        from .ops.arithmetic import cast
        return cast(self, dtype)

    def float(self):
        return self.astype(numpy.float32)

    def double(self):
        return self.astype(numpy.float64)

    def requires_grad_(self, flag=True):
        self.requires_grad = bool(flag)
        return self

    def zero_grad(self):
        self.grad = None

    # ------------------------------------------------------------------ autograd
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) * grad into every leaf's `.grad`.

        grad: ndarray, Tensor or None (None only for one-element tensors, meaning 1).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() was called on a tensor that does not require grad; "
                               "create the inputs with requires_grad=True and do not compute "
                               "the result under no_grad().")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element tensor, "
                                   f"this one has shape {self.shape}; pass grad=ones_like(...) "
                                   "or reduce it with .sum() first.")
            grad = xp.ones_like(self.data)
        else:
            grad = _as_array(grad, dtype=self.dtype, device=self.device)
            if grad.shape != self.shape:
                raise ValueError(f"backward() got a gradient of shape {grad.shape} for a tensor "
                                 f"of shape {self.shape}; they must be equal.")
        run_backward(self, grad, retain_graph)

    def _accumulate(self, g):
        """Add gradient g into .grad; a new array, so no caller's array is ever mutated."""
        if g.dtype != self.data.dtype:
            g = g.astype(self.data.dtype)
        if g.shape != self.data.shape:
            g = backend.get_array_module(g).broadcast_to(g, self.data.shape)
        self.grad = g if self.grad is None else self.grad + g
        for hook in getattr(self, "_grad_hooks", ()):   # unset on most tensors
            hook(self)

    def register_post_accumulate_grad_hook(self, hook):
        """Call hook(self) each time backward has added a gradient into .grad (a leaf used k
        times in the graph gets k calls; DistributedDataParallel counts them)."""
        if getattr(self, "_grad_hooks", None) is None:
            self._grad_hooks = []
        self._grad_hooks.append(hook)

    # ------------------------------------------------------------------ operators
    def __add__(self, other): return _A.add(self, other)
    def __radd__(self, other): return _A.add(other, self)
    def __sub__(self, other): return _A.sub(self, other)
    def __rsub__(self, other): return _A.sub(other, self)
    def __mul__(self, other): return _A.mul(self, other)
    def __rmul__(self, other): return _A.mul(other, self)
    def __truediv__(self, other): return _A.div(self, other)
    def __rtruediv__(self, other): return _A.div(other, self)
    def __pow__(self, other): return _A.pow(self, other)
    def __rpow__(self, other): return _A.pow(other, self)
    def __matmul__(self, other): return _A.matmul(self, other)
    def __rmatmul__(self, other): return _A.matmul(other, self)
    def __neg__(self): return _A.neg(self)
    def __pos__(self): return self
    def __abs__(self): return _A.abs(self)

    # Comparisons give boolean tensors outside the graph (they have no gradient).
    def _compare(self, other, op):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(op(self.data, other))

    def __lt__(self, other): return self._compare(other, lambda a, b: a < b)
    def __le__(self, other): return self._compare(other, lambda a, b: a <= b)
    def __gt__(self, other): return self._compare(other, lambda a, b: a > b)
    def __ge__(self, other): return self._compare(other, lambda a, b: a >= b)
    def __eq__(self, other): return self._compare(other, lambda a, b: a == b)
    def __ne__(self, other): return self._compare(other, lambda a, b: a != b)
    __hash__ = object.__hash__  # tensors stay usable as dict keys despite __eq__

    def __bool__(self):
        if self.data.size != 1:
            raise ValueError(f"the truth value of a tensor with {self.data.size} elements is "
                             "ambiguous; use .any() or .all().")
        return bool(self.data.reshape(()))

    def any(self): return bool(self.data.any())
    def all(self): return bool(self.data.all())

    def __getitem__(self, index): return _S.getitem(self, index)

    def reshape(self, *shape): return _S.reshape(self, *shape)
    view = reshape

    def flatten(self, start_dim=0, end_dim=-1): return _S.flatten(self, start_dim, end_dim)

    def transpose(self, *axes): return _S.transpose(self, *axes)
    permute = transpose

    def sum(self, axis=None, keepdims=False): return _R.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _R.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return _R.max(self, axis, keepdims)
    def min(self, axis=None, keepdims=False): return _R.min(self, axis, keepdims)
    def argmax(self, axis=None): return Tensor(self.data.argmax(axis=axis))
    def argmin(self, axis=None): return Tensor(self.data.argmin(axis=axis))
    def exp(self): return _A.exp(self)
    def log(self): return _A.log(self)
    def sqrt(self): return _A.sqrt(self)
    def abs(self): return _A.abs(self)
    def clip(self, min=None, max=None): return _A.clip(self, min, max)
    clamp = clip
    def relu(self): return _Act.relu(self)
    def sigmoid(self): return _Act.sigmoid(self)
    def tanh(self): return _Act.tanh(self)
    def softmax(self, dim): return _Act.softmax(self, dim)
    def log_softmax(self, dim): return _Act.log_softmax(self, dim)

    def unsqueeze(self, dim):
        """A view with a new axis of length 1 at `dim` (torch.unsqueeze)."""
        dim = dim % (self.ndim + 1)
        return self.reshape(*(self.shape[:dim] + (1,) + self.shape[dim:]))

    def squeeze(self, dim=None):
        """Drop axes of length 1 (only `dim` when given, if it has length 1)."""
        if dim is None:
            return self.reshape(*(n for n in self.shape if n != 1))
        dim = dim % max(self.ndim, 1)
        if self.ndim == 0 or self.shape[dim] != 1:
            return self
        return self.reshape(*(self.shape[:dim] + self.shape[dim + 1:]))


def run_backward(root, grad, retain_graph=False):
    """Reverse-mode sweep from `root` with seed gradient `grad`.

    Iterative depth-first search gives a topological order without recursion, so a chain
    of 100,000 ops does not hit Python's recursion limit. Gradients of a node used several
    times are summed before the node's backward runs.
    """
    if root._node is None:          # a leaf: d(root)/d(root) = 1
        root._accumulate(grad)
        return
    order, visited = [], set()
    stack = [(root._node, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if node in visited:
            continue
        visited.add(node)
        stack.append((node, True))
        if node.freed:
            raise RuntimeError("backward() reached a part of the graph that an earlier backward() "
                               "already freed; pass retain_graph=True to the first backward() "
                               "to run backward twice.")
        for parent in node.parents:
            if parent is not None and not isinstance(parent, Tensor) and parent not in visited:
                stack.append((parent, False))

    pending = {root._node: grad}
    for node in reversed(order):     # every consumer runs before the node it consumes
        gy = pending.pop(node, None)
        if gy is None:
            continue
        grads = node.backward(gy)
        if not isinstance(grads, tuple):
            grads = (grads,)
        for parent, g in zip(node.parents, grads):
            if parent is None or g is None:
                continue
            if isinstance(parent, Tensor):
                parent._accumulate(g)
            elif parent in pending:
                pending[parent] = pending[parent] + g
            else:
                pending[parent] = g
        if not retain_graph:
            node.release()


def tensor(data, requires_grad=False, dtype=None, device=None):
    """Make a Tensor (the `minidl.tensor` factory, like `torch.tensor`)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


# The operator methods above use these; imported last because they import Tensor.
from .ops import arithmetic as _A  # noqa: E402
from .ops import reduction as _R  # noqa: E402
from .ops import shape as _S  # noqa: E402
from .ops import activation as _Act  # noqa: E402

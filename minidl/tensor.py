"""`Tensor`: an ndarray plus what reverse-mode autograd needs.

A tensor made by an operation remembers the operation (`_node`, a `Function`), and the
operation remembers its parents. `backward()` walks that graph once, in reverse topological
order, handing each node the gradient of its output and collecting the gradients of its
inputs. The graph holds *nodes*, not tensors, so an intermediate tensor's array is freed as
soon as nothing but the graph refers to it, unless its node saved it for backward.
"""
import numpy

from . import backend, device_checks, dtypes
from .grad_mode import is_grad_enabled


def _as_array(data, dtype=None, device=None):
    """Turn `data` (Tensor, ndarray, list, scalar) into a backend array.

    Python floats and lists become float32, as in PyTorch; existing arrays keep their dtype.
    """
    dtype = dtypes.resolve(dtype)
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
    device = property(lambda self: backend.device_of(self.data))
    is_leaf = property(lambda self: self._node is None)
    grad_fn = property(lambda self: self._node)
    # .T reverses every dim (PyTorch's meaning, deprecated there for ndim != 2); .mT swaps
    # the last two (a batch of matrices, each transposed).
    T = property(lambda self: _S.permute(self, *reversed(range(self.ndim))))
    mT = property(lambda self: _S.transpose(self, -2, -1))

    def size(self, dim=None):
        """The shape (a tuple), or the length of one dim: t.size() / t.size(1) as in PyTorch.
        (NumPy's `a.size`, the element count, is t.numel() here.)"""
        return self.data.shape if dim is None else self.data.shape[dim]

    def numel(self):
        """The number of elements."""
        return self.data.size

    def dim(self):
        """The number of dims (same as .ndim)."""
        return self.data.ndim

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

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}.")
        if backend.is_gpu_array(self.data):
            device_checks.check()   # a host read anyway: read the deferred checks with it
        return self.data.reshape(()).item()

    def tolist(self):
        return backend.to_numpy(self.data).tolist()

    def detach(self):
        """The same values, cut from the graph (shares memory, like PyTorch)."""
        return Tensor(self.data)

    def to(self, device=None, dtype=None):
        """A copy on `device` ("cpu" or "gpu") and/or with `dtype`, differentiable."""
        if isinstance(device, (numpy.dtype, type, dtypes._Unavailable)):   # t.to(minidl.float64)
            device, dtype = None, device
        out = self
        if dtype is not None and out.dtype != dtypes.resolve(dtype):
            out = out.astype(dtype)
        if device is not None and backend.normalize_device(device) != out.device:
            out = _S.to_device_op(out, device)
        return out

    def cpu(self):
        return self.to("cpu")

    def gpu(self):
        return self.to("gpu")

    def astype(self, dtype):
        """A copy with `dtype`; differentiable between floating dtypes. Casting to an integer
        or bool dtype gives a tensor outside the graph (it has no gradient), as in PyTorch."""
        dtype = dtypes.resolve(dtype)
        if dtype.kind not in "fc":
            return Tensor._wrap(self.data.astype(dtype))
        return _A.cast(self, dtype)

    def float(self):
        return self.astype(numpy.float32)

    def double(self):
        return self.astype(numpy.float64)

    def half(self):
        return self.astype(numpy.float16)

    def long(self):
        return self.astype(numpy.int64)

    def int(self):
        return self.astype(numpy.int32)

    def bool(self):
        return self.astype(numpy.bool_)

    def requires_grad_(self, requires_grad=True):
        """Set requires_grad in place (leaves only, like PyTorch); returns self."""
        if requires_grad and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype "
                            f"{self.data.dtype}; convert it first with .float().")
        if not requires_grad and self._node is not None:
            raise RuntimeError("requires_grad_(False) works on leaf tensors only; use .detach() "
                               "to cut a computed tensor from the graph.")
        self.requires_grad = bool(requires_grad)
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

    def transpose(self, dim0, dim1):
        """Swap two dims (torch.transpose). NumPy's a.transpose(axes) is permute(*axes)."""
        return _S.transpose(self, dim0, dim1)

    def permute(self, *dims): return _S.permute(self, *dims)
    def expand(self, *sizes): return _S.expand(self, *sizes)
    def expand_as(self, other): return _S.expand(self, *other.shape)
    def repeat(self, *reps): return _S.repeat(self, *reps)
    def clone(self): return _S.clone(self)
    def contiguous(self): return _S.contiguous(self)
    def gather(self, dim, index): return _S.gather(self, dim, index)
    def scatter(self, dim, index, src=None, *, value=None): return _S.scatter(self, dim, index, src, value=value)
    def split(self, split_size_or_sections, dim=0): return _S.split(self, split_size_or_sections, dim)
    def chunk(self, chunks, dim=0): return _S.chunk(self, chunks, dim)

    def masked_fill(self, mask, value):
        """value where mask is true, self elsewhere (mask broadcasts against self)."""
        mask = mask.data if isinstance(mask, Tensor) else mask
        if getattr(mask, "dtype", None) is None or mask.dtype != numpy.bool_:
            raise TypeError("masked_fill() needs a boolean mask, e.g. t.masked_fill(t < 0, 0.0).")
        xp = backend.get_array_module(self.data)
        fill = xp.full(self.shape, value, dtype=self.dtype)
        return _A.where(xp.broadcast_to(mask, self.shape), fill, self)

    # Reductions take PyTorch's dim/keepdim; NumPy's axis/keepdims are aliases.
    def sum(self, dim=None, keepdim=False, **aliases): return _R.sum(self, dim, keepdim, **aliases)
    def mean(self, dim=None, keepdim=False, **aliases): return _R.mean(self, dim, keepdim, **aliases)
    def max(self, dim=None, keepdim=False, **aliases): return _R.max(self, dim, keepdim, **aliases)
    def min(self, dim=None, keepdim=False, **aliases): return _R.min(self, dim, keepdim, **aliases)
    def amax(self, dim=None, keepdim=False, **aliases): return _R.amax(self, dim, keepdim, **aliases)
    def amin(self, dim=None, keepdim=False, **aliases): return _R.amin(self, dim, keepdim, **aliases)

    def argmax(self, dim=None, keepdim=False, **aliases):
        """Index of the first maximum along dim (None: flattened), int64, outside the graph."""
        dim, keepdim = _R.resolve_dim("argmax", dim, keepdim, **aliases)
        return Tensor._wrap(_R.argextreme("max", self.data, dim, keepdim))

    def argmin(self, dim=None, keepdim=False, **aliases):
        dim, keepdim = _R.resolve_dim("argmin", dim, keepdim, **aliases)
        return Tensor._wrap(_R.argextreme("min", self.data, dim, keepdim))

    def maximum(self, other): return _A.maximum(self, other)
    def minimum(self, other): return _A.minimum(self, other)
    def var(self, dim=None, **options): return _R.var(self, dim, **options)
    def std(self, dim=None, **options): return _R.std(self, dim, **options)
    def norm(self, p="fro", dim=None, keepdim=False, **aliases): return _R.norm(self, p, dim, keepdim, **aliases)
    def pow(self, exponent): return _A.pow(self, exponent)
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

    # ------------------------------------------------------------------ in-place
    # These change .data itself. The graph keeps no version counter (PyTorch's guard
    # against changing a value an op saved for backward), so an in-place op on a tensor
    # that takes part in autograd is refused instead: use the out-of-place op there, or
    # run it under no_grad() (e.g. to update parameters by hand).
    def _check_inplace(self, name):
        if self.requires_grad and is_grad_enabled():
            what = ("a leaf tensor that requires grad" if self._node is None
                    else "a tensor computed by the graph")
            raise RuntimeError(f"{name}() cannot change {what} in place while gradients are "
                               "recorded; wrap it in `with minidl.no_grad():` or use the "
                               "out-of-place version.")

    def _assign(self, values):
        self.data[...] = values
        return self

    def zero_(self):
        self._check_inplace("zero_")
        return self._assign(0)

    def fill_(self, value):
        self._check_inplace("fill_")
        return self._assign(value.data if isinstance(value, Tensor) else value)

    def add_(self, other, alpha=1):
        self._check_inplace("add_")
        other = other.data if isinstance(other, Tensor) else other
        return self._assign(self.data + other * alpha if alpha != 1 else self.data + other)

    def mul_(self, other):
        self._check_inplace("mul_")
        return self._assign(self.data * (other.data if isinstance(other, Tensor) else other))

    def clamp_(self, min=None, max=None):  # noqa: A002 - torch's argument names
        self._check_inplace("clamp_")
        if min is None and max is None:
            raise ValueError("clamp_() needs at least one of min and max.")
        xp = backend.get_array_module(self.data)
        return self._assign(xp.clip(self.data, min, max))

    clip_ = clamp_

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


# Every op module the methods above call, gathered here. tensor.py and minidl/ops import
# each other on purpose: an op needs the Tensor class to wrap its output, and a Tensor
# method (t.sum(), t + u) needs the op. Importing the ops last, after Tensor exists, makes
# that circle harmless; the methods look them up only when called. Keep all such imports
# here, not inside methods.
from .ops import arithmetic as _A  # noqa: E402
from .ops import reduction as _R  # noqa: E402
from .ops import shape as _S  # noqa: E402
from .ops import activation as _Act  # noqa: E402

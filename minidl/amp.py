"""Automatic mixed precision: `autocast` (which op runs in which dtype) and `GradScaler`.

    scaler = amp.GradScaler()
    with amp.autocast("gpu", dtype="bfloat16"):
        loss = criterion(model(x), y)          # convs/matmuls low precision, the rest float32
    scaler.scale(loss).backward()              # gradients of parameters arrive in float32
    scaler.step(optimizer)                     # unscales; skips the step on inf/NaN gradients
    scaler.update()                            # grows or backs off the scale

The dtype rules live in one table, POLICY (op class name -> rule), applied by a hook in
`Function.apply`, so no op knows about autocast:

    "lower"    convolutions, transposed convolutions, matmuls: float32 inputs are cast to the
               low precision, the op accumulates in float32, the output is low precision
    "float32"  softmax, log-softmax, the losses, batch norm (also synchronised), layer/group/
               instance norm, reductions (and the 2-norm), exp/log/pow, pooling
               and resizing: low-precision inputs are cast up to float32
    "promote"  ops of several inputs (add, mul, cat, where, ...): all inputs are cast to the
               widest floating dtype among them, as PyTorch does
    (unlisted) element-wise ops (ReLU, dropout, reshape, ...) run in whatever dtype arrives

Every cast is itself a differentiable op (`_Round`), whose backward brings the gradient back
to the input's dtype, so parameters stay float32 (the master weights) and `.grad` is float32.

How the low precision is represented. NumPy has no bfloat16 and CuPy 13 neither (CuPy 14 has
an experimental one through the ml_dtypes package, cupy/cupy#9494), and minidl's GPU kernels
(im2col, pooling) take float32/float64 only. So:

* float16 outputs are real float16 arrays (half the memory between ops);
* bfloat16 values are float32 arrays whose low 16 bits are zero, i.e. exactly the values a
  bfloat16 holds (rounded to nearest even); the dtype reads float32.
* A "lower" op gets its inputs rounded to the low precision but stored as float32 and computes
  in float32. A product of two float16 or bfloat16 numbers is exact in float32, so this gives
  the numbers of a tensor-core GEMM with float32 accumulation (up to summation order); the
  speed of one needs low-precision kernels: on the GPU the conv plan runs convolutions and
  transposed convolutions under autocast on the bfloat16/float16 implicit-GEMM kernels
  (minidl/ops/conv_implicit_gemm.py, tensor cores); matmuls and the CPU keep this emulation.

Devices: `autocast("gpu")` applies to ops on GPU arrays only, `autocast("cpu")` to ops on
NumPy arrays only (slower than float32 there: it is for studying the numerics and for tests).
The gradients' backward passes are not autocast-aware: they run in the dtype of the arrays
each op saved, as in PyTorch.
"""
import contextlib

import numpy

from . import backend, function
from .function import Function
from .grad_mode import no_grad
from .optim.flat import FlatBuffer
from .tensor import Tensor
import kernels

LOW_DTYPES = ("bfloat16", "float16")

# Op class name -> rule (see the module docstring). Names, not classes, so that this module
# imports no op module: an op is autocast by adding its name here.
POLICY = {
    "Conv2d": "lower", "ConvTranspose2d": "lower", "MatMul": "lower", "Linear": "lower",
    "BatchNorm": "float32", "SyncBatchNorm": "float32", "Standardize": "float32",
    "Softmax": "float32", "LogSoftmax": "float32",
    "CrossEntropy": "float32", "NLL": "float32", "BinaryCrossEntropy": "float32",
    "Sum": "float32", "Mean": "float32", "Norm2": "float32",
    "Exp": "float32", "Log": "float32", "Pow": "float32", "PowScalar": "float32",
    "Sqrt": "float32", "Softplus": "float32",
    # Their kernels take float32/float64 only (kernels/gpu.py).
    "MaxPool2d": "float32", "MaxUnpool2d": "float32", "AvgPool2d": "float32",
    "AdaptiveAvgPool2d": "float32", "Bilinear": "float32", "Nearest": "float32",
    "Add": "promote", "Sub": "promote", "Mul": "promote", "Div": "promote",
    "Maximum": "promote", "Minimum": "promote", "Where": "promote",
    "Concatenate": "promote", "Stack": "promote",
    # seg.losses' soft Dice is one op: a loss, so float32 (in float16 the GradScaler's
    # 65536 * gradient would overflow inside it).
    "SoftDice": "float32",
}

_state = None     # (device, dtype) inside autocast, None outside


# ---------------------------------------------------------------------- rounding
def round_to(a, dtype):
    """a (float32 array, any shape) rounded to the values of `dtype` ("bfloat16"/"float16"),
    returned as float32. NaN stays NaN; values beyond the range become +-inf."""
    xp = backend.get_array_module(a)
    a = xp.ascontiguousarray(a, dtype=numpy.float32)
    if dtype == "float16":
        with numpy.errstate(over="ignore"):
            return a.astype(numpy.float16).astype(numpy.float32)
    # bfloat16 is the top half of a float32: round the low 16 bits to nearest, ties to even
    # (kernels/reference.py spells it out; one kernel on the GPU).
    return kernels.for_array(a).round_bfloat16(a)


def _storage(a, dtype):
    """The array that holds low-precision values between ops: float16, or float32 for bf16."""
    r = round_to(a, dtype)
    return r.astype(numpy.float16) if dtype == "float16" else r


class _Round(Function):
    """The differentiable cast autocast inserts. Params: to ("bfloat16", "float16", or
    "float32" for a plain cast up), store (whether the result is kept in the storage dtype).

    forward: x rounded to `to`; backward: the gradient rounded the same way (it is the
    gradient of a low-precision tensor), returned in x's dtype.
    """

    def forward(self, x):
        self.source = x.dtype
        if self.to == "float32":
            return x.astype(numpy.float32)
        return _storage(x, self.to) if self.store else round_to(x, self.to)

    def backward(self, gy):
        if self.to != "float32":
            gy = round_to(gy, self.to)
        return gy.astype(self.source, copy=False)


def _cast(x, to, store=False):
    return _Round(to=to, store=store)(x)


def _array(x):
    return x.data if isinstance(x, Tensor) else x


def _is_float(a, kinds=(numpy.float16, numpy.float32)):
    return hasattr(a, "dtype") and hasattr(a, "shape") and a.dtype in kinds


def _autocast_apply(cls, inputs, params):
    """Function.apply inside autocast: cast the inputs by cls's rule, run the op, and for a
    "lower" op store the output in the low precision."""
    rule = POLICY.get(cls.__name__)
    arrays = [_array(x) for x in inputs]
    device, dtype = _state
    on_device = [a for a in arrays if _is_float(a, (numpy.float16, numpy.float32, numpy.float64))]
    if (rule is None or not on_device or backend.device_of(on_device[0]) != device
            or any(a.dtype == numpy.float64 for a in on_device)):
        return cls(**params)(*inputs)     # float64 is never autocast, as in PyTorch
    if rule == "lower":
        cast = [_cast(x, dtype) if _is_float(_array(x)) else x for x in inputs]
        return _cast(cls(**params)(*cast), dtype, store=True)
    if rule == "float32" or any(a.dtype == numpy.float32 for a in on_device):
        # float32 rule, or promotion of a float16/float32 mix to float32
        cast = [_cast(x, "float32") if _is_float(_array(x), (numpy.float16,)) else x
                for x in inputs]
        return cls(**params)(*cast)
    return cls(**params)(*inputs)


def _low_dtype(dtype):
    """"bfloat16" or "float16" from a name ("bf16", "fp16", "half" too) or numpy.float16."""
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
    else:
        try:
            name = numpy.dtype(dtype).name
        except TypeError:
            name = repr(dtype)
    if name not in LOW_DTYPES:
        raise ValueError(f"autocast: dtype must be 'bfloat16' or 'float16', got {dtype!r}.")
    return name


@contextlib.contextmanager
def autocast(device="gpu", dtype="bfloat16", enabled=True):
    """Run the ops inside in mixed precision (see the module docstring for the rules).

    device: "gpu" (or "cuda") or "cpu": which arrays' ops are autocast; dtype: "bfloat16"
    or "float16"; enabled=False runs everything as written (so one code path serves both).
    Nesting replaces the outer setting until the inner block ends.
    """
    global _state
    device = backend.normalize_device(device)
    dtype = _low_dtype(dtype)
    saved = (_state, function.autocast_hook)
    if enabled:
        _state = (device, dtype)
        function.autocast_hook = _autocast_apply
    else:
        _state, function.autocast_hook = None, None
    try:
        yield
    finally:
        _state, function.autocast_hook = saved


def is_autocast_enabled():
    return _state is not None


def autocast_dtype(device):
    """The low dtype ("bfloat16"/"float16") autocast gives ops on `device` ("cpu"/"gpu") now,
    or None outside autocast or for the other device. (The conv plan reads it to pick
    low-precision kernels on the GPU; backward keeps the plan forward chose.)"""
    if _state is None or _state[0] != device:
        return None
    return _state[1]


# ---------------------------------------------------------------------- GradScaler
class GradScaler:
    """Loss scaling for float16 training (PyTorch's torch.amp.GradScaler).

    float16 gradients underflow to 0 below 6e-8; multiplying the loss by `scale` (2^16 at
    first) lifts them into range. `step` divides the gradients by the scale again and skips
    the optimizer step when any of them is inf or NaN (the scale was too big); `update` then
    halves the scale (backoff_factor), and doubles it (growth_factor) after growth_interval
    steps in a row without inf/NaN. bfloat16 has float32's range and rarely needs it.

    No host read. The scale (0-d float32), the growth tracker (0-d int32) and each step's
    inf/NaN flag (0-d float32) are arrays on the gradients' device (made there at the first
    `scale` or `unscale_`), and every decision is taken there: `unscale_` is one kernel per
    gradient (one per flat buffer for FlatSGD/FlatAdam/FlatAdamW) that also sets the flag,
    the optimizer skips its own update when the flag is set, and `update` is one kernel.
    So a GPU never waits for Python, and a CUDA graph can replay the whole step. On the CPU
    the arrays are NumPy arrays and the code path is the same.

    Which optimizers skip on the device: those whose `supports_found_inf` is true (SGD and
    FlatSGD without momentum dampening; Adam, AdamW, FlatAdam, FlatAdamW with capturable=True).
    For any other (plain Adam counts its steps in Python; your own optimizer), `step` reads
    the flag back to the host, one read per step, and does not call optimizer.step() on an
    inf/NaN: the behaviour before, and what PyTorch does.

    What `step` returns: PyTorch returns None for a skipped step, which needs the flag on
    the host. On the host path this is so; on the device path `step` returns what
    optimizer.step() returned (None unless it was given a closure), skipped or not. To learn
    whether steps are skipped, read `get_scale()` (a host read) after `update()`: it falls
    when one was.

    get_scale() and state_dict() read the host (the user asks for numbers), as in PyTorch;
    state_dict() keeps its format of plain numbers. enabled=False makes every method a
    pass-through, so one training loop serves both.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        if not init_scale > 0 or not growth_factor > 1 or not 0 < backoff_factor < 1 \
                or int(growth_interval) < 1:
            raise ValueError(f"GradScaler needs init_scale > 0, growth_factor > 1, 0 < "
                             f"backoff_factor < 1 and growth_interval >= 1, got {init_scale}, "
                             f"{growth_factor}, {backoff_factor}, {growth_interval}.")
        self._enabled = bool(enabled)
        self._growth_factor, self._backoff_factor = float(growth_factor), float(backoff_factor)
        self._growth_interval = int(growth_interval)
        # Plain numbers until the first scale()/unscale_() shows the device (as in PyTorch).
        self._init_scale, self._init_growth_tracker = float(init_scale), 0
        self._scale = None            # 0-d float32 array on the device
        self._growth_tracker = None   # 0-d int32 array on the device
        self._found_inf = {}       # id(optimizer) -> its 0-d float32 flag, unscaled this step
        self._stepped = set()      # id(optimizer) whose step() ran since the last update()

    def is_enabled(self):
        return self._enabled

    def _state_on(self, like):
        """The scale and growth tracker as arrays on `like`'s device (made or moved there)."""
        device = backend.device_of(like)
        if self._scale is None:
            xp = backend.array_module(device)
            self._scale = xp.full((), self._init_scale, dtype=numpy.float32)
            self._growth_tracker = xp.full((), self._init_growth_tracker, dtype=numpy.int32)
        elif backend.device_of(self._scale) != device:     # the model moved: once, not per step
            self._scale = backend.to_device(self._scale, device)
            self._growth_tracker = backend.to_device(self._growth_tracker, device)
        return self._scale, self._growth_tracker

    def get_scale(self):
        """The current scale as a Python float (a host read); 1.0 when disabled."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(_to_host(self._scale))

    def scale(self, outputs):
        """outputs (a Tensor, or a list/tuple of them) multiplied by the current scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        if not isinstance(outputs, Tensor):
            raise TypeError(f"GradScaler.scale expects a Tensor (the loss), got "
                            f"{type(outputs).__name__}.")
        scale, _ = self._state_on(outputs.data)
        return outputs * scale

    def unscale_(self, optimizer):
        """Divide the optimizer's gradients by the scale (once per step), e.g. before clipping
        them, and record on the device whether any is inf or NaN."""
        if not self._enabled:
            return
        key = id(optimizer)
        if key in self._found_inf:
            raise RuntimeError("unscale_() was already called on this optimizer since the last "
                               "update(); call it at most once per step.")
        if key in self._stepped:
            raise RuntimeError("unscale_() is being called after step(); call it before.")
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return
        scale, _ = self._state_on(grads[0])
        found_inf = backend.get_array_module(scale).zeros((), dtype=numpy.float32)
        with no_grad():
            buffer = getattr(optimizer, "buffer", None)
            if isinstance(buffer, FlatBuffer):
                # A flat optimizer: its gradients gathered into its buffer (step() would do it
                # anyway, then finds them there), unscaled there in place by one kernel.
                buffer.gather_grads()
                kernels.for_array(buffer.grad).unscale_and_check(buffer.grad, buffer.grad,
                                                                 scale, found_inf)
            else:
                # New arrays, not in place: autograd may hand one array to several parameters.
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            xp = backend.get_array_module(p.grad)
                            out = xp.empty(p.grad.shape, dtype=p.grad.dtype)
                            kernels.for_array(p.grad).unscale_and_check(p.grad, out, scale,
                                                                        found_inf)
                            p.grad = out
        self._found_inf[key] = found_inf

    def step(self, optimizer, *args, **kwargs):
        """optimizer.step(*args, **kwargs), skipped when a gradient is inf/NaN: on the device
        when the optimizer supports it (returns optimizer.step()'s result either way), else
        decided by one host read (returns None when skipped). See the class docstring."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        key = id(optimizer)
        if key in self._stepped:
            raise RuntimeError("step() was already called on this optimizer since the last "
                               "update(); call update() once per iteration.")
        if key not in self._found_inf:
            self.unscale_(optimizer)
        self._stepped.add(key)
        found_inf = self._found_inf.get(key)
        if found_inf is None:                  # no gradients: nothing to check
            return optimizer.step(*args, **kwargs)
        if getattr(optimizer, "supports_found_inf", False):
            optimizer.found_inf = found_inf
            try:
                return optimizer.step(*args, **kwargs)
            finally:
                optimizer.found_inf = None
        # The fallback for optimizers that cannot skip on the device: one host read.
        if _to_host(found_inf):
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale=None):
        """Back off (any inf/NaN this step) or grow (growth_interval clean steps) the scale,
        on the device; new_scale (a number) sets it directly instead."""
        if not self._enabled:
            return
        if new_scale is not None:
            if self._scale is None:
                self._init_scale, self._init_growth_tracker = float(new_scale), 0
            else:                  # in place: a CUDA graph keeps the arrays it captured
                self._scale[...] = float(new_scale)
                self._growth_tracker[...] = 0
        elif self._found_inf:
            flags = list(self._found_inf.values())
            found_inf = flags[0]
            for flag in flags[1:]:
                found_inf = found_inf + flag
            kernels.for_array(self._scale).update_scale(
                self._scale, self._growth_tracker, found_inf, self._growth_factor,
                self._backoff_factor, self._growth_interval)
        self._found_inf.clear()
        self._stepped.clear()

    def _get_growth_tracker(self):
        if self._growth_tracker is None:
            return self._init_growth_tracker
        return int(_to_host(self._growth_tracker))

    def state_dict(self):
        """Plain numbers (storable with minidl.save; reads the host); {} when disabled, as in
        PyTorch."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._get_growth_tracker()}

    def load_state_dict(self, state_dict):
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("GradScaler.load_state_dict got an empty state (saved from a "
                               "disabled GradScaler); save one from an enabled GradScaler.")
        value = {k: (v.item() if hasattr(v, "item") else v) for k, v in state_dict.items()}
        self._growth_factor = float(value["growth_factor"])
        self._backoff_factor = float(value["backoff_factor"])
        self._growth_interval = int(value["growth_interval"])
        scale, tracker = float(value["scale"]), int(value["_growth_tracker"])
        if self._scale is None:
            self._init_scale, self._init_growth_tracker = scale, tracker
        else:                      # in place: a CUDA graph keeps the arrays it captured
            self._scale[...] = scale
            self._growth_tracker[...] = tracker


def _to_host(a):
    """The one place the GradScaler reads an array back to the host (get_scale, state_dict,
    and step() for an optimizer that cannot skip on the device); tests count the calls."""
    return backend.to_numpy(a)[()]

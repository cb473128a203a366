"""`Module`: the base of every layer and model, and the containers built on it.

A module registers three kinds of attributes as you assign them:
parameters (`Parameter`, trained), buffers (arrays saved with the model but not trained, e.g.
batch norm's running mean) and sub-modules. `state_dict()` flattens them into dotted names.
"""
from collections import OrderedDict

import numpy

from .. import backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A tensor that is a trainable weight of a module (requires_grad by default)."""
    __slots__ = ()

    def __init__(self, data, requires_grad=True, dtype=None, device=None):
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(data, requires_grad=requires_grad, dtype=dtype, device=device)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


class Module:
    """Base class: subclasses set parameters/sub-modules in __init__ and define forward()."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               "before assigning attributes.")
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        elif name in self.__dict__.get("_buffer_names", ()):
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)
            return
        self.__dict__.pop(name, None)

    def __getattr__(self, name):
        # Only called when normal lookup fails: look in the registries.
        d = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if table in d and name in d[table]:
                return d[table][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                del table[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name, array):
        """Keep `array` (an ndarray or None) with the module and in its state_dict, untrained."""
        if "_buffer_names" not in self.__dict__:
            object.__setattr__(self, "_buffer_names", set())
        self._buffer_names.add(name)
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    def register_parameter(self, name, param):
        if param is None:
            self._parameters.pop(name, None)
            object.__setattr__(self, name, None)
        else:
            setattr(self, name, param)

    def add_module(self, name, module):
        self._modules[name] = module

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def apply(self, fn):
        """Call fn(module) on every submodule, children first, then on self (as torch);
        returns self. Typical use: model.apply(init_weights)."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    def requires_grad_(self, requires_grad=True):
        """Switch gradients on or off for every parameter (freeze a backbone); returns self."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def children(self):
        return iter(m for m in self._modules.values() if m is not None)

    def named_children(self):
        return iter((n, m) for n, m in self._modules.items() if m is not None)

    def named_parameters(self, prefix=""):
        seen = set()
        for mod_name, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if p is not None and id(p) not in seen:   # shared weights listed once
                    seen.add(id(p))
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix=""):
        for mod_name, m in self.named_modules(prefix):
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), b

    def buffers(self):
        for _, b in self.named_buffers():
            yield b

    def num_parameters(self, trainable_only=True):
        return sum(int(p.data.size) for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """Parameter and buffer arrays by dotted name (the arrays themselves, not copies)."""
        state = OrderedDict()
        for name, p in self.named_parameters():
            state[name] = p.data
        for name, b in self.named_buffers():
            state[name] = b
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into this module's parameters and buffers, on the module's device.

        With strict=True any missing or unexpected key, or any shape mismatch, raises a
        KeyError/ValueError listing them all. Returns (missing_keys, unexpected_keys).
        """
        own = {}
        for mod_name, m in self.named_modules():
            for name in list(m._parameters) + list(m._buffers):
                own[f"{mod_name}.{name}" if mod_name else name] = (m, name)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = []
        for key, value in state_dict.items():
            if key in own:
                m, name = own[key]
                current = m._parameters[name].data if name in m._parameters else m._buffers[name]
                if current is not None and tuple(current.shape) != tuple(numpy.shape(value)):
                    mismatched.append(f"{key}: checkpoint {tuple(numpy.shape(value))} vs model "
                                      f"{tuple(current.shape)}")
        if mismatched:
            raise ValueError("load_state_dict() found shape mismatches: " + "; ".join(mismatched)
                             + ". The checkpoint was made for a different configuration.")
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict() keys do not match: missing {missing}, unexpected "
                           f"{unexpected}; pass strict=False to load the keys that match.")
        for key, value in state_dict.items():
            if key not in own:
                continue
            m, name = own[key]
            if name in m._parameters:
                p = m._parameters[name]
                array = backend.to_device(value, p.device).astype(p.dtype, copy=False)
                p.data = array.copy() if array is value else array
            else:
                current = m._buffers[name]
                device = backend.device_of(current) if current is not None else "cpu"
                array = backend.to_device(value, device)
                if current is not None and hasattr(current, "dtype"):
                    array = array.astype(current.dtype, copy=False)
                m._buffers[name] = array.copy() if array is value else array
        return missing, unexpected

    # ------------------------------------------------------------------ modes and devices
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = p.grad * 0

    def to(self, device=None, dtype=None):
        """Move every parameter and buffer to `device` and/or cast floating ones to `dtype`, in place."""
        for m in self.modules():
            for p in m._parameters.values():
                if p is None:
                    continue
                data = p.data
                if dtype is not None and data.dtype.kind == "f":
                    data = data.astype(dtype)
                if device is not None:
                    data = backend.to_device(data, device)
                p.data = data
                if p.grad is not None:
                    p.grad = backend.to_device(p.grad, backend.device_of(data)).astype(data.dtype)
            for name, b in list(m._buffers.items()):
                if b is None:
                    continue
                if dtype is not None and b.dtype.kind == "f":
                    b = b.astype(dtype)
                if device is not None:
                    b = backend.to_device(b, device)
                m._buffers[name] = b
        return self

    def cpu(self):
        return self.to("cpu")

    def gpu(self):
        return self.to("gpu")

    def float(self):
        return self.to(dtype=numpy.float32)

    def double(self):
        return self.to(dtype=numpy.float64)

    @property
    def device(self):
        for p in self.parameters():
            return p.device
        return "cpu"

    # ------------------------------------------------------------------ calling
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward().")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied one after another."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __getitem__(self, i):
        mods = list(self._modules.values())
        return Sequential(*mods[i]) if isinstance(i, slice) else mods[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module):
        self.add_module(str(len(self._modules)), module)
        return self


class ModuleList(Module):
    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        self.add_module(str(len(self._modules)), module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, i):
        mods = list(self._modules.values())
        return ModuleList(mods[i]) if isinstance(i, slice) else mods[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ModuleDict(Module):
    def __init__(self, modules=None):
        super().__init__()
        for name, m in (modules or {}).items():
            self.add_module(name, m)

    def __getitem__(self, name):
        return self._modules[name]

    def __setitem__(self, name, module):
        self.add_module(name, module)

    def __contains__(self, name):
        return name in self._modules

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()

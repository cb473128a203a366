"""Multi-tensor optimizers: every parameter, gradient and moment in one flat buffer.

The per-parameter optimizers (sgd.py, adam.py) launch a few kernels for *each* parameter:
the example U-Net has 64 of them, most tiny (biases, batch-norm scales), so on a GPU a step
is hundreds of launches that each do almost nothing. Here every parameter's array is a view
into one contiguous 1-D array (`FlatBuffer`), and so are the gradients and the optimizer's
moments; one kernel call then updates all of them (per parameter group):

    buffer.data  [ conv1.weight | conv1.bias | bn1.weight | ... ]     p.data is a view of its slice
    buffer.grad  [ ............ gradients, same layout ......... ]     p.grad too, after a step
    exp_avg, ... [ ............ moments, same layout ........... ]

The gradients are copied into `buffer.grad` at each step (autograd makes a fresh array per
backward); from then on `p.grad` is a view of it, so a data-parallel all-reduce can sum
`buffer.grad` across processes in one call and every `p.grad` sees the result.

FlatSGD, FlatAdam and FlatAdamW give the same numbers as SGD, Adam and AdamW (the same
arithmetic, element by element), their state_dict()s are interchangeable, and parameters
without a gradient are skipped as there (then each parameter's slice is updated on its own).
FlatAdam(capturable=True) keeps its step counts on the device, as Adam's option does. Under a
GradScaler, FlatSGD (without dampening) and capturable FlatAdam/FlatAdamW skip a step with
inf/NaN gradients on the device (`supports_found_inf`; minidl/amp.py).
"""
import math

from .. import backend
from ..grad_mode import enable_grad, no_grad
from .adam import adam_defaults, decay_factor
from .optimizer import Optimizer
from .sgd import sgd_defaults, skips_on_found_inf
import kernels


class FlatBuffer:
    """Tensors' arrays (and gradients) as views into one contiguous 1-D array, in order.

    tensors: Tensors of one dtype and device. Building it copies each tensor's array into
    `data` (total,) and makes tensor.data a view of its slice; `grad` (total,) receives the
    gradients (gather_grads). segments[i] = (start, stop) of tensor i.
    """

    def __init__(self, tensors):
        self.tensors = list(tensors)
        if not self.tensors:
            raise ValueError("FlatBuffer needs at least one tensor.")
        first = self.tensors[0].data
        for t in self.tensors:
            if t.data.dtype != first.dtype or backend.device_of(t.data) != backend.device_of(first):
                raise ValueError(f"a flat buffer holds tensors of one dtype and device, got "
                                 f"{first.dtype} on {backend.device_of(first)} and {t.data.dtype} "
                                 f"on {backend.device_of(t.data)}; use a per-parameter optimizer "
                                 "or convert the model first.")
        xp = backend.get_array_module(first)
        self.segments, start = [], 0
        for t in self.tensors:
            self.segments.append((start, start + t.data.size))
            start += t.data.size
        self.data = xp.empty(start, dtype=first.dtype)
        self.grad = xp.zeros(start, dtype=first.dtype)
        self.views = []
        for t in self.tensors:
            self.views.append(None)
            self.adopt(len(self.views) - 1)

    def view(self, flat, i):
        """Tensor i's slice of the flat array `flat` (any array of the buffer's layout)."""
        start, stop = self.segments[i]
        return flat[start:stop].reshape(self.tensors[i].data.shape)

    def zeros(self):
        """A new zero array of the buffer's layout (for optimizer moments)."""
        return backend.get_array_module(self.data).zeros_like(self.data)

    def adopt(self, i):
        """Copy tensor i's array into its slice and make tensor.data that view (again: for
        arrays replaced since, e.g. by Module.load_state_dict)."""
        t, start, stop = self.tensors[i], *self.segments[i]
        if (t.data.size != stop - start or t.data.dtype != self.data.dtype
                or backend.device_of(t.data) != backend.device_of(self.data)):
            raise RuntimeError(f"parameter {i} changed shape, dtype or device since the flat "
                               "optimizer was built (model.to()? a new layer?); build the "
                               "optimizer after the model is final.")
        view = self.data[start:stop].reshape(t.data.shape)
        view[...] = t.data
        t.data = self.views[i] = view

    def gather_grads(self):
        """Point every tensor's .grad at its slice of `grad`, copying it there first when it
        lives elsewhere. Returns [whether tensor i has a gradient]; a missing one's slice is
        zeroed (its .grad stays None)."""
        has = []
        for i, t in enumerate(self.tensors):
            if t.data is not self.views[i]:
                self.adopt(i)
            start, stop = self.segments[i]
            view = self.grad[start:stop].reshape(t.data.shape)
            if t.grad is None:
                view[...] = 0
                has.append(False)
                continue
            if t.grad is not view:
                view[...] = t.grad
                t.grad = view
            has.append(True)
        return has


class _FlatOptimizer(Optimizer):
    """Optimizer over a FlatBuffer: step() calls `update_flat(lo, hi, step, group)` once per
    parameter group (or once per parameter when some lack a gradient or their step counts
    differ, e.g. after loading a per-parameter state), on slices [lo, hi) of the flat arrays."""

    moment_names = ()

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.buffer = FlatBuffer(self.params)
        self.flat_state = {name: self.buffer.zeros() for name in self._moments()}

    def _moments(self):
        return self.moment_names

    def add_param_group(self, group):
        if hasattr(self, "buffer"):
            raise ValueError(f"{type(self).__name__} lays out all parameters when it is built; "
                             "pass every parameter group to the constructor.")
        super().add_param_group(group)

    def _param_state(self, i):
        """Parameter i's state dict: its step count and views of the flat moments."""
        p = self.params[i]
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = {"step": self._step_view(i) if self.defaults.get(
                "capturable") else 0}
            state.update({k: self.buffer.view(v, i) for k, v in self.flat_state.items()})
        return state

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        has = self.buffer.gather_grads()
        with no_grad():
            first = 0
            for group in self.param_groups:
                idx = range(first, first + len(group["params"]))
                first += len(idx)
                active = [i for i in idx if has[i]]
                if self.defaults.get("capturable") and active:
                    for lo, hi, t in self._device_step_spans(idx, active):
                        self.update_flat(lo, hi, t, group)
                    continue
                steps = []
                for i in active:
                    state = self._param_state(i)
                    state["step"] += 1
                    steps.append(state["step"])
                if not active:
                    continue
                if len(active) == len(idx) and len(set(steps)) == 1:
                    spans = [(self.buffer.segments[idx[0]][0], self.buffer.segments[idx[-1]][1],
                              steps[0])]
                else:
                    spans = [(*self.buffer.segments[i], t) for i, t in zip(active, steps)]
                for lo, hi, t in spans:
                    self.update_flat(lo, hi, t, group)
        return loss

    def update_flat(self, lo, hi, step, group):
        raise NotImplementedError

    # ------------------------------------------------------------------ capturable step counts
    # With capturable=True (FlatAdam, FlatAdamW) every parameter's step count is a 0-d view of
    # one float64 array on the parameters' device, `device_steps`, so that a CUDA graph can
    # replay the step and a GradScaler's skip leaves the counts as they were, with no host
    # read. A group whose counts have moved together so far (every parameter had a gradient
    # at every step; known on the host) is one span, counted by one operation.
    def _step_view(self, i):
        """Parameter i's step count: a 0-d view of device_steps (made on first use)."""
        self._make_device_steps()
        return self.device_steps[i:i + 1].reshape(())

    def _make_device_steps(self):
        if getattr(self, "device_steps", None) is None:
            xp = backend.get_array_module(self.buffer.data)
            self.device_steps = xp.zeros(len(self.params), dtype=xp.float64)
            self.steps_together = {}         # a group's first parameter index -> bool

    def _device_step_spans(self, idx, active):
        """Count a step for the active parameters of a group (none when the GradScaler's flag
        is set) and return the spans [(lo, hi, step count as a 0-d device array)]."""
        count = 1 if self.found_inf is None else (self.found_inf == 0)
        views = [self._param_state(i)["step"] for i in active]
        together = self.steps_together.get(idx[0], True) and len(active) == len(idx)
        self.steps_together[idx[0]] = together
        if together:
            self.device_steps[idx[0]:idx[-1] + 1] += count
            return [(self.buffer.segments[idx[0]][0], self.buffer.segments[idx[-1]][1],
                     views[0])]
        for t in views:
            t += count
        return [(*self.buffer.segments[i], t) for i, t in zip(active, views)]

    def load_state_dict(self, state_dict):
        """As Optimizer.load_state_dict (a per-parameter optimizer's state loads too); the
        loaded moments are then copied into the flat buffers."""
        super().load_state_dict(state_dict)
        loaded, self.state = self.state, {}
        for i, p in enumerate(self.params):
            saved = loaded.get(p)
            if saved is None:
                continue
            state = self._param_state(i)
            for name, value in saved.items():
                if name in state and name != "step":
                    state[name][...] = value
                else:
                    state[name] = value
            if saved and "step" not in saved:
                state["step"] = 1     # SGD's state has no step count: it has stepped before
        for group in self.param_groups:       # capturable: the constructor's choice, not the file's
            if "capturable" in self.defaults:
                group["capturable"] = self.defaults["capturable"]
        if self.defaults.get("capturable"):
            self._load_device_steps()
        else:                         # counts saved by a capturable optimizer: numbers again
            for state in self.state.values():
                if hasattr(state.get("step"), "shape"):
                    state["step"] = int(backend.to_numpy(state["step"]))

    def _load_device_steps(self):
        """After loading: the step counts into device_steps (a host write; loading is not a
        training step), and which groups' counts still move together."""
        self._make_device_steps()
        counts = {}
        for i, p in enumerate(self.params):
            state = self.state.get(p)
            if state is not None:
                counts[i] = float(backend.to_numpy(state["step"]))
                view = state["step"] = self._step_view(i)
                view[...] = counts[i]
        first = 0
        for group in self.param_groups:
            idx = range(first, first + len(group["params"]))
            first += len(idx)
            seen = {counts.get(i) for i in idx}
            self.steps_together[idx[0]] = len(seen) == 1      # (None: never stepped)


class FlatSGD(_FlatOptimizer):
    """SGD (same options and numbers as minidl.optim.SGD) on one flat buffer."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        super().__init__(params, sgd_defaults("FlatSGD", lr, momentum, dampening, weight_decay,
                                              nesterov))

    def _moments(self):
        return ("momentum_buffer",) if any(g["momentum"] != 0 for g in self.param_groups) else ()

    @property
    def supports_found_inf(self):
        # As SGD: the momentum buffers start at zero, so under a GradScaler's flag no step is
        # treated as the first (with dampening 0 that is the same step), and a skipped one
        # leaves nothing behind. The step count here only tells the first step apart; it counts
        # the steps tried (SGD's own state has no step count).
        return skips_on_found_inf(self.param_groups)

    def update_flat(self, lo, hi, step, group):
        buf = self.flat_state.get("momentum_buffer")
        kernels.for_array(self.buffer.data).sgd_update(
            self.buffer.data[lo:hi], self.buffer.grad[lo:hi],
            None if buf is None else buf[lo:hi], step == 1 and self.found_inf is None,
            group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
            group["nesterov"], found_inf=self.found_inf)


class FlatAdam(_FlatOptimizer):
    """Adam (same options and numbers as minidl.optim.Adam) on one flat buffer.

    capturable=True: as Adam's, the step counts live on the device (see _step_view), so a
    CUDA graph can replay the step and a GradScaler's skip happens on the device. It holds
    for every parameter group and stays what the constructor was given (a loaded state that
    says otherwise does not change it)."""
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, capturable=False):
        super().__init__(params, dict(adam_defaults(type(self).__name__, lr, betas, eps,
                                                    weight_decay, amsgrad),
                                      capturable=bool(capturable)))
        if any(bool(g["capturable"]) != bool(capturable) for g in self.param_groups):
            raise ValueError(f"{type(self).__name__}'s capturable applies to all parameters; "
                             "pass it to the constructor, not in a parameter group.")

    @property
    def supports_found_inf(self):
        return bool(self.defaults["capturable"])

    def _moments(self):
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if any(g["amsgrad"] for g in self.param_groups) \
            else names

    def update_flat(self, lo, hi, step, group):
        p, s = self.buffer.data[lo:hi], self.flat_state
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if wd != 0 and self.decoupled:
            p *= decay_factor(1 - lr * wd, p, self.found_inf)
            wd = 0.0
        arrays = (p, self.buffer.grad[lo:hi], s["exp_avg"][lo:hi], s["exp_avg_sq"][lo:hi],
                  s["max_exp_avg_sq"][lo:hi] if group["amsgrad"] else None, group["amsgrad"],
                  beta1, beta2)
        bundle = kernels.for_array(p)
        if hasattr(step, "shape"):     # capturable: the count (so the corrections) on the device
            bundle.adam_update_at_step(*arrays, lr, step, group["eps"], wd,
                                       found_inf=self.found_inf)
        else:
            bundle.adam_update(*arrays, lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step),
                               group["eps"], wd)


class FlatAdamW(FlatAdam):
    """AdamW (same options and numbers as minidl.optim.AdamW) on one flat buffer."""
    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, capturable=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, capturable)


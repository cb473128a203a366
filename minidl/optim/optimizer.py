"""Optimizer base class: parameter groups, per-parameter state, zero_grad, step, state_dict.

A subclass sets its default hyper-parameters and implements `update(param, grad, state, group)`,
which changes `param.data` in place with xp operations (so it runs on the parameter's device)
and keeps whatever it needs between steps (momentum buffers, step counts) in `state`, a dict
of arrays and numbers. Saving `optimizer.state_dict()` and loading it into a fresh optimizer
over the same parameters resumes training with exactly the step an uninterrupted run takes.
"""
import copy

import numpy

from .. import backend
from ..grad_mode import no_grad
from ..tensor import Tensor


class Optimizer:
    # The GradScaler's inf/NaN flag (a 0-d float32 array on the parameters' device) while
    # GradScaler.step runs this optimizer's step, None otherwise. Optimizers whose
    # `supports_found_inf` is true then skip the step on the device when the flag is set
    # (parameters, moments and step counts unchanged), so the scaler never reads it back.
    found_inf = None

    @property
    def supports_found_inf(self):
        """Whether step() honours `found_inf` (else the GradScaler reads the flag on the host
        and does not call step() on an inf/NaN)."""
        return False

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.param_groups = []
        self.state = {}          # parameter (Tensor) -> dict of its state
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list; pass "
                             "model.parameters() of a model that has parameters.")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group):
        """Add a dict {"params": [...], "lr": ..., ...}; missing options take the defaults."""
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__} can only optimise Tensors, got "
                                f"{type(p).__name__}.")
            if not p.requires_grad:
                raise ValueError(f"{type(self).__name__} got a tensor that does not require grad; "
                                 "only pass trainable parameters.")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params) or len({id(p) for p in params}) != len(params):
            raise ValueError("some parameters appear more than once in the optimizer's parameter "
                             "groups; list each parameter once.")
        group["params"] = params
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None if set_to_none or p.grad is None else p.grad * 0

    def step(self, closure=None):
        """One update of every parameter that has a gradient. closure: re-evaluates the loss."""
        loss = None
        if closure is not None:
            from ..grad_mode import enable_grad
            with enable_grad():
                loss = closure()
        with no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad
                    if grad.dtype != p.data.dtype:
                        grad = grad.astype(p.data.dtype)
                    self.update(p, grad, self.state.setdefault(p, {}), group)
        return loss

    def update(self, param, grad, state, group):
        """Change param.data in place. grad must not be modified (it may be shared)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ saving and resuming
    def state_dict(self):
        """{"state": {index: {name: array or number}}, "param_groups": [{options, "params": [index]}]}.

        Parameters are named by their position across the groups, as in torch, so the dict
        can be loaded into a new optimizer built over the same parameters in the same order.
        The arrays are the live ones (not copies), as in torch: save them before stepping again.
        """
        index = {}
        groups = []
        for group in self.param_groups:
            entry = {k: v for k, v in group.items() if k != "params"}
            entry["params"] = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                entry["params"].append(index[id(p)])
            groups.append(entry)
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore options and per-parameter state (copied onto each parameter's device)."""
        groups = state_dict["param_groups"]
        if isinstance(groups, dict):   # a list comes back from minidl.load as a list already;
            groups = [groups[k] for k in sorted(groups, key=int)]   # accept {"0": ...} too
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the saved optimizer state has {len(groups)} parameter groups, this "
                             f"optimizer has {len(self.param_groups)}; build it the same way.")
        by_index = {}
        for saved, group in zip(groups, self.param_groups):
            saved_params = [int(i) for i in saved["params"]]
            if len(saved_params) != len(group["params"]):
                raise ValueError(f"a saved parameter group holds {len(saved_params)} parameters, "
                                 f"this one {len(group['params'])}; build the optimizer over the "
                                 "same model.")
            for i, p in zip(saved_params, group["params"]):
                by_index[i] = p
        self.state = {}
        for key, saved in state_dict.get("state", {}).items():
            p = by_index.get(int(key))
            if p is None:
                raise ValueError(f"the saved optimizer state names parameter {key}, which this "
                                 "optimizer does not have.")
            state = {}
            for name, value in saved.items():
                if isinstance(value, numpy.ndarray) or backend.is_gpu_array(value):
                    value = backend.to_device(value, p.device).astype(value.dtype, copy=True)
                elif isinstance(value, numpy.generic):     # a NumPy scalar -> Python number
                    value = value.item()
                state[name] = value
            self.state[p] = state
        for saved, group in zip(groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = _plain(value)

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        return "\n".join(lines) + "\n)"


def _plain(value):
    """Options read back from a file may be arrays: turn them into Python numbers/tuples."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return tuple(value)
    return copy.deepcopy(value)

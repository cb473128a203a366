"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay (torch semantics)."""
from .. import backend
from .optimizer import Optimizer
import kernels


def sgd_defaults(name, lr, momentum, dampening, weight_decay, nesterov):
    """SGD's hyper-parameters checked (one sentence naming `name` on a bad value) -> dict."""
    if lr < 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(f"{name} needs lr, momentum and weight_decay >= 0, got lr={lr}, "
                         f"momentum={momentum}, weight_decay={weight_decay}.")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{name} with nesterov=True needs momentum > 0 and dampening = 0.")
    return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                nesterov=nesterov)


class SGD(Optimizer):
    """For each parameter p with gradient g:

        g = g + weight_decay * p
        buf = g                                     (first step)
        buf = momentum * buf + (1 - dampening) * g  (later steps)
        g = g + momentum * buf if nesterov else buf     (when momentum != 0)
        p = p - lr * g
    """
    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False):
        super().__init__(params, sgd_defaults("SGD", lr, momentum, dampening, weight_decay,
                                              nesterov))

    @property
    def supports_found_inf(self):
        return skips_on_found_inf(self.param_groups)

    def update(self, p, g, state, group):
        if self.found_inf is not None:
            return self._skippable_update(p, g, state, group)
        momentum, wd = group["momentum"], group["weight_decay"]
        if wd != 0:
            g = g + wd * p.data
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * g
            g = g + momentum * buf if group["nesterov"] else buf
        p.data -= group["lr"] * g

    def _skippable_update(self, p, g, state, group):
        """The same step through the kernel bundle, which skips it on the device when the
        GradScaler's flag self.found_inf is set. The momentum buffer starts at zero instead of
        at the first gradient: with dampening 0, momentum * 0 + g is g, and a skipped first
        step then leaves nothing to undo."""
        momentum, buf = group["momentum"], None
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = \
                    backend.get_array_module(p.data).zeros_like(p.data)
        kernels.for_array(p.data).sgd_update(
            p.data, g, buf, False, group["lr"], momentum, group["dampening"],
            group["weight_decay"], group["nesterov"], found_inf=self.found_inf)


def skips_on_found_inf(groups):
    """Whether SGD over these parameter groups can skip a step on the device (GradScaler):
    not with momentum and dampening, whose first step differs from the later ones."""
    return all(g["momentum"] == 0 or g["dampening"] == 0 for g in groups)

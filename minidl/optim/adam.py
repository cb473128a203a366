"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019), optionally with AMSGrad."""
import math

from .. import backend
from .optimizer import Optimizer
import kernels



def adam_defaults(name, lr, betas, eps, weight_decay, amsgrad):
    """Adam's hyper-parameters checked (one sentence naming `name` on a bad value) -> dict."""
    beta1, beta2 = betas
    if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"{name} needs lr, eps, weight_decay >= 0 and betas in [0, 1), got "
                         f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}.")
    return dict(lr=lr, betas=(float(beta1), float(beta2)), eps=eps, weight_decay=weight_decay,
                amsgrad=amsgrad)

class Adam(Optimizer):
    """Per parameter, at step t:

        m = beta1 m + (1 - beta1) g          v = beta2 v + (1 - beta2) g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

    weight_decay adds weight_decay * p to g (L2 regularisation); AdamW instead shrinks p
    directly ("decoupled" decay). amsgrad uses the running maximum of v.

    capturable=True (PyTorch's name) keeps the step count t in a 0-d array on the parameter's
    device and computes the bias corrections there, so that no Python number changes from
    step to step and a CUDA graph can replay the update (minidl.cuda.make_graphed_step). The
    numbers are Adam's; the learning rate stays a Python number (capture again after changing
    it). Slower on the CPU, where nothing is captured. With capturable=True a GradScaler's
    inf/NaN check skips the step on the device (`supports_found_inf`): parameters, moments
    and the step count stay as they were, with no host read.
    """
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, capturable=False):
        super().__init__(params, dict(adam_defaults(type(self).__name__, lr, betas, eps,
                                                    weight_decay, amsgrad),
                                      capturable=bool(capturable)))

    @property
    def supports_found_inf(self):
        # Plain Adam counts steps in Python, which cannot learn of a step skipped on the GPU.
        return all(g.get("capturable") for g in self.param_groups)

    def update(self, p, g, state, group):
        # Runs once per parameter per step (64 times for the example U-Net, most of them
        # small biases and BN scales), so it does little beyond calling the kernel.
        data = p.data
        if not state:
            xp = backend.get_array_module(data)
            state["step"] = 0       # (an array with capturable=True, see _capturable_update)
            state["exp_avg"] = xp.zeros_like(data)
            state["exp_avg_sq"] = xp.zeros_like(data)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = xp.zeros_like(data)
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if wd != 0 and self.decoupled:
            data *= decay_factor(1 - lr * wd, data, self.found_inf)
            wd = 0.0
        if group.get("capturable"):
            self._capturable_update(data, g, state, group, lr, beta1, beta2, wd)
            return
        t = state["step"] = int(state["step"]) + 1
        # The arithmetic (kernels/reference.py spells it out) is one fused loop on the CPU.
        kernels.for_array(data).adam_update(
            data, g, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            group["amsgrad"], beta1, beta2, lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t),
            group["eps"], wd)

    def _capturable_update(self, data, g, state, group, lr, beta1, beta2, wd):
        """The same step with the step count t a 0-d float64 array on the parameter's device;
        the bias corrections lr / (1 - beta1^t) and sqrt(1 - beta2^t) are computed from it
        where the update runs (on the GPU: inside the kernel), in float64 as Python computes
        them, then rounded to the parameter's dtype, as the Python numbers are."""
        xp = backend.get_array_module(data)
        if not hasattr(state["step"], "shape"):       # a new state, or one saved by plain Adam
            state["step"] = xp.asarray(float(state["step"]), dtype=xp.float64)
        t = state["step"]
        # In place: the graph's array. A step the GradScaler skips does not count.
        t += 1 if self.found_inf is None else (self.found_inf == 0)
        kernels.for_array(data).adam_update_at_step(
            data, g, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            group["amsgrad"], beta1, beta2, lr, t, group["eps"], wd, found_inf=self.found_inf)


def decay_factor(factor, data, found_inf=None):
    """AdamW's decay factor 1 - lr * weight_decay, or with a GradScaler's flag a 0-d array of
    data's dtype that is 1 when the step is skipped (decided on the device)."""
    if found_inf is None:
        return factor
    xp = backend.get_array_module(data)
    return xp.where(found_inf == 0, data.dtype.type(factor), data.dtype.type(1))


class AdamW(Adam):
    """Adam with decoupled weight decay: p = p - lr * weight_decay * p before the Adam step."""
    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, capturable=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, capturable)

"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019), optionally with AMSGrad."""
import math

from .. import backend
from .optimizer import Optimizer


class Adam(Optimizer):
    """Per parameter, at step t:

        m = beta1 m + (1 - beta1) g          v = beta2 v + (1 - beta2) g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

    weight_decay adds weight_decay * p to g (L2 regularisation); AdamW instead shrinks p
    directly ("decoupled" decay). amsgrad uses the running maximum of v.
    """
    decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False):
        beta1, beta2 = betas
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"{type(self).__name__} needs lr, eps, weight_decay >= 0 and betas in "
                             f"[0, 1), got lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}.")
        super().__init__(params, dict(lr=lr, betas=(float(beta1), float(beta2)), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad))

    def update(self, p, g, state, group):
        xp = backend.get_array_module(p.data)
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        if wd != 0:
            if self.decoupled:
                p.data *= 1 - lr * wd
            else:
                g = g + wd * p.data
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        if group["amsgrad"]:
            v_hat = state["max_exp_avg_sq"]
            xp.maximum(v_hat, v, out=v_hat)
        else:
            v_hat = v
        bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
        denominator = xp.sqrt(v_hat) / math.sqrt(bias2) + eps
        p.data -= (lr / bias1) * m / denominator


class AdamW(Adam):
    """Adam with decoupled weight decay: p = p - lr * weight_decay * p before the Adam step."""
    decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)

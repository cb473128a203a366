"""RMSprop (Hinton's lecture 6e), with torch's options: alpha, eps, momentum, centered."""
from .. import backend
from .optimizer import Optimizer


class RMSprop(Optimizer):
    """Per parameter:

        g = g + weight_decay * p
        s = alpha s + (1 - alpha) g^2                   (running mean of g^2)
        c = alpha c + (1 - alpha) g                     (centered only: mean of g)
        d = sqrt(s - c^2 if centered else s) + eps
        buf = momentum buf + g / d;  p = p - lr buf     (momentum > 0)
        p = p - lr g / d                                (otherwise)
    """
    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        if lr < 0 or eps < 0 or weight_decay < 0 or momentum < 0 or not 0 <= alpha <= 1:
            raise ValueError(f"RMSprop needs lr, eps, weight_decay, momentum >= 0 and alpha in "
                             f"[0, 1], got lr={lr}, alpha={alpha}, eps={eps}, "
                             f"weight_decay={weight_decay}, momentum={momentum}.")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered))

    def update(self, p, g, state, group):
        xp = backend.get_array_module(p.data)
        alpha, wd, momentum = group["alpha"], group["weight_decay"], group["momentum"]
        if not state:
            state["step"] = 0
            state["square_avg"] = xp.zeros_like(p.data)
            if momentum > 0:
                state["momentum_buffer"] = xp.zeros_like(p.data)
            if group["centered"]:
                state["grad_avg"] = xp.zeros_like(p.data)
        state["step"] += 1
        if wd != 0:
            g = g + wd * p.data
        s = state["square_avg"]
        s *= alpha
        s += (1 - alpha) * (g * g)
        if group["centered"]:
            c = state["grad_avg"]
            c *= alpha
            c += (1 - alpha) * g
            denominator = xp.sqrt(s - c * c) + group["eps"]
        else:
            denominator = xp.sqrt(s) + group["eps"]
        if momentum > 0:
            buf = state.setdefault("momentum_buffer", xp.zeros_like(p.data))
            buf *= momentum
            buf += g / denominator
            p.data -= group["lr"] * buf
        else:
            p.data -= group["lr"] * (g / denominator)

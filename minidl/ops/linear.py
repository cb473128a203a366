"""Fully connected layer: y = x @ weight.T + bias, one fused Function.

Fused so that backward reuses the flattened input directly: for x (..., in) the weight
gradient is gy (M, out)^T @ x (M, in) with M the product of the leading axes.
"""
from ..function import Function


class Linear(Function):
    def forward(self, x, weight, bias=None):
        need_x, need_w = self.needs_input_grad[:2] if self.needs_input_grad else (False, False)
        self.x = x if need_w else None         # dW needs x
        self.weight = weight if need_x else None   # dx needs W
        y = x @ weight.T
        if bias is not None:
            y = y + bias
        return y

    def backward(self, gy):
        need = self.needs_input_grad
        gx = gy @ self.weight if need[0] else None
        gw = gb = None
        if need[1]:
            out_features = gy.shape[-1]
            gw = gy.reshape(-1, out_features).T @ self.x.reshape(-1, self.x.shape[-1])
        if len(need) > 2 and need[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(axis=0)
        return gx, gw, gb


def linear(x, weight, bias=None):
    """y = x @ weight.T + bias.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    Returns (..., out_features).
    """
    xs, ws = tuple(x.shape), tuple(weight.shape)
    if len(ws) != 2 or not xs or xs[-1] != ws[1]:
        raise ValueError(f"linear() got input of shape {xs} and weight of shape {ws}; the weight "
                         "must be (out_features, in_features) with in_features = input.shape[-1].")
    if bias is not None and tuple(bias.shape) != (ws[0],):
        raise ValueError(f"linear() got bias of shape {tuple(bias.shape)}; it must be ({ws[0]},).")
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)

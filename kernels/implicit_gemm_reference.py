"""The implicit-GEMM convolution in plain NumPy: the oracle for kernels/implicit_gemm.py.

Each product of a convolution is one GEMM per group, C = A @ B, whose operands are *gathered*
from the arrays (the table in implicit_gemm.py's docstring). Here the gathers are written out
as whole matrices, with the same index formulas the CUDA kernel evaluates one tile at a time:
the GPU kernel is this file with B never stored.

Precision is modelled the same way as on the GPU: both operands are rounded to the mode's
type (tf32 / bf16 / fp16), products are summed in float64 here (the GPU sums in float32, so the
two differ by float32 summation error only: the tests' tolerances say how much).
"""
import numpy as np

PRECISIONS = ("highest", "tf32", "bf16", "fp16")


def round_to(a, precision):
    """float32 array a rounded as the kernel rounds its shared tiles."""
    a = np.asarray(a, dtype=np.float32)
    if precision == "highest":
        return a
    if precision == "fp16":
        return a.astype(np.float16).astype(np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    if precision == "bf16":    # keep 7 mantissa bits, round to nearest even
        drop = 16
        bits = bits + (1 << (drop - 1)) - 1 + ((bits >> drop) & 1)
    elif precision == "tf32":  # keep 10 mantissa bits, round to nearest, ties away from zero
        drop = 13
        bits = bits + (1 << (drop - 1))
    else:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    out = (bits & ~np.uint64((1 << drop) - 1)).astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(a), out, a)


def _taps(out_size, s, p, k, d):
    """(k, out_size) input coordinates read by output o through tap i: o*s - p + i*d."""
    return np.arange(k)[:, None] * d + np.arange(out_size)[None, :] * s - p


def im2col_matrix(x, g, groups, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """B of fwd for group g: (C_in/G*kh*kw, N*ho*wo), row (ci, i, j), column (n, oy, ox)."""
    n, c, h, w = x.shape
    cg = c // groups
    iy, ix = _taps(ho, sh, ph, kh, dh), _taps(wo, sw, pw, kw, dw)      # (kh, ho), (kw, wo)
    inside = (((iy >= 0) & (iy < h))[:, None, :, None] & ((ix >= 0) & (ix < w))[None, :, None, :])
    xs = x[:, g * cg:(g + 1) * cg]
    # vals[n, ci, i, j, oy, ox] = x[n, ci, iy[i, oy], ix[j, ox]], 0 where that is padding
    vals = xs[:, :, np.clip(iy, 0, h - 1)[:, None, :, None], np.clip(ix, 0, w - 1)[None, :, None, :]]
    vals = np.where(inside, vals, 0)
    return vals.transpose(1, 2, 3, 0, 4, 5).reshape(cg * kh * kw, n * ho * wo)


def _gemm(a, b, precision):
    return round_to(a, precision).astype(np.float64) @ round_to(b, precision).astype(np.float64)


def conv2d_forward(x, w, sh, sw, ph, pw, dh, dw, ho, wo, groups, precision="highest"):
    """x (N, C_in, H, W), w (C_out, C_in/G, kh, kw) -> y (N, C_out, ho, wo), float32."""
    n = x.shape[0]
    c_out, _, kh, kw = w.shape
    og = c_out // groups
    y = np.empty((n, c_out, ho, wo), dtype=np.float32)
    for g in range(groups):
        a = w[g * og:(g + 1) * og].reshape(og, -1)                          # A: (M, R)
        b = im2col_matrix(x, g, groups, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)   # B: (R, Q)
        y[:, g * og:(g + 1) * og] = _gemm(a, b, precision).reshape(og, n, ho, wo).transpose(1, 0, 2, 3)
    return y


def conv2d_input_grad(gy, w, h, wd, sh, sw, ph, pw, dh, dw, groups, precision="highest"):
    """gy (N, C_out, ho, wo), w (C_out, C_in/G, kh, kw) -> gx (N, C_in, h, wd), float32: the
    GEMM A = weight read as (C_in/G, C_out/G*kh*kw), B[(co, i, j), (n, iy, ix)] = gy at the
    output that reads (iy, ix) through tap (i, j), 0 where none does."""
    n, c_out, ho, wo = gy.shape
    _, ig, kh, kw = w.shape
    og = c_out // groups
    gx = np.empty((n, ig * groups, h, wd), dtype=np.float32)
    # ty[i, iy] = iy + ph - i*dh must be oy*sh with 0 <= oy < ho
    ty = np.arange(h)[None, :] + ph - np.arange(kh)[:, None] * dh
    tx = np.arange(wd)[None, :] + pw - np.arange(kw)[:, None] * dw
    oy, ox = ty // sh, tx // sw
    ok_y = (ty >= 0) & (ty % sh == 0) & (oy < ho)                        # (kh, h)
    ok_x = (tx >= 0) & (tx % sw == 0) & (ox < wo)                        # (kw, wd)
    inside = ok_y[:, None, :, None] & ok_x[None, :, None, :]
    for g in range(groups):
        ws = w[g * og:(g + 1) * og]                                         # (og, ig, kh, kw)
        a = ws.transpose(1, 0, 2, 3).reshape(ig, og * kh * kw)              # A: (M, R)
        gs = gy[:, g * og:(g + 1) * og]
        vals = gs[:, :, np.clip(oy, 0, ho - 1)[:, None, :, None], np.clip(ox, 0, wo - 1)[None, :, None, :]]
        b = np.where(inside, vals, 0).transpose(1, 2, 3, 0, 4, 5).reshape(og * kh * kw, n * h * wd)
        gx[:, g * ig:(g + 1) * ig] = _gemm(a, b, precision).reshape(ig, n, h, wd).transpose(1, 0, 2, 3)
    return gx


def conv2d_weight_grad(x, gy, kh, kw, sh, sw, ph, pw, dh, dw, groups, precision="highest"):
    """x (N, C_in, H, W), gy (N, C_out, ho, wo) -> gw (C_out, C_in/G, kh, kw), float32: the GEMM
    A = gy as (C_out/G, N*ho*wo), B = im2col(x) transposed."""
    n, c_in = x.shape[:2]
    _, c_out, ho, wo = gy.shape
    og, ig = c_out // groups, c_in // groups
    gw = np.empty((c_out, ig, kh, kw), dtype=np.float32)
    for g in range(groups):
        a = gy[:, g * og:(g + 1) * og].transpose(1, 0, 2, 3).reshape(og, n * ho * wo)
        b = im2col_matrix(x, g, groups, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo).T
        gw[g * og:(g + 1) * og] = _gemm(a, b, precision).reshape(og, ig, kh, kw)
    return gw


def conv_transpose2d_forward(x, w, out_hw, sh, sw, ph, pw, dh, dw, groups, precision="highest"):
    """x (N, C_in, h, w), w (C_in, C_out/G, kh, kw) -> y (N, C_out, *out_hw): conv2d's input
    gradient, the adjoint (see implicit_gemm.py)."""
    return conv2d_input_grad(x, w, out_hw[0], out_hw[1], sh, sw, ph, pw, dh, dw, groups, precision)

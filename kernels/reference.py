"""Reference kernels: plain NumPy, written to be read, and the oracle the tests compare against.

Every function here has a twin with the same signature in kernels/cpu.py (Numba) and
kernels/gpu.py (CuPy). All arrays are C-contiguous, NCHW; every function returns new arrays.

Shared geometry arguments (one pair per spatial axis, height first):

    kh, kw   kernel size            sh, sw   stride
    ph, pw   zero padding before    dh, dw   dilation (gap between kernel taps)
    ho, wo   output size, passed in explicitly by the caller

Output pixel (oy, ox) with kernel tap (i, j) reads input pixel

    iy = oy * sh - ph + i * dh,    ix = ox * sw - pw + j * dw

and anything outside 0 <= iy < h, 0 <= ix < w is padding. Because ho/wo are given rather
than computed, a caller can ask for more output rows than symmetric padding would give; the
extra windows simply read more zeros. That is how conv2d's asymmetric padding="same" and
pooling's ceil_mode are expressed without a second padding argument. Padding may also be
negative: output row 0 then starts -ph rows into the input, which is how minidl/ops/conv_plan.py
unfolds one band of output rows at a time.
"""
import numpy as np


def _tap(o, s, p, k, d):
    """Input coordinate read by output position o through kernel tap k."""
    return o * s - p + k * d


# ---------------------------------------------------------------------- im2col / col2im
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """Unfold every receptive window into a column.

    x: (N, C, H, W) -> cols (N, C*kh*kw, ho*wo). Row (c, i, j) of cols holds channel c seen
    through tap (i, j) at every output position, the same order as the columns of
    weight.reshape(C_out, C*kh*kw); so conv2d is `weight2d @ cols[n]`.
    """
    n, c, h, w = x.shape
    cols = np.zeros((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            for oy in range(ho):
                iy = _tap(oy, sh, ph, i, dh)
                if not 0 <= iy < h:
                    continue          # a padding row: stays zero
                for ox in range(wo):
                    ix = _tap(ox, sw, pw, j, dw)
                    if 0 <= ix < w:
                        cols[:, :, i, j, oy, ox] = x[:, :, iy, ix]
    return cols.reshape(n, c * kh * kw, ho * wo)


def col2im(cols, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """The adjoint of im2col: add every column entry back onto the pixel it was read from.

    cols: (N, C*kh*kw, ho*wo) -> x (N, C, h, w). Where windows overlap, contributions add up;
    entries that came from padding are dropped.
    """
    n = cols.shape[0]
    cols = cols.reshape(n, c, kh, kw, ho, wo)
    x = np.zeros((n, c, h, w), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            for oy in range(ho):
                iy = _tap(oy, sh, ph, i, dh)
                if not 0 <= iy < h:
                    continue
                for ox in range(wo):
                    ix = _tap(ox, sw, pw, j, dw)
                    if 0 <= ix < w:
                        x[:, :, iy, ix] += cols[:, :, i, j, oy, ox]
    return x


# ---------------------------------------------------------------------- max pooling
def maxpool2d_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """Max over each window, and where it was.

    x: (N, C, H, W) -> y (N, C, ho, wo), idx int64 (N, C, ho, wo) with idx = iy * W + ix, the
    flat position inside the input plane. Taps are scanned row by row and only a strictly
    larger value replaces the current best, so the first maximum wins ties (a window of -inf
    points at its first pixel). Padding is never a candidate. A NaN wins (as in PyTorch).
    """
    n, c, h, w = x.shape
    y = np.full((n, c, ho, wo), -np.inf, dtype=x.dtype)
    idx = np.full((n, c, ho, wo), -1, dtype=np.int64)
    for b in range(n):
        for ch in range(c):
            for oy in range(ho):
                for ox in range(wo):
                    best, where = -np.inf, -1
                    for i in range(kh):
                        iy = _tap(oy, sh, ph, i, dh)
                        if not 0 <= iy < h:
                            continue
                        for j in range(kw):
                            ix = _tap(ox, sw, pw, j, dw)
                            if not 0 <= ix < w:
                                continue
                            v = x[b, ch, iy, ix]
                            if where < 0 or v > best or np.isnan(v):
                                best, where = v, iy * w + ix
                    y[b, ch, oy, ox], idx[b, ch, oy, ox] = best, where
    return y, idx


def maxpool2d_backward(gy, idx, h, w):
    """Send each output gradient to the input pixel that won its window.

    gy, idx: (N, C, ho, wo) -> gx (N, C, h, w). Overlapping windows can pick the same pixel
    more than once; those gradients add. idx < 0 (a window of padding only) sends nothing.
    """
    n, c = gy.shape[:2]
    gx = np.zeros((n, c, h * w), dtype=gy.dtype)
    for b in range(n):
        for ch in range(c):
            where, g = idx[b, ch].ravel(), gy[b, ch].ravel()
            keep = where >= 0
            np.add.at(gx[b, ch], where[keep], g[keep])
    return gx.reshape(n, c, h, w)


def maxunpool2d_forward(x, idx, ho, wo):
    """Put each value back where max pooling found it (SegNet's unpooling); zeros elsewhere.

    x, idx: (N, C, h, w) -> y (N, C, ho, wo) with y[b, c].flat[idx[b, c]] = x[b, c].
    """
    n, c = x.shape[:2]
    y = np.zeros((n, c, ho * wo), dtype=x.dtype)
    for b in range(n):
        for ch in range(c):
            y[b, ch, idx[b, ch].ravel()] = x[b, ch].ravel()
    return y.reshape(n, c, ho, wo)


def maxunpool2d_backward(gy, idx):
    """Gradient of unpooling: read gy back at the same positions.

    gy: (N, C, ho, wo), idx: (N, C, h, w) -> gx (N, C, h, w).
    """
    n, c = gy.shape[:2]
    flat = gy.reshape(n, c, -1)
    gx = np.empty(idx.shape, dtype=gy.dtype)
    for b in range(n):
        for ch in range(c):
            gx[b, ch] = flat[b, ch][idx[b, ch]]
    return gx


# ---------------------------------------------------------------------- bilinear resize
def bilinear_weights(n_in, n_out, align_corners):
    """For each output coordinate along one axis: the two source indices and their weights.

    PyTorch's rule (area_pixel_compute_source_index): with align_corners the corner pixels
    of input and output line up, src = dst * (n_in - 1) / (n_out - 1); without it, pixel
    *centres* line up, src = (dst + 0.5) * n_in / n_out - 0.5, clamped below at 0.
    Returns i0, i1 (int64) and l0, l1 (float64) with value = l0 * in[i0] + l1 * in[i1].
    """
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = dst * scale
    else:
        src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = np.clip(src - i0, 0.0, 1.0)
    return i0, i1, 1.0 - l1, l1


def bilinear_forward(x, ho, wo, align_corners):
    """Bilinear resize: x (N, C, h, w) -> y (N, C, ho, wo)."""
    h, w = x.shape[2:]
    y0, y1, a0, a1 = bilinear_weights(h, ho, align_corners)
    x0, x1, b0, b1 = bilinear_weights(w, wo, align_corners)
    a0, a1 = a0[:, None], a1[:, None]
    top = x[:, :, y0][:, :, :, x0] * b0 + x[:, :, y0][:, :, :, x1] * b1
    bottom = x[:, :, y1][:, :, :, x0] * b0 + x[:, :, y1][:, :, :, x1] * b1
    return (a0 * top + a1 * bottom).astype(x.dtype)


def bilinear_backward(gy, h, w, align_corners):
    """Adjoint of bilinear_forward: gy (N, C, ho, wo) -> gx (N, C, h, w)."""
    n, c, ho, wo = gy.shape
    y0, y1, a0, a1 = bilinear_weights(h, ho, align_corners)
    x0, x1, b0, b1 = bilinear_weights(w, wo, align_corners)
    gx = np.zeros((n, c, h, w), dtype=np.float64)
    for oy in range(ho):
        for ox in range(wo):
            g = gy[:, :, oy, ox]
            gx[:, :, y0[oy], x0[ox]] += a0[oy] * b0[ox] * g
            gx[:, :, y0[oy], x1[ox]] += a0[oy] * b1[ox] * g
            gx[:, :, y1[oy], x0[ox]] += a1[oy] * b0[ox] * g
            gx[:, :, y1[oy], x1[ox]] += a1[oy] * b1[ox] * g
    return gx.astype(gy.dtype)


# ---------------------------------------------------------------------- batch normalisation
# x is viewed as (N, C, S): S = H*W for images, 1 for (N, C) features. Statistics are per
# channel, over the N*S values of that channel. Written with array methods and operators
# only, so the same code also runs on CuPy arrays (kernels/gpu.py uses it as it is).
def batchnorm_stats(x):
    """x (N, C, S) -> per-channel mean and biased variance, each (C,), in x's dtype."""
    return x.mean(axis=(0, 2)), x.var(axis=(0, 2))


def batchnorm_train_statistics(x, eps, running_mean=None, running_var=None, momentum=0.0):
    """x (N, C, S) with N*S > 1 -> (mean, inv_std), each (C,), in x's dtype:

        mean, var = batchnorm_stats(x),   inv_std = 1 / sqrt(var + eps)
        running_mean <- (1 - momentum) running_mean + momentum mean            (in place)
        running_var  <- (1 - momentum) running_var + momentum var M / (M - 1)  (unbiased)

    with M = N*S values per channel; running_mean and running_var are (C,) or both None.
    """
    mean, var = batchnorm_stats(x)
    if running_mean is not None:
        m = x.shape[0] * x.shape[2]
        running_mean *= 1 - momentum
        running_mean += momentum * mean.astype(running_mean.dtype, copy=False)
        running_var *= 1 - momentum
        running_var += (momentum * m / (m - 1)) * var.astype(running_var.dtype, copy=False)
    return mean, (1 / np.sqrt(var + x.dtype.type(eps))).astype(x.dtype)


def batchnorm_eval_statistics(running_mean, running_var, eps):
    """running_mean, running_var (C,) -> (mean, inv_std), each (C,): the running mean, and
    inv_std = 1 / sqrt(running_var + eps)."""
    return running_mean, (1 / np.sqrt(running_var + running_var.dtype.type(eps))).astype(
        running_var.dtype)


def batchnorm_forward(x, mean, inv_std, scale, shift, relu=False):
    """x (N, C, S); mean, inv_std, scale, shift (C,) -> (y, xhat), both (N, C, S):

        xhat = (x - mean) * inv_std,   y = xhat * scale + shift   (per channel)

    relu: y = max(y, 0) as well (batch norm and the ReLU after it in one pass).
    """
    xhat = (x - mean[:, None]) * inv_std[:, None]
    y = xhat * scale[:, None] + shift[:, None]
    if relu:
        y[y < 0] = 0
    return y, xhat


def batchnorm_backward(gy, xhat, inv_std, scale, training, relu_shift=None):
    """Gradients of batchnorm_forward: gy, xhat (N, C, S); inv_std, scale (C,) ->
    (gx (N, C, S), gscale (C,), gshift (C,)).

        gshift = sum(gy),  gscale = sum(gy * xhat)                       (per channel)
        training: gx = scale * inv_std * (gy - mean(gy) - xhat * mean(gy * xhat))
        eval:     gx = scale * inv_std * gy

    In training the mean and variance are functions of x too; the two subtracted means are
    their contribution (minidl/ops/normalization.py derives it).

    relu_shift: the forward's shift when it ran with relu=True. gy is then the gradient of
    the ReLU's output, and is first zeroed where xhat * scale + shift (recomputed exactly as
    forward did, so no mask is kept) was not positive.
    """
    if relu_shift is not None:
        gy = gy * (xhat * scale[:, None] + relu_shift[:, None] > 0)
    gshift = gy.sum(axis=(0, 2))
    gscale = (gy * xhat).sum(axis=(0, 2))
    k = (scale * inv_std)[:, None]
    if training:
        m = gy.shape[0] * gy.shape[2]
        gx = k * (gy - (gshift / m)[:, None] - xhat * (gscale / m)[:, None])
    else:
        gx = k * gy
    return gx.astype(gy.dtype), gscale, gshift


# ---------------------------------------------------------------------- Adam
# In-place arithmetic and operators only, so the same code also runs on CuPy arrays
# (kernels/gpu.py uses it as it is).
def adam_update(p, g, m, v, v_max, amsgrad, beta1, beta2, step_size, bias2_sqrt, eps,
                weight_decay, found_inf=None):
    """One Adam step, in place on p, m, v (and v_max when amsgrad), all of one shape:

        g = g + weight_decay * p                       (L2 form; AdamW decays p beforehand)
        m = beta1 m + (1 - beta1) g,    v = beta2 v + (1 - beta2) g^2
        v_max = max(v_max, v)                          (AMSGrad only; then used for v)
        p = p - step_size * m / (sqrt(v) / bias2_sqrt + eps)

    step_size = lr / (1 - beta1^t) and bias2_sqrt = sqrt(1 - beta2^t) undo the zero start of
    m and v at step t. found_inf: a 0-d float32 array (the GradScaler's); when it is nonzero
    the step is skipped and nothing changes (see skip_if_found_inf).
    """
    if found_inf is not None:
        state = (p, m, v) + ((v_max,) if amsgrad else ())
        return skip_if_found_inf(
            lambda p, m, v, v_max=None: adam_update(p, g, m, v, v_max, amsgrad, beta1, beta2,
                                                    step_size, bias2_sqrt, eps, weight_decay),
            state, found_inf)
    if weight_decay != 0:
        g = g + weight_decay * p
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * (g * g)
    if amsgrad:
        np.maximum(v_max, v, out=v_max)     # (dispatches to CuPy for CuPy arrays)
        v = v_max
    p -= step_size * m / (v ** 0.5 / bias2_sqrt + eps)


def adam_update_at_step(p, g, m, v, v_max, amsgrad, beta1, beta2, lr, step, eps,
                        weight_decay, found_inf=None):
    """adam_update at step count `step`, a 0-d float64 array (capturable Adam keeps it on the
    device): step_size = lr / (1 - beta1^step), bias2_sqrt = sqrt(1 - beta2^step), computed
    in float64 and rounded to p's dtype, as the Python numbers are for plain Adam."""
    step_size = (lr / (1 - beta1 ** step)).astype(p.dtype)
    bias2_sqrt = np.sqrt(1 - beta2 ** step).astype(p.dtype)
    adam_update(p, g, m, v, v_max, amsgrad, beta1, beta2, step_size, bias2_sqrt, eps,
                weight_decay, found_inf)


# ---------------------------------------------------------------------- SGD
def sgd_update(p, g, buf, first, lr, momentum, dampening, weight_decay, nesterov,
               found_inf=None):
    """One SGD step, in place on p (and buf, the momentum buffer, when momentum != 0):

        g = g + weight_decay * p
        buf = g                                   (first step)
        buf = momentum * buf + (1 - dampening) g  (later steps)
        g = g + momentum * buf if nesterov else buf
        p = p - lr * g

    The same arithmetic as minidl/optim/sgd.py, as one function a kernel bundle can offer.
    found_inf: as in adam_update (nonzero: the step is skipped, nothing changes).
    """
    if found_inf is not None:
        state = (p, buf) if momentum != 0 else (p,)
        return skip_if_found_inf(
            lambda p, buf=None: sgd_update(p, g, buf, first, lr, momentum, dampening,
                                           weight_decay, nesterov),
            state, found_inf)
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        if first:
            buf[...] = g
        else:
            buf *= momentum
            buf += (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p -= lr * g


# ---------------------------------------------------------------------- loss scaling (GradScaler)
# The GradScaler's arithmetic on arrays (minidl/amp.py), written so that no value is read back
# to the host: on a GPU every decision stays on the device, and a CUDA graph can replay it.
# The flag `found_inf` is a 0-d float32 array, 0 or 1 (or a sum of such flags).
def unscale_and_check(g, out, scale, found_inf):
    """out = g * inv (out may be g itself, for in place), inv = 1 / scale rounded to float32
    (PyTorch's inverse scale); found_inf becomes 1 when a value of out is inf or NaN and is
    left as it is otherwise, so one flag collects the check over several calls.

    g, out: arrays of one shape and dtype; scale: 0-d float32 array; found_inf: 0-d float32.
    Checking out rather than g also flags a finite value that unscaling overflows.
    """
    inv = (1.0 / scale.astype(np.float64)).astype(np.float32)
    np.multiply(g, inv.astype(g.dtype), out=out)
    np.maximum(found_inf, ~np.isfinite(out).all(), out=found_inf)


def update_scale(scale, growth_tracker, found_inf, growth_factor, backoff_factor,
                 growth_interval):
    """The loss scale's update rule (PyTorch's), in place on 0-d arrays scale (float32) and
    growth_tracker (int32, the clean steps in a row):

        found_inf > 0:  scale = scale * backoff_factor, growth_tracker = 0
        otherwise:      growth_tracker += 1, and when it reaches growth_interval:
                        scale = scale * growth_factor (unless that is inf), growth_tracker = 0
    """
    found = found_inf > 0
    tracker = np.where(found, 0, growth_tracker + 1)
    grow = tracker >= growth_interval
    with np.errstate(over="ignore"):        # a scale grown to inf is not taken
        grown = scale * np.float32(growth_factor)
    kept = np.where(grow & np.isfinite(grown), grown, scale)
    scale[...] = np.where(found, scale * np.float32(backoff_factor), kept)
    growth_tracker[...] = np.where(grow, 0, tracker)


def skip_if_found_inf(update, arrays, found_inf):
    """Run update(*arrays) (in place) so that it changes nothing where found_inf is nonzero:
    the step is taken on copies, which are kept only when found_inf is 0. Array operations
    only, so a GPU decides without a host read (the compiled kernels test the flag instead)."""
    copies = [a.copy() for a in arrays]
    with np.errstate(all="ignore"):       # a skipped step may compute with inf/NaN gradients
        update(*copies)
    keep = found_inf == 0
    for a, c in zip(arrays, copies):
        np.copyto(a, c, where=keep)


# ---------------------------------------------------------------------- softmax cross-entropy
def cross_entropy_forward(x, target, weight):
    """Softmax cross-entropy over the class axis 1, per element, and the softmax.

    x: (N, C, S) logits; target: (N, S) int64 class ids, all in [0, C) (ignored elements
    already replaced by a valid id and given weight 0); weight: (N, S) factors or None.
    Returns (loss (N, S), probs (N, C, S)): with z = x - max_c x (log-sum-exp: exp never
    overflows), loss = (log sum_c exp(z_c) - z_target) * weight, probs = softmax(x).
    """
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    picked = np.take_along_axis(z, target[:, None, :], axis=1)[:, 0]
    loss = np.log(s[:, 0]) - picked
    if weight is not None:
        loss = loss * weight
    return loss, e / s


def cross_entropy_backward(probs, target, coef, weight):
    """d loss / dx of cross_entropy_forward: (probs - onehot(target)) * k per element,
    k = weight * coef (coef: d(result)/d(loss element) before weighting, a 0-d array for a
    reduced loss or an (N, S) map for reduction "none"; weight (N, S) or None).

    probs: (N, C, S); target: (N, S) int64 -> gx (N, C, S).
    """
    k = np.broadcast_to(coef if weight is None else weight * coef, target.shape)
    onehot = np.arange(probs.shape[1])[None, :, None] == target[:, None, :]
    return probs * k[:, None, :] - onehot * k[:, None, :]


# ---------------------------------------------------------------------- conv epilogue: bias + ReLU
def bias_relu(y, bias):
    """y (N, C, S) -> max(y + bias[c], 0) (bias (C,) or None); NaN stays NaN."""
    if bias is not None:
        y = y + bias[None, :, None]
    return np.maximum(y, 0)


def relu_bias_backward(gy, y, bias_grad=True, channel_major=False):
    """The adjoint of bias_relu, from its output y (N, C, S) and gy (N, C, S):
    gx = gy where y > 0 else 0 (the gradient of the conv's output), and the bias gradient
    gbias (C,) = the sum of gx over N and S (None unless bias_grad). channel_major: gx is
    returned as (C, N, S), C-contiguous."""
    gx = gy * (y > 0)
    gb = gx.sum(axis=(0, 2)) if bias_grad else None
    return (np.ascontiguousarray(gx.transpose(1, 0, 2)) if channel_major else gx), gb


# ---------------------------------------------------------------------- im2col, batch in the columns
def im2col_rows(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """im2col with the samples side by side: x (N, C, H, W) -> cols (C*kh*kw, N*ho*wo),
    column (n, oy, ox). Then gy (C_out, N*ho*wo) @ cols.T is a conv's weight gradient summed
    over the samples in one matrix product."""
    cols = im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)       # (N, K, L)
    return np.ascontiguousarray(cols.transpose(1, 0, 2)).reshape(cols.shape[1], -1)


def col2im_rows(cols, n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """The adjoint of im2col_rows: cols (C*kh*kw, N*ho*wo) -> x (N, C, h, w), overlaps
    summed (col2im of the same columns in im2col's layout)."""
    per_sample = cols.reshape(cols.shape[0], n, ho * wo).transpose(1, 0, 2)
    return col2im(np.ascontiguousarray(per_sample), c, h, w, kh, kw, sh, sw, ph, pw, dh, dw,
                  ho, wo)


# ---------------------------------------------------------------------- bfloat16 rounding
def round_bfloat16(a):
    """a (float32, C-contiguous, any shape) -> the nearest bfloat16 values (ties to even), as
    float32; NaN stays NaN, values beyond bfloat16's range become +-inf.

    bfloat16 is the top half of a float32, so rounding is integer arithmetic on the bits:
    add 0x7FFF plus the lowest kept bit (ties to even), then clear the low 16 bits.
    """
    u = a.view(np.uint32)
    lsb = (u >> np.uint32(16)) & np.uint32(1)
    r = ((u + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(a), a, r)


# ---------------------------------------------------------------------- counter-based random numbers
# Philox4x32-10 (J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers:
# as easy as 1, 2, 3", SC 2011): a keyed bijection of a 128-bit counter, so the n-th random
# block is a pure function of (key, n). No state but a counter: a GPU thread computes its own
# numbers, and a CUDA graph can replay a draw with a counter (offset) kept on the device.
# The constants are the paper's Philox4x32: two round multipliers and the key's per-round
# increments (the golden ratio and sqrt(3) - 1 as 32-bit fractions).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter, key, rounds=10):
    """The Philox4x32 bijection. counter (..., 4) and key (..., 2), uint32 -> (..., 4) uint32.

    One round multiplies words 0 and 2 by the multipliers (64-bit products split into high
    and low halves) and mixes the high halves with words 1 and 3 and the key:
        (c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))
    and the key grows by PHILOX_W before every round but the first.
    """
    c = [np.asarray(counter, np.uint32)[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = (np.asarray(key, np.uint32)[..., i].astype(np.uint64) for i in range(2))
    m0, m1 = (np.uint64(m) for m in PHILOX_M)
    for r in range(rounds):
        if r > 0:
            k0, k1 = (k0 + np.uint64(PHILOX_W[0])) & _U32, (k1 + np.uint64(PHILOX_W[1])) & _U32
        p0, p1 = m0 * c[0], m1 * c[2]          # < 2^64: exact in uint64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _U32,
             (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _U32]
    return np.stack(c, axis=-1).astype(np.uint32)


def philox_blocks(n):
    """How many 4-word Philox blocks n numbers use (what a draw advances the offset by)."""
    return (int(n) + 3) // 4


def philox_uint32(seed, offset, n):
    """n uint32 words of the stream (seed, offset): block b (0 <= b < Q = philox_blocks(n))
    is philox4x32(counter = offset + b as 64 bits (low word first, then 0, 0), key = seed as
    64 bits (low word first)), and word j of block b is number b + j * Q. (That order lets
    GPU thread b write four numbers Q apart: neighbouring threads, neighbouring addresses.)
    """
    q = philox_blocks(n)
    seed, offset = int(seed) % 2 ** 64, int(offset) % 2 ** 64
    block = (np.uint64(offset) + np.arange(q, dtype=np.uint64))      # wraps mod 2^64
    zero = np.zeros(q, np.uint64)
    counter = np.stack([block & _U32, block >> np.uint64(32), zero, zero], axis=-1)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint64)
    words = philox4x32(counter.astype(np.uint32), key.astype(np.uint32))   # (Q, 4)
    return np.ascontiguousarray(words.T).reshape(-1)[:n]


def keep_threshold(p):
    """Dropout keeps a number u (a uint32 word) when its top 24 bits, read as a fraction
    (u >> 8) / 2^24 in [0, 1), are >= p: that is (u >> 8) >= ceil(p * 2^24), this integer."""
    return int(np.ceil(float(p) * 2 ** 24))


def dropout_mask(seed, offset, shape, p, dtype):
    """The dropout mask of `shape` the GPU draws at (seed, offset): scale = 1 / (1 - p) where
    the stream's word keeps (keep_threshold), else 0; dtype float32 or float64. 0 <= p < 1."""
    n = int(np.prod(shape, dtype=np.int64))
    keep = (philox_uint32(seed, offset, n) >> np.uint32(8)) >= np.uint32(keep_threshold(p))
    dtype = np.dtype(dtype)
    return np.where(keep, dtype.type(1.0 / (1.0 - p)), dtype.type(0)).reshape(shape)


# ---------------------------------------------------------------------- class-id targets
def class_targets(target, c, ignore_index, dtype):
    """Class ids checked against c classes: target (any shape) ints -> (safe, valid), same
    shape: safe (int64) the id, or 0 where it is ignore_index or outside [0, c); valid (dtype)
    1 where the id counts, 0 where it is ignored or outside [0, c)."""
    t = np.asarray(target).astype(np.int64)
    keep = (t != ignore_index) & (t >= 0) & (t < c)
    return np.where(keep, t, 0), keep.astype(dtype)


def class_targets_record(target, c, ignore_index, denominator, old=None):
    """What follows class_targets once its weights are summed -> (record, safe denominator).

    record (2,) int64: [1, the first id outside [0, c) in flat order] or [0, 0] if none (the
    record of a device check, minidl.device_checks); old, the same check's record not read
    yet, is kept instead when it had failed. The safe denominator (0-d) is denominator where
    it is > 0, else 1 (every target ignored: the sum is 0 and "mean" returns 0, not NaN).
    """
    t = np.asarray(target).astype(np.int64).reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= c))
    if old is not None and old[0]:
        record = np.array(old, dtype=np.int64)
    else:
        record = np.array([1, t[bad][0]] if bad.any() else [0, 0], dtype=np.int64)
    den = np.asarray(denominator)
    return record, np.where(den > 0, den, den.dtype.type(1))

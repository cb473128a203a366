"""Padding and cropping: pad (constant, reflect, replicate) and center_crop.

`pad` takes torch's pad tuple, which lists the *last* axis first:
(left, right) pads the last axis, (left, right, top, bottom) the last two, and so on.

Reflect padding mirrors the input about its edge without repeating the edge value
(x = [a b c d], pad 2 -> [c b | a b c d | c b]). This is the U-Net "overlap-tile" strategy:
missing context at the image border is filled by mirroring the image. Its backward adds
the gradient of each mirrored copy back onto the position it was copied from.
"""
from .. import backend
from ..function import Function
from ..tensor import Tensor

_MODES = ("constant", "reflect", "replicate")


def _pairs(pad, ndim):
    """torch pad tuple -> [(axis, before, after), ...]."""
    pad = tuple(int(p) for p in pad)
    if len(pad) % 2 or len(pad) // 2 > ndim:
        raise ValueError(f"pad needs an even number of values, two per padded axis, at most "
                         f"{2 * ndim} for a tensor with {ndim} dimensions; got {pad}.")
    return [(ndim - 1 - i, pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)]


def _axis_slice(ndim, axis, start, stop):
    index = [slice(None)] * ndim
    index[axis] = slice(start, stop)
    return tuple(index)


class ConstantPad(Function):
    """Pad with `value`; negative widths crop (as torch). Backward keeps the inner part."""
    def forward(self, x):
        xp = backend.get_array_module(x)
        out_shape = list(x.shape)
        src = [slice(None)] * x.ndim
        dst = [slice(None)] * x.ndim
        for axis, before, after in self.pairs:
            n = x.shape[axis]
            out_shape[axis] = n + before + after
            if out_shape[axis] < 0:
                raise ValueError(f"pad crops axis {axis} of size {n} by more than its size.")
            # The part of x that survives negative (cropping) widths, and where it lands.
            lo, hi = max(-before, 0), n - max(-after, 0)
            kept = max(hi - lo, 0)
            src[axis] = slice(lo, lo + kept)
            dst[axis] = slice(max(before, 0), max(before, 0) + kept)
        self.src, self.dst, self.in_shape = tuple(src), tuple(dst), x.shape
        out = xp.full(out_shape, self.value, dtype=x.dtype)
        out[self.dst] = x[self.src]
        return out

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        gx[self.src] = gy[self.dst]
        return gx


class MirrorPad(Function):
    """Reflect or replicate padding (NumPy's "reflect" / "edge" modes)."""
    def forward(self, x):
        xp = backend.get_array_module(x)
        widths = [(0, 0)] * x.ndim
        for axis, before, after in self.pairs:
            widths[axis] = (before, after)
        return xp.pad(x, widths, mode="reflect" if self.mode == "reflect" else "edge")

    def backward(self, gy):
        # Undo one axis at a time: add each padded border onto the positions it copied.
        for axis, before, after in reversed(self.pairs):
            gy = self._fold(gy, axis, before, after)
        return gy

    def _fold(self, g, axis, before, after):
        xp = backend.get_array_module(g)
        ndim = g.ndim
        n = g.shape[axis] - before - after
        inner = g[_axis_slice(ndim, axis, before, before + n)].copy()
        left = g[_axis_slice(ndim, axis, 0, before)]
        right = g[_axis_slice(ndim, axis, before + n, None)]
        if self.mode == "reflect":
            # Left border position i (0-based) copied input index before - i: flip, then add
            # onto indices 1..before. The right border mirrors onto n-1-after..n-2.
            if before:
                inner[_axis_slice(ndim, axis, 1, before + 1)] += xp.flip(left, axis=axis)
            if after:
                inner[_axis_slice(ndim, axis, n - 1 - after, n - 1)] += xp.flip(right, axis=axis)
        else:  # replicate: every border value copied the edge element
            if before:
                inner[_axis_slice(ndim, axis, 0, 1)] += left.sum(axis=axis, keepdims=True)
            if after:
                inner[_axis_slice(ndim, axis, n - 1, n)] += right.sum(axis=axis, keepdims=True)
        return inner


def pad(x, pad, mode="constant", value=0):
    """Pad x with torch's pad tuple (last axis first).

    x:    any shape, e.g. (N, C, H, W)
    pad:  (left, right) for the last axis, (left, right, top, bottom) for the last two, ...
    mode: "constant" (fill with value; negative widths crop), "reflect" (mirror without
          repeating the edge; each width must be smaller than its axis), "replicate"
          (repeat the edge value).
    """
    if mode not in _MODES:
        raise ValueError(f"pad() got mode={mode!r}; use 'constant', 'reflect' or 'replicate'.")
    pairs = _pairs(pad, x.ndim)
    if mode == "constant":
        return ConstantPad.apply(x, pairs=pairs, value=value)
    shape = tuple(x.shape)
    for axis, before, after in pairs:
        if before < 0 or after < 0:
            raise ValueError(f"pad() with mode={mode!r} needs non-negative widths, got {tuple(pad)}.")
        if mode == "reflect" and max(before, after) >= shape[axis]:
            raise ValueError(f"reflect padding of ({before}, {after}) needs widths smaller than "
                             f"axis {axis} of size {shape[axis]}; pad in several steps or use "
                             "mode='replicate'.")
        if mode == "replicate" and shape[axis] == 0 and (before or after):
            raise ValueError(f"replicate padding needs a non-empty axis {axis}.")
    return MirrorPad.apply(x, pairs=pairs, mode=mode)


def center_crop(x, size):
    """The central (h, w) window of the last two axes of x (e.g. (N, C, H, W)).

    The U-Net's crop-and-concat: an encoder feature map is cropped to the decoder's smaller
    size before concatenation. size: int or (h, w). When H - h is odd the extra row is
    dropped at the bottom (the window starts at floor((H - h) / 2)); the same for columns.
    """
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if x.ndim < 2:
        raise ValueError(f"center_crop() needs at least two dimensions, got shape {tuple(x.shape)}.")
    H, W = x.shape[-2], x.shape[-1]
    if h > H or w > W or h < 0 or w < 0:
        raise ValueError(f"center_crop() cannot cut a ({h}, {w}) window from an input of spatial "
                         f"size ({H}, {W}); the crop must not be larger than the input.")
    if not isinstance(x, Tensor):
        x = Tensor(x)
    elif (h, w) == (H, W):
        return x            # nothing to cut: no copy in backward (U-Net with padding "same")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]

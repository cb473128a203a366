"""Pixel shuffle (Shi et al. 2016, sub-pixel convolution): channels become a finer grid.

(N, C r^2, H, W) -> (N, C, H r, W r): output pixel (h r + i, w r + j) of channel c is input
channel c r^2 + i r + j at (h, w). It is a reshape, a permute and a reshape, so the
gradient comes from those ops; pixel_unshuffle is the inverse.
"""
from .shape import permute, reshape


def pixel_shuffle(x, upscale_factor):
    """x: (N, C * r^2, H, W) -> (N, C, H * r, W * r), r = upscale_factor."""
    r = int(upscale_factor)
    n, c, h, w = _four_dims("pixel_shuffle", x)
    if r < 1 or c % (r * r):
        raise ValueError(f"pixel_shuffle() needs channels divisible by upscale_factor^2 = {r * r}, "
                         f"got {c} channels.")
    y = reshape(x, n, c // (r * r), r, r, h, w)          # (N, C, i, j, H, W)
    return reshape(permute(y, 0, 1, 4, 2, 5, 3), n, c // (r * r), h * r, w * r)


def pixel_unshuffle(x, downscale_factor):
    """x: (N, C, H * r, W * r) -> (N, C * r^2, H, W), the inverse of pixel_shuffle."""
    r = int(downscale_factor)
    n, c, h, w = _four_dims("pixel_unshuffle", x)
    if r < 1 or h % r or w % r:
        raise ValueError(f"pixel_unshuffle() needs height and width divisible by {r}, got {h}x{w}.")
    y = reshape(x, n, c, h // r, r, w // r, r)            # (N, C, H, i, W, j)
    return reshape(permute(y, 0, 1, 3, 5, 2, 4), n, c * r * r, h // r, w // r)


def _four_dims(name, x):
    if len(x.shape) != 4:
        raise ValueError(f"{name}() needs input of shape (N, C, H, W), got {tuple(x.shape)}.")
    return tuple(x.shape)

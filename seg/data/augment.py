"""Data augmentation that moves an image and its mask together.

Every geometric function takes ``image`` (H, W) or (H, W, C) float32 and ``mask`` (H, W)
integer class ids (or None for unlabelled data) and returns the transformed pair. The image
is interpolated bilinearly (``order=1``); the mask with nearest neighbour (``order=0``), because
averaging class ids would invent classes (the mean of class 0 and class 2 is not class 1).
Both use the same coordinates and the same border mode, so they stay aligned pixel for pixel.

Random functions take a NumPy ``Generator`` (``np.random.default_rng(seed)``) so a run can be
repeated exactly; ``seg.data.DataLoader`` hands each sample its own generator.

    aug = Augment(size=(96, 128), hflip=0.5, rotate=10, elastic_sigma=3)
    image, mask = aug(image, mask, np.random.default_rng(0))

The elastic deformation is the U-Net paper's (Ronneberger et al. 2015): random displacements
on a coarse 3x3 grid, Gaussian with 10 px standard deviation, interpolated bicubically to every
pixel. 10 px was meant for their 572-pixel tiles; scale ``sigma`` down for smaller images.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "hflip",
    "vflip",
    "random_flip",
    "affine",
    "random_affine",
    "elastic_displacement",
    "elastic_deform",
    "intensity_jitter",
    "resize",
    "Augment",
    "Resize",
]


def _check(image, mask):
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}.")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image size {image.shape[:2]}.")
    return image, mask


def _sample(a, ys, xs, order, mode="reflect"):
    """Read a (H, W) or (H, W, C) array at float coordinates ys, xs (each (H', W'))."""
    if a.ndim == 2:
        return ndimage.map_coordinates(a, [ys, xs], order=order, mode=mode)
    return np.stack([ndimage.map_coordinates(a[..., c], [ys, xs], order=order, mode=mode)
                     for c in range(a.shape[-1])], axis=-1)


def _warp(image, mask, ys, xs, mode="reflect"):
    """Resample image (bilinear) and mask (nearest) at the same source coordinates."""
    out_image = _sample(image, ys, xs, order=1, mode=mode).astype(image.dtype, copy=False)
    out_mask = None if mask is None else _sample(mask, ys, xs, order=0, mode=mode)
    return out_image, out_mask


# ----------------------------------------------------------------------------- flips (exact)


def hflip(image, mask=None):
    """Mirror left <-> right. Returns (image, mask)."""
    image, mask = _check(image, mask)
    return np.ascontiguousarray(image[:, ::-1]), None if mask is None else np.ascontiguousarray(mask[:, ::-1])


def vflip(image, mask=None):
    """Mirror top <-> bottom. Returns (image, mask)."""
    image, mask = _check(image, mask)
    return np.ascontiguousarray(image[::-1]), None if mask is None else np.ascontiguousarray(mask[::-1])


def random_flip(image, mask, rng, horizontal=0.5, vertical=0.0):
    """Flip left-right with probability ``horizontal`` and top-bottom with ``vertical``.

    Vertical flips are off by default: in ultrasound the probe is at the top, so depth has a
    direction (attenuation, shadows) that an upside-down image would not have.
    """
    if rng.uniform() < horizontal:
        image, mask = hflip(image, mask)
    if rng.uniform() < vertical:
        image, mask = vflip(image, mask)
    return image, mask


# ----------------------------------------------------------------------------- rotation / shift / scale


def _affine_coords(shape, angle=0.0, shift=(0.0, 0.0), scale=1.0, ys=None, xs=None):
    """Source coordinates for rotating by ``angle`` degrees about the centre, then shifting.

    The output pixel p reads the input at R^-1 (p - c - shift) / scale + c, i.e. we map each
    *output* pixel back into the input (inverse mapping leaves no holes).
    """
    H, W = shape
    if ys is None:
        ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    cy, cx = (H - 1) / 2.0, (W - 1) / 2.0
    # Rows grow downwards, so a counter-clockwise turn on screen is a negative angle in (y, x).
    t = -np.deg2rad(angle)
    c, s = np.cos(t), np.sin(t)
    y = (ys - cy - shift[0]) / scale
    x = (xs - cx - shift[1]) / scale
    return c * y - s * x + cy, s * y + c * x + cx


def affine(image, mask=None, angle=0.0, shift=(0.0, 0.0), scale=1.0, mode="reflect"):
    """Rotate by ``angle`` degrees (counter-clockwise on screen, like ``np.rot90`` and
    ``scipy.ndimage.rotate``), scale by ``scale`` about the centre, then
    shift by (dy, dx) pixels. Missing border pixels are mirrored (``mode``, as in scipy.ndimage).

    Returns (image, mask) of the same size.
    """
    image, mask = _check(image, mask)
    ys, xs = _affine_coords(image.shape[:2], angle, shift, scale)
    return _warp(image, mask, ys, xs, mode)


def _draw_affine(shape, rng, max_angle, max_shift, max_scale):
    H, W = shape
    angle = rng.uniform(-max_angle, max_angle)
    shift = (rng.uniform(-max_shift, max_shift) * H, rng.uniform(-max_shift, max_shift) * W)
    scale = float(np.exp(rng.uniform(-max_scale, max_scale)))  # symmetric in log: x1.1 as likely as /1.1
    return angle, shift, scale


def random_affine(image, mask, rng, max_angle=10.0, max_shift=0.05, max_scale=0.0, mode="reflect"):
    """Small random rotation (uniform in +-max_angle degrees), shift (uniform in +-max_shift
    of the height/width) and zoom (exp(uniform(+-max_scale))). Returns (image, mask)."""
    image, mask = _check(image, mask)
    angle, shift, scale = _draw_affine(image.shape[:2], rng, max_angle, max_shift, max_scale)
    return affine(image, mask, angle, shift, scale, mode)


# ----------------------------------------------------------------------------- elastic deformation


def elastic_displacement(shape, rng, grid=3, sigma=10.0):
    """Smooth random displacement field: (dy, dx), each float32 (H, W), in pixels.

    Displacements are drawn on a coarse ``grid`` x ``grid`` lattice spanning the image
    (N(0, sigma^2) pixels per axis, U-Net paper: 3x3 and 10 px) and interpolated to every pixel
    with cubic splines, which pass through the lattice values and give a smooth warp.
    """
    H, W = shape
    if grid < 2:
        raise ValueError(f"elastic grid must be at least 2x2, got {grid}.")
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    # Position of every pixel in lattice units: row 0 -> 0, row H-1 -> grid-1.
    gy = np.linspace(0, grid - 1, H, dtype=np.float64)
    gx = np.linspace(0, grid - 1, W, dtype=np.float64)
    gyy, gxx = np.meshgrid(gy, gx, indexing="ij")
    dy = ndimage.map_coordinates(coarse[0], [gyy, gxx], order=3, mode="nearest")
    dx = ndimage.map_coordinates(coarse[1], [gyy, gxx], order=3, mode="nearest")
    return dy.astype(np.float32), dx.astype(np.float32)


def elastic_deform(image, mask, rng, grid=3, sigma=10.0, mode="reflect"):
    """U-Net elastic deformation: output pixel p reads the input at p + d(p). Returns (image, mask)."""
    image, mask = _check(image, mask)
    H, W = image.shape[:2]
    dy, dx = elastic_displacement((H, W), rng, grid, sigma)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    return _warp(image, mask, ys + dy, xs + dx, mode)


# ----------------------------------------------------------------------------- intensity (image only)


def intensity_jitter(image, rng, brightness=0.1, contrast=0.1, gamma=0.1):
    """Random gamma, contrast and brightness change of a [0, 1] image; the mask is untouched.

    gamma: x -> x ** exp(uniform(+-gamma)) (brightens or darkens mid-tones, keeps 0 and 1);
    contrast: scale deviations from the image mean by 1 + uniform(+-contrast);
    brightness: add uniform(+-brightness). The result is clipped to [0, 1].
    """
    x = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    x = x ** np.float32(np.exp(rng.uniform(-gamma, gamma)))
    mean = x.mean()
    x = (x - mean) * np.float32(1.0 + rng.uniform(-contrast, contrast)) + mean
    x = x + np.float32(rng.uniform(-brightness, brightness))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- resize


def resize(image, mask, size, antialias=True):
    """Resize to ``size`` = (height, width): image bilinear, mask nearest.

    Pixel centres are aligned as in ``F.interpolate(..., align_corners=False)``. When shrinking,
    antialias=True first blurs the image with sigma = (factor - 1) / 2 so that fine detail
    (speckle) averages out instead of aliasing into false patterns. Returns (image, mask).
    """
    image, mask = _check(image, mask)
    H, W = image.shape[:2]
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize size must be positive, got {size}.")
    if (h, w) == (H, W):
        return image, mask
    fy, fx = H / h, W / w
    if antialias and (fy > 1 or fx > 1):
        sigma = [max(0.0, (fy - 1) / 2), max(0.0, (fx - 1) / 2)] + [0.0] * (image.ndim - 2)
        image = ndimage.gaussian_filter(image.astype(np.float32, copy=False), sigma=sigma, mode="reflect")
    ys = ((np.arange(h, dtype=np.float32) + 0.5) * fy - 0.5)[:, None]
    xs = ((np.arange(w, dtype=np.float32) + 0.5) * fx - 0.5)[None, :]
    ys, xs = np.broadcast_to(ys, (h, w)), np.broadcast_to(xs, (h, w))
    # 'nearest' at the border: align_corners=False reads half a pixel outside the edge.
    return _warp(image, mask, ys, xs, mode="nearest")


# ----------------------------------------------------------------------------- composed transforms


class Resize:
    """Deterministic transform: ``Resize((h, w))(image, mask, rng=None) -> (image, mask)``."""

    def __init__(self, size, antialias=True):
        self.size = (int(size[0]), int(size[1]))
        self.antialias = antialias

    def __call__(self, image, mask, rng=None):
        return resize(image, mask, self.size, self.antialias)

    def __repr__(self):
        return f"Resize(size={self.size})"


class Augment:
    """Random augmentation for training: ``Augment(...)(image, mask, rng) -> (image, mask)``.

    Steps, in order (each independently with its probability):
      1. resize to ``size`` (if given; always), so the rest works on the small image;
      2. horizontal flip (``hflip``), vertical flip (``vflip``);
      3. rotation +-``rotate`` degrees, shift +-``shift`` of the size, zoom exp(+-``scale``)
         (``p_affine``) and elastic deformation (``p_elastic``, 3x3 grid, ``elastic_sigma`` px):
         composed into one coordinate map and interpolated once, to blur the image only once;
      4. gamma/contrast/brightness jitter of the image (``p_intensity``).
    """

    def __init__(self, size=None, hflip=0.5, vflip=0.0, rotate=10.0, shift=0.05, scale=0.0,
                 p_affine=0.5, elastic_sigma=10.0, elastic_grid=3, p_elastic=0.5,
                 brightness=0.1, contrast=0.1, gamma=0.1, p_intensity=0.5, mode="reflect"):
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.hflip, self.vflip = hflip, vflip
        self.rotate, self.shift, self.scale, self.p_affine = rotate, shift, scale, p_affine
        self.elastic_sigma, self.elastic_grid, self.p_elastic = elastic_sigma, elastic_grid, p_elastic
        self.brightness, self.contrast, self.gamma, self.p_intensity = brightness, contrast, gamma, p_intensity
        self.mode = mode

    def __call__(self, image, mask, rng):
        image, mask = _check(image, mask)
        if self.size is not None:
            image, mask = resize(image, mask, self.size)
        image, mask = random_flip(image, mask, rng, self.hflip, self.vflip)
        H, W = image.shape[:2]
        # Draw every random number up front, in a fixed order, so results depend only on rng.
        do_affine = rng.uniform() < self.p_affine
        do_elastic = rng.uniform() < self.p_elastic and self.elastic_sigma > 0
        if do_affine or do_elastic:
            ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
            if do_elastic:  # output p -> p + d(p) ...
                dy, dx = elastic_displacement((H, W), rng, self.elastic_grid, self.elastic_sigma)
                ys, xs = ys + dy, xs + dx
            if do_affine:  # ... -> then through the inverse affine map into the input
                angle, shift, scale = _draw_affine((H, W), rng, self.rotate, self.shift, self.scale)
                ys, xs = _affine_coords((H, W), angle, shift, scale, ys, xs)
            image, mask = _warp(image, mask, ys, xs, self.mode)
        if rng.uniform() < self.p_intensity:
            image = intensity_jitter(image, rng, self.brightness, self.contrast, self.gamma)
        return image, mask

    def __repr__(self):
        return (f"Augment(size={self.size}, hflip={self.hflip}, vflip={self.vflip}, rotate={self.rotate}, "
                f"shift={self.shift}, scale={self.scale}, p_affine={self.p_affine}, "
                f"elastic_sigma={self.elastic_sigma}, p_elastic={self.p_elastic}, p_intensity={self.p_intensity})")

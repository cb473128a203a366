"""Classical segmentation: hand-made filters, LoG blob detection and region growing.

This is the "Related Work" part of the talk, the methods that came before learned filters:

- **Gradient-based edges**: the Sobel x / y filters respond to the first derivative of the
  image; edges are where its magnitude is large (`sobel`).
- **Laplacian-based edges**: the Laplacian (4-neighbour, or 8-neighbour "with diagonals")
  responds to the second derivative; edges are its zero crossings (`laplacian`,
  `zero_crossings`).
- **LoG and DoG** ("Mexican hat"): smooth with a Gaussian first so the noise does not drown
  the derivative (`log_kernel`, `dog_kernel`, `log_filter`, `dog_filter`).
- **Blob detection**: the scale-normalised LoG over many scales has a local maximum at the
  centre and scale of each blob (`blob_log`).
- **Region growing**: from a seed point, add neighbours whose intensity is close enough
  (`region_grow`).

Every filter is a *fixed* convolution kernel applied with `minidl.functional.conv2d`: a bank
of K hand-made filters is exactly a conv layer with K output channels whose weights nobody
trains. The deep models of `seg.models` learn those weights instead ("Into the deep: even
learn filter"). Convolution here is cross-correlation, as in PyTorch and in the talk's
vertical-edge example (6x6 image * 3x3 kernel = 4x4 with 30s in the middle).

Images are float arrays (H, W) or (N, H, W); results are NumPy arrays.
"""
from __future__ import annotations

from collections import deque

import numpy as np

import minidl
from minidl import functional as F

__all__ = [
    "VERTICAL_EDGE", "SOBEL_X", "SOBEL_Y", "LAPLACIAN_4", "LAPLACIAN_8",
    "gaussian_kernel1d", "gaussian_kernel", "log_kernel", "dog_kernel",
    "filter2d", "separable_filter2d", "sobel", "laplacian", "log_filter", "dog_filter",
    "zero_crossings", "local_maxima", "blob_log", "blobs_to_mask", "region_grow",
]

# ----------------------------------------------------------------------------- fixed kernels
# The talk's kernels, as written on its slides (row 0 is the top row).

#: The talk's vertical-edge detector (Andrew Ng's example): bright-left/dark-right gives +.
VERTICAL_EDGE = np.array([[1, 0, -1],
                          [1, 0, -1],
                          [1, 0, -1]], dtype=np.float32)
#: Sobel "x filter": derivative along x (columns), smoothed along y with weights 1-2-1.
SOBEL_X = np.array([[-1, 0, 1],
                    [-2, 0, 2],
                    [-1, 0, 1]], dtype=np.float32)
#: Sobel "y filter" as on the slide: +1 +2 +1 on top, so it responds to bright-above-dark.
SOBEL_Y = np.array([[1, 2, 1],
                    [0, 0, 0],
                    [-1, -2, -1]], dtype=np.float32)
#: The Laplacian operator (4 neighbours). The slide's sign: centre positive, i.e. minus the
#: second derivative, so a bright spot gives a positive response.
LAPLACIAN_4 = np.array([[0, -1, 0],
                        [-1, 4, -1],
                        [0, -1, 0]], dtype=np.float32)
#: The Laplacian operator including diagonals (8 neighbours).
LAPLACIAN_8 = np.array([[-1, -1, -1],
                        [-1, 8, -1],
                        [-1, -1, -1]], dtype=np.float32)


def _radius(sigma, truncate):
    return max(1, int(np.ceil(truncate * sigma)))


def gaussian_kernel1d(sigma, truncate=4.0, order=0):
    """Sampled 1-D Gaussian (order=0) or its second derivative (order=2), length 2r+1.

    r = ceil(truncate * sigma). The Gaussian is normalised to sum 1; the second derivative
    g''(x) = (x^2 / sigma^4 - 1 / sigma^2) g(x) is shifted to sum 0, so a constant image gives
    exactly zero response despite the truncation.
    """
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if order not in (0, 2):
        raise ValueError(f"order must be 0 (Gaussian) or 2 (second derivative), got {order}.")
    r = _radius(sigma, truncate)
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    if order == 0:
        return g
    d2 = (x * x / sigma**4 - 1.0 / sigma**2) * g
    return d2 - d2.mean()


def gaussian_kernel(sigma, truncate=4.0, radius=None):
    """2-D Gaussian kernel (2r+1, 2r+1) summing to 1 (the outer product of two 1-D ones).

    radius: force r (used by `dog_kernel` so both Gaussians have the same size).
    """
    g = gaussian_kernel1d(sigma, truncate)
    if radius is not None:
        g = _pad_center(g, radius)
    return np.outer(g, g)


def _pad_center(k, radius):
    """Zero-pad a centred 1-D kernel to length 2*radius+1."""
    extra = radius - len(k) // 2
    if extra < 0:
        raise ValueError("radius is smaller than the kernel's own radius.")
    return np.pad(k, extra)


def log_kernel(sigma, truncate=4.0, normalized=True):
    """Laplacian of Gaussian kernel (2r+1, 2r+1), r = ceil(truncate * sigma).

    The true Laplacian of the Gaussian, d2G/dy2 + d2G/dx2: negative at the centre, so a
    bright blob gives a negative response (the "Mexican hat" is its negative). Both terms are
    separable: d2G/dx2 = g''(x) g(y). The kernel sums to zero.
    normalized=True multiplies by sigma^2 (scale normalisation, Lindeberg): without it the
    response of a blob shrinks like 1/sigma^2 and responses of different scales could not be
    compared.
    """
    g = gaussian_kernel1d(sigma, truncate)
    d2 = gaussian_kernel1d(sigma, truncate, order=2)
    k = np.outer(d2, g) + np.outer(g, d2)
    return k * sigma**2 if normalized else k


def dog_kernel(sigma, k=1.6, truncate=4.0, normalized=True):
    """Difference of Gaussians G(k sigma) - G(sigma), both sampled on the same (2r+1)^2 grid.

    r = ceil(truncate * k * sigma). The DoG has the shape of the LoG at the geometric-mean
    scale sigma * sqrt(k) (heat equation: dG/dsigma = sigma LoG); k = 1.6 is Marr and
    Hildreth's ratio. normalized=True divides by (k^2 - 1) / (2k), which makes the centre
    value equal that of the scale-normalised `log_kernel(sigma * sqrt(k))` (for k near 1 the
    factor is k - 1, Lowe's approximation DoG ~ (k - 1) sigma^2 LoG).
    """
    if not k > 1:
        raise ValueError(f"k must be greater than 1 (the second Gaussian is the wider one), got {k}.")
    r = _radius(k * sigma, truncate)
    d = gaussian_kernel(k * sigma, truncate) - gaussian_kernel(sigma, truncate, radius=r)
    return d / _dog_scale(k) if normalized else d


def _dog_scale(k):
    return (k * k - 1.0) / (2.0 * k)


# ----------------------------------------------------------------------------- applying filters
_PAD_MODES = {"valid": None, "zeros": "constant", "reflect": "reflect", "edge": "edge"}


def _as_batch(image):
    """(H, W) or (N, H, W) -> float (N, 1, H, W) and whether the input was one image."""
    a = image.numpy() if isinstance(image, minidl.Tensor) else np.asarray(image)
    if a.ndim not in (2, 3):
        raise ValueError(f"image must have shape (H, W) or (N, H, W), got shape {a.shape}.")
    if a.dtype.kind != "f":
        a = a.astype(np.float32)
    single = a.ndim == 2
    return (a[None] if single else a)[:, None], single


def _pad(x, kh, kw, padding):
    """Pad (N, 1, H, W) so a kh x kw correlation returns H x W (or nothing for 'valid')."""
    if padding not in _PAD_MODES:
        raise ValueError(f"padding must be one of {sorted(_PAD_MODES)}, got {padding!r}.")
    mode = _PAD_MODES[padding]
    if mode is None:
        return x
    # Border handling is done here in NumPy rather than by conv2d's zero padding, because
    # zeros around an image make a strong false edge all along its border.
    widths = ((0, 0), (0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
    return np.pad(x, widths, mode=mode)


def filter2d(image, kernels, padding="reflect"):
    """Correlate `image` with one or several fixed kernels, as one conv2d call.

    image: (H, W) or (N, H, W) floats.
    kernels: (kh, kw) or a bank (K, kh, kw); the bank becomes the conv weight (K, 1, kh, kw).
    padding: "valid" (no padding: the output shrinks by kh-1, kw-1, as in the talk's
        6x6 -> 4x4), "reflect" (mirror without repeating the edge pixel), "edge" (repeat the
        edge pixel) or "zeros"; the last three keep the size (H, W).
    Returns an array (H', W'), (K, H', W'), (N, H', W') or (N, K, H', W'): the image's leading
    shape, then the bank's. dtype: the image's float dtype.
    """
    x, single = _as_batch(image)
    w = np.asarray(kernels, dtype=x.dtype)
    bank = w.ndim == 3
    if w.ndim not in (2, 3):
        raise ValueError(f"kernels must have shape (kh, kw) or (K, kh, kw), got shape {w.shape}.")
    w = (w if bank else w[None])[:, None]            # (K, 1, kh, kw)
    kh, kw = w.shape[-2:]
    x = _pad(x, kh, kw, padding)
    if x.shape[-2] < kh or x.shape[-1] < kw:
        raise ValueError(f"the image ({x.shape[-2]}x{x.shape[-1]}) is smaller than the kernel "
                         f"({kh}x{kw}); use a padding mode other than 'valid' or a smaller kernel.")
    with minidl.no_grad():                           # fixed filters: nothing to differentiate
        y = F.conv2d(minidl.tensor(np.ascontiguousarray(x)), minidl.tensor(w)).numpy()
    if not bank:
        y = y[:, 0]
    return y[0] if single else y


def separable_filter2d(image, column, row, padding="reflect"):
    """Apply the separable kernel outer(column, row) as two 1-D passes (two conv2d calls).

    column: (kh,) filter along y; row: (kw,) filter along x. Same result as
    `filter2d(image, np.outer(column, row))`, but im2col needs kh + kw columns per pixel
    instead of kh * kw: for sigma = 10 (81 taps) that is 162 instead of 6561.
    """
    column = np.asarray(column, dtype=np.float64).reshape(-1, 1)
    row = np.asarray(row, dtype=np.float64).reshape(1, -1)
    return filter2d(filter2d(image, column, padding), row, padding)


def sobel(image, padding="reflect", return_components=False):
    """Gradient magnitude sqrt(gx^2 + gy^2) from the Sobel x and y filters.

    image: (H, W) or (N, H, W). Both filters run as one conv2d with 2 output channels.
    return_components=True returns (magnitude, gx, gy).
    """
    g = filter2d(image, np.stack([SOBEL_X, SOBEL_Y]), padding)   # (..., 2, H, W)
    gx, gy = g[..., 0, :, :], g[..., 1, :, :]
    magnitude = np.hypot(gx, gy)
    return (magnitude, gx, gy) if return_components else magnitude


def laplacian(image, diagonals=False, padding="reflect"):
    """The talk's Laplacian operator (centre positive): 4 neighbours, or 8 with diagonals."""
    return filter2d(image, LAPLACIAN_8 if diagonals else LAPLACIAN_4, padding)


def log_filter(image, sigma, normalized=True, truncate=4.0, padding="reflect"):
    """Laplacian of Gaussian response, sigma^2-normalised by default (bright blob -> negative).

    Equal to `filter2d(image, log_kernel(sigma))`, computed as the sum of two separable
    passes, d2G/dy2 * I + d2G/dx2 * I, because the 2-D kernel of side 8 sigma + 1 would make
    im2col's matrix (8 sigma + 1)^2 columns wide.
    """
    g = gaussian_kernel1d(sigma, truncate)
    d2 = gaussian_kernel1d(sigma, truncate, order=2)
    out = separable_filter2d(image, d2, g, padding) + separable_filter2d(image, g, d2, padding)
    return out * sigma**2 if normalized else out


def dog_filter(image, sigma, k=1.6, normalized=True, truncate=4.0, padding="reflect"):
    """Difference of Gaussians response, G(k sigma) * I - G(sigma) * I (see `dog_kernel`)."""
    r = _radius(k * sigma, truncate)
    wide = gaussian_kernel1d(k * sigma, truncate)
    narrow = _pad_center(gaussian_kernel1d(sigma, truncate), r)
    out = separable_filter2d(image, wide, wide, padding) - separable_filter2d(image, narrow, narrow, padding)
    return out / _dog_scale(k) if normalized else out


def zero_crossings(response, threshold=0.0):
    """Edges of a Laplacian-type response: pixels where its sign flips to the right or below.

    response: (H, W). A pixel is marked when it and its right (or lower) neighbour have
    opposite signs and differ by more than `threshold` (which drops the flat-region noise).
    Returns a bool (H, W) map.
    """
    r = np.asarray(response)
    if r.ndim != 2:
        raise ValueError(f"response must have shape (H, W), got shape {r.shape}.")
    edges = np.zeros(r.shape, dtype=bool)
    for a, b, where in ((r[:, :-1], r[:, 1:], (slice(None), slice(None, -1))),
                        (r[:-1, :], r[1:, :], (slice(None, -1), slice(None)))):
        edges[where] |= (np.sign(a) * np.sign(b) < 0) & (np.abs(a - b) > threshold)
    return edges


# ----------------------------------------------------------------------------- blob detection
def local_maxima(volume, threshold):
    """Boolean mask of points >= all their neighbours (3x3 in 2-D, 3x3x3 in 3-D) and > threshold.

    volume: (H, W) or (S, H, W); points outside the array count as -infinity.
    """
    v = np.asarray(volume, dtype=np.float64)
    padded = np.pad(v, 1, mode="constant", constant_values=-np.inf)
    peak = v > threshold
    # Compare with every neighbour by slicing the padded array at each offset.
    for offset in np.ndindex(*(3,) * v.ndim):
        if all(o == 1 for o in offset):
            continue
        shifted = padded[tuple(slice(o, o + n) for o, n in zip(offset, v.shape))]
        peak &= v >= shifted
    return peak


def blob_log(image, sigmas=(1, 1.5, 2, 3, 4, 6, 8), threshold=0.05, bright=True, max_blobs=None,
             exclude_border=0):
    """Find blobs as local maxima of the scale-normalised LoG in (scale, y, x).

    image: (H, W) floats (scale the image to [0, 1] so `threshold` means the same everywhere).
    sigmas: increasing scales to try; a blob of radius r responds most at sigma = r / sqrt(2)
        (a Gaussian blob of width s at sigma = s).
    threshold: the least response kept. bright: look for bright blobs on a dark background
        (they give negative LoG, so the response used is -sigma^2 LoG); False for dark blobs.
    exclude_border: drop blobs whose centre is closer than this many pixels to the border.
    Returns a float64 array (M, 4) of rows (y, x, sigma, response), strongest first (ties by
    y then x, so the order is deterministic).
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"blob_log takes one image of shape (H, W), got shape {img.shape}.")
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or sigmas.size == 0 or np.any(np.diff(sigmas) <= 0) or sigmas[0] <= 0:
        raise ValueError("sigmas must be a non-empty list of increasing positive scales.")
    sign = -1.0 if bright else 1.0
    stack = np.stack([sign * log_filter(img, s) for s in sigmas])      # (S, H, W)
    s_idx, ys, xs = np.nonzero(local_maxima(stack, threshold))
    if exclude_border:
        H, W = img.shape
        keep = ((ys >= exclude_border) & (ys < H - exclude_border)
                & (xs >= exclude_border) & (xs < W - exclude_border))
        s_idx, ys, xs = s_idx[keep], ys[keep], xs[keep]
    response = stack[s_idx, ys, xs]
    order = np.lexsort((xs, ys, -response))    # last key is primary: strongest first
    blobs = np.stack([ys, xs, sigmas[s_idx], response], axis=1)[order].astype(np.float64)
    return blobs[:max_blobs] if max_blobs is not None else blobs


def blobs_to_mask(blobs, shape):
    """Paint blobs (rows y, x, sigma, ...) as discs of radius sigma * sqrt(2) into a bool mask."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    mask = np.zeros(shape, dtype=bool)
    blobs = np.asarray(blobs, dtype=np.float64)
    if blobs.size == 0:
        return mask
    for y, x, sigma in blobs.reshape(-1, blobs.shape[-1])[:, :3]:
        mask |= (yy - y) ** 2 + (xx - x) ** 2 <= 2.0 * sigma**2
    return mask


# ----------------------------------------------------------------------------- region growing
_NEIGHBOURS = {4: ((-1, 0), (0, -1), (0, 1), (1, 0)),
               8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))}


def region_grow(image, seeds, tolerance, connectivity=4, reference="seed"):
    """Grow regions from seed points by breadth-first search; return the bool mask (H, W).

    image: (H, W). seeds: (y, x) pairs (one pair or a list).
    tolerance: a neighbour joins when |image[p] - ref| <= tolerance, where ref is the seed's
        own intensity (reference="seed") or the mean of the region grown so far ("mean",
        updated each time a pixel joins, so the region can drift along slow gradients).
    connectivity: 4 (up, down, left, right) or 8 (also the diagonals).
    Each seed grows on its own and the regions are united, so the result does not depend on
    the order of the seeds; BFS visits neighbours in a fixed order, so it is deterministic.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"region_grow takes one image of shape (H, W), got shape {img.shape}.")
    if connectivity not in _NEIGHBOURS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
    if reference not in ("seed", "mean"):
        raise ValueError(f"reference must be 'seed' or 'mean', got {reference!r}.")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 2)
    H, W = img.shape
    steps = _NEIGHBOURS[connectivity]
    union = np.zeros((H, W), dtype=bool)
    for sy, sx in seeds:
        if not (0 <= sy < H and 0 <= sx < W):
            raise ValueError(f"seed ({sy}, {sx}) lies outside the {H}x{W} image.")
        region = np.zeros((H, W), dtype=bool)
        region[sy, sx] = True
        total, count = img[sy, sx], 1
        queue = deque([(int(sy), int(sx))])
        while queue:
            y, x = queue.popleft()
            ref = img[sy, sx] if reference == "seed" else total / count
            for dy, dx in steps:
                ny, nx = y + dy, x + dx
                if 0 <= ny < H and 0 <= nx < W and not region[ny, nx] \
                        and abs(img[ny, nx] - ref) <= tolerance:
                    region[ny, nx] = True
                    total, count = total + img[ny, nx], count + 1
                    queue.append((ny, nx))
        union |= region
    return union

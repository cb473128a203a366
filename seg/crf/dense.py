"""Fully connected CRF with Gaussian edge potentials (Kraehenbuehl & Koltun, NIPS 2011).

The CRF refines a network's per-pixel class probabilities so that the labelling follows the
image's edges: every pixel is connected to *every* other pixel, with a pairwise Potts penalty for
disagreeing labels weighted by Gaussian kernels on features

* appearance / bilateral:  w1 * exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))
  - nearby pixels of similar colour should share a label;
* smoothness / Gaussian:   w2 * exp(-|p_i - p_j|^2 / (2 sxy^2))  - removes small isolated regions.

Mean-field inference, exactly as the widely used C++ implementation does it:

    Q = softmax(-U)
    repeat n_iterations:
        acc = -U
        for each kernel m:  n_m = 1 / sqrt(K_m 1 + 1e-20)          (symmetric normalisation)
                            acc -= compat_m( n_m * K_m(n_m * Q) )   (Potts: acc += w_m * ...)
        Q = softmax(acc)                                           (per pixel, log-sum-exp)

``K_m`` (the Gaussian sum over all pixels, the pixel itself included) is applied with the
permutohedral lattice, linear in the number of pixels (``kernels/permutohedral_cpu.py``, CuPy in
``kernels/permutohedral_gpu.py``). The lattice is built once per kernel and reused by every
iteration and every label.

Conventions
-----------
* Pixel n of the flattened image is ``row * W + col``; features are positions ``x = col``,
  ``y = row`` (and colour) divided by their thetas.
* ``U``: unary energy, (L, N) float32; ``-log(probability)`` is the usual choice.
* ``compat``: a number ``w`` means Potts with weight w (energy ``w`` for every pair of different
  labels); an (L, L) matrix ``mu`` is the energy ``mu[l, l']`` of labels l, l' on two similar
  pixels, so Potts w is ``w * (1 - eye(L))``. Positive = penalise. (The message for label l is
  ``-sum_l' mu[l, l'] * (n K n Q)[l']``; for Potts that is ``w * (n K n Q)[l]`` up to a per-pixel
  constant, which the softmax ignores: a label that nearby similar pixels hold gains score.)
* Thetas are in pixels (sxy) and in image intensity units (srgb): the presets were tuned on 0-255
  images.

Choosing parameters: sxy of the bilateral kernel sets how far labels propagate along similar
colours (tens of pixels); srgb how different two colours may be and still count as "similar"
(3-13 on 0-255); the bilateral weight (4-10) how strongly; the Gaussian kernel (sxy 1-3, weight
3) only cleans up. DeepLab tuned theirs by grid search on a held-out set; do the same on yours.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np

import kernels
from minidl import backend

# Parameter sets (from the dense-CRF example code and the DeepLab papers/releases).
PRESETS = {
    # The dense-CRF C++ example: Gaussian (sxy 3, compat 3), bilateral (80, 13, 10), 5 iterations.
    "default": {"gaussian": (3.0, 3.0), "bilateral": (80.0, 13.0, 10.0), "iterations": 5},
    # DeepLab v1 LargeFOV: Gaussian (3, 3), bilateral (sxy 49, srgb 5, compat 4), 10 iterations.
    "deeplab_v1_largefov": {"gaussian": (3.0, 3.0), "bilateral": (49.0, 5.0, 4.0), "iterations": 10},
    # DeepLab v2 ResNet-101: Gaussian (1, 3), bilateral (67, 3, 4), 10 iterations.
    "deeplab_v2": {"gaussian": (1.0, 3.0), "bilateral": (67.0, 3.0, 4.0), "iterations": 10},
}

def _positive_values(value, name):
    """A theta given as one number or one per axis -> float array; checks positivity."""
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be a positive number (or one positive number per axis); got {value!r}.")
    return arr


def _check_image(image, height, width):
    """image: (H, W), (H, W, 1) or (H, W, C) of any real dtype -> (H, W, C) float64."""
    img = backend.to_numpy(image)
    if img.dtype.kind not in "biuf":
        raise TypeError(f"image must hold real numbers (uint8 or float); got dtype {img.dtype}.")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"image must be (H, W) grayscale or (H, W, C) colour; got shape {img.shape}.")
    if img.shape[:2] != (height, width):
        raise ValueError(
            f"image is {img.shape[0]}x{img.shape[1]} (H x W) but the CRF is {height}x{width}; "
            "give the image the probabilities were computed for, at the same size."
        )
    img = img.astype(np.float64)  # the dtype is converted for the user: uint8, bool, float32 all fine
    if not np.all(np.isfinite(img)):
        raise ValueError("image contains NaN or infinity; clean it before running the CRF.")
    return img


def _check_compat(compat, n_labels, xp):
    """Number -> ("potts", w); (L, L) matrix -> ("matrix", mu on the device)."""
    if isinstance(compat, numbers.Real) and not isinstance(compat, bool):
        if not np.isfinite(compat):
            raise ValueError(f"compat must be a finite number or an (L, L) matrix; got {compat!r}.")
        return "potts", float(compat)
    mu = np.asarray(backend.to_numpy(compat), dtype=np.float32)
    if mu.ndim == 0:
        return "potts", float(mu)
    if mu.shape != (n_labels, n_labels):
        raise ValueError(
            f"compat must be a number (Potts weight) or an ({n_labels}, {n_labels}) label "
            f"compatibility matrix; got shape {mu.shape}."
        )
    if not np.all(np.isfinite(mu)):
        raise ValueError("the compat matrix contains NaN or infinity.")
    return "matrix", xp.asarray(mu)


def _labels_first(probs, height, width, labels_axis):
    """Bring probabilities to (L, H, W); detect the layout from the image size when possible."""
    if probs.ndim != 3:
        raise ValueError(
            f"probabilities must be 3-D, (L, H, W) or (H, W, L); got shape {probs.shape} "
            "(for a single foreground map p use np.stack([1 - p, p]))."
        )
    if labels_axis is None:
        first = probs.shape[1:] == (height, width)
        last = probs.shape[:2] == (height, width)
        if first and last:
            raise ValueError(
                f"probabilities of shape {probs.shape} could be (L, H, W) or (H, W, L); "
                "pass labels_axis=0 or labels_axis=-1 to say which."
            )
        if not (first or last):
            raise ValueError(
                f"probabilities of shape {probs.shape} match neither (L, {height}, {width}) nor "
                f"({height}, {width}, L); the image is {height}x{width} (H x W)."
            )
        labels_axis = 0 if first else 2
    if labels_axis not in (0, 2, -1, -3):
        raise ValueError(f"labels_axis must be 0 (L, H, W) or -1 (H, W, L); got {labels_axis!r}.")
    p = np.moveaxis(probs, labels_axis, 0)
    if p.shape[1:] != (height, width):
        raise ValueError(
            f"probabilities are {p.shape[1]}x{p.shape[2]} (H x W) with labels_axis={labels_axis} "
            f"but the image is {height}x{width}; resize the probabilities to the image first."
        )
    return p


def _check_probs(probs):
    """Any real array -> float32 probabilities normalised over axis 0 (labels)."""
    p = np.asarray(probs)
    if p.dtype.kind not in "biuf":
        raise TypeError(f"probabilities must be real numbers; got dtype {p.dtype}.")
    p = p.astype(np.float32)
    if np.isnan(p).any():
        raise ValueError(f"probabilities contain {int(np.isnan(p).sum())} NaN value(s); check the network output.")
    if np.isinf(p).any():
        raise ValueError("probabilities contain infinity; pass probabilities (e.g. a softmax), not scores.")
    if (p < 0).any():
        raise ValueError(
            f"probabilities must be non-negative, found minimum {float(p.min()):.4g}; "
            "pass softmax probabilities, not logits (use set_unary_energy for energies)."
        )
    total = p.sum(axis=0, keepdims=True)
    if (total <= 0).any():
        raise ValueError(f"probabilities sum to zero over the labels at {int((total <= 0).sum())} pixels.")
    return p / total  # normalised for the user (e.g. uint8 masks or unnormalised scores)


class _Kernel:
    """One pairwise term: a lattice, its symmetric normalisation n = 1/sqrt(K 1), and compat."""

    def __init__(self, lattice, norm, kind, compat):
        self.lattice, self.norm, self.kind, self.compat = lattice, norm, kind, compat


class DenseCRF:
    """Fully connected CRF over a ``height x width`` image with ``n_labels`` labels.

    device: "cpu" (NumPy + Numba) or "gpu" (CuPy; lattice built on the CPU, filtering on the GPU).

    Typical use::

        crf = DenseCRF(W, H, L)
        crf.set_unary_from_probs(probs)                 # (L, H, W) softmax output
        crf.add_pairwise_gaussian(sxy=3, compat=3)
        crf.add_pairwise_bilateral(sxy=80, srgb=13, image=img, compat=10)
        Q = crf.inference(5)                           # (L, H, W) float32, sums to 1 over L
        labels = Q.argmax(0)
    """

    def __init__(self, width, height, n_labels, device="cpu"):
        for name, v in (("width", width), ("height", height), ("n_labels", n_labels)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        if device not in backend.DEVICES:
            raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}.")
        self.width, self.height, self.n_labels = int(width), int(height), int(n_labels)
        self.n_pixels = self.width * self.height
        self.device = device
        self.xp = backend.array_module(device)
        self.unary = None  # (N, L) float32 on the device: pixel-major, as the lattice filters
        self.kernels = []
        yy, xx = np.mgrid[0 : self.height, 0 : self.width]
        self._positions = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)  # (N, 2)

    # ----------------------------------------------------------------- unary
    def set_unary_energy(self, unary):
        """unary: (L, N) or (L, H, W) energies (lower = more likely), e.g. -log(p); made float32."""
        u = backend.to_numpy(unary)
        if u.dtype.kind not in "biuf":
            raise TypeError(f"unary energy must be real numbers; got dtype {u.dtype}.")
        if u.ndim == 3:
            u = u.reshape(u.shape[0], -1) if u.shape[1:] == (self.height, self.width) else u
        if u.shape != (self.n_labels, self.n_pixels):
            raise ValueError(
                f"unary energy must be (L, N) = ({self.n_labels}, {self.n_pixels}) "
                f"(or (L, H, W) = ({self.n_labels}, {self.height}, {self.width})); got shape {u.shape}."
            )
        u = u.astype(np.float32)
        if not np.all(np.isfinite(u)):
            raise ValueError("unary energy contains NaN or infinity; clip probabilities before taking -log.")
        self.unary = self.xp.asarray(np.ascontiguousarray(u.T))

    def set_unary_from_probs(self, probs, clip=1e-5, labels_axis=None):
        """Unary = -log(clip(p)) from probabilities.

        probs: (L, H, W), (H, W, L) or (L, N); labels_axis (0 or -1) resolves the layout when
        the shape alone cannot (L == H == W). Converted to float32 and normalised over labels.
        clip: smallest probability kept (1e-5 as in common dense-CRF wrappers) so that a
        confidently wrong network output can still be overturned by the pairwise terms.
        """
        p = backend.to_numpy(probs)
        if p.ndim == 2 and p.shape == (self.n_labels, self.n_pixels):
            p = p.reshape(self.n_labels, self.height, self.width)
        elif p.ndim == 3:
            p = _labels_first(p, self.height, self.width, labels_axis)
        else:
            _labels_first(p, self.height, self.width, labels_axis)  # raises the shape error
        p = _check_probs(p)
        if p.shape[0] != self.n_labels:
            raise ValueError(f"probabilities have {p.shape[0]} labels but the CRF was made for {self.n_labels}.")
        if not 0.0 < clip < 1.0:
            raise ValueError(f"clip must be in (0, 1); got {clip!r}.")
        self.set_unary_energy(-np.log(np.clip(p, clip, 1.0)).reshape(self.n_labels, -1))

    # -------------------------------------------------------------- pairwise
    def add_pairwise_features(self, features, compat):
        """Add a Potts/matrix term with kernel exp(-|f_i - f_j|^2 / 2).

        features: (N, d), already divided by their thetas. compat: number or (L, L) matrix.
        A weight of 0 adds nothing (no lattice is built).
        """
        kind, c = _check_compat(compat, self.n_labels, self.xp)
        if kind == "potts" and c == 0.0:
            return
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] != self.n_pixels:
            raise ValueError(f"features must be (N, d) with N = {self.n_pixels}; got shape {feats.shape}.")
        ones = self.xp.ones((self.n_pixels, 1), dtype=self.xp.float32)
        # The lattice of the CRF's device: built on the CPU either way, filtering on the device.
        lattice = kernels.for_array(ones).PermutohedralLattice(feats)
        # n = 1 / sqrt(K 1): fixed per kernel, so computed once here rather than every iteration.
        norm = 1.0 / self.xp.sqrt(lattice.filter(ones) + 1e-20)
        self.kernels.append(_Kernel(lattice, norm.astype(self.xp.float32).reshape(-1), kind, c))

    def _scaled_positions(self, sxy):
        s = _positive_values(sxy, "sxy")
        if s.size > 2:
            raise ValueError(f"sxy must be one number or a pair (sx, sy); got {sxy!r}.")
        return self._positions / s  # (N, 2) / (1,) or (2,)

    def add_pairwise_gaussian(self, sxy, compat):
        """Smoothness kernel on positions: features (x / sx, y / sy). sxy: number or (sx, sy)."""
        self.add_pairwise_features(self._scaled_positions(sxy), compat)

    def add_pairwise_bilateral(self, sxy, srgb, image, compat):
        """Appearance kernel: features (x / sx, y / sy, I_1 / srgb, ..., I_C / srgb).

        image: (H, W) or (H, W, 1) grayscale, (H, W, 3) colour (any channel count works),
        uint8 or float - converted to float. srgb is in the image's units (presets: 0-255).
        """
        pos = self._scaled_positions(sxy)
        img = _check_image(image, self.height, self.width)
        c = img.shape[2]
        r = _positive_values(srgb, "srgb")
        if r.size not in (1, c):
            raise ValueError(f"srgb must be one number or one per channel ({c}); got {srgb!r}.")
        floating = np.issubdtype(backend.to_numpy(image).dtype, np.floating)
        if floating and 0.0 < img.max() <= 1.0 and r.min() > 1.0:
            warnings.warn(
                f"the image lies in [0, 1] but srgb={srgb} is meant for 0-255 intensities; "
                "multiply the image by 255 or use a smaller srgb.",
                UserWarning,
                stacklevel=2,
            )
        colour = img.reshape(-1, c) / r
        self.add_pairwise_features(np.concatenate([pos, colour], axis=1), compat)

    # ------------------------------------------------------------- inference
    def inference(self, n_iterations):
        """Run mean field. returns Q: (L, H, W) float32 on the CRF's device (NumPy for "cpu",
        CuPy for "gpu"), a probability distribution over labels at every pixel."""
        if self.unary is None:
            raise ValueError("set the unary first: call set_unary_energy or set_unary_from_probs before inference.")
        if not isinstance(n_iterations, numbers.Integral) or n_iterations < 0:
            raise ValueError(f"n_iterations must be a non-negative integer; got {n_iterations!r}.")
        xp = self.xp
        acc = -self.unary  # (N, L) scores; reused every iteration to avoid allocations
        # A compiled row softmax on both devices: on the CPU, NumPy's reductions over a short
        # last axis (L = 2) cost more than the whole lattice filter.
        bundle = kernels.for_array(acc)
        q = bundle.softmax_rows(acc, xp.empty_like(acc))  # Q = softmax(-U)
        for _ in range(int(n_iterations)):
            xp.negative(self.unary, out=acc)
            for k in self.kernels:
                if k.kind == "potts":
                    # acc += w * n K(n Q): equals -(w (1 - I)) applied to the message, up to a
                    # per-pixel constant that the softmax ignores.
                    k.lattice.accumulate_filter(q, acc, scale=k.norm, weight=k.compat)
                else:
                    msg = xp.zeros_like(acc)
                    k.lattice.accumulate_filter(q, msg, scale=k.norm)
                    acc -= msg @ k.compat.T  # acc[:, l] -= sum_l' mu[l, l'] msg[:, l']
            bundle.softmax_rows(acc, q)
        return xp.ascontiguousarray(q.T).reshape(self.n_labels, self.height, self.width)


def dense_crf(probs, image, gaussian=None, bilateral=None, iterations=None, device="cpu",
              preset="default", labels_axis=None, clip=1e-5):
    """Refine per-pixel class probabilities with a fully connected CRF.

    probs:  (L, H, W) or (H, W, L) probabilities (e.g. a network's softmax), NumPy or CuPy. The
            layout is read off the image size: (L, H, W) if probs.shape[1:] == (H, W), else
            (H, W, L) if probs.shape[:2] == (H, W); when both hold (L == H == W) pass
            ``labels_axis`` (0 or -1). Converted to float32 and normalised over the labels.
    image:  (H, W), (H, W, 1) grayscale or (H, W, 3) colour, uint8 or float (0-255 scale for the
            presets).
    gaussian:  (sxy, compat) of the smoothness kernel, bilateral: (sxy, srgb, compat) of the
            appearance kernel, iterations: mean-field steps. Any of them left as None is taken
            from ``preset`` ("default", "deeplab_v1_largefov" or "deeplab_v2", see PRESETS).
            A compat of 0 drops that kernel.
    device: "cpu" or "gpu".
    returns: (L, H, W) float32 probabilities (always labels first, whatever the input layout),
            NumPy unless probs was a CuPy array.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    cfg = PRESETS[preset]
    gaussian = cfg["gaussian"] if gaussian is None else gaussian
    bilateral = cfg["bilateral"] if bilateral is None else bilateral
    iterations = cfg["iterations"] if iterations is None else iterations
    if not isinstance(gaussian, (tuple, list)) or len(gaussian) != 2:
        raise ValueError(f"gaussian must be a pair (sxy, compat); got {gaussian!r}.")
    if not isinstance(bilateral, (tuple, list)) or len(bilateral) != 3:
        raise ValueError(f"bilateral must be a triple (sxy, srgb, compat); got {bilateral!r}.")
    was_cupy = backend.is_gpu_array(probs)
    p = backend.to_numpy(probs)
    img = backend.to_numpy(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) grayscale or (H, W, C) colour; got shape {img.shape}.")
    height, width = img.shape[:2]
    p = _check_probs(_labels_first(p, height, width, labels_axis))
    crf = DenseCRF(width, height, p.shape[0], device=device)
    crf.set_unary_from_probs(p, clip=clip, labels_axis=0)
    crf.add_pairwise_gaussian(gaussian[0], gaussian[1])
    crf.add_pairwise_bilateral(bilateral[0], bilateral[1], img, bilateral[2])
    q = crf.inference(iterations)
    if was_cupy:
        return crf.xp.asarray(q)
    return backend.to_numpy(q)

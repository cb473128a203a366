"""Synthetic ultrasound images: the project's built-in data set, in the Kaggle layout.

The real Kaggle Ultrasound Nerve Segmentation data cannot be shipped, so this module draws
stand-in frames with the same format and the same kind of difficulty:

- 580 wide x 420 high, grayscale uint8, masks 0/255 saved beside the image;
- tissue as smooth, wavy, roughly horizontal layers of different echogenicity (brightness),
  including thin bright fascia lines, dimmer with depth (attenuation);
- speckle: ultrasound images are the envelope of interfering echoes, whose amplitude is
  Rayleigh distributed; it multiplies the tissue brightness. It is smoothed more along x than
  along y because lateral resolution is worse than axial resolution;
- a dark round artery (no echoes from blood, with a bright wall and brighter tissue below it,
  "posterior acoustic enhancement") in many frames, nerve or not;
- the nerve in about half the frames: an ellipse with a bright rim (epineurium) around a
  honeycomb of dark round fascicles in bright connective tissue.

The nerve is found by its texture and rim, not by brightness alone: the fascia lines are as
bright as its rim and some layers as bright as its mean, so a single threshold does not work.
Frames of one subject share anatomy (layers, nerve and artery place) with small changes, like
consecutive frames of one patient, so ``split_by_subject`` matters here as in the real data.

    root = write_synthetic_dataset("data/synthetic", n_subjects=12, images_per_subject=20)
    data = seg.data.KaggleUltrasound(root)          # the real reader reads it

Everything is seeded: the same arguments give byte-identical files on every run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["synthetic_image", "write_synthetic_dataset", "DEFAULT_SIZE"]

#: (height, width) of a Kaggle ultrasound frame.
DEFAULT_SIZE = (420, 580)

# Streams of the random generator: every image gets its own seed sequence
# [seed, stream, subject, n], so an image does not depend on how many were drawn before it.
_TRAIN, _TEST = 1, 2
# Bump when the drawing code changes: folders written by an older version are then redrawn.
_FORMAT_VERSION = 1


def _subject_anatomy(rng, size):
    """Random anatomy shared by all frames of one subject (sizes in pixels of ``size``)."""
    H, W = size
    s = float(np.sqrt(H / 420.0 * W / 580.0))  # geometric scale relative to the Kaggle frame
    # Layer profile along depth: bands of random echogenicity with random thickness.
    n_bands = int(rng.integers(5, 9))
    edges = np.sort(rng.uniform(-0.1, 1.2, n_bands - 1)) * H
    levels = rng.uniform(0.2, 0.7, n_bands)
    fascia = rng.uniform(0.0, 1.2, int(rng.integers(2, 5))) * H  # thin bright lines
    a = rng.uniform(60, 90) * s
    return {
        "edges": edges,
        "levels": levels,
        "fascia": fascia,
        "fascia_level": rng.uniform(0.75, 0.95, fascia.size),
        "fascia_width": rng.uniform(2.0, 4.0, fascia.size) * s,
        # y offset of the layers as a sum of a few slow waves across the width, plus a tilt.
        "wave_amp": rng.uniform(5, 22, 3) * s,
        "wave_freq": rng.uniform(0.3, 1.6, 3),
        "wave_phase": rng.uniform(0, 2 * np.pi, 3),
        "tilt": rng.uniform(-0.12, 0.12),
        "attenuation": rng.uniform(0.2, 0.7),
        "nerve_center": (rng.uniform(0.3, 0.72) * H, rng.uniform(0.22, 0.78) * W),
        "nerve_axes": (a, a * rng.uniform(0.55, 0.8)),
        "nerve_angle": rng.uniform(-0.45, 0.45),  # radians, about +-25 degrees: horizontal-ish
        "artery": rng.uniform() < 0.7,
        "artery_side": rng.choice([-1.0, 1.0]),
        "artery_radius": rng.uniform(18, 32) * s,
    }


def _tissue(anat, rng, size):
    """Background brightness (H, W) float32 from the layered profile, without speckle."""
    H, W = size
    y = np.arange(H, dtype=np.float32)[:, None]
    x = np.arange(W, dtype=np.float32)[None, :]
    phase = anat["wave_phase"] + rng.normal(0, 0.15, 3)  # frames differ slightly
    offset = anat["tilt"] * (x - W / 2) + sum(
        amp * np.sin(2 * np.pi * f * x / W + ph)
        for amp, f, ph in zip(anat["wave_amp"], anat["wave_freq"], phase)
    )
    depth = y + offset  # (H, W): the "layer coordinate" of every pixel
    # The profile is built once along a fine 1-D depth axis and looked up for every pixel.
    s = float(np.sqrt(H / 420.0 * W / 580.0))
    margin = 60 * s
    z = np.linspace(-margin, H + margin, int(H + 2 * margin) + 1).astype(np.float32)
    band = np.searchsorted(anat["edges"], z)
    profile = anat["levels"][band]
    profile = ndimage.gaussian_filter1d(profile, sigma=4 * s)  # soft layer boundaries
    for c, lev, wid in zip(anat["fascia"], anat["fascia_level"], anat["fascia_width"]):
        profile = np.maximum(profile, lev * np.exp(-0.5 * ((z - c) / wid) ** 2))
    return np.interp(depth.ravel(), z, profile).reshape(H, W).astype(np.float32)


def _ellipse_coords(center, axes, angle, size, pad):
    """Bounding-box slices and normalised radius r (r = 1 on the ellipse) around an ellipse."""
    H, W = size
    cy, cx = center
    a, b = axes
    ext = a * pad
    y0, y1 = int(max(0, np.floor(cy - ext))), int(min(H, np.ceil(cy + ext) + 1))
    x0, x1 = int(max(0, np.floor(cx - ext))), int(min(W, np.ceil(cx + ext) + 1))
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    c, s = np.cos(angle), np.sin(angle)
    u = (xx * c + yy * s) / a  # along the long axis, in units of the semi-axis
    v = (-xx * s + yy * c) / b
    return (slice(y0, y1), slice(x0, x1)), u, v


def _draw_nerve(img, mask, anat, rng, size):
    """Paint the honeycomb nerve into img (in place) and its area into mask."""
    H, W = size
    cy, cx = anat["nerve_center"]
    cy += rng.normal(0, 0.03 * H)
    cx += rng.normal(0, 0.03 * W)
    scale = rng.uniform(0.9, 1.1)
    axes = (anat["nerve_axes"][0] * scale, anat["nerve_axes"][1] * scale)
    angle = anat["nerve_angle"] + rng.normal(0, 0.08)
    box, u, v = _ellipse_coords((cy, cx), axes, angle, size, pad=1.25)
    r = np.sqrt(u * u + v * v)
    # Fascicles: centres on a jittered hexagonal grid (in normalised ellipse coordinates) kept
    # inside the ellipse -> the honeycomb look of a nerve in cross-section.
    spacing = rng.uniform(0.34, 0.42)
    gy, gx = np.mgrid[-3:4, -3:4].astype(np.float32)
    centres = np.stack([(gx + 0.5 * (gy % 2)) * spacing, gy * spacing * 0.87], axis=-1).reshape(-1, 2)
    centres += rng.normal(0, 0.05, centres.shape)
    centres = centres[np.hypot(centres[:, 0], centres[:, 1]) < 0.78]
    radius = spacing * rng.uniform(0.26, 0.32)
    dark = np.zeros_like(r)
    for fu, fv in centres:
        dark = np.maximum(dark, np.exp(-0.5 * ((u - fu) ** 2 + (v - fv) ** 2) / radius**2))
    inside = rng.uniform(0.55, 0.75) * (1.0 - 0.8 * dark)  # bright septa, dark fascicles
    rim = rng.uniform(0.3, 0.42) * np.exp(-0.5 * ((r - 0.93) / 0.07) ** 2)  # epineurium
    w = np.clip((1.0 - r) / 0.05 + 0.5, 0.0, 1.0)  # 1 inside, 0 outside, ~2 px soft edge
    patch = img[box]
    img[box] = patch * (1 - w) + inside * w + rim
    mask[box] |= r <= 1.0
    return (cy, cx), axes


def _draw_artery(img, anat, rng, size, nerve_center, nerve_axes):
    """Paint a dark round artery beside the nerve (in place), with posterior enhancement."""
    H, W = size
    cy, cx = nerve_center
    ra = anat["artery_radius"] * rng.uniform(0.9, 1.1)
    # Beside the nerve, clear of it: centre one nerve semi-axis + radius + gap away.
    dx = anat["artery_side"] * (nerve_axes[0] * 1.1 + ra + 0.03 * W)
    ay, ax = cy + rng.normal(0, 0.03 * H), cx + dx
    if not (ra < ax < W - ra):
        ax = cx - dx  # no room on that side: use the other one
    box, u, v = _ellipse_coords((ay, ax), (ra, ra), 0.0, size, pad=1.3)
    r = np.sqrt(u * u + v * v)
    lumen = np.clip((1.0 - r) / 0.08 + 0.5, 0.0, 1.0)
    wall = 0.3 * np.exp(-0.5 * ((r - 1.02) / 0.07) ** 2)
    img[box] = img[box] * (1 - 0.9 * lumen) + wall
    # Posterior enhancement: sound crosses blood with little loss, so the tissue below is brighter.
    x = np.arange(W, dtype=np.float32)
    y = np.arange(H, dtype=np.float32)[:, None]
    column = np.exp(-0.5 * ((x - ax) / (0.8 * ra)) ** 2)[None, :]
    below = np.clip((y - ay - ra) / (0.3 * ra), 0, 1) * np.exp(-np.maximum(y - ay - ra, 0) / (4 * ra))
    img *= 1.0 + 0.35 * column * below


def _speckle(rng, size):
    """Multiplicative speckle (H, W), mean 1: smoothed Rayleigh amplitudes."""
    H, W = size
    s = float(np.sqrt(H / 420.0 * W / 580.0))
    raw = rng.rayleigh(1.0, size=size).astype(np.float32)
    # Axial (y) resolution beats lateral (x) resolution, hence the anisotropic blur.
    sm = ndimage.gaussian_filter(raw, sigma=(1.0 * s, 2.2 * s))
    return 1.0 + 0.32 * (sm - sm.mean()) / (sm.std() + 1e-6)


def synthetic_image(seed=0, subject=1, n=1, size=DEFAULT_SIZE, nerve=None, presence=0.5, test=False):
    """Draw one synthetic frame and its mask.

    seed, subject, n: identify the frame; frames of one subject share anatomy.
    size: (height, width) in pixels; geometry scales with it.
    nerve: True/False forces the nerve in or out; None draws it with probability ``presence``.
    test: draw from the separate test stream (test images are their own subjects).
    Returns (image uint8 (H, W), mask uint8 (H, W) with 0 background / 255 nerve).
    """
    H, W = (int(size[0]), int(size[1]))
    if H < 16 or W < 16:
        raise ValueError(f"size must be at least 16x16 pixels, got {H}x{W}.")
    stream = _TEST if test else _TRAIN
    anat = _subject_anatomy(np.random.default_rng([seed, stream, subject]), (H, W))
    rng = np.random.default_rng([seed, stream, subject, n])
    present = bool(rng.uniform() < presence) if nerve is None else bool(nerve)
    img = _tissue(anat, rng, (H, W))
    mask = np.zeros((H, W), dtype=bool)
    if present:
        center, axes = _draw_nerve(img, mask, anat, rng, (H, W))
    else:  # the artery still sits where the anatomy puts it
        center, axes = anat["nerve_center"], anat["nerve_axes"]
    if anat["artery"]:
        _draw_artery(img, anat, rng, (H, W), center, axes)
    # Attenuation: echoes from deeper tissue come back weaker (applied to everything drawn).
    img *= np.exp(-anat["attenuation"] * np.arange(H, dtype=np.float32) / H)[:, None]
    img *= _speckle(rng, (H, W)) * rng.uniform(0.85, 1.15)  # speckle and overall gain
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return image, (mask.astype(np.uint8) * 255)


def _write_tiff(path, array):
    """Write a plain TIFF atomically (temp file, then os.replace) and without a timestamp."""
    import tifffile

    tmp = f"{path}.tmp"
    # metadata=None: no JSON description, so identical arrays give identical bytes.
    tifffile.imwrite(tmp, array, metadata=None)
    os.replace(tmp, path)


def write_synthetic_dataset(root, n_subjects=12, images_per_subject=20, seed=0, size=DEFAULT_SIZE,
                            n_test=5, presence=0.5):
    """Write a synthetic data set in the Kaggle layout and return its root as a Path.

    Writes root/train/<subject>_<n>.tif + <subject>_<n>_mask.tif (subjects 1..n_subjects,
    n 1..images_per_subject), root/test/<n>.tif (n 1..n_test), and root/synthetic.json with
    the arguments. Calling it again with the same arguments does nothing (the data set is
    complete); an interrupted run is completed, and a set drawn by an older version of this
    generator is redrawn. A root that holds other data, or a synthetic set made with other
    arguments, raises ValueError instead of being overwritten.
    """
    root = Path(root)
    H, W = int(size[0]), int(size[1])
    params = {
        "generator": "seg.data.synthetic",
        "version": _FORMAT_VERSION,
        "n_subjects": int(n_subjects),
        "images_per_subject": int(images_per_subject),
        "seed": int(seed),
        "size": [H, W],
        "n_test": int(n_test),
        "presence": float(presence),
    }
    if n_subjects < 1 or images_per_subject < 1 or n_test < 0:
        raise ValueError("n_subjects and images_per_subject must be at least 1 and n_test at least 0.")
    train_names = [f"{s}_{i}{suffix}.tif" for s in range(1, n_subjects + 1)
                   for i in range(1, images_per_subject + 1) for suffix in ("", "_mask")]
    test_names = [f"{i}.tif" for i in range(1, n_test + 1)]
    marker = root / "synthetic.json"

    if marker.exists():
        stored = json.loads(marker.read_text())
        outdated = stored.get("generator") == params["generator"] and stored.get("version") != _FORMAT_VERSION
        if outdated:
            stored = {**stored, "version": _FORMAT_VERSION, "complete": False}
        if {k: v for k, v in stored.items() if k != "complete"} != params:
            raise ValueError(
                f"Folder {root} holds a synthetic data set made with other arguments ({marker}); "
                "use another folder or delete this one."
            )
        if stored.get("complete") and all((root / "train" / f).exists() for f in train_names) \
                and all((root / "test" / f).exists() for f in test_names):
            return root  # already complete: nothing to do
        if outdated:
            # Drawn by an older version of this generator (our own folder, the marker says so):
            # delete its files so that the loop below redraws them all, even after an interruption.
            marker.write_text(json.dumps({**params, "complete": False}, indent=1))
            for sub, names in (("train", train_names), ("test", test_names)):
                for name in names:
                    (root / sub / name).unlink(missing_ok=True)
    else:
        for sub, expected in (("train", set(train_names)), ("test", set(test_names))):
            folder = root / sub
            if folder.is_dir():
                extra = [f for f in os.listdir(folder) if f not in expected and not f.endswith(".tmp")]
                if extra:
                    raise ValueError(
                        f"Folder {folder} already holds other files (e.g. {extra[0]}); "
                        "write the synthetic data set to an empty folder."
                    )

    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**params, "complete": False}, indent=1))
    for s in range(1, n_subjects + 1):
        for i in range(1, images_per_subject + 1):
            image_path, mask_path = root / "train" / f"{s}_{i}.tif", root / "train" / f"{s}_{i}_mask.tif"
            if image_path.exists() and mask_path.exists():
                continue  # left by an interrupted run; files are written atomically
            image, mask = synthetic_image(seed, s, i, (H, W), presence=presence)
            _write_tiff(mask_path, mask)
            _write_tiff(image_path, image)
    for i in range(1, n_test + 1):
        path = root / "test" / f"{i}.tif"
        if not path.exists():
            image, _ = synthetic_image(seed, i, 0, (H, W), presence=presence, test=True)
            _write_tiff(path, image)
    tmp = root / "synthetic.json.tmp"
    tmp.write_text(json.dumps({**params, "complete": True}, indent=1))
    os.replace(tmp, marker)
    return root

"""Overlap-tile prediction (U-Net paper, Fig. 2) and mirror padding for valid-padding models.

A valid-padding U-Net maps a 572x572 tile to a 388x388 output: the output only covers the
tile's centre, because every output pixel needs 92 pixels of context on each side. To segment
an image of any size:

1. mirror (reflect) the image at its borders, so the border pixels get context too;
2. cut the padded image into input tiles whose *outputs* lie side by side;
3. predict each tile and paste the outputs together: no seams, no averaging.

The steps between tiles are multiples of the model's down-sampling factor (2**(depth-1)), so
every tile's max-pool grid lines up with the whole image's: the stitched result equals what one
pass over the whole (mirror-padded) image gives, just with bounded memory.

"same"-padding models get the same treatment with `context` extra pixels per tile side whose
(zero-padding affected) predictions are thrown away: plain tiling with overlap.

    probs = predict_tiled(model, image, tile_size=572)          # (num_classes, H, W)
    plan = tile_plan(model, H, W, tile_size=572)                 # where those tiles go (pure)
    logits = forward_full(model, x)                              # (N, K, H, W) for x (N, C, H, W)
"""
import math
from typing import NamedTuple

import numpy as np

from minidl import backend, no_grad
from minidl.ops.geometry import pair
from minidl.tensor import Tensor

from .errors import explain_gpu_out_of_memory

__all__ = ["predict_tiled", "tile_plan", "TilePlan", "forward_full", "input_geometry", "mirror_pad"]


def _has_sizes(model):
    return hasattr(model, "valid_input_size") and hasattr(model, "output_size")


def _margin(model, s):
    """Total context (input - output size) along a dimension, for inputs near size s."""
    t = model.valid_input_size(s, s)[0]
    return t - model.output_size(t, t)[0]


def input_geometry(model, h, w):
    """How to run `model` so that its output covers an (h, w) image exactly.

    Returns (in_size, pad):
      in_size = (H_in, W_in), a valid input size for the model;
      pad = (top, bottom, left, right) mirror padding that turns the image into that input.
    The image's (h, w) window starts at the top-left corner of the model's output.
    Models without size rules (no `valid_input_size`) need no padding.
    """
    if not _has_sizes(model):
        return (h, w), (0, 0, 0, 0)
    sizes, pads = [], []
    for s in (int(h), int(w)):
        m = _margin(model, s)
        t = model.valid_input_size(s + m, s + m)[0]
        # The output is t - m - s pixels larger than the image; the surplus goes to the
        # bottom/right, so the pooling grid starts at the same place as predict_tiled's.
        before = m // 2
        sizes.append(t)
        pads.append((before, t - s - before))
    return tuple(sizes), (pads[0][0], pads[0][1], pads[1][0], pads[1][1])


def mirror_pad(x, pad):
    """Reflect-pad the last two axes of an array: pad = (top, bottom, left, right).

    Works for pads larger than the image too (the mirroring repeats), which small training
    images with a deep valid U-Net need.
    """
    top, bottom, left, right = pad
    if not any(pad):
        return x
    xp = backend.get_array_module(x)
    widths = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return xp.pad(x, widths, mode="reflect") if min(x.shape[-2:]) > 1 else xp.pad(x, widths, mode="edge")


def forward_full(model, x):
    """Run `model` on x: (N, C, H, W) and return logits (N, K, H, W) aligned with x.

    For a valid-padding U-Net the input is mirror-padded by the missing context first (the
    overlap-tile idea for a whole batch); for a same-padding model with size rules it is
    padded up to a valid size; other models are just called. x may be a Tensor or an array;
    the input itself gets no gradient (it is data), the model's parameters do.
    """
    data = x.data if isinstance(x, Tensor) else x
    h, w = data.shape[-2:]
    _, pad = input_geometry(model, h, w)
    if not any(pad):
        return model(x if isinstance(x, Tensor) else Tensor(data))
    out = model(Tensor(mirror_pad(data, pad)))
    if out.shape[2:] == (h, w):
        return out
    return out[:, :, :h, :w]


def _softmax(logits, axis):
    shifted = logits - logits.max(axis=axis, keepdims=True)   # log-sum-exp: no overflow
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


class TilePlan(NamedTuple):
    """Where the tiles of one image go (all pairs are (height, width); see tile_plan).

    tile:    input tile size, a valid input size of the model
    out_tile: the model's output size for one tile
    context: output pixels per tile side that are computed but thrown away
    step:    output pixels every tile keeps (its stride in the image)
    counts:  tiles per column and per row
    pad:     (top, bottom, left, right) mirror padding of the image
    origins: top-left corner (y, x) of every tile in the padded image, row by row
    """

    tile: tuple
    out_tile: tuple
    context: tuple
    step: tuple
    counts: tuple
    pad: tuple
    origins: list


def tile_plan(model, height, width, tile_size=None, context=None):
    """Plan the overlap-tile prediction of a (height, width) image; the model is not run.

    tile_size and context as in predict_tiled. Tile (i, j) starts at (i * step_h, j * step_w)
    in the padded image and keeps output pixels [context, context + step) of each axis, which
    are image pixels [i * step_h, (i + 1) * step_h) x [j * step_w, (j + 1) * step_w).
    Returns a TilePlan.
    """
    H, W = int(height), int(width)
    sized = _has_sizes(model)
    margins = (_margin(model, H), _margin(model, W)) if sized else (0, 0)
    valid_padding = sized and margins != (0, 0)
    align = int(getattr(model, "total_stride", 1))
    if tile_size is None:
        # Output tiles of up to 256 pixels (one tile for a small image), plus the context.
        if context is None:
            context = 0 if valid_padding else max(8, 2 * align)
        c = pair(context, "context", "predict_tiled")
        want = (min(H, 256) + margins[0] + 2 * c[0], min(W, 256) + margins[1] + 2 * c[1])
        tile = model.valid_input_size(*want) if sized else want
    else:
        tile = pair(tile_size, "tile_size", "predict_tiled")
    if sized:
        if hasattr(model, "check_input_size"):
            model.check_input_size(*tile)
        out_tile = model.output_size(*tile)
    else:
        out_tile = tile
    if context is None:
        ctx = (0, 0) if valid_padding else (out_tile[0] // 8, out_tile[1] // 8)
    else:
        ctx = pair(context, "context", "predict_tiled")

    steps = []
    for o, c in zip(out_tile, ctx):
        step = o - 2 * c
        if step >= align:
            step -= step % align   # keep every tile's pooling grid aligned with the image's
        if step < 1:
            raise ValueError(f"tile output {out_tile} leaves nothing to keep with context {ctx}; "
                             "use a larger tile_size or a smaller context.")
        steps.append(step)

    counts, pads = [], []
    for size, t, o, c, step in zip((H, W), tile, out_tile, ctx, steps):
        n = math.ceil(size / step)
        before = (t - o) // 2 + c       # the output tile's kept part starts `before` into the input
        total = (n - 1) * step + t
        counts.append(n)
        pads.append((before, total - size - before))
    origins = [(i * steps[0], j * steps[1]) for i in range(counts[0]) for j in range(counts[1])]
    return TilePlan(tuple(tile), tuple(out_tile), tuple(ctx), tuple(steps), tuple(counts),
                    (pads[0][0], pads[0][1], pads[1][0], pads[1][1]), origins)


def predict_tiled(model, image, tile_size=None, num_classes=None, batch_size=4, context=None,
                  output="probs", oom_advice=None):
    """Predict an image of any size tile by tile with the overlap-tile strategy.

    model: maps (N, C, h, w) to (N, K, h', w'); set to eval mode here (and restored after).
    image: (H, W) or (C, H, W) array (NumPy or CuPy), float.
    tile_size: *input* tile size, int or (h, w), a valid input size of the model (U-Net paper:
        572 -> 388 output); default: the smallest valid tile that keeps 256 output pixels
        per side (the whole image in one tile when it is smaller).
    num_classes: K, to check the model's output against (optional).
    batch_size: tiles per forward pass (memory vs speed).
    context: pixels per side of every output tile that are computed but discarded, so kept
        pixels see enough of their surroundings. Default 0 for valid-padding models (the
        model's own margin already gives full context); for others tile/8 with an explicit
        tile_size, else max(8, 2 * the model's down-sampling factor).
    output: "probs" (softmax over classes) or "logits".
    oom_advice: what the error suggests when the GPU runs out of memory on a batch of tiles
        (default: a smaller batch_size or tile_size, or the CPU); the error is
        seg.errors.GPUOutOfMemoryError, one sentence naming the batch.
    Returns float32 NumPy (K, H, W).
    """
    if output not in ("probs", "logits"):
        raise ValueError(f"output must be 'probs' or 'logits', got {output!r}.")
    img = np.asarray(backend.to_numpy(image.data if isinstance(image, Tensor) else image),
                     dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3:
        raise ValueError(f"predict_tiled takes one image (H, W) or (C, H, W), got shape {img.shape}.")
    expected = getattr(model, "in_channels", None)
    if expected is not None and img.shape[0] != expected:
        raise ValueError(f"the image has {img.shape[0]} channel(s) but the model takes {expected}; "
                         "give the image as (C, H, W) with the model's channel count.")
    C, H, W = img.shape
    plan = tile_plan(model, H, W, tile_size, context)
    (th, tw), (sh, sw), (ch, cw) = plan.tile, plan.step, plan.context
    padded = mirror_pad(img, plan.pad)

    device = getattr(model, "device", "cpu")
    advice = oom_advice or (f"a smaller batch_size (it is {batch_size}) or tile_size, or the "
                            "CPU (model.to('cpu'))")
    was_training = getattr(model, "training", False)
    model.eval()
    result = None
    try:
        with no_grad():
            for k in range(0, len(plan.origins), max(1, int(batch_size))):
                chunk = plan.origins[k:k + batch_size]
                batch = np.stack([padded[:, y:y + th, x:x + tw] for y, x in chunk])
                with explain_gpu_out_of_memory("tile prediction", batch, advice=advice):
                    out = model(Tensor(backend.to_device(batch, device)))
                    logits = backend.to_numpy(out.data).astype(np.float32, copy=False)
                if logits.shape[2:] != plan.out_tile:
                    raise ValueError(f"the model returned tiles of {logits.shape[2:]} for input "
                                     f"tiles of {plan.tile}, expected {plan.out_tile}.")
                if result is None:
                    K = logits.shape[1]
                    if num_classes is not None and K != num_classes:
                        raise ValueError(f"the model predicts {K} classes but num_classes={num_classes}.")
                    result = np.empty((K, plan.counts[0] * sh, plan.counts[1] * sw), np.float32)
                for (y, x), tile_logits in zip(chunk, logits):
                    result[:, y:y + sh, x:x + sw] = tile_logits[:, ch:ch + sh, cw:cw + sw]
    finally:
        model.train(was_training)
    result = result[:, :H, :W]
    return np.ascontiguousarray(_softmax(result, 0) if output == "probs" else result)

"""Classical segmentation next to a small U-Net, on the synthetic ultrasound frames.

The talk's "Related Work" in action: hand-made filters (Sobel, Laplacian with and without
diagonals, LoG, DoG), blob detection with the scale-normalised LoG, and region growing from a
seed point, all built on fixed conv2d kernels (seg/classical.py). They are scored with the
Kaggle Dice (seg.metrics) on test frames that contain a nerve, next to a U-Net trained for a
minute, and the result is printed as a table and drawn as a picture:

    image + true outline | edges (Sobel, LoG zero crossings) | region growing | U-Net

    python examples/classical_segmentation.py                # about 2 minutes on a laptop CPU
    python examples/classical_segmentation.py --quick        # smoke test, seconds

The U-Net is loaded from runs/unet/best.npz when that checkpoint exists (written by
`python -m seg train`), else from this example's own earlier run, else trained here briefly
with seg.train. What to look for: the filters find edges everywhere (speckle, fascia lines),
the LoG finds blobs but not *which* blob is the nerve ("without semantic"), and region
growing needs someone to click on the nerve, then leaks through its rim or stops at the
fascicles. The learned filters of the U-Net do the same job from examples.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import minidl  # noqa: E402
from minidl import optim  # noqa: E402
from seg import classical as C  # noqa: E402
from seg import metrics, models, plots  # noqa: E402
from seg.data import DataLoader, Dataset, synthetic_image  # noqa: E402
from seg.losses import CEDiceLoss  # noqa: E402
from seg.checkpoints import load_checkpoint, read_checkpoint_meta  # noqa: E402
from seg.inference import predict_image  # noqa: E402
from seg.train import train  # noqa: E402

UNET_OPTIONS = {"depth": 3, "features_root": 8, "padding": "same", "batch_norm": True}


# ----------------------------------------------------------------------------- data
def frame(subject, n, size, test=False, nerve=None):
    """One synthetic frame as (image float32 (H, W) in [0, 1], mask int64 (H, W) 0/1)."""
    image, mask = synthetic_image(seed=0, subject=subject, n=n, size=size, nerve=nerve, test=test)
    return image.astype(np.float32) / 255.0, (mask > 0).astype(np.int64)


def smooth(image, sigma):
    g = C.gaussian_kernel1d(sigma)
    return C.separable_filter2d(image, g, g)


def nerve_centre(mask):
    """The 'click': the pixel at the centre of mass of the true nerve."""
    ys, xs = np.nonzero(mask)
    return int(round(ys.mean())), int(round(xs.mean()))


# ----------------------------------------------------------------------------- classical methods
def grow_region(image, seed, sigma, k):
    """Region growing on the smoothed image; tolerance k standard deviations of its intensity."""
    s = smooth(image, sigma)
    return C.region_grow(s, seed, tolerance=k * s.std(), reference="mean")


def strongest_blob(image, sigmas):
    """The strongest bright LoG blob (y, x, sigma, response), away from the border."""
    blobs = C.blob_log(image, sigmas=sigmas, threshold=0.0, bright=True,
                       exclude_border=int(sigmas[0]), max_blobs=1)
    return blobs[0] if len(blobs) else None


def tune_region_growing(frames):
    """Pick smoothing and tolerance on training frames (the only 'learning' classical gets)."""
    best = None
    for sigma in (1.0, 2.0):
        for k in (0.5, 0.8, 1.0):
            dice = np.mean([metrics.dice_score(grow_region(x, nerve_centre(y), sigma, k), y) for x, y in frames])
            if best is None or dice > best[0]:
                best = (dice, sigma, k)
    return best


# ----------------------------------------------------------------------------- U-Net
def unet_config(size):
    return {"model": "unet", "num_classes": 2, "in_channels": 1, "model_options": UNET_OPTIONS,
            "size": list(size)}


def load_unet(paths):
    """A U-Net from the first readable seg.train checkpoint among `paths`, or (None, None)."""
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            config = read_checkpoint_meta(path).get("config") or {}
            model = models.build(config["model"], num_classes=config["num_classes"],
                                 in_channels=config.get("in_channels", 1), **config.get("model_options", {}))
            load_checkpoint(path, model)
            return model.eval(), config, path
        except (KeyError, ValueError, TypeError) as exc:
            print(f"  cannot use {path} ({type(exc).__name__}: {exc}); trying the next option")
    return None, None, None


def train_unet(size, n_subjects, epochs, out_dir, seed=0):
    """Train the small U-Net briefly on synthetic training frames with seg.train."""
    minidl.manual_seed(seed)
    model = models.build("unet", num_classes=2, in_channels=1, **UNET_OPTIONS)
    samples = [(s, n) for s in range(1, n_subjects + 1) for n in range(1, 11)]
    val = [(s, n) for s in range(n_subjects + 1, n_subjects + 3) for n in range(1, 5)]
    load = lambda sn: frame(sn[0], sn[1], size)     # noqa: E731
    train_loader = DataLoader(Dataset(samples, load, cache=True), batch_size=8, shuffle=True, seed=seed)
    val_loader = DataLoader(Dataset(val, load, cache=True), batch_size=8)
    result = train(model, train_loader, val_loader, CEDiceLoss(), optim.Adam(model.parameters(), lr=3e-3),
                   epochs=epochs, out_dir=out_dir, config=unet_config(size), progress=False,
                   plot_every=max(1, epochs))
    load_checkpoint(os.path.join(out_dir, "best.npz"), model)    # the best epoch, not the last
    print(f"  best validation Dice {result.best_score:.3f} after epoch {result.best_epoch}")
    return model.eval()


def describe(config):
    """'unet depth 3, 8 features' from a checkpoint's config."""
    options = config.get("model_options", {})
    name = config.get("model", "model")
    if "depth" in options:
        name += f" depth {options['depth']}, {options.get('features_root', '?')} features"
    return name


def unet_predict(model, config, image):
    """Label map (H, W) for one image, resized to the size the model was trained at and back."""
    return predict_image(model, image, config.get("size")).argmax(axis=0)


# ----------------------------------------------------------------------------- figures
def save_figure(fig, path):
    print(f"  wrote {plots.save_figure(fig, path, bbox_inches='tight')}")


def filter_gallery(image, path):
    """The hand-made filters of the talk on one frame."""
    panels = [("image", image),
              ("talk's vertical edge", C.filter2d(image, C.VERTICAL_EDGE)),
              ("Sobel magnitude", C.sobel(image)),
              ("Laplacian (4)", C.laplacian(smooth(image, 1.0))),
              ("Laplacian (8, diagonals)", C.laplacian(smooth(image, 1.0), diagonals=True)),
              ("LoG sigma=2", C.log_filter(image, 2.0)),
              ("DoG sigma=2, k=1.6", C.dog_filter(image, 2.0)),
              ("LoG zero crossings", C.zero_crossings(C.log_filter(image, 2.0), threshold=0.02))]
    fig, axes = plt.subplots(2, 4, figsize=(13, 5))
    for ax, (title, a) in zip(axes.flat, panels):
        ax.imshow(a, cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    save_figure(fig, path)


def comparison(rows, path):
    """One row per frame: image + truth, edges, region growing, U-Net."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        x, y = row["image"], row["mask"]
        edges = np.zeros(x.shape + (3,))
        edges[..., 0] = np.clip(C.sobel(smooth(x, 1.0)) / 1.5, 0, 1)           # Sobel: red
        edges[..., 1] = C.zero_crossings(C.log_filter(x, 2.0), threshold=0.02)   # LoG zero x: green
        panels = [("image, true nerve", x, None),
                  ("edges: Sobel (red), LoG zero crossings (green)", edges, None),
                  (f"region growing from a click, Dice {row['rg_dice']:.2f}", x, row["rg"]),
                  (f"U-Net, Dice {row['unet_dice']:.2f}", x, row["unet"])]
        for c, (title, a, pred) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(a, cmap="gray" if a.ndim == 2 else None)
            ax.contour(y, [0.5], colors="yellow", linewidths=0.8)
            if pred is not None and pred.any():
                ax.contour(pred, [0.5], colors="red", linewidths=1.0)
            if c == 0 and row.get("blob") is not None:
                by, bx, bs = row["blob"][:3]
                ax.add_patch(plt.Circle((bx, by), bs * np.sqrt(2), fill=False, color="cyan", lw=1))
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("yellow: true nerve; red: prediction; cyan: strongest LoG blob", fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/classical", help="folder for the pictures and the U-Net")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 88), metavar=("H", "W"),
                        help="frame size in pixels (default 64 88)")
    parser.add_argument("--test-frames", type=int, default=12, help="test frames with a nerve")
    parser.add_argument("--epochs", type=int, default=8, help="U-Net epochs when it must be trained")
    parser.add_argument("--checkpoint", default="runs/unet/best.npz",
                        help="U-Net checkpoint to use if present (default %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="train the U-Net even if a checkpoint exists")
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    args = parser.parse_args(argv)
    size = tuple(args.size)
    n_test = 3 if args.quick else args.test_frames
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    test = [frame(s, 1, size, test=True, nerve=True) for s in range(1, n_test + 1)]
    tune = [frame(s, 1, size, nerve=True) for s in range(1, 7)]

    print("1. hand-made filters")
    # The gallery uses the first test frame drawn three times larger, so the filters show detail.
    filter_gallery(frame(1, 1, (3 * size[0], 3 * size[1]), test=True, nerve=True)[0], out / "filters.png")

    print("\n2. classical segmentation")
    _, sigma, k = tune_region_growing(tune)
    print(f"  region growing tuned on 6 training frames: smoothing sigma {sigma}, tolerance {k} std")
    # Nerve semi-axes are about 13% and 9% of the frame height: LoG scales around r / sqrt(2).
    h = size[0]
    sigmas = np.round(np.linspace(0.04 * h, 0.12 * h, 7), 2)
    rows = []
    for x, y in test:
        blob = strongest_blob(x, sigmas)
        blob_mask = C.blobs_to_mask(blob[None], x.shape) if blob is not None else np.zeros_like(y)
        click = nerve_centre(y)
        rg = grow_region(x, click, sigma, k)
        rg_blob = grow_region(x, (int(blob[0]), int(blob[1])), sigma, k) if blob is not None else np.zeros_like(y)
        rows.append({"image": x, "mask": y, "blob": blob, "rg": rg,
                     "blob_dice": metrics.dice_score(blob_mask.astype(np.int64), y),
                     "rg_dice": metrics.dice_score(rg.astype(np.int64), y),
                     "rg_blob_dice": metrics.dice_score(rg_blob.astype(np.int64), y)})

    print("\n3. U-Net")
    own = str(out / "unet" / "best.npz")
    candidates = [] if args.retrain else [args.checkpoint, own]
    model, config, path = load_unet(candidates)
    if model is not None:
        print(f"  loaded {path} (trained at {config.get('size')})")
        source = path
    else:
        epochs = 1 if args.quick else args.epochs
        n_subjects = 2 if args.quick else 8
        print(f"  no checkpoint: training {UNET_OPTIONS} for {epochs} epochs on {10 * n_subjects} frames")
        t = time.perf_counter()
        model = train_unet(size, n_subjects, epochs, str(out / "unet"))
        config = unet_config(size)
        print(f"  trained in {time.perf_counter() - t:.0f} s")
        source = f"trained here, {epochs} epochs"
    for row in rows:
        row["unet"] = unet_predict(model, config, row["image"])
        row["unet_dice"] = metrics.dice_score(row["unet"], row["mask"])

    table = [("LoG blob detection (strongest bright blob as a disc)", "blob_dice"),
             ("region growing, seed = strongest LoG blob", "rg_blob_dice"),
             ("region growing, seed = a click on the nerve", "rg_dice"),
             (f"{describe(config)} ({source})", "unet_dice")]
    print(f"\nDice on {len(rows)} test frames with a nerve ({size[0]}x{size[1]} pixels):")
    width = max(len(name) for name, _ in table)
    print(f"  {'method':<{width}} {'mean':>6} {'min':>6} {'max':>6}")
    for name, key in table:
        d = np.array([row[key] for row in rows])
        print(f"  {name:<{width}} {d.mean():6.3f} {d.min():6.3f} {d.max():6.3f}")
    comparison(rows[:4], out / "classical_vs_unet.png")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return {name: float(np.mean([row[key] for row in rows])) for name, key in table}


if __name__ == "__main__":
    main()

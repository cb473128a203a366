"""Sharpen a U-Net's masks with a fully connected CRF (Kraehenbuehl & Koltun 2011), as DeepLab does.

    python examples/crf_refine.py                       # about 10 s with runs/unet/best.npz
    python examples/crf_refine.py --images 10 --preset default   # compare with a preset

1. A U-Net: the checkpoint that examples/train_unet.py writes (runs/unet/best.npz). Without
   it, the same helpers train the default small U-Net (8 epochs, about a minute on 2 CPU
   cores) into runs/crf/unet, which later runs reuse.
2. A handful of validation frames of the synthetic ultrasound data, predicted at their full
   580x420 size (seg.inference.predict_image: resize to the training size, predict, resize back).
3. seg.crf.dense_crf refines the softmax probabilities with the image: every pixel is linked
   to every other one, and pixels that are close (Gaussian kernel, sxy pixels) or close *and*
   of similar brightness (bilateral kernel, sxy pixels and srgb grey levels) are pushed
   towards the same label. It removes small false detections and snaps borders to edges.
4. A table of Dice before/after per image (Kaggle rule: an empty prediction on an empty mask
   scores 1) and runs/crf/crf_before_after.png (image / ground truth / U-Net / U-Net + CRF).

Choosing the parameters (seg.inference.CRF_PARAMS, also used by `python -m seg predict/evaluate
--crf`): the image is converted from [0, 1] floats to 0-255, the scale the published thetas
were tuned on. A grid search with the runs/unet/best.npz U-Net on the first two validation
patients (40 frames; sxy 20/49/80, srgb 3/5/13, bilateral weight 3/5/10, Gaussian (3, 3),
5 iterations) gave mean Dice 0.910 -> 0.988 for sxy 49 / srgb 3-13 / weight 3; srgb hardly
matters on speckle, while weight 10 with sxy 80 (the "default" preset, made for colour
photos) gives 0.88. The frames shown come from the third validation patient, unseen by the
search. Most of the gain is on empty frames: the CRF wipes out the U-Net's small false
detections, each of which scores 0 there. On nerve frames it snaps borders to edges, but it
also erodes a nerve the network under-segments, and with strong noise next to srgb it erodes
objects (noise of 50 grey levels and a blurred prediction: Dice 0.96 -> 0.72 in a test):
check it on held-out images of your own data.
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minidl  # noqa: E402,F401  (first: it sets the BLAS/Numba thread policy before NumPy loads)
import numpy as np  # noqa: E402
from seg import cli, inference, setup  # noqa: E402
from seg.data import KaggleUltrasound  # noqa: E402
from seg.crf import PRESETS, dense_crf  # noqa: E402
from seg.metrics import dice_score  # noqa: E402
from seg.train import train  # noqa: E402


def refine_and_score(probs, image, mask, **crf):
    """Dice of the network's labels and of the CRF-refined labels for one image.

    probs: (2, H, W) softmax probabilities; image: (H, W) float in [0, 1]; mask: (H, W) in {0, 1}.
    crf: dense_crf keywords (gaussian, bilateral, iterations, preset); default seg.inference.CRF_PARAMS.
    returns (dice_before, dice_after, refined probabilities (2, H, W)).
    """
    image255 = np.clip(image * 255.0, 0, 255).astype(np.uint8)   # thetas are for 0-255 images
    refined = dense_crf(probs, image255, labels_axis=0, **(crf or inference.CRF_PARAMS))
    return dice_score(probs.argmax(0), mask), dice_score(refined.argmax(0), mask), refined


def train_briefly(out_dir, epochs):
    """The steps of examples/train_unet.py with its defaults, for `epochs` epochs."""
    args = cli.parse_train_args(["--epochs", str(epochs), "--out", str(out_dir), "--plot-every",
                                 str(epochs)], prog="crf_refine.py")
    run = setup.set_up_training(args, synthetic_root=ROOT / "data" / "synthetic")
    train(run.model, run.data.train_loader, run.data.val_loader, run.loss_fn, run.optimizer,
          run.scheduler, config=run.config, **setup.trainer_options(args))
    return Path(out_dir) / "best.npz"


def plot(rows, path):
    """One row per image: image, ground truth, U-Net, U-Net + CRF (red, truth outline green)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 4, figsize=(13, 2.4 * len(rows)), squeeze=False)
    for ax_row, (name, image, mask, before, after, d0, d1) in zip(axes, rows):
        panels = [(image, None, name), (mask, None, "ground truth"),
                  (image, before, f"U-Net, Dice {d0:.3f}"), (image, after, f"+ CRF, Dice {d1:.3f}")]
        for ax, (picture, labels, title) in zip(ax_row, panels):
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
            if labels is not None:
                red = np.zeros(labels.shape + (4,))
                red[labels != 0] = (1.0, 0.1, 0.1, 0.45)
                ax.imshow(red)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=["lime"], linewidths=0.8)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/unet/best.npz")
    parser.add_argument("--images", type=int, default=8, help="validation frames to show")
    parser.add_argument("--epochs", type=int, default=setup.TRAIN_DEFAULTS["epochs"],
                        help="training epochs when there is no checkpoint; default %(default)s")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="use a dense_crf preset instead of seg.inference.CRF_PARAMS")
    parser.add_argument("--out", default="runs/crf")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    # 1. the U-Net
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        checkpoint = Path(args.out) / "unet" / "best.npz"
        if not checkpoint.exists():
            print(f"{args.checkpoint} not found: training the default U-Net for {args.epochs} epochs")
            checkpoint = train_briefly(checkpoint.parent, args.epochs)
    model, config = inference.load_for_inference(checkpoint)
    print(f"U-Net from {checkpoint}")

    # 2. frames of the validation patient the CRF parameters were not chosen on
    reader = KaggleUltrasound(setup.ensure_synthetic(ROOT / "data" / "synthetic"))
    val = reader.split(config.get("val_fraction", 0.25), seed=0)[1]
    val = [s for s in val if s.subject == val[-1].subject]
    picked = [val[i] for i in np.linspace(0, len(val) - 1, min(args.images, len(val))).astype(int)]

    # 3. predict, refine, score
    crf = {"preset": args.preset} if args.preset else inference.CRF_PARAMS
    print(f"dense CRF: {crf}\n")
    print(f"{'':>10} {'pixels of nerve:':>27}  {'Dice:':>8}")
    print(f"{'image':>10} {'truth':>7} {'U-Net':>9} {'+ CRF':>9} {'U-Net':>8} {'+ CRF':>7}")
    rows, crf_seconds = [], 0.0
    for sample in picked:
        image, mask = reader.load(sample)
        probs = inference.predict_image(model, image, config["size"])
        t = time.perf_counter()
        before, after, refined = refine_and_score(probs, image, mask, **crf)
        crf_seconds += time.perf_counter() - t
        name = Path(sample.image_path).stem
        pixels = [int(np.count_nonzero(m)) for m in (mask, probs.argmax(0), refined.argmax(0))]
        print(f"{name:>10} {pixels[0]:>7} {pixels[1]:>9} {pixels[2]:>9} {before:>8.4f} {after:>7.4f}")
        rows.append((name, image, mask, probs.argmax(0), refined.argmax(0), before, after))
    mean_before, mean_after = (np.mean([r[k] for r in rows]) for k in (5, 6))
    print(f"{'mean':>10} {'':>27} {mean_before:>8.4f} {mean_after:>7.4f}")

    # 4. the picture
    path = plot(rows, os.path.join(args.out, "crf_before_after.png"))
    print(f"\nCRF {crf_seconds / len(rows):.2f} s per 580x420 frame; total "
          f"{time.perf_counter() - start:.0f} s; picture in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

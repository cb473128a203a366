"""Train a U-Net to find the nerve in ultrasound images (the talk's Kaggle task), on the CPU.

    python examples/train_unet.py                          # a few minutes on 2 CPU cores
    python examples/train_unet.py --epochs 30 --size 96x128 --features-root 16
    python examples/train_unet.py --data ~/kaggle/ultrasound-nerve-segmentation --device gpu
    python examples/train_unet.py --preset seed-unet       # the talk's settings table (long!)
    python examples/train_unet.py --resume runs/unet/last.npz --epochs 30   # train on
    python examples/train_unet.py --amp bf16               # mixed precision (docs/AMP.md)

What happens, step by step (steps 1-3: `seg.setup.set_up_training`, step 4: `seg.train.train`):

1. Data. Without --data, a synthetic stand-in for the Kaggle Ultrasound Nerve Segmentation
   set is generated once into data/synthetic (580x420 grayscale TIFFs with 0/255 masks, about
   half of them empty, 12 "patients" of 20 frames) and read back with the same reader as the
   real data. A quarter of the *patients* is held out for validation, because frames of one
   patient are near-duplicates. Images are resized once to --size (default 64x88) and cached;
   training images are augmented (flips, small rotations, the paper's elastic deformation,
   intensity jitter).
2. Model. The U-Net of Ronneberger et al. 2015 (seg/models/unet.py), small for the CPU:
   depth 4 (three 2x2 max-pools), 8 channels in the first level, BatchNorm, "same" padding so
   that the output has the input's size. `--padding valid` gives the paper's unpadded convs;
   the inputs are then mirror-padded by the missing context (the overlap-tile idea).
3. Loss and optimizer. Cross-entropy + soft Dice (Dice cares about the small nerve, not the
   large background); Adam, learning rate 2e-3 decaying with DeepLab's "poly" schedule, batch 4.
4. Training (seg/train.py). Each epoch: a progress bar with loss and images/s, then the
   validation Dice with the Kaggle rule (an empty prediction on an empty mask scores 1),
   mean IoU and pixel accuracy. Everything goes to --out (default runs/unet):
   metrics.csv, curves.png, samples_epochNNN.png and samples_last.png (X / Y / Pred panels
   like the talk's), last.npz and best.npz. Ctrl-C saves interrupted.npz and stops cleanly;
   --resume continues a run exactly.
5. Result. The final validation Dice is printed (the default run reaches >= 0.85 on the
   synthetic data). Then try:

       python -m seg predict --checkpoint runs/unet/best.npz --input data/synthetic/test --output masks
       python -m seg evaluate --checkpoint runs/unet/best.npz --data data/synthetic --split val

--preset seed-unet uses the talk's U-Net table: depth 3, 8 root features, keep-prob 0.6
(dropout 0.4 after every conv, as tf_unet does), learning rate 1e-4, batch 16, 400 epochs, the
original 420x580 images and unpadded convs. The talk reports it did not converge in its time
budget; options given explicitly still override the preset.

--distributed trains data-parallel on every rank of an MPI job (`mpiexec -n 4 python
examples/train_unet.py --distributed`; --batch-size is per rank; docs/DISTRIBUTED.md).

--crf additionally scores the validation images after dense-CRF post-processing (seg.crf).
--device gpu needs CuPy (`pip install -e ".[gpu]"`).
"""
import sys
import time
from pathlib import Path

# Run from anywhere: make the repository importable and keep the data next to it.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minidl  # noqa: E402,F401  (first: it sets the Numba thread policy, see minidl/__init__.py)
from seg import cli, distributed_training, setup  # noqa: E402
from seg.inference import crf_report  # noqa: E402
from seg.train import train  # noqa: E402

# The defaults (seg.setup.TRAIN_DEFAULTS, shared with `python -m seg train`) were tuned to finish
# in under 5 minutes on a 2-core CPU with a validation Dice of at least 0.85 on the synthetic
# data: 64x88 images, U-Net depth 4 with 8 root features and BatchNorm, batch 4, Adam 2e-3
# with poly decay, cross-entropy + Dice, 8 epochs.
DEFAULTS = {"out": "runs/unet"}


def main(argv=None):
    args = cli.parse_train_args(argv, prog="train_unet.py", defaults=DEFAULTS,
                                description="Train a U-Net on (synthetic) ultrasound nerve images.")
    # Errors (bad data, a checkpoint of another model, ...) end in one sentence, as in `python -m seg`.
    return cli.run_main(run, args, "train_unet.py")


def run(args):
    start = time.perf_counter()
    # 1. data: generated once, read back with the Kaggle reader, split by patient;
    # 2. model; 3. loss, optimizer and learning-rate schedule (seg/setup.py), after seeding
    #    the random streams (weights, dropout, augmentation)
    run = setup.set_up_training(args, synthetic_root=ROOT / "data" / "synthetic")
    data, model = run.data, run.model
    print(f"U-Net depth {args.depth}, {args.features_root} root features, {args.padding} padding: "
          f"{model.num_parameters():,} parameters")
    print(f"{data.n_train} training / {data.n_val} validation images ({data.kind} data in "
          f"{data.root}), resized to {args.size[0]}x{args.size[1]}")

    # 4. train (checkpoints, metrics.csv and plots go to args.out)
    # (a NaN loss, a sample that fails to load, a full disk: one line and exit code 1 from
    # cli.run_main, as for python -m seg train)
    result = train(model, data.train_loader, data.val_loader, run.loss_fn, run.optimizer,
                   run.scheduler, config=run.config, **setup.trainer_options(args))

    # 5. result
    minutes = (time.perf_counter() - start) / 60
    if result.history:
        print(f"\nfinal validation Dice {result.last['val_dice']:.4f} (best {result.best_score:.4f} "
              f"at epoch {result.best_epoch}), {minutes:.1f} minutes; outputs in {args.out}")
    if args.crf and not result.interrupted:
        crf_report(args, data)
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    # --distributed: an error code on one rank ends every rank of the mpiexec job
    sys.exit(distributed_training.finish(main()))

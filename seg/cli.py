"""The command line: ``python -m seg train|predict|evaluate|models``.

    python -m seg train --model unet --epochs 20 --out runs/unet        # synthetic data by default
    python -m seg train --data ~/kaggle/ultrasound --size 96x128 --depth 4 --device gpu
    python -m seg train --preset seed-unet                               # the talk's settings
    python -m seg predict --checkpoint runs/unet/best.npz --input data/synthetic/test --output out/
    python -m seg evaluate --checkpoint runs/unet/best.npz --data data/synthetic
    python -m seg models

The helpers below (parse_train_args, prepare_data, build_model_from_args, make_optimizer,
make_scheduler, load_for_inference, predict_image, evaluate_samples) are shared with examples/train_unet.py.
Bad arguments end the program with one sentence on stderr and exit code 2.
"""
import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["main", "parse_train_args", "build_train_parser", "prepare_data", "build_model_from_args",
           "make_optimizer", "make_scheduler", "run_config", "load_for_inference", "predict_image",
           "evaluate_samples", "crf_refine", "CRF_PARAMS",
           "PRESETS", "UsageError"]

#: Where the synthetic stand-in for the Kaggle data is generated (once) when --data is not given.
DEFAULT_SYNTHETIC = "data/synthetic"

#: --preset values. "seed-unet" is the talk's U-Net settings table (tf_unet: layers 3,
#: features_root 8, keep_prob 0.6, learning rate 1e-4, batch 16, 400 epochs, original image
#: size, valid convolutions, dropout after every conv, plain softmax cross-entropy).
PRESETS = {
    "seed-unet": {"depth": 3, "features_root": 8, "dropout": 0.4, "dropout_mode": "every_conv",
                  "lr": 1e-4, "lr_schedule": "none", "batch_size": 16, "epochs": 400,
                  "size": "420x580", "padding": "valid", "batch_norm": False, "loss": "ce",
                  "optimizer": "adam"},
}

#: Defaults of `train`, shared with examples/train_unet.py. Measured to reach a validation
#: Dice above 0.85 on the synthetic data within a few minutes on a 2-core CPU: 64x88 images
#: (the Kaggle frames' aspect ratio; the well-known Kaggle U-Net starter used 64x80), a
#: depth-4 U-Net with 8 root features and BatchNorm, batch 4, Adam 2e-3 with poly decay.
TRAIN_DEFAULTS = {"model": "unet", "data": None, "device": "cpu", "epochs": 8, "batch_size": 4,
                  "lr": 2e-3, "lr_schedule": "poly", "size": "64x88", "depth": 4, "features_root": 8,
                  "padding": "same", "batch_norm": True, "dropout": 0.0, "dropout_mode": "bottleneck",
                  "loss": "ce_dice", "optimizer": "adam", "out": "runs/unet", "resume": None, "seed": 0,
                  "val_fraction": 0.25, "num_classes": None, "augment": True, "crf": False,
                  "plot_every": 4, "progress": True, "preset": None}


class UsageError(Exception):
    """A bad command-line argument: printed as one sentence, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-sentence errors (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')}; see {self.prog} --help.\n")


# ----------------------------------------------------------------------------- train arguments

def _size(text):
    """'96x128' -> (96, 128); '128' -> (128, 128)."""
    try:
        parts = [int(p) for p in str(text).lower().replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 96x128") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        raise argparse.ArgumentTypeError(
            f"size {text!r} must be HEIGHTxWIDTH with both at least 8, e.g. 96x128")
    return tuple(parts)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def add_train_arguments(parser, defaults=None):
    """Add the training options (shared by `python -m seg train` and examples/train_unet.py)."""
    from .losses import LOSSES

    d = dict(TRAIN_DEFAULTS, **(defaults or {}))
    p = parser
    p.add_argument("--model", default=d["model"],
                   help="architecture name (python -m seg models); default %(default)s")
    p.add_argument("--data", default=d["data"], metavar="DIR",
                   help="Kaggle layout (DIR/train/<s>_<n>.tif + _mask.tif) or DIR/images + DIR/masks; "
                        f"default: synthetic data generated once into {DEFAULT_SYNTHETIC}")
    p.add_argument("--device", choices=("cpu", "gpu"), default=d["device"], help="default %(default)s")
    p.add_argument("--epochs", type=_positive_int, default=d["epochs"], help="default %(default)s")
    p.add_argument("--batch-size", type=_positive_int, default=d["batch_size"], help="default %(default)s")
    p.add_argument("--lr", type=_positive_float, default=d["lr"], help="learning rate; default %(default)s")
    p.add_argument("--lr-schedule", choices=("poly", "none"), default=d["lr_schedule"],
                   help="poly: lr * (1 - epoch/epochs)**0.9 (DeepLab's), none: constant; default %(default)s")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default=d["optimizer"],
                   help="adam, or sgd with momentum 0.99 (the paper); default %(default)s")
    p.add_argument("--size", type=_size, default=_size(d["size"]), metavar="HxW",
                   help="images are resized to this size for training; default %s" % d["size"])
    p.add_argument("--depth", type=_positive_int, default=d["depth"],
                   help="U-Net levels; default %(default)s")
    p.add_argument("--features-root", type=_positive_int, default=d["features_root"],
                   help="U-Net channels of the first level; default %(default)s")
    p.add_argument("--padding", choices=("valid", "same"), default=d["padding"], help="default %(default)s")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=d["batch_norm"],
                   help="BatchNorm after every 3x3 conv")
    p.add_argument("--dropout", type=float, default=d["dropout"],
                   help="drop probability; default %(default)s")
    p.add_argument("--dropout-mode", choices=("bottleneck", "every_conv"), default=d["dropout_mode"],
                   help="paper: bottleneck; tf_unet: every_conv")
    p.add_argument("--loss", choices=tuple(LOSSES), default=d["loss"], help="default %(default)s")
    p.add_argument("--out", default=d["out"], metavar="DIR", help="output folder; default %(default)s")
    p.add_argument("--resume", default=d["resume"], metavar="CHECKPOINT",
                   help="continue from a checkpoint (e.g. OUT/last.npz)")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed; default %(default)s")
    p.add_argument("--val-fraction", type=_fraction, default=d["val_fraction"],
                   help="share of subjects held out for validation; default %(default)s")
    p.add_argument("--num-classes", type=_positive_int, default=d["num_classes"],
                   help="classes for an images/masks folder (Kaggle data: 2)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d["augment"],
                   help="flips, small rotations, elastic deformation, intensity jitter")
    p.add_argument("--crf", action="store_true", default=d["crf"],
                   help="after training, also score the validation set with dense-CRF post-processing")
    p.add_argument("--plot-every", type=_positive_int, default=d["plot_every"],
                   help="draw the X / Y / Pred panel every N epochs; default %(default)s")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="seed-unet: the talk's U-Net settings (explicit options still win)")
    return parser


def build_train_parser(prog="python -m seg train", description=None, defaults=None):
    parser = _Parser(prog=prog, description=description)
    return add_train_arguments(parser, defaults)


def _apply_preset(parser, argv):
    """Parse twice: the preset sets new defaults, so options given explicitly still win."""
    args = parser.parse_args(argv)
    if args.preset:
        preset = dict(PRESETS[args.preset])
        if "size" in preset:
            preset["size"] = _size(preset["size"])
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
    return args


def check_train_args(args):
    """Checks that need more than one option, or the outside world; UsageError on failure."""
    from minidl import backend

    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be a probability in [0, 1), got {args.dropout}.")
    if args.resume is not None and not os.path.exists(args.resume):
        raise UsageError(f"--resume checkpoint {args.resume} does not exist.")
    if args.data is not None and not os.path.isdir(args.data):
        raise UsageError(f"--data folder {args.data} does not exist.")
    if args.device == "gpu":
        try:
            backend.require_cupy()
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
    return args


def parse_train_args(argv=None, prog="python -m seg train", description=None, defaults=None):
    """Parse and check the training options (with --preset applied). Exits 2 on bad input."""
    parser = build_train_parser(prog, description, defaults)
    args = _apply_preset(parser, argv)
    try:
        return check_train_args(args)
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


# ----------------------------------------------------------------------------- data

@dataclass
class Data:
    """What prepare_data returns."""
    train_loader: object
    val_loader: object
    root: str
    num_classes: int
    kind: str                 # "kaggle" or "folder"
    n_train: int
    n_val: int


def _open_dataset(root, num_classes=None):
    """A Kaggle-layout or images/masks data set -> (reader, kind, num_classes)."""
    from . import data as sdata

    root = Path(root)
    if (root / "images").is_dir():
        classes = num_classes or 2
        return sdata.ImageMaskFolder(root, num_classes=classes, binary=classes == 2), "folder", classes
    return sdata.KaggleUltrasound(root), "kaggle", 2


def ensure_synthetic(root=DEFAULT_SYNTHETIC, log=print):
    """Generate the synthetic Kaggle-layout data set into `root` once (later calls reuse it)."""
    from .data import write_synthetic_dataset

    root = Path(root)
    if not (root / "synthetic.json").exists():
        log(f"Generating the synthetic ultrasound data set in {root} (once) ...")
    return write_synthetic_dataset(root)


def prepare_data(args, log=print, synthetic_root=DEFAULT_SYNTHETIC):
    """Loaders for training (augmented, shuffled) and validation, split by subject.

    Images are read with the real readers (the synthetic data goes through the Kaggle reader),
    resized once to args.size and cached in memory.
    """
    from . import data as sdata

    root = args.data if args.data is not None else ensure_synthetic(synthetic_root, log)
    reader, kind, num_classes = _open_dataset(root, args.num_classes)
    train_samples, val_samples = reader.split(args.val_fraction, seed=0)
    if not val_samples:
        raise UsageError(f"the data in {root} has too few subjects for a validation split; "
                         "add data or raise --val-fraction.")
    h, w = args.size
    # Elastic deformation as in the paper, scaled from their 572-px tiles to our image size.
    augment = sdata.Augment(hflip=0.5, rotate=10.0, shift=0.05, elastic_sigma=10.0 * w / 572) \
        if args.augment else None
    resize = sdata.Resize((h, w))
    train_set = sdata.Dataset(train_samples, reader.load, transform=augment, cache=True, preprocess=resize)
    val_set = sdata.Dataset(val_samples, reader.load, cache=True, preprocess=resize)
    train_loader = sdata.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, seed=args.seed)
    val_loader = sdata.DataLoader(val_set, batch_size=args.batch_size, shuffle=False)
    return Data(train_loader, val_loader, str(root), num_classes, kind, len(train_set), len(val_set))


# ----------------------------------------------------------------------------- model + optimizer

def model_options(args):
    """Builder options from the arguments (U-Net options only for the U-Net)."""
    if args.model != "unet":
        return {}
    return {"depth": args.depth, "features_root": args.features_root, "padding": args.padding,
            "batch_norm": args.batch_norm, "dropout": args.dropout, "dropout_mode": args.dropout_mode}


def build_model_from_args(args, num_classes, in_channels=1):
    from . import models

    try:
        return models.build(args.model, num_classes=num_classes, in_channels=in_channels,
                            **model_options(args))
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def make_optimizer(args, model):
    from minidl import optim

    if args.optimizer == "sgd":
        return optim.SGD(model.parameters(), lr=args.lr, momentum=0.99)   # the paper's momentum
    return optim.Adam(model.parameters(), lr=args.lr)


def make_scheduler(args, optimizer):
    """The learning-rate schedule, stepped once per epoch (None for a constant rate)."""
    from minidl.optim.lr_scheduler import PolyLR

    class RunPolyLR(PolyLR):
        """PolyLR whose length follows --epochs also after --resume: resuming with the same
        --epochs continues exactly, a larger --epochs stretches the remaining decay."""

        def load_state_dict(self, state_dict):
            total = self.total_iters
            super().load_state_dict(state_dict)
            self.total_iters = total
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                group["lr"] = lr

    if args.lr_schedule == "poly":
        return RunPolyLR(optimizer, total_iters=args.epochs, power=0.9)
    return None


def run_config(args, num_classes, in_channels=1):
    """What a checkpoint needs to rebuild the model and preprocess new images."""
    return {"model": args.model, "num_classes": int(num_classes), "in_channels": int(in_channels),
            "model_options": model_options(args), "size": list(args.size), "loss": args.loss,
            "lr": args.lr, "lr_schedule": args.lr_schedule, "epochs": args.epochs,
            "batch_size": args.batch_size, "seed": args.seed,
            "val_fraction": args.val_fraction, "data": None if args.data is None else str(args.data)}


# ----------------------------------------------------------------------------- inference

def load_for_inference(checkpoint, device="cpu"):
    """Rebuild the model stored in a seg.train checkpoint -> (model in eval mode, config)."""
    from . import models
    from .train import load_checkpoint, read_checkpoint_meta

    config = read_checkpoint_meta(checkpoint).get("config") or {}
    if "model" not in config:
        raise UsageError(f"checkpoint {checkpoint} has no model configuration; it was not written by "
                         "`python -m seg train` or examples/train_unet.py.")
    model = models.build(config["model"], num_classes=config["num_classes"],
                         in_channels=config.get("in_channels", 1), **config.get("model_options", {}))
    load_checkpoint(checkpoint, model)
    model.to(device)
    model.eval()
    return model, config


#: Dense-CRF settings of --crf (thetas for 0-255 intensities), chosen by a grid search on the
#: synthetic data's validation patients (see examples/crf_refine.py): the presets' smoothness
#: kernel (sxy 3, weight 3), DeepLab v1's bilateral sxy 49 / srgb 5 with weight 3, 5 iterations.
#: The "default" preset (bilateral sxy 80, weight 10, made for colour photos) lets the
#: background swallow the small nerve in these speckled grayscale frames.
CRF_PARAMS = {"gaussian": (3.0, 3.0), "bilateral": (49.0, 5.0, 3.0), "iterations": 5}


def crf_refine(probs, image):
    """The --crf hook: dense-CRF refinement of probs (K, H, W) using the image (H, W) in [0, 1]."""
    try:
        from .crf import dense_crf
    except ImportError as exc:
        raise UsageError(f"--crf needs seg.crf, which could not be imported ({exc}).") from None
    return dense_crf(probs, np.clip(image * 255.0, 0, 255).astype(np.uint8), labels_axis=0, **CRF_PARAMS)


def predict_image(model, image, size=None, crf=False):
    """Class probabilities (K, H, W) for one image (H, W) float in [0, 1], at its own size.

    The image is resized to the training size, predicted (overlap-tile, so any size works),
    and the probabilities are resized back (bilinear); crf=True refines them with the dense CRF.
    """
    from .data import resize
    from .tiling import predict_tiled

    H, W = image.shape
    small = image if size is None else resize(image, None, tuple(size))[0]
    probs = predict_tiled(model, small, oom_advice="predicting on the CPU (--device cpu)")
    if probs.shape[1:] != (H, W):
        up = resize(np.moveaxis(probs, 0, -1), None, (H, W), antialias=False)[0]
        probs = np.moveaxis(up, -1, 0)
        probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
    if crf:
        probs = crf_refine(probs, image)
    return np.ascontiguousarray(probs, dtype=np.float32)


def evaluate_samples(model, reader, samples, size=None, num_classes=2, crf=False, progress=True):
    """Metrics at the images' own resolution: Kaggle mean Dice, mean IoU, pixel accuracy."""
    from tqdm.auto import tqdm

    from . import metrics

    dice, confusion = [], np.zeros((num_classes, num_classes), dtype=np.int64)
    for sample in tqdm(samples, desc="evaluate", unit="image", disable=not progress, leave=False):
        image, mask = reader.load(sample)
        pred = predict_image(model, image, size, crf=crf).argmax(axis=0)
        dice.append(metrics.dice_score(pred, mask))
        confusion += metrics.confusion_matrix(pred, mask, num_classes)
    iou = metrics.iou_from_confusion(confusion)
    present = ~np.isnan(iou)
    return {"images": len(samples), "dice": float(np.mean(dice)) if dice else float("nan"),
            "iou": float(iou[present].mean()) if present.any() else float("nan"),
            "accuracy": metrics.accuracy_from_confusion(confusion)}


def _write_mask(path, labels, binary, fmt):
    """Write a label map: binary -> 0/255 (the Kaggle convention), else class ids, uint8."""
    array = (labels != 0).astype(np.uint8) * 255 if binary else labels.astype(np.uint8)
    tmp = f"{path}.tmp"
    if fmt == "png":
        from PIL import Image
        Image.fromarray(array).save(tmp, format="PNG")
    else:
        import tifffile
        tifffile.imwrite(tmp, array, metadata=None)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- subcommands

def cmd_train(args, log=print):
    """`python -m seg train`: the same steps as examples/train_unet.py."""
    import minidl
    from .losses import get_loss
    from .train import train

    minidl.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = prepare_data(args, log)
    model = build_model_from_args(args, data.num_classes)
    log(f"{args.model}: {model.num_parameters():,} parameters; {data.n_train} training / "
        f"{data.n_val} validation images of {args.size[0]}x{args.size[1]} from {data.root}")
    optimizer = make_optimizer(args, model)
    result = train(model, data.train_loader, data.val_loader, get_loss(args.loss), optimizer,
                   make_scheduler(args, optimizer), epochs=args.epochs, out_dir=args.out,
                   device=args.device, resume=args.resume,
                   config=run_config(args, data.num_classes), plot_every=args.plot_every,
                   progress=args.progress, log=log)
    if result.history:
        log(f"final validation Dice {result.last['val_dice']:.4f} (best {result.best_score:.4f} at "
            f"epoch {result.best_epoch}); checkpoints and plots in {args.out}")
    if args.crf and not result.interrupted:
        crf_report(args, data, log)
    return 130 if result.interrupted else 0


def crf_report(args, data, log=print):
    """Score the validation images at full resolution without and with the dense CRF."""
    model, config = load_for_inference(os.path.join(args.out, "best.npz"), args.device)
    reader, _, num_classes = _open_dataset(data.root, args.num_classes)
    _, val_samples = reader.split(args.val_fraction, seed=0)
    for crf in (False, True):
        scores = evaluate_samples(model, reader, val_samples, config["size"], num_classes, crf=crf,
                                  progress=args.progress)
        log(f"best model, validation at full resolution{' + dense CRF' if crf else ''}: "
            f"Dice {scores['dice']:.4f}  IoU {scores['iou']:.4f}  accuracy {scores['accuracy']:.4f}")


def cmd_predict(args, log=print):
    from .data import IMAGE_SUFFIXES, load_image

    if not os.path.isdir(args.input):
        raise UsageError(f"--input folder {args.input} does not exist.")
    files = sorted(p for p in Path(args.input).iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
    if not files:
        raise UsageError(f"--input folder {args.input} holds no {'/'.join(IMAGE_SUFFIXES)} images.")
    model, config = _load_model_arg(args)
    os.makedirs(args.output, exist_ok=True)
    binary = config["num_classes"] == 2
    suffix = ".png" if args.format == "png" else ".tif"
    from tqdm.auto import tqdm
    for path in tqdm(files, desc="predict", unit="image", disable=not args.progress):
        probs = predict_image(model, load_image(path), config.get("size"), crf=args.crf)
        _write_mask(os.path.join(args.output, path.stem + suffix), probs.argmax(axis=0), binary, args.format)
    log(f"wrote {len(files)} mask(s) to {args.output}")
    return 0


def cmd_evaluate(args, log=print):
    if not os.path.isdir(args.data):
        raise UsageError(f"--data folder {args.data} does not exist.")
    model, config = _load_model_arg(args)
    reader, _, num_classes = _open_dataset(args.data, config["num_classes"])
    samples = reader.samples
    if args.split == "val":
        samples = reader.split(config.get("val_fraction", 0.25), seed=0)[1]
    # With --crf: the plain network first, then network + dense CRF, to show what the CRF adds.
    for crf in ((False, True) if args.crf else (False,)):
        scores = evaluate_samples(model, reader, samples, config.get("size"), num_classes, crf=crf,
                                  progress=args.progress)
        log(f"{scores['images']} images ({args.split}){' + dense CRF' if crf else ''}: Dice (Kaggle) "
            f"{scores['dice']:.4f}  mean IoU {scores['iou']:.4f}  pixel accuracy {scores['accuracy']:.4f}")
    return 0


def cmd_models(args, log=print):
    """`python -m seg models`: every model with its parameter count at the reference
    configuration and output stride; `--explain NAME` lists NAME's layers (seg.models.summary)."""
    from . import models
    from .models import summary

    if getattr(args, "explain", None):
        if args.explain not in models.available():
            raise UsageError(f"--explain: unknown model {args.explain!r}; choose one of: "
                             f"{', '.join(models.available())}.")
        log(summary.explain(args.explain, input_size=getattr(args, "input_size", None)))
        return 0
    log(summary.format_table(summary.models_table()))
    return 0


def _load_model_arg(args):
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist.")
    if args.device == "gpu":
        from minidl import backend
        try:
            backend.require_cupy()
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
    return load_for_inference(args.checkpoint, args.device)


def build_parser():
    parser = _Parser(prog="python -m seg", description="Image segmentation with minidl.")
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,evaluate,models}",
                                parser_class=_Parser)
    sub.required = True
    train_p = sub.add_parser("train", help="train a model (default: U-Net on synthetic data)")
    add_train_arguments(train_p)
    pred = sub.add_parser("predict", help="write masks for a folder of images")
    pred.add_argument("--checkpoint", required=True)
    pred.add_argument("--input", required=True, metavar="DIR")
    pred.add_argument("--output", required=True, metavar="DIR")
    pred.add_argument("--format", choices=("png", "tiff"), default="png")
    ev = sub.add_parser("evaluate", help="print metrics of a checkpoint on a data set")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True, metavar="DIR")
    ev.add_argument("--split", choices=("all", "val"), default="all",
                    help="all images, or the validation subjects of the training run")
    for p in (pred, ev):
        p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
        p.add_argument("--crf", action="store_true", help="refine with the dense CRF")
        p.add_argument("--no-progress", dest="progress", action="store_false")
    models_p = sub.add_parser("models", help="list the models with parameter counts and strides")
    models_p.add_argument("--explain", metavar="NAME", default=None,
                          help="list NAME's conv layers: parameters, output sizes, receptive field")
    models_p.add_argument("--input-size", dest="input_size", type=_size, default=None, metavar="HxW",
                          help="input size for --explain; default: the paper's")
    return parser


def run_main(fn, args, prog):
    """Run a command, turning the expected failures into one line and an exit code."""
    from .train import GPUOutOfMemoryError, NonFiniteLossError

    try:
        return fn(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:     # bad data folder / file contents
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, GPUOutOfMemoryError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted.", file=sys.stderr)
        return 130


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        # Re-parse the train options with the preset applied (explicit options win).
        train_parser = build_train_parser()
        args = _apply_preset(train_parser, argv[1:])
        args.command = "train"
        try:
            check_train_args(args)
        except UsageError as exc:
            print(f"python -m seg train: error: {exc}", file=sys.stderr)
            return 2
    else:
        args = parser.parse_args(argv)
    commands = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate,
                "models": cmd_models}
    return run_main(commands[args.command], args, f"python -m seg {args.command}")

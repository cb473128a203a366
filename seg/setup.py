"""Training set-up: from the training options to data, model, loss, optimizer and schedule.

`python -m seg train` and the examples build a run the same way:

    args = seg.cli.parse_train_args(argv)       # the options (an argparse namespace)
    run = set_up_training(args)                  # seeds, data, model, loss, optimizer, schedule
    seg.train.train(run.model, run.data.train_loader, run.data.val_loader, run.loss_fn,
                    run.optimizer, run.scheduler, config=run.config, **trainer_options(args))

A new training option flows through three places: its default in TRAIN_DEFAULTS, its argument
in seg.cli.add_train_arguments, and its use here (the builder it changes, `trainer_options` for
the training loop, `run_config` when predicting needs it too).
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import minidl
from minidl import optim
from minidl.optim.lr_scheduler import PolyLR

from . import acceleration
from . import data as sdata
from . import distributed_training, models
from .errors import UsageError
from .losses import get_loss

__all__ = ["TRAIN_DEFAULTS", "PRESETS", "DEFAULT_SYNTHETIC", "default_synthetic_root", "preset_notice",
           "Data", "TrainingRun", "set_up_training",
           "trainer_options", "prepare_data", "open_dataset", "ensure_synthetic", "model_options",
           "build_model_from_args", "make_optimizer", "make_scheduler", "run_config",
           "load_pretrained_from_args", "open_checked_dataset", "checked_dataset", "SKIPPED_FILE"]

#: Where the synthetic stand-in for the Kaggle data is generated (once) when --data is not given
#: and the command runs in the repository (elsewhere: default_synthetic_root(), a user cache).
DEFAULT_SYNTHETIC = "data/synthetic"

#: What a preset costs, said before it starts (measured on a 2-core CPU).
PRESET_COST = {"seed-unet": (400, (420, 580), "about 10 hours on a 2-core CPU")}

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
                  "plot_every": 4, "progress": True, "preset": None, "distributed": False,
                  "sync_bn": False, "in_channels": None, "overwrite": False, "skip_bad": False,
                  # pretrained weights and mixed precision (seg.models.pretrained, seg/acceleration.py)
                  "pretrained": None, "pretrained_mapping": "auto", "amp": None, "cuda_graph": False,
                  "matmul_precision": None}


# ----------------------------------------------------------------------------- the whole run

@dataclass
class TrainingRun:
    """What set_up_training returns: everything seg.train.train needs besides its options."""
    data: "Data"
    model: object
    loss_fn: object
    optimizer: object
    scheduler: object        # None for a constant learning rate
    config: dict             # run_config: stored in every checkpoint


def set_up_training(args, log=print, synthetic_root=None):
    """Seed the random streams, then build data, model, loss, optimizer and schedule from args.

    The order is fixed (seeds first, the model after the data), so the same options give the
    same run. Bad options raise UsageError; bad data ValueError or FileNotFoundError.
    synthetic_root: where the synthetic data goes without --data (default_synthetic_root()).
    """
    distributed = getattr(args, "distributed", False) or getattr(args, "sync_bn", False)
    if distributed:                        # mpiexec -n R ... --distributed: join the job first
        distributed_training.start(args)
        if args.data is None:              # written once, by rank 0, before anyone reads it
            distributed_training.on_rank_zero_first(ensure_synthetic, synthetic_root, log)
    notice = preset_notice(args)
    if notice:
        log(notice)
    minidl.manual_seed(args.seed)          # weights, dropout
    np.random.seed(args.seed)
    acceleration.apply_matmul_precision(args)
    data = prepare_data(args, log, synthetic_root)
    if distributed:
        data = distributed_training.distribute_data(data, args)
    model = build_model_from_args(args, data.num_classes, data.in_channels)
    load_pretrained_from_args(args, model, log)
    if distributed:
        model = distributed_training.wrap_model(model, args)
    optimizer = make_optimizer(args, model)
    return TrainingRun(data, model, get_loss(args.loss), optimizer, make_scheduler(args, optimizer),
                       run_config(args, data.num_classes, data.in_channels))


def trainer_options(args):
    """The keyword arguments of seg.train.train that come from the training options."""
    options = {"epochs": args.epochs, "out_dir": args.out, "device": args.device, "resume": args.resume,
               "plot_every": args.plot_every, "progress": args.progress,
               **acceleration.trainer_options(args)}
    if getattr(args, "distributed", False):
        options["trainer_class"] = distributed_training.DistributedTrainer
    return options


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
    in_channels: int = 1      # 1 gray, 3 RGB: the model's input channels


def open_dataset(root, num_classes=None, in_channels=None, problems=None):
    """A Kaggle-layout or images/masks data set -> (reader, kind, num_classes).

    For an images/masks folder, num_classes None is inferred from the mask values and
    in_channels None from the image files (seg.data.describe); Kaggle frames are gray, 2
    classes. reader.in_channels is the channel count the images are loaded with.
    problems: a list collecting the naming/pairing problems (and, for a folder, masks whose
    values fit no convention) instead of raising the first one: see open_checked_dataset.
    """
    root = Path(root)
    if (root / "images").is_dir():
        reader = sdata.ImageMaskFolder(root, num_classes=num_classes, binary=None, in_channels=in_channels,
                                       problems=problems)
        return reader, "folder", reader.num_classes
    return sdata.KaggleUltrasound(root, in_channels=in_channels or 1, problems=problems), "kaggle", 2


def preset_notice(args):
    """One line saying what the chosen --preset will cost, or None (no preset, or its length
    changed by --epochs / --size)."""
    cost = PRESET_COST.get(getattr(args, "preset", None))
    if cost is None:
        return None
    epochs, size, time = cost
    if args.epochs != epochs or tuple(args.size) != size:
        return None
    return (f"--preset {args.preset}: {epochs} epochs on {size[0]}x{size[1]} images, {time} "
            "(less on a GPU, --device gpu); --epochs and --size shorten it.")


def default_synthetic_root():
    """Where the synthetic data set goes when --data is not given.

    data/synthetic in the current folder when that is this repository (where the README's
    commands expect it); anywhere else a per-user cache, $XDG_CACHE_HOME/minidl/synthetic
    (~/.cache/minidl/synthetic), so that no ~110 MB lands in whatever folder the command ran in.
    """
    repository = Path(__file__).resolve().parents[1]
    if (repository / "pyproject.toml").is_file() and Path.cwd().resolve() == repository:
        return Path(DEFAULT_SYNTHETIC)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "minidl" / "synthetic"


def _synthetic_megabytes():
    """Disk use of the default synthetic set: uncompressed 8-bit TIFFs (images, masks, tests)."""
    import inspect
    from .data import synthetic
    defaults = {k: p.default for k, p in
                inspect.signature(synthetic.write_synthetic_dataset).parameters.items()}
    files = 2 * defaults["n_subjects"] * defaults["images_per_subject"] + defaults["n_test"]
    return files * defaults["size"][0] * defaults["size"][1] / 2 ** 20


def ensure_synthetic(root=None, log=print):
    """Generate the synthetic Kaggle-layout data set into `root` (default_synthetic_root())
    once; later calls reuse it."""
    root = Path(root) if root is not None else default_synthetic_root()
    if not (root / "synthetic.json").exists():
        log(f"Generating the synthetic ultrasound data set (once, about {_synthetic_megabytes():.0f} MB) "
            f"in {root.resolve()}; --data DIR trains on your own data instead.")
    return sdata.write_synthetic_dataset(root)


def prepare_data(args, log=print, synthetic_root=None):
    """Loaders for training (augmented, shuffled) and validation, split by subject.

    Images are read with the real readers (the synthetic data goes through the Kaggle reader),
    resized once to args.size and cached in memory.
    """
    root = args.data if args.data is not None else ensure_synthetic(synthetic_root, log)
    reader, kind, num_classes = checked_dataset(root, args, log)
    if kind == "folder":
        log(f"{root}: {reader.classes.describe()}; images read as "
            f"{'RGB' if reader.in_channels == 3 else 'gray'} ({reader.in_channels} channel(s))")
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
    return Data(train_loader, val_loader, str(root), num_classes, kind, len(train_set), len(val_set),
                reader.in_channels)


def open_checked_dataset(root, num_classes=None, in_channels=None, read_masks=True):
    """open_dataset, then the data check (seg.data.check) -> (reader, kind, num_classes, report).

    num_classes / in_channels as in open_dataset (None: inferred from the files).
    Naming and pairing problems do not stop the opening; they are in the report with the rest."""
    problems = []
    reader, kind, classes = open_dataset(root, num_classes, in_channels, problems=problems)
    return reader, kind, classes, sdata.check_dataset(reader, problems, read_masks=read_masks)


#: Where --skip-bad lists the files it left out (CSV: file, problem), in the run folder.
SKIPPED_FILE = "skipped.csv"


def checked_dataset(root, args, log=print):
    """The data set of a training run, checked: (reader, kind, num_classes).

    Problems stop the run before anything is written (a DataCheckError listing them all), or,
    with --skip-bad, the pairs with problems are left out and listed in OUT/skipped.csv.
    """
    reader, kind, num_classes, report = open_checked_dataset(root, args.num_classes,
                                                             getattr(args, "in_channels", None))
    skipped = Path(args.out) / SKIPPED_FILE
    if report.ok:
        log(f"data check: {report.summary['pairs']:,} pairs in {root}, no problems "
            f"({report.summary['seconds']:.1f} s)")
        if skipped.is_file():
            skipped.unlink()                 # a list left by an earlier run in this folder
        return reader, kind, num_classes
    if not getattr(args, "skip_bad", False):
        raise sdata.DataCheckError(report, "fix or remove these files, or pass --skip-bad to train on "
                                           "the rest (python -m seg check-data DIR checks without training)")
    if not report.samples:
        raise sdata.DataCheckError(report, "no image/mask pair is left to train on")
    skipped.parent.mkdir(parents=True, exist_ok=True)
    report.write_problems(skipped)
    log(report.format_problems())
    log(f"--skip-bad: training on the {len(report.samples):,} pairs without problems; the files "
        f"left out are listed in {skipped}.")
    reader.samples = report.samples
    return reader, kind, num_classes


# ----------------------------------------------------------------------------- model, optimizer, schedule

def model_options(args):
    """Builder options from the arguments (U-Net options only for the U-Net)."""
    if args.model != "unet":
        return {}
    return {"depth": args.depth, "features_root": args.features_root, "padding": args.padding,
            "batch_norm": args.batch_norm, "dropout": args.dropout, "dropout_mode": args.dropout_mode}


def build_model_from_args(args, num_classes, in_channels=1):
    try:
        return models.build(args.model, num_classes=num_classes, in_channels=in_channels,
                            **model_options(args))
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def load_pretrained_from_args(args, model, log=print):
    """--pretrained PATH [--pretrained-mapping NAME]: copy a weight file's arrays into `model`
    (seg.models.pretrained) and log the loaded / skipped / mismatched report. Returns the
    report, or None without --pretrained. UsageError for a missing file, an unknown mapping
    or a file of which nothing fits the model."""
    path = getattr(args, "pretrained", None)
    if path is None:
        return None
    from .models.pretrained import format_report, load_pretrained
    if not Path(path).is_file():
        raise UsageError(f"--pretrained file {path} does not exist; export the weights to a "
                         ".safetensors or .npz file first (see docs/INTEROP.md).")
    mapping = getattr(args, "pretrained_mapping", "auto")
    mapping = None if mapping in ("none", "own") else mapping
    try:
        report = load_pretrained(model, path, mapping=mapping, verbose=False)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--pretrained {path}: {exc}") from None
    log(format_report(report, path))
    if not report["loaded"]:
        used = report["mapping"] or "the model's own names"
        raise UsageError(f"--pretrained {path}: none of its {len(report['skipped']) + len(report['mismatched'])} "
                         f"arrays fits {args.model} (mapping: {used}); pass the file's layout with "
                         "--pretrained-mapping NAME (e.g. vgg16-torchvision), or a file made for "
                         "this model.")
    return report


def make_optimizer(args, model):
    if args.optimizer == "sgd":
        return optim.SGD(model.parameters(), lr=args.lr, momentum=0.99)   # the paper's momentum
    # --cuda-graph on the GPU: Adam's step count on the device, so the update can be replayed.
    capturable = bool(getattr(args, "cuda_graph", False)) and args.device == "gpu"
    return optim.Adam(model.parameters(), lr=args.lr, capturable=capturable)


class RunPolyLR(PolyLR):
    """PolyLR whose length follows --epochs also after --resume: resuming with the same
    --epochs continues exactly, a larger --epochs stretches the remaining decay."""

    def load_state_dict(self, state_dict):
        total = self.total_iters
        super().load_state_dict(state_dict)
        self.total_iters = total
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr


def make_scheduler(args, optimizer):
    """The learning-rate schedule, stepped once per epoch (None for a constant rate)."""
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

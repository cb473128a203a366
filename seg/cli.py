"""The command line: ``python -m seg train|predict|evaluate|models``.

    python -m seg train --model unet --epochs 20 --out runs/unet        # synthetic data by default
    python -m seg train --data ~/kaggle/ultrasound --size 96x128 --depth 4 --device gpu
    python -m seg train --preset seed-unet                               # the talk's settings
    python -m seg predict --checkpoint runs/unet/best.npz --input data/synthetic/test --output out/
    python -m seg evaluate --checkpoint runs/unet/best.npz --data data/synthetic
    python -m seg models
    python -m seg export --checkpoint runs/unet/best.npz --output unet.onnx
    python -m seg check-data ~/kaggle/ultrasound                        # the data check alone

This module parses the arguments and runs the commands; the work is done by seg.setup
(training set-up: data, model, optimizer, schedule), seg.train (the loop) and seg.inference
(predicting and scoring with a checkpoint). The training options are shared with the examples
(parse_train_args, build_train_parser). Bad arguments end the program with one sentence on
stderr and exit code 2.
"""
import argparse
import os
import sys

from tqdm.auto import tqdm

from minidl import backend

from . import distributed_training, models
from .acceleration import AMP_DTYPES, MATMUL_PRECISIONS
from .data import DataCheckError, Problem, load_image
from .errors import GPUOutOfMemoryError, NonFiniteLossError, TrainingDataError, UsageError
from .inference import crf_report, evaluate_samples, predict_image, write_mask
from .interrupt import is_interrupt
from .losses import LOSSES
from .metrics import format_class_table
from .models import summary
from .models.pretrained import resolve_mapping
from .outputs import choose_run_folder, mask_outputs
from .prediction_inputs import load_model_checked, prepare_output_folder, scan_inputs
from .setup import (DEFAULT_SYNTHETIC, PRESETS, TRAIN_DEFAULTS, open_checked_dataset, set_up_training,
                    trainer_options)
from .train import train

__all__ = ["main", "parse_train_args", "build_train_parser", "add_train_arguments", "check_train_args",
           "UsageError"]


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


def _number(convert, ok, requirement):
    """An argparse type: text -> convert(text), rejected with `requirement` unless ok(value)."""
    noun = "an integer" if convert is int else "a number"

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} {requirement}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "must be at least 1")
_positive_float = _number(float, lambda v: v > 0, "must be positive")
_fraction = _number(float, lambda v: 0 <= v < 1, "must be in [0, 1)")


class _StoreOut(argparse.Action):
    """--out: stores the folder and notes that it was typed, since a default folder that holds
    an earlier run gives way to a numbered one while a typed one is refused (seg.outputs)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.out_given = True


def add_train_arguments(parser, defaults=None):
    """Add the training options (shared by `python -m seg train` and the examples).

    A new option gets its default in seg.setup.TRAIN_DEFAULTS and its use in seg.setup.
    """
    d = dict(TRAIN_DEFAULTS, **(defaults or {}))
    p = parser
    p.add_argument("--model", default=d["model"],
                   help="architecture name (python -m seg models); default %(default)s")
    p.add_argument("--data", default=d["data"], metavar="DIR",
                   help="Kaggle layout (DIR/train/<s>_<n>.tif + _mask.tif) or DIR/images + DIR/masks; "
                        f"default: synthetic data generated once (over 100 MB) into {DEFAULT_SYNTHETIC} "
                        "when run in the repository, else into ~/.cache/minidl/synthetic ($XDG_CACHE_HOME)")
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
    p.add_argument("--out", default=d["out"], metavar="DIR", action=_StoreOut,
                   help="output folder; default %(default)s (or %(default)s-2, -3, ... when it holds "
                        "an earlier run; with --resume: the checkpoint's folder)")
    p.add_argument("--overwrite", action="store_true", default=d["overwrite"],
                   help="let --out replace the training run it already holds")
    p.set_defaults(out_given=False)
    p.add_argument("--resume", default=d["resume"], metavar="CHECKPOINT",
                   help="continue from a checkpoint (e.g. OUT/last.npz)")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed; default %(default)s")
    p.add_argument("--val-fraction", type=_fraction, default=d["val_fraction"],
                   help="share of subjects held out for validation; default %(default)s")
    p.add_argument("--num-classes", type=_positive_int, default=d["num_classes"],
                   help="classes for an images/masks folder; default: read off the mask values "
                        "(0/255 or 0/1: 2, ids 0..K-1: K; Kaggle data: 2)")
    p.add_argument("--in-channels", type=int, choices=(1, 3), default=d["in_channels"],
                   help="1 (gray) or 3 (RGB) model input; default: 3 when the images are colour")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d["augment"],
                   help="flips, small rotations, elastic deformation, intensity jitter")
    p.add_argument("--crf", action="store_true", default=d["crf"],
                   help="after training, also score the validation set with dense-CRF post-processing")
    p.add_argument("--plot-every", type=_positive_int, default=d["plot_every"],
                   help="draw the X / Y / Pred panel every N epochs; default %(default)s")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="seed-unet: the talk's U-Net settings, 400 epochs at 420x580 (about 10 hours "
                        "on a 2-core CPU; explicit options still win)")
    p.add_argument("--distributed", action="store_true", default=d["distributed"],
                   help="data-parallel training on every rank of `mpiexec -n R ...` "
                        "(--batch-size is per rank); see docs/DISTRIBUTED.md")
    p.add_argument("--sync-bn", action="store_true", default=d["sync_bn"],
                   help="with --distributed: batch norm statistics over the global batch")
    p.add_argument("--skip-bad", action="store_true", default=d["skip_bad"],
                   help="train on the files the data check finds no problem with, listing the "
                        "others in OUT/skipped.csv (default: problems stop the run)")
    add_interop_arguments(p, d)
    return parser


def _mapping_name(text):
    """--pretrained-mapping: 'auto', 'none' (the model's own names) or a known layout."""
    if text.lower() in ("auto", "none"):
        return text.lower()
    try:
        return resolve_mapping(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).rstrip(".")) from None


def add_interop_arguments(p, d):
    """--pretrained, --amp, --cuda-graph, --matmul-precision (seg.setup, seg.acceleration)."""
    p.add_argument("--pretrained", default=d["pretrained"], metavar="PATH",
                   help="start from the weights in this .safetensors / .npz file (e.g. torchvision's "
                        "VGG-16 for fcn8s); see docs/INTEROP.md")
    p.add_argument("--pretrained-mapping", type=_mapping_name, default=d["pretrained_mapping"],
                   metavar="NAME", help="the file's layout, e.g. vgg16-torchvision, resnet101-timm, "
                                        "vgg16-caffe; none: the model's own names; default: "
                                        "recognised from the names")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default=d["amp"],
                   help="mixed precision: forward and loss in bfloat16 / float16 (docs/AMP.md)")
    p.add_argument("--cuda-graph", action="store_true", default=d["cuda_graph"],
                   help="replay the training step as a CUDA graph (GPU; else one line says why not)")
    p.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default=d["matmul_precision"],
                   help="float32 matmul precision (minidl.set_float32_matmul_precision)")


def build_train_parser(prog="python -m seg train", description=None, defaults=None):
    parser = _Parser(prog=prog, description=description)
    return add_train_arguments(parser, defaults)


def _parse(parser, argv, train_parser):
    """Parse argv. A --preset sets new defaults on the train options and argv is parsed again,
    so options given explicitly still win.

    train_parser: the parser holding the train options (parser itself, or its train command);
    it also reports unknown options of a train command line, as it lists the known ones.
    """
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "preset", None):
        preset = dict(PRESETS[args.preset])
        if "size" in preset:
            preset["size"] = _size(preset["size"])
        train_parser.set_defaults(**preset)
        args, unknown = parser.parse_known_args(argv)
    if unknown:
        owner = train_parser if getattr(args, "command", "train") == "train" else parser
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def require_device(device):
    """The one GPU check of the command line: --device gpu needs CuPy and a GPU."""
    if device == "gpu":
        try:
            backend.require_cupy()
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None


def check_train_args(args, log=print):
    """Checks that need more than one option, or the outside world; UsageError on failure.

    Also settles args.out, so that no earlier run is replaced by accident (seg.outputs).
    """
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be a probability in [0, 1), got {args.dropout}.")
    if args.resume is not None and not os.path.exists(args.resume):
        raise UsageError(f"--resume checkpoint {args.resume} does not exist.")
    if args.data is not None and not os.path.isdir(args.data):
        raise UsageError(f"--data folder {args.data} does not exist.")
    if getattr(args, "pretrained", None) is not None and not os.path.isfile(args.pretrained):
        raise UsageError(f"--pretrained file {args.pretrained} does not exist; export the weights "
                         "to a .safetensors or .npz file first (see docs/INTEROP.md).")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; name a folder for the run's outputs.")
    require_device(args.device)
    args.out, note = choose_run_folder(args.out, getattr(args, "out_given", True), args.resume,
                                       getattr(args, "overwrite", False))
    if note:
        log(note)
    return args


def parse_train_args(argv=None, prog="python -m seg train", description=None, defaults=None,
                     parser=None):
    """Parse and check the training options (with --preset applied). Exits 2 on bad input.

    parser: a build_train_parser() parser with options of its own added (examples/train_any.py).
    """
    parser = parser or build_train_parser(prog, description, defaults)
    args = _parse(parser, argv, parser)
    try:
        return check_train_args(args)
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


# ----------------------------------------------------------------------------- commands

def cmd_train(args, log=print):
    """`python -m seg train`: the same steps as examples/train_unet.py."""
    check_train_args(args, log)
    run = set_up_training(args, log)
    data = run.data
    log(f"{args.model}: {run.model.num_parameters():,} parameters; {data.n_train} training / "
        f"{data.n_val} validation images of {args.size[0]}x{args.size[1]} from {data.root}")
    result = train(run.model, data.train_loader, data.val_loader, run.loss_fn, run.optimizer,
                   run.scheduler, config=run.config, log=log, **trainer_options(args))
    if result.history:
        log(f"final validation Dice {result.last['val_dice']:.4f} (best {result.best_score:.4f} at "
            f"epoch {result.best_epoch}); checkpoints and plots in {args.out}")
    if args.crf and not result.interrupted:
        crf_report(args, data, log)
    return 130 if result.interrupted else 0


def _load_model_arg(args):
    require_device(args.device)
    return load_model_checked(args.checkpoint, args.device)


def cmd_predict(args, log=print):
    """Masks for --input (one image file or a folder of them). Files that cannot be predicted
    (not images, damaged, a channel count the model does not take: seg.prediction_inputs) are
    listed and skipped, exit code 1 when some were; masks never replace an input or each other
    (seg.outputs.mask_outputs)."""
    scan = scan_inputs(args.input)
    model, config = _load_model_arg(args)
    channels = config.get("in_channels", 1)      # checkpoints from before RGB support: gray
    scan = scan.for_channels(channels, args.checkpoint)
    pairs, note = mask_outputs([path for path, _ in scan.files], args.output,
                               ".png" if args.format == "png" else ".tif")
    prepare_output_folder(args.output)
    if note:
        log(note)
    binary = config["num_classes"] == 2
    written = 0
    for path, target in tqdm(pairs, desc="predict", unit="image", disable=not args.progress):
        try:
            image = load_image(path, channels)
        except (ValueError, OSError) as exc:     # damage the header did not show: skip this one
            scan.skipped.append(Problem(str(path), str(exc)))
            continue
        probs = predict_image(model, image, config.get("size"), crf=args.crf)
        try:
            write_mask(target, probs.argmax(axis=0), binary, args.format)
        except OSError as exc:
            raise UsageError(f"could not write {target} ({exc.strerror or exc}); check the space and "
                             "permissions of --output.") from None
        written += 1
    log(f"wrote {written} mask(s) to {args.output}"
        + (f"; {len(scan.skipped)} image(s) could not be read (listed below)" if scan.skipped else ""))
    if scan.skipped:
        print(scan.format_skipped(), file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args, log=print):
    if not os.path.isdir(args.data):
        raise UsageError(f"--data folder {args.data} does not exist.")
    model, config = _load_model_arg(args)
    reader, _, num_classes, report = open_checked_dataset(args.data, config["num_classes"],
                                                          config.get("in_channels", 1))
    if not report.ok:
        raise DataCheckError(report, "fix or remove these files (python -m seg check-data DIR checks "
                                     "a data set)")
    samples = reader.samples
    if args.split == "val":
        samples = reader.split(config.get("val_fraction", 0.25), seed=0)[1]
    # With --crf: the plain network first, then network + dense CRF, to show what the CRF adds.
    for crf in ((False, True) if args.crf else (False,)):
        scores = evaluate_samples(model, reader, samples, config.get("size"), num_classes, crf=crf,
                                  progress=args.progress)
        dice = "Dice (Kaggle)" if num_classes == 2 else f"mean Dice (classes 1-{num_classes - 1})"
        log(f"{scores['images']} images ({args.split}){' + dense CRF' if crf else ''}: {dice} "
            f"{scores['dice']:.4f}  mean IoU {scores['iou']:.4f}  pixel accuracy {scores['accuracy']:.4f}"
            + format_class_table(scores))
    return 0


def cmd_export(args, log=print):
    """`python -m seg export`: the checkpoint's model as an ONNX file (seg.export)."""
    from .export import export_checkpoint     # (imports minidl.onnx only for this command)
    info = export_checkpoint(args.checkpoint, args.output, args.opset, args.size)
    shapes = ["x".join(str(d) for d in info[k]) for k in ("input_shape", "output_shape")]
    log(f"wrote {info['path']}: {info['model']} as ONNX opset {info['opset_version']}, "
        f"{info['nodes']} nodes; input 'image' {shapes[0]}, output 'logits' {shapes[1]} "
        "(the batch axis is dynamic)")
    return 0


def cmd_check_data(args, log=print):
    """`python -m seg check-data DIR`: the data check of training (seg.data.check) without
    training: the problems and the summary; exit code 0 when clean, 1 when problems were found."""
    if not os.path.isdir(args.data):
        raise UsageError(f"data folder {args.data} does not exist.")
    reader, kind, _, report = open_checked_dataset(args.data, args.num_classes, read_masks=args.read_masks)
    log(report.format_problems() if not report.ok else f"No problems found in {args.data} ({kind} layout).")
    if getattr(reader, "classes", None) is not None:     # an images/masks folder: classes inferred
        log(f"({reader.classes.describe()}; --num-classes N if some classes are absent from the masks)")
    log(report.format_summary())
    return 0 if report.ok else 1


def cmd_models(args, log=print):
    """`python -m seg models`: every model with its parameter count at the reference
    configuration and output stride; `--explain NAME` lists NAME's layers (seg.models.summary)."""
    if getattr(args, "explain", None):
        if args.explain not in models.available():
            raise UsageError(f"--explain: unknown model {args.explain!r}; choose one of: "
                             f"{', '.join(models.available())}.")
        options = {k: getattr(args, k, None) for k in ("depth", "features_root")}
        if args.explain != "unet" and any(v is not None for v in options.values()):
            raise UsageError("--depth and --features-root describe the U-Net only; "
                             f"leave them out for {args.explain}.")
        log(summary.explain(args.explain, input_size=getattr(args, "input_size", None),
                            **{k: v for k, v in options.items() if v is not None}))
        return 0
    log(summary.format_table(summary.models_table()))
    return 0


def build_parsers():
    """The `python -m seg` parser and its train command's parser -> (parser, train_parser)."""
    parser = _Parser(prog="python -m seg", description="Image segmentation with minidl.")
    sub = parser.add_subparsers(dest="command", metavar="{train,predict,evaluate,check-data,models,export}",
                                parser_class=_Parser)
    sub.required = True
    train_p = sub.add_parser("train", help="train a model (default: U-Net on synthetic data)")
    add_train_arguments(train_p)
    pred = sub.add_parser("predict", help="write masks for a folder of images")
    pred.add_argument("--checkpoint", required=True)
    pred.add_argument("--input", required=True, metavar="PATH", help="an image file or a folder of images")
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
    check = sub.add_parser("check-data", help="check a data set (every file's header, the pairs) "
                                              "and print its summary, without training")
    check.add_argument("data", metavar="DIR", help="Kaggle layout or DIR/images + DIR/masks")
    check.add_argument("--num-classes", type=_positive_int, default=None,
                       help="classes for an images/masks folder (Kaggle data: 2)")
    check.add_argument("--headers-only", dest="read_masks", action="store_false",
                       help="read mask headers only: faster, but mask values and the empty-mask "
                            "share are not checked")
    models_p = sub.add_parser("models", help="list the models with parameter counts and strides")
    models_p.add_argument("--explain", metavar="NAME", default=None,
                          help="list NAME's conv layers: parameters, output sizes, receptive field")
    models_p.add_argument("--input-size", dest="input_size", type=_size, default=None, metavar="HxW",
                          help="input size for --explain; default: the paper's")
    models_p.add_argument("--depth", type=_positive_int, default=None,
                          help="for --explain unet: levels (default: the paper's 5)")
    models_p.add_argument("--features-root", type=_positive_int, default=None,
                          help="for --explain unet: channels of the first level (default 64)")
    exp = sub.add_parser("export", help="write a checkpoint's model as an ONNX file")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--output", required=True, metavar="FILE.onnx")
    exp.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (13..18); default %(default)s")
    exp.add_argument("--size", type=_size, default=None, metavar="HxW",
                     help="height and width of the graph's input; default: the training size")
    return parser, train_p


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "models": cmd_models,
            "check-data": cmd_check_data, "export": cmd_export}


def run_main(fn, args, prog):
    """Run a command, turning the expected failures into one line and an exit code."""
    try:
        return fn(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:     # bad data folder / file contents
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, GPUOutOfMemoryError, TrainingDataError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:      # a full disk, a folder without write permission: names the file
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemError) as exc:
        if not is_interrupt(exc):      # Ctrl-C inside a Numba kernel arrives as a SystemError
            raise
        print(f"\n{prog}: interrupted.", file=sys.stderr)
        return 130


def main(argv=None):
    parser, train_parser = build_parsers()
    args = _parse(parser, sys.argv[1:] if argv is None else list(argv), train_parser)
    code = run_main(COMMANDS[args.command], args, f"python -m seg {args.command}")
    return distributed_training.finish(code)   # an error on one rank ends every rank

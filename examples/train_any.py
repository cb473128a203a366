"""Train any registered architecture, width-reduced for the CPU, on the synthetic ultrasound data.

    python examples/train_any.py --model segnet                      # width 1/16, 2 epochs, 64x64
    python examples/train_any.py --model deeplabv3 --epochs 4 --size 96x128
    python examples/train_any.py --model fcn8s --width 0.125 --device gpu
    python examples/train_any.py --model fcn8s --pretrained vgg16.safetensors   # ImageNet start
    python -m seg models                                             # the names, full-size counts

It does what examples/train_unet.py does (data, loss, learning-rate schedule, seg.train's loop,
checkpoints and plots in --out; the same options, --preset included), with one difference: the
model is built with `width=--width`, which divides every channel count (width 1/16 turns VGG's
64..512 channels into 4..32), so that the paper's architectures - 20 to 250 million parameters
at full size - train in minutes on two cores. The layers, strides, skips and sizes are the
paper's; only the widths shrink. `python -m seg train --model NAME` trains the full-size model
instead (slow on a CPU). For "unet", whose size is set by --depth / --features-root, --width is
ignored.

Some architectures need a minimum input size (DeconvNet's 7x7 fc6 needs 224x224): when --size
is too small for the model, the nearest size it accepts is used, and said so.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import minidl  # noqa: E402
from seg import acceleration, cli, models, setup  # noqa: E402
from seg.errors import UsageError  # noqa: E402
from seg.losses import get_loss  # noqa: E402
from seg.models.input_size import fitting_input_size  # noqa: E402
from seg.train import train  # noqa: E402

DEFAULTS = {"model": "segnet", "epochs": 2, "batch_size": 4, "lr": 1e-3, "size": "64x64",
            "loss": "ce_dice", "out": "runs/any", "plot_every": 1}


def build(args, num_classes, in_channels=1):
    if args.model == "unet":
        return setup.build_model_from_args(args, num_classes, in_channels=in_channels)
    return models.build(args.model, num_classes, in_channels=in_channels, width=args.width)


def fit_size(args):
    """args.size, or the nearest size the model accepts (announced)."""
    if args.model == "unet":       # training pads the U-Net's input itself (seg.tiling)
        return args.size
    size = fitting_input_size(build(args, 2), args.size)
    if size != tuple(args.size):
        print(f"{args.model} cannot take {args.size[0]}x{args.size[1]} images; using the nearest "
              f"size it accepts, {size[0]}x{size[1]} (--size to choose another).")
    return size


def run(args):
    if args.model not in models.available():
        raise UsageError(f"unknown model {args.model!r} (--model); choose one of: "
                         f"{', '.join(models.available())}.")
    if setup.preset_notice(args):
        print(setup.preset_notice(args))
    args.size = fit_size(args)
    minidl.manual_seed(args.seed)
    np.random.seed(args.seed)
    acceleration.apply_matmul_precision(args)
    data = setup.prepare_data(args, synthetic_root=ROOT / "data" / "synthetic")
    model = build(args, data.num_classes, data.in_channels)
    setup.load_pretrained_from_args(args, model)      # --pretrained FILE (e.g. ImageNet VGG)
    print(f"{args.model} at width {args.width:g}: {model.num_parameters():,} parameters "
          f"(output stride {getattr(model, 'output_stride', 1)}), {args.size[0]}x{args.size[1]} images")
    config = setup.run_config(args, data.num_classes, data.in_channels)
    if args.model != "unet":               # so `python -m seg predict` rebuilds the same width
        config["model_options"] = {"width": args.width}
    optimizer = setup.make_optimizer(args, model)
    result = train(model, data.train_loader, data.val_loader, get_loss(args.loss), optimizer,
                   setup.make_scheduler(args, optimizer), config=config,
                   **setup.trainer_options(args))
    if result.history:
        print(f"validation Dice {result.last['val_dice']:.4f} (best {result.best_score:.4f}); "
              f"outputs in {args.out}")
    return 130 if result.interrupted else 0


def main(argv=None):
    parser = cli.build_train_parser("train_any.py", "Train any seg model, width-reduced.", DEFAULTS)
    parser.add_argument("--width", type=float, default=1 / 16,
                        help="channel multiplier (1 = the paper's model); default 1/16")
    args = cli.parse_train_args(argv, prog="train_any.py", parser=parser)
    return cli.run_main(run, args, "train_any.py")


if __name__ == "__main__":
    sys.exit(main())

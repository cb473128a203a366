"""Benchmark every architecture at full size: one training step's time and peak memory.

    python examples/benchmark_models.py                               # all, at each paper's size
    python examples/benchmark_models.py --models segnet fcdensenet56 --size 128
    python examples/benchmark_models.py --scale 0.5 --out runs/bench.json
    python examples/benchmark_models.py --device gpu --repeat 3

For each model (the reference configuration of seg.models.summary: 21 classes for the PASCAL
VOC models, 11 for the CamVid ones, 2 for U-Net) this builds the full-size network and times
forward + cross-entropy + backward on one image of the paper's input size:

    FCN 500x500, U-Net 572x572, SegNet 360x480, DeconvNet 224x224, FC-DenseNet 224x224,
    Dilation8 / DeepLab v1, v2 321x321, DeepLab v3 513x513, RefineNet 512x512

and reports seconds per image and the peak memory: on the CPU the peak resident set size (RSS)
of a fresh process per model (so one model's peak does not hide the next one's), on the GPU the
high-water mark of CuPy's memory pool during one step. --size (N or HxW) replaces every input
size, --scale multiplies them (sizes are then rounded to what each model accepts). Results are
printed as a table and written as JSON (--out). Timings are the median of --repeat steps after
--warmup steps.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

# One row per model: (name, build options, classes).
MODELS = [("fcn32s", {}, 21), ("fcn16s", {}, 21), ("fcn8s", {}, 21), ("unet", {"in_channels": 1}, 2),
          ("segnet", {}, 11), ("deconvnet", {}, 21), ("fcdensenet56", {}, 11),
          ("fcdensenet67", {}, 11), ("fcdensenet103", {}, 11), ("dilation8", {}, 21),
          ("deeplab_largefov", {}, 21), ("deeplabv2", {}, 21),
          ("deeplabv2", {"backbone": "resnet101"}, 21), ("deeplabv3", {}, 21), ("refinenet", {}, 21)]


def _label(name, options):
    extra = ",".join(str(v) for k, v in options.items() if k != "in_channels")
    return f"{name}[{extra}]" if extra else name


def _fit_size(model, name, h, w):
    """The nearest input size at least (h, w) that `name` accepts."""
    if hasattr(model, "valid_input_size"):               # valid-padding U-Net
        return tuple(model.valid_input_size(h, w))
    low = {"deconvnet": 193, "fcdensenet56": 32, "fcdensenet67": 32, "fcdensenet103": 32}.get(name, 1)
    return max(h, low), max(w, low)


def run_one(name, options, classes, size, device, warmup, repeat):
    """Build one full-size model and time training steps on one image; returns a dict."""
    import minidl
    from minidl import backend
    from minidl import functional as F
    from seg import models

    minidl.manual_seed(0)
    options = dict(options)
    in_channels = options.pop("in_channels", 3)
    model = models.build(name, classes, in_channels=in_channels, **options)
    if device == "gpu":
        model.to("gpu")
    h, w = _fit_size(model, name, *size)
    xp = backend.array_module(device)
    x = minidl.tensor(xp.asarray(np.random.default_rng(0).random((1, in_channels, h, w),
                                                                 dtype=np.float32)))
    out_hw = model.output_size(h, w) if hasattr(model, "output_size") else (h, w)
    target = xp.zeros((1,) + tuple(out_hw), dtype=np.int64)

    def sync():
        if device == "gpu":
            backend.require_cupy().cuda.Device().synchronize()

    def step():
        model.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        sync()
        return loss

    for _ in range(warmup):
        step()
    peak_gpu = None
    if device == "gpu":
        _, peak_gpu = backend.gpu_peak_memory(step)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"model": _label(name, dict(options, **({"in_channels": in_channels}
                                                    if in_channels != 3 else {}))),
            "params": model.num_parameters(), "input": [h, w], "device": device,
            "seconds_per_image": statistics.median(times), "times": times,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_pool_mib": None if peak_gpu is None else peak_gpu / 2 ** 20}


def _sizes(name, args):
    from seg.models.summary import paper_input_size

    h, w = paper_input_size(name)
    if args.size is not None:
        h, w = args.size
    return max(1, round(h * args.scale)), max(1, round(w * args.scale))


def _parse_size(text):
    parts = [int(p) for p in text.lower().split("x")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time a training step of every full-size model.")
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="subset of model names (default: all)")
    parser.add_argument("--size", type=_parse_size, default=None, metavar="N|HxW",
                        help="input size for every model (default: each paper's)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the input sizes")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--warmup", type=int, default=None, help="default 0 on the CPU, 1 on the GPU")
    parser.add_argument("--repeat", type=int, default=1, help="timed steps per model")
    parser.add_argument("--out", default="benchmark_models.json", help="JSON output file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: one model
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (1 if args.device == "gpu" else 0)

    if args.worker is not None:            # child process: run one model, print its JSON
        index = int(args.worker)
        name, options, classes = MODELS[index]
        print(json.dumps(run_one(name, options, classes, _sizes(name, args), args.device, warmup,
                                 args.repeat)))
        return 0

    chosen = [i for i, (name, _, _) in enumerate(MODELS)
              if args.models is None or name in args.models]
    if args.models:
        unknown = set(args.models) - {m[0] for m in MODELS}
        if unknown:
            parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(sorted({m[0] for m in MODELS}))}")
    rows = []
    head = (f"{'model':<24} {'params':>12} {'input':>9} {'s/image':>9} {'peak RSS MiB':>13}"
            + (f" {'GPU pool MiB':>13}" if args.device == "gpu" else ""))
    print(head)
    print("-" * len(head))
    for i in chosen:
        # A fresh process per model: ru_maxrss is a high-water mark that never goes down.
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(i), "--device", args.device,
               "--scale", str(args.scale), "--repeat", str(args.repeat), "--warmup", str(warmup)]
        if args.size is not None:
            cmd += ["--size", f"{args.size[0]}x{args.size[1]}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
            print(f"{_label(*MODELS[i][:2]):<24} failed: {err}")
            rows.append({"model": _label(*MODELS[i][:2]), "error": err})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        line = (f"{r['model']:<24} {r['params']:>12,} {r['input'][0]:>4}x{r['input'][1]:<4} "
                f"{r['seconds_per_image']:>9.2f} {r['peak_rss_mib']:>13.0f}")
        if args.device == "gpu":
            line += f" {r['peak_gpu_pool_mib']:>13.0f}"
        print(line, flush=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"device": args.device, "rows": rows}, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Count the GPU work of one U-Net training step without a GPU: the launch census.

    PYTHONPATH=tests python scripts/launch_census.py --depth 4 --features 16 --batch 4 --size 128
    PYTHONPATH=tests python scripts/launch_census.py --depth 5 --features 64 --batch 8 --size 16
    ... --amp bf16          forward and loss under minidl.amp.autocast("gpu", "bfloat16")
    ... --optimizer flat    FlatAdam (one update kernel for every parameter) instead of Adam
    ... --batch-norm        the U-Net with BatchNormReLU2d after each 3x3 conv
    ... --json FILE         the tables as JSON as well

Runs the step of examples/benchmark_gpu.py (zero_grad, forward, cross-entropy, backward,
Adam; U-Net with padding "same", 2 classes, no batch norm unless asked) twice on the host
emulation of CuPy (tests/fake_cupy.py), and counts the device operations of the second,
warm step (the first creates the optimizer's state and compiles the kernels). Each is
attributed to a phase (forward / loss / backward / optimizer) and to the minidl op it ran
in (the innermost Function on the Python stack, else the optimizer, the autograd glue...).
Reads of device values on the host (float(), .item(), bool(), .get()) are counted apart:
each is a synchronisation on a real GPU, and a step with one cannot be captured as a graph.

How the count relates to real kernel launches (it is a count, not a timing):

* One per CuPy operation: an element-wise ufunc, a reduction (CuPy runs a reduction over
  any axes as one kernel, as counted), a cupy function (where, take,
  concatenate...), an advanced index or an index assignment, a copy (astype, a contiguous
  copy of a non-contiguous view), a fill (zeros, ones, arange: zeros is a cudaMemsetAsync,
  not a kernel, but it costs a launch all the same) and each RawKernel launch. Views
  (reshape, transpose, broadcast_to, basic slicing) and allocations (empty) count nothing,
  as they launch nothing on the GPU either.
* Undercounts: a matrix product counts 1, but cuBLAS may run two kernels for one GEMM
  (split-K with a reduction kernel) and CuPy's batched matmul of non-contiguous operands
  copies them first; a cupy function that CuPy implements with several kernels (pad,
  concatenate of many arrays, sort) counts 1; host-to-device copies are listed apart
  ("h2d"), not as launches.
* Overcounts: a NumPy method that the fake CuPy runs as NumPy does, in two ufunc calls,
  counts 2 where CuPy runs one kernel: x.mean() (a sum and a division) and x.var(). CuPy
  fuses nothing on its own, so an expression like a * b + c is 2 launches there as here.
* Sizes matter only where the conv plan cuts a layer's column matrix into pieces (more
  than 512 MiB of columns, conv_plan.Settings.gpu_column_buffer_bytes): the big U-Net at
  batch 8 of 256x256 has more launches in its largest layers than at the small size this
  script runs it at. Everything else depends on the layers and the batch (a 1x1 conv sums
  its weight gradient sample by sample), not on the image size or the channel counts.
"""
import argparse
import collections
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import fake_cupy  # noqa: E402  (before minidl, so that it finds the "GPU")

fake_cupy.install()

import numpy as np  # noqa: E402

import minidl  # noqa: E402
from minidl import amp, optim  # noqa: E402
from minidl import functional as F  # noqa: E402
from minidl.function import Function  # noqa: E402
from minidl.optim.optimizer import Optimizer  # noqa: E402

PHASES = ("forward", "loss", "backward", "optimizer")
# Functions whose frames say what the work is for when no minidl op encloses it.
GLUE = {"_accumulate": "gradient into .grad (Tensor._accumulate)",
        "run_backward": "autograd: summing branch gradients",
        "zero_grad": "zero_grad"}
AMP_FILE = os.path.join("minidl", "amp.py")


class Census:
    """Tallies the events fake_cupy reports: by (phase, op) for launches, by op for reads."""

    def __init__(self):
        self.phase = None
        self.launches = collections.Counter()     # (phase, op) -> count
        self.kinds = collections.Counter()        # (phase, category) -> count
        self.reads = collections.Counter()        # (phase, op) -> host reads of device values
        self.h2d = collections.Counter()          # (phase, op) -> host-to-device copies
        self.names = collections.Counter()        # (op, phase, category, name) -> count
        self.events = 0

    def __call__(self, category, name):
        if self.phase is None:                    # outside the counted step
            return
        self.events += 1
        op = attribute(sys._getframe(2))
        if category == "d2h":
            self.reads[self.phase, op] += 1
        elif category == "h2d":
            self.h2d[self.phase, op] += 1
        else:
            self.launches[self.phase, op] += 1
            self.kinds[self.phase, category] += 1
            self.names[op, self.phase, category, name] += 1


def attribute(frame):
    """The op a device operation ran for: the innermost minidl Function on the stack, else
    the optimizer, the GradScaler, autocast's casts or the autograd glue around them."""
    while frame is not None:
        name = frame.f_code.co_name
        if name in GLUE:
            return GLUE[name]
        owner = frame.f_locals.get("self")
        if isinstance(owner, Function):
            return type(owner).__name__
        if isinstance(owner, Optimizer):
            return f"{type(owner).__name__} (optimizer step)"
        if isinstance(owner, amp.GradScaler):
            return "GradScaler"
        if frame.f_code.co_filename.endswith(AMP_FILE):
            return "autocast casts"
        frame = frame.f_back
    return "other"


def build_step(args):
    """The model, optimizer and one training step on the emulated GPU (as benchmark_gpu's)."""
    import seg.models
    minidl.manual_seed(0)
    model = seg.models.build("unet", 2, 1, depth=args.depth, features_root=args.features,
                             padding="same", batch_norm=args.batch_norm)
    model.to("gpu").train()
    make = {"adam": optim.Adam, "flat": optim.FlatAdam}[args.optimizer]
    opt = make(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    shape = (args.batch, 1, args.size, args.size)
    x = minidl.tensor(rng.standard_normal(shape, dtype=np.float32), device="gpu")
    target = minidl.tensor(rng.integers(0, 2, (args.batch, args.size, args.size)), device="gpu")
    scaler = amp.GradScaler(enabled=args.amp == "fp16")
    low = {"bf16": "bfloat16", "fp16": "float16"}.get(args.amp)

    def step(census):
        census.phase = "optimizer"
        opt.zero_grad()
        with amp.autocast("gpu", dtype=low or "bfloat16", enabled=low is not None):
            census.phase = "forward"
            logits = model(x)
            census.phase = "loss"
            loss = F.cross_entropy(logits, target)
        census.phase = "backward"
        scaler.scale(loss).backward()
        census.phase = "optimizer"
        scaler.step(opt)
        scaler.update()
        census.phase = None
    return step


def run(args):
    """The census of one warm step -> a dict of plain numbers (see `report`)."""
    step = build_step(args)
    warm = Census()
    step(warm)                            # cold: optimizer state, kernel compilation
    census = Census()
    fake_cupy.census = census
    try:
        step(census)
    finally:
        fake_cupy.census = None
    ops = sorted({op for _, op in census.launches} | {op for _, op in census.reads})
    table = {op: {ph: census.launches[ph, op] for ph in PHASES} for op in ops}
    return dict(
        model=dict(depth=args.depth, features=args.features, batch=args.batch, size=args.size,
                   batch_norm=args.batch_norm, amp=args.amp, optimizer=args.optimizer),
        events=census.events,
        launches_by_phase={ph: sum(census.launches[ph, op] for op in ops) for ph in PHASES},
        launches_by_op=table,
        launches_by_kind={kind: {ph: census.kinds[ph, kind] for ph in PHASES}
                          for kind in sorted({k for _, k in census.kinds})},
        host_reads={f"{ph}: {op}": n for (ph, op), n in sorted(census.reads.items())},
        host_to_device={f"{ph}: {op}": n for (ph, op), n in sorted(census.h2d.items())},
        operations={" | ".join(key): n for key, n in sorted(census.names.items())},
    )


def report(result):
    """The census as text: launches per op and phase, per kind, and the host reads."""
    m = result["model"]
    lines = [f"U-Net depth {m['depth']}, {m['features']} features, batch_norm={m['batch_norm']}, "
             f"batch {m['batch']} x {m['size']}x{m['size']}, amp {m['amp']}, "
             f"{m['optimizer']} Adam: one warm training step on the CuPy emulation",
             "(emulated launch count, not a timing; see this script's docstring)", ""]
    width = max([len(op) for op in result["launches_by_op"]] + [24])
    head = f"{'launches':<{width}}" + "".join(f"{ph:>10}" for ph in PHASES) + f"{'total':>10}"
    lines += [head, "-" * len(head)]

    def row(label, counts):
        return (f"{label:<{width}}" + "".join(f"{counts[ph]:>10}" for ph in PHASES)
                + f"{sum(counts.values()):>10}")
    by_op = sorted(result["launches_by_op"].items(), key=lambda kv: -sum(kv[1].values()))
    lines += [row(op, counts) for op, counts in by_op if sum(counts.values())]
    lines += ["-" * len(head), row("total", result["launches_by_phase"]), ""]
    lines += [f"{'by kind':<{width}}"]
    lines += [row(kind, counts) for kind, counts in result["launches_by_kind"].items()]
    reads = result["host_reads"]
    lines += ["", f"host reads of device values (each a synchronisation): {sum(reads.values())}"]
    lines += [f"  {where}: {n}" for where, n in reads.items()]
    h2d = result["host_to_device"]
    if h2d:
        lines += [f"host-to-device copies: {sum(h2d.values())}"]
        lines += [f"  {where}: {n}" for where, n in h2d.items()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32,
                        help="image side (the count does not depend on it below 512 MiB of "
                             "columns per layer; small is fast on the emulation)")
    parser.add_argument("--batch-norm", action="store_true",
                        help="BatchNormReLU2d after every 3x3 conv (benchmark_gpu's U-Net has none)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--optimizer", default="adam", choices=["adam", "flat"],
                        help="adam: one update per parameter; flat: FlatAdam, one for all")
    parser.add_argument("--json", help="also write the census to this JSON file")
    parser.add_argument("--detail", action="store_true",
                        help="also list every operation (op | phase | kind | name: count)")
    args = parser.parse_args(argv)
    if args.size < 2 ** (args.depth - 1):
        parser.error(f"--size must be at least 2**(depth - 1) = {2 ** (args.depth - 1)} for a "
                     f"U-Net of depth {args.depth}.")
    result = run(args)
    print(report(result))
    if args.detail:
        print("\noperations (op | phase | kind | name: count)")
        print("\n".join(f"  {key}: {n}" for key, n in result["operations"].items()))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()

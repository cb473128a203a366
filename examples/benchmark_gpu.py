"""GPU benchmark: how fast does minidl train a U-Net on CuPy, and how close to the hardware is it?

    PYTHONPATH=. python3 examples/benchmark_gpu.py                 # U-Net depth 5, 64 features
    PYTHONPATH=. python3 examples/benchmark_gpu.py --size 128 --batch 4 --json out.json
    PYTHONPATH=. python3 examples/benchmark_gpu.py --matmul-precision high --amp bf16 \
        --conv-algorithm implicit_gemm        # the settings the step runs in (default: strict)

Measures, on one GPU:

1. A full training step (forward, cross-entropy, backward, Adam) of
   seg.models.build("unet", 2, 1, depth=5, features_root=64, padding="same") on a batch of
   8 images of 256x256: images per second and the achieved TFLOP/s. FLOPs are counted from
   the convolution shapes seen in one forward pass: 2 * multiply-adds per conv, times 3 for
   forward + the two backward products (input and weight gradient). Everything that is not
   a convolution (ReLU, pooling, BN, the loss, Adam) is not counted: it is cheap in FLOPs but
   not in time, which is part of what the gap to the GEMM rate shows.
2. For every distinct convolution of that network: the forward + backward FLOP rate of
   F.conv2d / F.conv_transpose2d, next to the rate of plain CuPy float32 matmuls of the
   same GEMM shapes (what im2col + GEMM would reach if im2col and col2im were free).
3. The GPU's float32 matmul rate on a large square product, measured in the same run, as the
   ceiling for everything above.
4. Peak GPU memory of one training step: the CuPy memory pool's high-water mark of bytes in
   use (tracked with a memory hook) and the bytes the pool holds from the driver.

5. A breakdown of one minidl step by category (GEMMs, im2col/col2im, batch norm, pooling,
   activations, loss, optimizer, other kernels + idle gaps), from CUDA events around the
   functions doing the work (examples/torch_compare.py, Breakdown).
6. Per distinct conv, on the GPU: the implicit-GEMM kernels (kernels/implicit_gemm.py) in the
   --implicit-gemm precisions, forward + backward time and the forward's error against F.conv2d.
7. With --compare-torch, where PyTorch is importable (never a dependency): the same U-Net,
   batch, loss and optimizer in PyTorch, timed in the same run in float32-strict, TF32 and
   bfloat16 autocast, and the minidl/PyTorch ratios. minidl's row of each mode: float32 =
   precision "highest"; TF32 = minidl.set_float32_matmul_precision("high"); bf16 =
   minidl.amp.autocast("gpu", "bfloat16"); TF32 and bf16 each with the conv plan's automatic
   choice (the implicit-GEMM kernels) and with --conv-algorithm's im2col for comparison.
   With --cuda-graph, each of minidl's rows is also timed as a CUDA-graph replay of the whole
   step (minidl.cuda.make_graphed_step, Adam(capturable=True)), against PyTorch eager.

The step itself runs in the settings --matmul-precision (highest | high), --amp (none | bf16 |
fp16: autocast, with a GradScaler for fp16 as in PyTorch's recipe) and --conv-algorithm
(minidl.backends.conv_algorithm: auto | implicit_gemm | im2col | ...).

Timing uses CUDA events recorded on the stream (kernels run asynchronously; a host clock
would measure launches, not work), after warm-up steps that also compile every kernel.
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import minidl  # noqa: E402
from minidl import amp, backend, optim  # noqa: E402
from minidl import functional as F  # noqa: E402
from minidl.ops import conv as conv_ops, conv_plan  # noqa: E402
import torch_compare  # noqa: E402  (examples/torch_compare.py, next to this file)


# ---------------------------------------------------------------------------- timing helpers
class Clock:
    """Times work on one device: CUDA events on the GPU, the host clock on the CPU.

    On the GPU kernels run asynchronously, so a host clock would measure launches, not work;
    events recorded on the stream before and after, then synchronised, measure the work.
    (--device cpu exists only to smoke-test this script on a machine without a GPU.)
    """

    def __init__(self, device):
        self.device = device
        self.xp = backend.array_module(device)
        self.cp = self.xp if device == "gpu" else None

    def sync(self):
        if self.cp is not None:
            self.cp.cuda.Stream.null.synchronize()

    def time(self, fn, warmup=1, iters=3):
        """Median seconds of fn() and the list of all timings."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.cp is None:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                continue
            start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(self.cp.cuda.get_elapsed_time(start, end) / 1e3)
        return statistics.median(times), times

    def randn(self, *shape):
        return self.xp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))


def matmul_rate(clock, n):
    """float32 TFLOP/s of an n x n x n matmul (on the GPU CuPy's default math mode: no TF32)."""
    a, b = clock.randn(n, n), clock.randn(n, n)
    t, _ = clock.time(lambda: a @ b, warmup=2, iters=5)
    return 2 * n ** 3 / t / 1e12


# ---------------------------------------------------------------------------- FLOP counting
class ConvRecorder:
    """Wraps the Conv2d / ConvTranspose2d Functions to record each call's shapes and geometry."""

    def __init__(self):
        self.layers = []

    def __enter__(self):
        self._saved = conv_ops.Conv2d.forward, conv_ops.ConvTranspose2d.forward
        recorder = self

        def record(kind, original):
            def forward(fn, x, weight, bias=None):
                recorder.layers.append(dict(kind=kind, x=tuple(x.shape), w=tuple(weight.shape),
                                            geom=fn.geom, bias=bias is not None,
                                            out=getattr(fn, "out_shape", None)))
                return original(fn, x, weight, bias)
            return forward
        conv_ops.Conv2d.forward = record("conv", self._saved[0])
        conv_ops.ConvTranspose2d.forward = record("convT", self._saved[1])
        return self

    def __exit__(self, *exc):
        conv_ops.Conv2d.forward, conv_ops.ConvTranspose2d.forward = self._saved


def conv_macs(layer):
    """Multiply-adds of one forward convolution (a transposed conv: of its adjoint conv)."""
    g = layer["geom"]
    if layer["kind"] == "conv":
        n, c_in = layer["x"][:2]
        c_out, c_in_g, kh, kw = layer["w"]
        return n * c_out * g.ho * g.wo * c_in_g * kh * kw
    # conv_transpose2d with weight (C_in, C_out/G, kh, kw) on x (N, C_in, h, w): every input
    # pixel scatters a (C_out/G, kh, kw) patch, so MACs = N * h * w * C_in * C_out/G * kh * kw.
    n, c_in, h, w = layer["x"]
    _, c_out_g, kh, kw = layer["w"]
    return n * h * w * c_in * c_out_g * kh * kw


def gemm_shapes(layer):
    """(groups, M, K, L) of the GEMMs of im2col + GEMM for this layer's (adjoint) convolution:
    forward (M x K) @ (K x L), input gradient (K x M) @ (M x L), weight gradient (M x L) @ (L x K),
    each once per group."""
    g = layer["geom"]
    n = layer["x"][0]
    if layer["kind"] == "conv":
        c_in, c_out = layer["x"][1], layer["w"][0]
    else:   # conv_transpose2d is the adjoint of a conv from its output (C_out) to its input (C_in)
        c_in, c_out = layer["w"][1] * g.groups, layer["x"][1]
    k = c_in // g.groups * g.kh * g.kw
    return g.groups, c_out // g.groups, k, n * g.ho * g.wo


# ---------------------------------------------------------------------------- the benchmark
def training_step_benchmark(clock, args):
    import seg.models
    dev = clock.device
    minidl.manual_seed(0)
    model = seg.models.build("unet", 2, 1, depth=args.depth, features_root=args.features,
                             padding="same")
    model.to(dev).train()
    opt = optim.Adam(model.parameters(), lr=1e-4)
    x = minidl.randn(args.batch, 1, args.size, args.size, device=dev)
    target = minidl.randint(0, 2, (args.batch, args.size, args.size), device=dev)
    step = make_step(model, opt, x, target, args.amp)

    with ConvRecorder() as rec:          # one forward to see every convolution's shapes
        with minidl.no_grad():
            model(x)
    layers = rec.layers
    train_flops = 3 * sum(2 * conv_macs(layer) for layer in layers)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    clock.sync()
    warmup_s = time.perf_counter() - t0

    peak_used = pool_total = None
    if clock.cp is not None:
        # Peak memory of one step: the high-water mark of bytes in use in CuPy's pool.
        _, peak_used = backend.gpu_peak_memory(step)
        pool_total = clock.cp.get_default_memory_pool().total_bytes()

    median, times = clock.time(step, warmup=0, iters=args.iters)
    loss = float(step().item())
    breakdown = step_breakdown(clock, step, opt)
    return dict(
        model=f"unet depth={args.depth} features_root={args.features} padding=same",
        device=dev, batch=args.batch, size=args.size, conv_layers=len(layers),
        train_step_s=median, train_step_all_s=times, warmup_s=warmup_s,
        images_per_s=args.batch / median,
        conv_gflop_per_step=train_flops / 1e9,
        achieved_tflops=train_flops / median / 1e12,
        peak_used_bytes=peak_used, pool_total_bytes=pool_total, final_loss=loss,
        breakdown_ms={k: v * 1e3 for k, v in breakdown.items()},
    ), layers, step


def make_batch_step(model, opt, device, amp_dtype=None):
    """One training step (forward, CE, backward, Adam) as a function of the batch (x, target);
    amp_dtype "bf16" or "fp16" runs forward and loss under autocast on `device` (fp16 with a
    GradScaler)."""
    scaler = amp.GradScaler(enabled=amp_dtype == "fp16")

    def batch_step(x, target):
        opt.zero_grad()
        with amp.autocast(device, dtype=amp_dtype or "bf16", enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss
    return batch_step


def make_step(model, opt, x, target, amp_dtype=None):
    """make_batch_step on a fixed batch: a function of nothing, for the timers."""
    batch_step = make_batch_step(model, opt, backend.device_of(x.data), amp_dtype)

    def step():
        return batch_step(x, target)
    step.model, step.opt, step.x, step.target = model, opt, x, target
    return step


def graph_replay_step(step, amp_dtype=None):
    """step's model trained by a CUDA-graph replay (minidl.cuda.make_graphed_step) of the same
    step, with a capturable Adam (its step count on the device; fresh moments). Each call
    copies the batch into the graph's static inputs and launches the graph, as --cuda-graph
    does in training. Returns (a function of nothing, None), or (None, the reason) where
    the step cannot be captured."""
    from minidl import cuda
    opt = optim.Adam(step.model.parameters(), lr=1e-4, capturable=True)
    batch_step = make_batch_step(step.model, opt, backend.device_of(step.x.data), amp_dtype)
    with warnings.catch_warnings():          # the reason is returned (and printed) instead
        warnings.simplefilter("ignore", RuntimeWarning)
        graphed = cuda.make_graphed_step(batch_step, (step.x, step.target), optimizer=opt,
                                         fallback=True)
    if not graphed.graphed:
        return None, graphed.reason

    def replay():
        return graphed(step.x, step.target)
    return replay, None


class settings_of:
    """A with-block in one benchmark setting: matmul precision and conv algorithm (restored
    after)."""

    def __init__(self, matmul_precision, conv_algorithm):
        self.matmul, self.algorithm = matmul_precision, conv_algorithm

    def __enter__(self):
        self.saved = minidl.get_float32_matmul_precision(), minidl.backends.conv_algorithm
        minidl.set_float32_matmul_precision(self.matmul)
        minidl.backends.conv_algorithm = self.algorithm

    def __exit__(self, *exc):
        minidl.set_float32_matmul_precision(self.saved[0])
        minidl.backends.conv_algorithm = self.saved[1]


# minidl's settings for each of PyTorch's modes: (label, matmul precision, amp, conv algorithm)
MINIDL_MODES = {
    "float32": [("strict", "highest", None, "auto")],
    "tf32": [("high, auto", "high", None, "auto"), ("high, im2col", "high", None, "im2col")],
    "bf16": [("bf16, auto", "highest", "bf16", "auto"),
             ("bf16, im2col", "highest", "bf16", "im2col")],
}


BREAKDOWN = ("GEMMs", "im2col/col2im", "implicit GEMM", "batch norm", "pooling", "activations",
             "loss", "optimizer")


def step_breakdown(clock, step, opt):
    """{category: seconds} of one step (the second of two, the first warms the wrappers)."""
    import importlib
    from minidl.ops import activation, loss, normalization
    bundle = importlib.import_module("kernels.gpu" if clock.cp is not None else "kernels.cpu")
    bd = torch_compare.Breakdown(clock)
    bd.wrap(clock.xp, "matmul", "GEMMs")
    for name in ("im2col", "col2im", "im2col_rows", "col2im_rows"):
        bd.wrap(bundle, name, "im2col/col2im")
    from kernels import implicit_gemm
    for name in ("conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad"):
        bd.wrap(implicit_gemm, name, "implicit GEMM")     # the conv plan's implicit-GEMM route
    for cls in (normalization.BatchNorm, activation.ReLU, loss.CrossEntropy):
        category = {"BatchNorm": "batch norm", "ReLU": "activations"}.get(cls.__name__, "loss")
        for name in ("forward", "backward"):
            bd.wrap(cls, name, category)
    for name in ("maxpool2d_forward", "maxpool2d_backward"):
        bd.wrap(bundle, name, "pooling")
    for name in ("bias_relu", "relu_bias_backward"):
        bd.wrap(bundle, name, "activations")     # the epilogue of ConvReLU2d (conv2d_relu)
    bd.wrap(opt, "step", "optimizer")
    try:
        bd.measure(step, BREAKDOWN)
        return bd.measure(step, BREAKDOWN)
    finally:
        bd.restore()
        if "step" in vars(opt):
            del opt.step                 # back to the class's method


def minidl_modes(cuda_graph=False):
    """MINIDL_MODES, with each row also as a CUDA-graph replay (label + ", graph") when
    cuda_graph: {mode: [(label, matmul precision, amp, conv algorithm, graphed), ...]}."""
    return {mode: [row + (graphed,) for row in rows
                   for graphed in ((False, True) if cuda_graph else (False,))]
            for mode, rows in MINIDL_MODES.items()}


def mode_label(label, graphed):
    return label + ", graph" if graphed else label


def minidl_mode_times(clock, step, iters, cuda_graph=False):
    """{label: seconds of minidl's step} in each setting of minidl_modes() (a failing setting,
    e.g. kernels NVRTC cannot compile or a step that cannot be captured, prints its reason
    and gives None)."""
    out = {}
    for mode, rows in minidl_modes(cuda_graph).items():
        for label, matmul, amp_dtype, algorithm, graphed in rows:
            label = mode_label(label, graphed)
            try:
                with settings_of(matmul, algorithm):
                    if graphed:
                        mode_step, reason = graph_replay_step(step, amp_dtype)
                    else:
                        mode_step, reason = make_step(step.model, step.opt, step.x,
                                                      step.target, amp_dtype), None
                    if mode_step is None:
                        raise RuntimeError(f"not captured: {reason}")
                    out[label] = clock.time(mode_step, warmup=1, iters=iters)[0]
            except RuntimeError as exc:
                print(f"  minidl {label}: {str(exc).splitlines()[0]}")
                out[label] = None
    return out


def compare_torch(clock, args, step):
    """{mode: {"torch": s, minidl label: s or None}}: PyTorch's step in each mode next to
    minidl's in the matching settings (MINIDL_MODES)."""
    try:
        import torch
    except ImportError:
        print("\n  --compare-torch: PyTorch is not importable here; comparison skipped")
        return None
    if clock.cp is None or not torch.cuda.is_available():
        print("\n  --compare-torch: needs a GPU visible to both CuPy and PyTorch; skipped")
        return None
    cuda_graph = getattr(args, "cuda_graph", False)
    mine = minidl_mode_times(clock, step, args.iters, cuda_graph)
    out = {}
    print(f"\n  vs PyTorch {torch.__version__} (same U-Net, batch, CE, Adam), training step:")
    for mode in torch_compare.TORCH_MODES:
        t = torch_compare.torch_step_time(torch, args.depth, args.features, args.batch, args.size,
                                          mode, iters=args.iters)
        out[mode] = {"torch": t}
        for label, *_, graphed in minidl_modes(cuda_graph)[mode]:
            label = mode_label(label, graphed)
            m = out[mode][label] = mine[label]
            shown = f"{m * 1e3:8.1f} ms   minidl/PyTorch {m / t:5.2f}x" if m else "  (failed)"
            print(f"  {mode:8s} PyTorch {t * 1e3:8.1f} ms   minidl ({label:20s}) {shown}")
    return out


def per_layer_benchmark(clock, layers, iters, implicit=()):
    """Forward + backward of each distinct convolution, and the same GEMMs as plain matmuls
    (and the implicit-GEMM kernels in each precision of `implicit`, on the GPU)."""
    rows = {}
    for layer in layers:
        g = layer["geom"]
        key = (layer["kind"], layer["x"], layer["w"], g.args(), g.ho, g.wo, g.groups)
        if key not in rows:
            rows[key] = _measure_layer(clock, layer, iters)
            if clock.cp is not None:
                for precision in implicit:
                    rows[key].update(_measure_implicit(clock, layer, iters, precision))
        rows[key]["count"] += 1          # how often the network runs this shape, for the totals
    return list(rows.values())


def all_layers_rate(rows):
    """Forward + backward of every conv of the network (each distinct one times its count):
    (TFLOP/s of minidl, TFLOP/s of the same GEMMs alone)."""
    flops = sum(r["count"] * r["flops"] for r in rows)
    conv_s = sum(r["count"] * r["conv_ms"] for r in rows) / 1e3
    gemm_s = sum(r["count"] * r["gemm_ms"] for r in rows) / 1e3
    return flops / conv_s / 1e12, flops / gemm_s / 1e12


def layer_op(layer):
    """(Function class, its parameters, output shape) that re-runs one recorded conv layer."""
    g = layer["geom"]
    if layer["kind"] == "conv":
        return conv_ops.Conv2d, dict(geom=g), (layer["x"][0], layer["w"][0], g.ho, g.wo)
    return conv_ops.ConvTranspose2d, dict(geom=g, out_shape=layer["out"]), layer["out"]


def _measure_layer(clock, layer, iters):
    x = minidl.tensor(clock.randn(*layer["x"]), requires_grad=True)
    w = minidl.tensor(clock.randn(*layer["w"]), requires_grad=True)
    op, params, out_shape = layer_op(layer)
    gy = clock.xp.ones(out_shape, dtype=np.float32)

    def run():
        x.grad = w.grad = None
        op.apply(x, w, **params).backward(gy)
    t_conv, _ = clock.time(run, warmup=1, iters=iters)
    flops = 3 * 2 * conv_macs(layer)

    groups, m, k, length = gemm_shapes(layer)
    # 2-D operands when there is one group: cuBLAS then takes every transpose as a flag (a
    # batched product of transposed views may copy its operand first, and is no ceiling).
    lead = (groups,) if groups > 1 else ()
    a, cols, gout = (clock.randn(*lead, m, k), clock.randn(*lead, k, length),
                     clock.randn(*lead, m, length))

    def t(v):
        return v.swapaxes(-1, -2)

    def gemms():
        a @ cols                                  # forward
        t(a) @ gout                               # input gradient (before col2im)
        gout @ t(cols)                            # weight gradient
    t_gemm, _ = clock.time(gemms, warmup=1, iters=iters)
    return dict(kind=layer["kind"], x=layer["x"], w=layer["w"], stride=(layer["geom"].sh, layer["geom"].sw),
                count=0, flops=flops, conv_ms=t_conv * 1e3, conv_tflops=flops / t_conv / 1e12,
                gemm_ms=t_gemm * 1e3, gemm_tflops=flops / t_gemm / 1e12)


def implicit_gemm_step(layer, x, w, gy, precision):
    """Forward, input gradient and weight gradient of one recorded layer with the implicit-GEMM
    kernels (kernels/implicit_gemm.py): returns the forward output."""
    from kernels import implicit_gemm as ig
    g = layer["geom"]
    geo = (g.sh, g.sw, g.ph, g.pw, g.dh, g.dw)
    if layer["kind"] == "conv":
        y = ig.conv2d_forward(x, w, *geo, g.ho, g.wo, g.groups, precision)
        ig.conv2d_input_grad(gy, w, x.shape[2], x.shape[3], *geo, g.groups, precision)
        ig.conv2d_weight_grad(x, gy, g.kh, g.kw, *geo, g.groups, precision)
        return y
    y = ig.conv_transpose2d_forward(x, w, layer["out"][2:], *geo, g.groups, precision)
    ig.conv_transpose2d_input_grad(gy, w, *geo, g.groups, x.shape[2:], precision)
    ig.conv_transpose2d_weight_grad(x, gy, g.kh, g.kw, *geo, g.groups, precision)
    return y


def _measure_implicit(clock, layer, iters, precision):
    """{implicit_<precision>_ms, implicit_<precision>_err}: the implicit-GEMM kernels' forward +
    backward time, and the forward's largest error relative to minidl's conv (max |y|)."""
    x, w = clock.randn(*layer["x"]), clock.randn(*layer["w"])
    op, params, out_shape = layer_op(layer)
    gy = clock.randn(*out_shape)
    key = f"implicit_{precision}"
    try:
        t, _ = clock.time(lambda: implicit_gemm_step(layer, x, w, gy, precision), warmup=1, iters=iters)
    except RuntimeError as exc:               # e.g. a tensor-core mode NVRTC could not compile
        print(f"  implicit-GEMM {precision}: {str(exc).splitlines()[0]}")
        return {key + "_ms": None, key + "_err": None}
    y = implicit_gemm_step(layer, x, w, gy, precision)
    with minidl.no_grad():
        ref = op.apply(minidl.tensor(x), minidl.tensor(w), **params).data
    err = float(clock.xp.abs(y - ref).max() / max(float(clock.xp.abs(ref).max()), 1e-30))
    return {key + "_ms": t * 1e3, key + "_err": err}


def write_json(path, result):
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--layer-iters", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--skip-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument("--device", default="gpu", choices=["gpu", "cpu"],
                        help="cpu only to smoke-test the script on a machine without a GPU")
    parser.add_argument("--implicit-gemm", default="highest,tf32,bf16",
                        help="precisions of the implicit-GEMM kernels to time per conv on the GPU "
                             "(comma-separated; '' for none)")
    parser.add_argument("--matmul-precision", default="highest", choices=["highest", "high"],
                        help="minidl.set_float32_matmul_precision for the step (high: TF32)")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                        help="run the step under minidl.amp.autocast in this dtype")
    parser.add_argument("--conv-algorithm", default="auto", choices=list(conv_plan.ALGORITHMS),
                        help="minidl.backends.conv_algorithm for the step")
    parser.add_argument("--compare-torch", action="store_true",
                        help="also time the same U-Net in PyTorch (when importable) and print ratios")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the step as a CUDA-graph replay (minidl.cuda.make_graphed_step), "
                             "and with --compare-torch each of minidl's modes")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.amp = None if args.amp == "none" else args.amp
    with settings_of(args.matmul_precision, args.conv_algorithm):
        return run(args)


def run(args):
    clock = Clock(args.device)
    if clock.cp is not None:
        cp = clock.cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"GPU: {name}, CuPy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}")
    else:
        name = "cpu"
    with settings_of("highest", args.conv_algorithm):     # the exact float32 ceiling
        peak = matmul_rate(clock, args.matmul_size)
    print(f"float32 matmul {args.matmul_size}^3 on {args.device}: {peak:.3f} TFLOP/s")

    result, layers, step = training_step_benchmark(clock, args)
    result["gpu"] = name
    result["matmul_fp32_tflops"] = peak
    result.update(matmul_precision=args.matmul_precision, amp=args.amp,
                  conv_algorithm=args.conv_algorithm)
    print(f"\n{result['model']}, batch {args.batch} x {args.size}x{args.size}, Adam, on {args.device}"
          f" (matmul precision {args.matmul_precision}, amp {args.amp or 'none'}, conv algorithm "
          f"{args.conv_algorithm}):")
    print(f"  training step      {result['train_step_s'] * 1e3:8.1f} ms   "
          f"({result['images_per_s']:.1f} images/s; warm-up incl. compiling {result['warmup_s']:.1f} s)")
    print(f"  conv FLOPs/step    {result['conv_gflop_per_step']:8.1f} GFLOP  ->  "
          f"{result['achieved_tflops']:.3f} TFLOP/s = {100 * result['achieved_tflops'] / peak:.0f}% "
          "of the matmul rate")
    if result["peak_used_bytes"] is not None:
        print(f"  peak GPU memory    {result['peak_used_bytes'] / 2**30:8.2f} GiB in use "
              f"(pool holds {result['pool_total_bytes'] / 2**30:.2f} GiB)")

    print("  breakdown of one step (CUDA events around the work; 'other + idle': the rest):")
    for k, v in result["breakdown_ms"].items():
        print(f"    {k:14s} {v:8.2f} ms")
    if args.cuda_graph:
        replay, reason = graph_replay_step(step, args.amp)
        result["graph_step_s"] = None if replay is None else clock.time(
            replay, warmup=1, iters=args.iters)[0]
        if replay is None:
            print(f"  CUDA graph: not captured ({reason})")
        else:
            print(f"  step as a CUDA-graph replay {result['graph_step_s'] * 1e3:8.1f} ms "
                  f"({args.batch / result['graph_step_s']:.1f} images/s)")
    if args.compare_torch:
        result["torch"] = compare_torch(clock, args, step)
    # Written now and again at the end: the per-conv table below runs new kernels last, and a
    # crash there should not lose the figures above.
    write_json(args.json, result)

    if not args.skip_layers:
        implicit = [p for p in args.implicit_gemm.split(",") if p]
        rows = per_layer_benchmark(clock, layers, args.layer_iters, implicit)
        result["layers"] = rows
        print("\n  per distinct conv, forward + backward:            minidl             same GEMMs")
        for r in rows:
            print(f"  {r['kind']:5s} x{str(r['x']):22s} w{str(r['w']):20s} "
                  f"{r['conv_ms']:8.2f} ms {r['conv_tflops']:6.2f} TF/s  "
                  f"{r['gemm_ms']:8.2f} ms {r['gemm_tflops']:6.2f} TF/s  "
                  f"({100 * r['conv_tflops'] / max(r['gemm_tflops'], 1e-12):.0f}%)")
            for p in implicit:
                ms, err = r.get(f"implicit_{p}_ms"), r.get(f"implicit_{p}_err")
                if ms is not None:
                    print(f"        implicit-GEMM {p:8s} {ms:8.2f} ms "
                          f"{r['flops'] / ms / 1e9:6.2f} TF/s  (forward error {err:.1e} of max |y|)")
        for p in implicit:
            if rows and all(r.get(f"implicit_{p}_ms") is not None for r in rows):
                total = sum(r["count"] * r[f"implicit_{p}_ms"] for r in rows)
                mine = sum(r["count"] * r["conv_ms"] for r in rows)
                result[f"all_convs_implicit_{p}_ms"] = total
                print(f"  all convs, forward + backward, implicit-GEMM {p}: {total:.1f} ms "
                      f"(F.conv2d/conv_transpose2d today: {mine:.1f} ms)")
        conv_rate, gemm_rate = all_layers_rate(rows)
        result.update(all_convs_fwd_bwd_tflops=conv_rate, all_convs_same_gemms_tflops=gemm_rate,
                      conv_to_matmul_ratio=conv_rate / peak)
        print(f"\n  all {len(layers)} convs, forward + backward: {conv_rate:.2f} TFLOP/s = "
              f"{100 * conv_rate / peak:.0f}% of the {args.matmul_size}^3 matmul rate "
              f"({100 * conv_rate / max(gemm_rate, 1e-12):.0f}% of their own GEMMs' "
              f"{gemm_rate:.2f} TFLOP/s)")
    write_json(args.json, result)
    print("\nRESULT " + json.dumps({k: v for k, v in result.items() if k != "layers"}, default=str))
    return result


if __name__ == "__main__":
    main()

"""Benchmark: how close does minidl get to the machine's matrix-multiply speed?

Every convolution is im2col (or col2im) plus one GEMM (see minidl/ops/conv.py), so the best
a conv can do is the speed of float32 GEMM on the same matrix shapes. Two models:

    big      U-Net depth 5, 64 features (64 ... 1024), 1 x 1 x 256 x 256, padding "same",
             no BatchNorm (the paper's network on a size "same" padding allows), 2 classes
    default  the example's model (examples/train_unet.py, seg.setup.TRAIN_DEFAULTS): U-Net depth
             4, 8 root features, BatchNorm, padding "same", batch 4 x 1 x 64 x 88, 2 classes

Sections (printed as tables, and written to --json, default runs/benchmark.json):

1. GEMM     float32 GEMM GFLOP/s for the matrix shapes every measured layer needs (the
            baseline "1.00x" below); GEMM shapes are M x K x N of the forward product.
2. layers   per conv layer (recorded from one forward pass of the model): forward and
            forward + backward GFLOP/s and their ratio to the same GEMMs. FLOPs from the
            layer shape: 2 * multiply-adds = 2 * C_out * C_in*k*k * N*H_out*W_out forward;
            forward + backward is 3x that (the input gradient and the weight gradient).
3. step     whole training steps (forward, loss, backward, Adam): time, achieved GFLOP/s
            (conv FLOPs only; ReLU, pooling, BN, loss and Adam count as overhead), ratio to
            the time of the same products as plain GEMMs (timed interleaved with the step),
            and the process's peak RSS after the step.
4. cold     a fresh Python process (subprocess) importing minidl and running the first
            training step of the default model: with Numba's on-disk cache warm, and with
            NUMBA_CACHE_DIR pointing at an empty temporary folder (everything compiled).
5. overhead microseconds per op (forward, and forward + backward) on tiny tensors: the cost
            of Python, the autograd graph and the kernel dispatch, not of arithmetic.

Timings are the best of --repeat runs after a warm-up (training steps: of as many rounds as
fit in STEP_SECONDS); a layer's conv and GEMM runs are interleaved (a, b, a, b, ...) so
both see the same load on a shared machine. The load average is printed with the figures.

Run:  python examples/benchmark.py [--quick] [--repeat 3] [--json runs/benchmark.json]
      python examples/benchmark.py --device gpu     # runs examples/benchmark_gpu.py
Threads: minidl/__init__.py sets the policy (OpenBLAS's default of one thread per core, one
Numba thread, unless OPENBLAS_NUM_THREADS / NUMBA_NUM_THREADS are set); compare e.g. with
OPENBLAS_NUM_THREADS=1 python examples/benchmark.py.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minidl  # noqa: E402  (first: it sets the Numba thread policy before Numba loads)
import numpy as np  # noqa: E402
from minidl import functional as F  # noqa: E402
from minidl import optim  # noqa: E402
from minidl.ops import conv_plan  # noqa: E402
from benchmark_gpu import ConvRecorder, conv_macs, gemm_shapes, layer_op  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Smallest first: the peak RSS printed for a model is the process's peak so far.
MODELS = {   # name -> (builder options, input shape (N, C, H, W), loss)
    "default": (dict(depth=4, features_root=8, padding="same", batch_norm=True),
                (4, 1, 64, 88), "ce_dice"),
    "big": (dict(depth=5, features_root=64, padding="same", batch_norm=False),
            (1, 1, 256, 256), "ce"),
}
QUICK_BIG = (dict(depth=4, features_root=32, padding="same", batch_norm=False), (1, 1, 128, 128), "ce")
# A training step is timed (interleaved with its GEMMs) for at least this long: the default
# model's 40 ms step then gets about 40 rounds instead of 3, and one slow second of the
# shared VM no longer decides its figure (it did: 0.33x in one run against 0.62x in the next).
STEP_SECONDS = 4.0


# ---------------------------------------------------------------------------- helpers
def best_times(fns, repeat, min_seconds=0.02, min_total_seconds=0.0, max_repeat=50):
    """Best-of-`repeat` seconds per call of each function, the runs interleaved (a, b, c, a,
    b, c, ...) so that every function sees the same machine load.

    A warm-up call each first (it also sizes the sample); then every sample calls the
    function often enough to last about min_seconds, because one call of a sub-millisecond
    layer is mostly timer noise and first-touch page faults of freshly allocated buffers.
    min_total_seconds: keep taking rounds (up to max_repeat) until the timing has lasted
    that long, so that a cheap measurement is not decided by one slow second of a shared VM.
    """
    calls = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        calls.append(max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-9))))
    best = [float("inf")] * len(fns)
    start, rounds = time.perf_counter(), 0
    while rounds < repeat or (time.perf_counter() - start < min_total_seconds
                              and rounds < max_repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls[i]):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / calls[i])
        rounds += 1
    return best


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # KiB on Linux


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_model(options):
    import seg.models
    minidl.manual_seed(0)
    return seg.models.build("unet", num_classes=2, in_channels=1, **options)


def training_step(model, shape, loss_name):
    """A closure running one training step on random data (fixed seed)."""
    from seg.losses import get_loss
    rng = np.random.default_rng(0)
    x = minidl.tensor(rng.standard_normal(shape, dtype=np.float32))
    target = minidl.tensor(rng.integers(0, 2, (shape[0],) + shape[2:]))
    loss_fn = get_loss(loss_name)
    opt = optim.Adam(model.parameters(), lr=1e-4)
    model.train()

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        return loss
    return step, x


def record_layers(model, x):
    """The model's conv layers (benchmark_gpu.ConvRecorder's dicts) from one forward pass."""
    with ConvRecorder() as rec, minidl.no_grad():
        model(x)
    return rec.layers


# ---------------------------------------------------------------------------- 1 + 2: layers
def layer_closures(layer, rng):
    """(forward, forward+backward) closures running one recorded conv layer in minidl."""
    x = minidl.tensor(rng.standard_normal(layer["x"], dtype=np.float32), requires_grad=True)
    w = minidl.tensor(0.05 * rng.standard_normal(layer["w"], dtype=np.float32), requires_grad=True)
    op, params, out_shape = layer_op(layer)
    gy = rng.standard_normal(out_shape, dtype=np.float32)

    def forward():
        with minidl.no_grad():
            op.apply(x, w, **params)

    def step():
        x.grad = w.grad = None
        op.apply(x, w, **params).backward(gy)
    return forward, step


def gemm_closures(layer, rng):
    """(forward, forward+backward) closures doing the layer's products on random matrices:
    A (M,K) @ B (K,N); then also A.T @ G (input side) and G @ B.T (weight side)."""
    groups, m, k, n = gemm_shapes(layer)
    a = rng.standard_normal((groups, m, k), dtype=np.float32)[0]   # groups = 1 in both models
    b = rng.standard_normal((k, n), dtype=np.float32)
    g = rng.standard_normal((m, n), dtype=np.float32)
    return (lambda: a @ b, lambda: (a @ b, a.T @ g, g @ b.T))


def step_gemms(layers, rng):
    """One closure doing every conv product of a training step as plain float32 matmuls:
    each layer's forward, input-gradient and weight-gradient GEMM (repeated layers too)."""
    products = [gemm_closures(layer, rng)[1] for layer in layers]

    def run():
        for product in products:
            product()
    return run


def layer_table(name, layers, repeat, rng):
    """Time every distinct layer once; rows carry `count` for repeated shapes."""
    rows, seen = [], {}
    for layer in layers:
        g = layer["geom"]
        key = (layer["kind"], layer["x"], layer["w"], g.args(), g.ho, g.wo)
        if key in seen:
            seen[key]["count"] += 1
            continue
        flops = 2 * conv_macs(layer)
        conv_f, conv_fb, gemm_f, gemm_fb = best_times(
            layer_closures(layer, rng) + gemm_closures(layer, rng), repeat)
        _, m, k, n = gemm_shapes(layer)
        row = dict(model=name, kind=layer["kind"], x=list(layer["x"]), w=list(layer["w"]),
                   gemm_mkn=[m, k, n], count=1, fwd_gflop=flops / 1e9,
                   conv_fwd_s=conv_f, gemm_fwd_s=gemm_f, conv_fb_s=conv_fb, gemm_fb_s=gemm_fb,
                   conv_fwd_gflops=flops / conv_f / 1e9, gemm_fwd_gflops=flops / gemm_f / 1e9,
                   conv_fb_gflops=3 * flops / conv_fb / 1e9, gemm_fb_gflops=3 * flops / gemm_fb / 1e9,
                   fwd_ratio=gemm_f / conv_f, fb_ratio=gemm_fb / conv_fb)
        seen[key] = row
        rows.append(row)
    return rows


def print_layer_table(name, rows):
    head = (f"{'':2}{'kind':<6}{'input N x C x H x W':>22}{'C_out':>6} {'GEMM M x K x N':>22} "
            f"{'GFLOP':>7} {'fwd GF/s':>8} {'GEMM':>7} {'ratio':>5} {'f+b GF/s':>8} {'GEMM':>7} "
            f"{'ratio':>5}")
    print(f"\n[2] conv layers of the {name} model (x2 = two layers of that shape)")
    print(head)
    for r in rows:
        m, k, n = r["gemm_mkn"]
        c_out = r["w"][0] if r["kind"] == "conv" else r["w"][1]
        shape = "x".join(str(v) for v in r["x"]) + (f" x{r['count']}" if r["count"] > 1 else "")
        print(f"  {r['kind']:<6}{shape:>22}{c_out:>6} {m:>6} x{k:>6} x{n:>7} "
              f"{r['fwd_gflop']:>7.2f} {r['conv_fwd_gflops']:>8.1f} {r['gemm_fwd_gflops']:>7.1f} "
              f"{r['fwd_ratio']:>5.2f} {r['conv_fb_gflops']:>8.1f} {r['gemm_fb_gflops']:>7.1f} "
              f"{r['fb_ratio']:>5.2f}")
    t = totals(rows)
    print(f"  {'total':<6}{'':>28} {'':>22} {t['fwd_gflop']:>7.2f} {t['conv_fwd_gflops']:>8.1f} "
          f"{t['gemm_fwd_gflops']:>7.1f} {t['fwd_ratio']:>5.2f} {t['conv_fb_gflops']:>8.1f} "
          f"{t['gemm_fb_gflops']:>7.1f} {t['fb_ratio']:>5.2f}")
    return t


def totals(rows):
    """Totals over a model's layers (each distinct shape weighted by how often it occurs)."""
    s = {key: sum(r[key] * r["count"] for r in rows)
         for key in ("fwd_gflop", "conv_fwd_s", "gemm_fwd_s", "conv_fb_s", "gemm_fb_s")}
    return dict(s, conv_fwd_gflops=s["fwd_gflop"] / s["conv_fwd_s"],
                gemm_fwd_gflops=s["fwd_gflop"] / s["gemm_fwd_s"],
                conv_fb_gflops=3 * s["fwd_gflop"] / s["conv_fb_s"],
                gemm_fb_gflops=3 * s["fwd_gflop"] / s["gemm_fb_s"],
                fwd_ratio=s["gemm_fwd_s"] / s["conv_fwd_s"], fb_ratio=s["gemm_fb_s"] / s["conv_fb_s"])


# ---------------------------------------------------------------------------- 4: cold start
COLD_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
sys.argv = ["benchmark"]
import benchmark
model = benchmark.build_model(benchmark.MODELS["default"][0])
step, _ = benchmark.training_step(model, *benchmark.MODELS["default"][1:])
step()
"""


def cold_start(cache_dir):
    """Seconds from starting a fresh interpreter to the end of its first training step."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    code = COLD_SCRIPT.format(root=os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- 5: overhead
def op_overhead(repeat):
    """Microseconds per op on 4-element tensors (Python, graph and dispatch, not arithmetic):

    forward_us           one call of the op, recording the graph;
    forward_backward_us  op(x).sum().backward(): two ops, one graph walk, accumulation;
    chained_us           the forward + backward cost of one op inside a chain of CHAIN ops
                         ending in .sum().backward(): (T(chain) - T(no chain)) / CHAIN, so the
                         fixed cost of starting a backward pass is not charged to every op.
    """
    chain, calls, out = 20, 2000, {}
    a = minidl.tensor(np.ones(4, np.float32), requires_grad=True)
    b = minidl.tensor(np.ones(4, np.float32), requires_grad=True)
    a2 = minidl.tensor(np.ones((2, 2), np.float32), requires_grad=True)
    m = minidl.tensor(np.eye(2, dtype=np.float32), requires_grad=True)
    ops = {"add": (lambda y: y + b, a), "mul": (lambda y: y * b, a),
           "relu": (lambda y: F.relu(y), a), "sum": (lambda y: y.sum(), a),
           "matmul": (lambda y: y @ m, a2)}
    for name, (fn, x) in ops.items():
        def forward(fn=fn, x=x):
            for _ in range(calls):
                fn(x)

        def backward(fn=fn, x=x):
            for _ in range(calls // 4):
                fn(x).sum().backward()

        def chained(fn=fn, x=x, length=chain):
            for _ in range(calls // chain):
                y = x
                for _ in range(length):
                    y = fn(y)
                y.sum().backward()
        if name == "sum":      # a scalar does not chain
            t_f, t_b = best_times([forward, backward], repeat)
            per_op = None
        else:
            t_f, t_b, t_c, t_0 = best_times([forward, backward, chained,
                                             lambda c=chained: c(length=0)], repeat)
            per_op = (t_c - t_0) / (calls // chain) / chain * 1e6
        out[name] = dict(forward_us=t_f / calls * 1e6, forward_backward_us=t_b / (calls // 4) * 1e6,
                         chained_us=per_op)
    return out


# ---------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller big model (depth 4, 32 features, 128x128), fewer repeats")
    parser.add_argument("--repeat", type=int, default=None, help="best of N (default 3, quick 2)")
    parser.add_argument("--json", default=os.path.join(ROOT, "runs", "benchmark.json"))
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold-start runs")
    args = parser.parse_args(argv)
    if args.device == "gpu":     # one GPU benchmark, not two: hand over to benchmark_gpu
        import benchmark_gpu
        gpu_argv = ["--json", args.json] + (["--size", "128", "--batch", "2", "--iters", "2"]
                                            if args.quick else [])
        return benchmark_gpu.main(gpu_argv)
    repeat = args.repeat or (2 if args.quick else 3)
    models = dict(MODELS, big=QUICK_BIG) if args.quick else MODELS
    rng = np.random.default_rng(0)

    import numba
    load = os.getloadavg()
    info = dict(cpu=cpu_model(), cpus=os.cpu_count(), numba_threads=numba.get_num_threads(),
                openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
                load_average_start=load[0], column_buffer_mib=conv_plan.settings.column_buffer_bytes / 2**20,
                target_columns=conv_plan.settings.target_columns, repeat=repeat, quick=args.quick)
    print(f"{info['cpu']}, {info['cpus']} CPUs; Numba threads {info['numba_threads']}, "
          f"OPENBLAS_NUM_THREADS={info['openblas_threads']}; load average {load[0]:.1f} "
          f"(other processes skew timings); best of {repeat}")
    result = dict(machine=info, models={})

    # 3 first (training steps), so that the peak RSS is the step's, not the GEMM test data's.
    # The step and its GEMMs (every conv product of the step as plain matmuls) are timed
    # interleaved, so their ratio holds even when the machine's speed drifts (a shared VM
    # runs a burst fast and then slows down).
    steps = {}
    for name, (options, shape, loss_name) in models.items():
        model = build_model(options)
        step, x = training_step(model, shape, loss_name)
        layers = record_layers(model, x)
        step()
        rss = peak_rss_mib()
        t_step, t_gemm = best_times([step, step_gemms(layers, rng)], repeat,
                                    min_total_seconds=STEP_SECONDS)
        train_gflop = 3 * sum(2 * conv_macs(layer) for layer in layers) / 1e9
        steps[name] = dict(step_s=t_step, peak_rss_mib=rss, layers=layers,
                           train_gflop=train_gflop, step_gflops=train_gflop / t_step,
                           gemm_fb_s=t_gemm, step_ratio=t_gemm / t_step,
                           options=options, input=list(shape), loss=loss_name)
        del model, step, x

    for name in models:
        rows = layer_table(name, steps[name]["layers"], repeat, rng)
        t = print_layer_table(name, rows)
        s = steps[name]
        s.pop("layers")
        result["models"][name] = dict(layers=rows, layer_totals=t, step=s)

    print("\n[1] GEMM baseline per model: the same products as plain float32 matmuls")
    for name, m in result["models"].items():
        t = m["layer_totals"]
        print(f"  {name:<8} forward {t['gemm_fwd_gflops']:6.1f} GFLOP/s, forward+backward "
              f"{t['gemm_fb_gflops']:6.1f} GFLOP/s")
    print("\n[3] training step (forward, loss, backward, Adam)")
    print(f"  {'model':<8}{'input':>16}{'time s':>9}{'GFLOP':>8}{'GF/s':>7}{'GEMM s':>8}"
          f"{'ratio':>7}{'peak RSS MiB':>14}")
    for name, m in result["models"].items():
        s = m["step"]
        print(f"  {name:<8}{'x'.join(map(str, s['input'])):>16}{s['step_s']:>9.3f}"
              f"{s['train_gflop']:>8.1f}{s['step_gflops']:>7.1f}{s['gemm_fb_s']:>8.3f}"
              f"{s['step_ratio']:>7.2f}{s['peak_rss_mib']:>14.0f}")

    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as fresh, tempfile.TemporaryDirectory() as warm:
            cold = cold_start(fresh)
            cold_start(warm)                        # fills the cache ...
            cached = cold_start(warm)               # ... that this run loads
        result["cold_start"] = dict(no_cache_s=cold, cached_s=cached)
        print(f"\n[4] cold start to the end of the first training step (default model): "
              f"{cold:.1f} s without Numba's cache, {cached:.1f} s with it")

    result["overhead_us"] = op_overhead(repeat)
    print("\n[5] per-op overhead on 4-element tensors, microseconds")
    print("  op       forward   op().sum().backward()   forward+backward per op in a chain")
    for k, v in result["overhead_us"].items():
        chained = "" if v["chained_us"] is None else f"{v['chained_us']:8.1f}"
        print(f"  {k:8s} {v['forward_us']:7.1f} {v['forward_backward_us']:16.1f} {chained:>24s}")
    result["machine"]["load_average_end"] = os.getloadavg()[0]
    print(f"load average at the end {os.getloadavg()[0]:.1f}")

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

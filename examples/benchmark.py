"""Benchmark: how close do minidl's convolutions get to the machine's matrix-multiply speed?

Every convolution here is im2col (or col2im) plus one GEMM (see minidl/ops/conv.py), so the
best it can do is the speed of float32 GEMM on the same matrix shapes. This script runs the
23 convolution layers of a U-Net one at a time and for each prints

    FLOPs        2 * multiply-adds, from the layer shape: 2 * C_out * C_in*k*k * H_out*W_out
                 (forward); forward + backward is 3x that (input gradient + weight gradient)
    GFLOP/s      forward, and forward + backward (a training step's work for that layer)
    GEMM GFLOP/s the same GEMMs on random matrices of the layer's shapes, timed in this run
    ratio        conv speed / GEMM speed (1.0 = the im2col/col2im and bookkeeping are free)

plus totals over the network and the peak resident memory (RSS) of the process, measured
once after a pass over the conv layers alone and once at the end (the GEMM baseline's big
random matrices included).

The network: U-Net (Ronneberger et al. 2015) with depth 5, 64 features at the top (64 ... 1024),
one input channel, two classes, batch 1. Default: 256x256 input with padding="same" convs
(sizes stay 256, 128, ..., 16), because 256 is not a valid size for the paper's unpadded
convs. --padding valid uses the paper's valid convs (input 252 by default, the nearest valid
size: s = 12 mod 16), with the up-path convs on the cropped-and-concatenated maps.

Run:  python examples/benchmark.py [--size 256] [--padding same|valid] [--repeat 3]

Timings are the best of --repeat runs after one warm-up; the conv and GEMM runs of a layer are
interleaved, so both see the same machine load. For single-thread figures (steadier on a
shared machine) run with OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1.
"""
import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minidl  # noqa: E402
from minidl import functional as F  # noqa: E402
from minidl.ops import conv as conv_ops  # noqa: E402


def unet_layers(size=256, depth=5, features=64, in_channels=1, classes=2, padding="same"):
    """The conv layers of a U-Net as dicts: name, kind ("conv"/"up"), c_in, c_out, k, h, w (input)."""
    shrink = 2 if padding == "valid" else 0           # a 3x3 valid conv loses 2 pixels
    layers, h, c = [], size, in_channels
    skips = []
    for level in range(depth):
        f = features * 2 ** level
        for i in range(2):
            layers.append(dict(name=f"down{level}.conv{i + 1}", kind="conv", c_in=c, c_out=f, k=3,
                               h=h, w=h))
            c, h = f, h - shrink
        skips.append(h)
        if level < depth - 1:
            if h % 2:
                raise ValueError(f"size {size} is not valid for this U-Net: an odd map ({h}) "
                                 "would be max-pooled; with --padding valid use s = 12 mod 16.")
            h //= 2
    for level in reversed(range(depth - 1)):
        f = features * 2 ** level
        layers.append(dict(name=f"up{level}.upconv", kind="up", c_in=c, c_out=f, k=2, h=h, w=h))
        c, h = f, 2 * h
        for i in range(2):
            layers.append(dict(name=f"up{level}.conv{i + 1}", kind="conv", c_in=2 * f if i == 0 else f,
                               c_out=f, k=3, h=h, w=h))
            h -= shrink
    layers.append(dict(name="final1x1", kind="conv", c_in=c, c_out=classes, k=1, h=h, w=h))
    return layers


def layer_flops(layer, padding):
    """Forward FLOPs (2 * MACs) and the GEMM shapes (M, K, N) of the forward product."""
    k2 = layer["k"] ** 2
    if layer["kind"] == "up":                  # transposed conv: (C_out*k*k, C_in) @ (C_in, H*W)
        m, kk, n = layer["c_out"] * k2, layer["c_in"], layer["h"] * layer["w"]
    else:
        out = layer["h"] - (layer["k"] - 1 if padding == "valid" else 0)
        m, kk, n = layer["c_out"], layer["c_in"] * k2, out * out
    return 2 * m * kk * n, (m, kk, n)


def best_times(fns, repeat):
    """Best-of-`repeat` seconds of each function, the runs interleaved (a, b, c, a, b, c, ...)
    so that every function sees the same machine load; one warm-up call each first."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def layer_functions(layer, padding, rng):
    """(forward, forward+backward) closures running one layer in minidl."""
    x = minidl.tensor(rng.standard_normal((1, layer["c_in"], layer["h"], layer["w"]),
                                          dtype=np.float32), requires_grad=True)
    if layer["kind"] == "up":
        w = rng.standard_normal((layer["c_in"], layer["c_out"], 2, 2), dtype=np.float32)
        op = lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2)  # noqa: E731
    else:
        w = rng.standard_normal((layer["c_out"], layer["c_in"], layer["k"], layer["k"]),
                                dtype=np.float32)
        pad = "valid" if padding == "valid" or layer["k"] == 1 else "same"
        op = lambda x, w, b: F.conv2d(x, w, b, padding=pad)  # noqa: E731
    w = minidl.tensor(w * 0.05, requires_grad=True)
    b = minidl.tensor(np.zeros(layer["c_out"], np.float32), requires_grad=True)
    gy = rng.standard_normal(op(x, w, b).shape, dtype=np.float32)

    def forward():
        with minidl.no_grad():
            op(x, w, b)

    def step():
        x.grad = w.grad = b.grad = None
        op(x, w, b).backward(gy)
    return forward, step


def gemm_functions(m, k, n, rng):
    """(forward, forward+backward) closures doing the products a conv layer does on random
    matrices: A (M,K) @ B (K,N); then also A.T @ G (input side) and G @ B.T (weight side)."""
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    g = rng.standard_normal((m, n), dtype=np.float32)
    return (lambda: np.matmul(a, b),
            lambda: (np.matmul(a, b), np.matmul(a.T, g), np.matmul(g, b.T)))


def main(size=256, padding="same", repeat=3, seed=0):
    rng = np.random.default_rng(seed)
    layers = unet_layers(size, padding=padding)
    import numba
    print(f"U-Net depth 5, 64 features, input 1x1x{size}x{size}, padding={padding!r}, float32, "
          f"batch 1; column buffer bound {conv_ops.COLUMN_BUFFER_BYTES / 2**20:.0f} MiB, "
          f"{conv_ops.TARGET_COLUMNS} columns per piece")
    print(f"{os.cpu_count()} CPUs, Numba threads {numba.get_num_threads()}, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f} (other processes skew the timings)")
    head = (f"{'layer':<14}{'in':>16} {'out ch':>6} {'GEMM M x K x N':>21} {'fwd GFLOP':>9} "
            f"{'fwd GF/s':>9} {'GEMM':>7} {'ratio':>6} {'f+b GF/s':>9} {'GEMM':>7} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    # One training step per layer before any GEMM test matrices exist: the peak resident
    # memory after this pass is what the conv layers need (it also warms up Numba).
    for layer in layers:
        layer_functions(layer, padding, rng)[1]()
    conv_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # KiB on Linux
    totals = np.zeros(4)          # conv fwd s, gemm fwd s, conv f+b s, gemm f+b s
    total_flops = 0
    for layer in layers:
        flops, (m, k, n) = layer_flops(layer, padding)
        conv_f, conv_fb, gemm_f, gemm_fb = best_times(
            layer_functions(layer, padding, rng) + gemm_functions(m, k, n, rng), repeat)
        totals += (conv_f, gemm_f, conv_fb, gemm_fb)
        total_flops += flops
        print(f"{layer['name']:<14}{layer['c_in']:>6}x{layer['h']:>4}x{layer['w']:<4} "
              f"{layer['c_out']:>6} {m:>6} x{k:>6} x{n:>6} {flops / 1e9:>9.2f} "
              f"{flops / conv_f / 1e9:>9.1f} {flops / gemm_f / 1e9:>7.1f} {gemm_f / conv_f:>6.2f} "
              f"{3 * flops / conv_fb / 1e9:>9.1f} {3 * flops / gemm_fb / 1e9:>7.1f} "
              f"{gemm_fb / conv_fb:>6.2f}")
    print("-" * len(head))
    cf, gf, cfb, gfb = totals
    print(f"{'total':<14}{'':>16} {'':>6} {'':>21} {total_flops / 1e9:>9.2f} "
          f"{total_flops / cf / 1e9:>9.1f} {total_flops / gf / 1e9:>7.1f} {gf / cf:>6.2f} "
          f"{3 * total_flops / cfb / 1e9:>9.1f} {3 * total_flops / gfb / 1e9:>7.1f} {gfb / cfb:>6.2f}")
    print(f"time: forward {cf:.3f} s (GEMM {gf:.3f} s), forward+backward {cfb:.3f} s "
          f"(GEMM {gfb:.3f} s); forward+backward FLOPs {3 * total_flops / 1e9:.1f} G")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {conv_peak:.0f} MiB running the conv layers (forward + backward, one at a "
          f"time); {peak:.0f} MiB for the whole run including the GEMM test matrices")
    return dict(forward_ratio=gf / cf, train_ratio=gfb / cfb, conv_peak_rss_mib=conv_peak,
                peak_rss_mib=peak)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=None, help="input size (256 same / 252 valid)")
    parser.add_argument("--padding", choices=["same", "valid"], default="same")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size or (256 if args.padding == "same" else 252)
    try:
        main(size, args.padding, args.repeat)
    except ValueError as exc:
        parser.error(str(exc))

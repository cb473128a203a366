"""Time the fully connected CRF on a 580x420 image (the Kaggle ultrasound size).

    python examples/benchmark_crf.py [--repeats 3] [--colour]

For 2 labels and 21 labels (PASCAL VOC), 10 mean-field iterations, default parameters
(Gaussian sxy 3 / compat 3, bilateral sxy 80 / srgb 13 / compat 10), it prints separately

* construction: building the two permutohedral lattices (+ their normalisation K 1),
* inference: the 10 mean-field iterations,

on the CPU (one core is enough: the Numba code is serial) and, if CuPy sees a GPU, on the GPU.
The first call compiles the Numba kernels (or loads them from the cache): a warm-up run is done
before timing. Target: 2 labels, 10 iterations, inference < 0.5 s on one CPU core.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minidl.backend import gpu_available  # noqa: E402
from seg.crf import DenseCRF  # noqa: E402

HEIGHT, WIDTH = 420, 580


def synthetic_case(n_labels, colour, seed=0):
    """A smooth image with n_labels blobs and noisy probabilities of those blobs.

    returns image (H, W) or (H, W, 3) uint8, probs (L, H, W) float32.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    for lab in range(1, n_labels):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        r = rng.uniform(30, 120)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = lab
    palette = rng.uniform(0, 255, size=(n_labels, 3 if colour else 1))
    image = palette[labels] + rng.normal(0, 10, size=(HEIGHT, WIDTH, palette.shape[1]))
    image = np.clip(image, 0, 255).astype(np.uint8)
    if not colour:
        image = image[..., 0]
    logits = 2.0 * np.eye(n_labels)[labels].transpose(2, 0, 1) + rng.normal(0, 1.0, (n_labels, HEIGHT, WIDTH))
    probs = np.exp(logits - logits.max(0))
    return image, (probs / probs.sum(0)).astype(np.float32)


def time_crf(image, probs, device, repeats):
    """Best-of-`repeats` seconds for (construction, inference)."""
    sync = (lambda: None)
    if device == "gpu":
        import cupy

        sync = cupy.cuda.Device().synchronize
    best_build, best_inf = np.inf, np.inf
    for _ in range(repeats + 1):  # first round = warm-up (JIT / CUDA compilation)
        t0 = time.perf_counter()
        crf = DenseCRF(WIDTH, HEIGHT, probs.shape[0], device=device)
        crf.set_unary_from_probs(probs)
        crf.add_pairwise_gaussian(sxy=3, compat=3)
        crf.add_pairwise_bilateral(sxy=80, srgb=13, image=image, compat=10)
        sync()
        t1 = time.perf_counter()
        q = crf.inference(10)
        sync()
        t2 = time.perf_counter()
        best_build, best_inf = min(best_build, t1 - t0), min(best_inf, t2 - t1)
    del q
    return best_build, best_inf


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best is reported)")
    parser.add_argument("--colour", action="store_true", help="only the colour (H, W, 3) image")
    parser.add_argument("--gray", action="store_true", help="only the grayscale (H, W) image")
    args = parser.parse_args(argv)
    devices = ["cpu"] + (["gpu"] if gpu_available() else [])
    kinds = [False, True]
    if args.colour:
        kinds = [True]
    if args.gray:
        kinds = [False]
    print(f"dense CRF, {WIDTH}x{HEIGHT}, 10 iterations, best of {args.repeats}")
    for device in devices:
        for colour in kinds:
            for n_labels in (2, 21):
                image, probs = synthetic_case(n_labels, colour)
                build, inf = time_crf(image, probs, device, args.repeats)
                print(f"  {device:3s} {'colour' if colour else 'gray  '} {n_labels:2d} labels: "
                      f"construction {build * 1e3:7.1f} ms   inference {inf * 1e3:7.1f} ms "
                      f"({inf / 10 * 1e3:.1f} ms/iteration)")
    if "gpu" not in devices:
        print("  (no GPU: CuPy missing or no CUDA device)")


if __name__ == "__main__":
    main()

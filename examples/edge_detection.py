"""Edge detection with conv2d: the talk's first example of what a convolution filter does.

1. Vertical edges (Andrew Ng's example in the talk). A 6x6 image, bright (10) on the left
   half and dark (0) on the right, convolved with the 3x3 kernel

        1  0 -1
        1  0 -1
        1  0 -1

   gives a 4x4 map whose two middle columns are 30: the filter answers "bright on my left,
   dark on my right" and is 0 on flat regions. (Deep-learning "convolution" is really
   cross-correlation: the kernel is not flipped.)

2. Classic hand-made filters on a real-ish image (a synthetic ultrasound frame from
   seg.data.synthetic, or a procedural image when that is unavailable), blurred first
   because speckle looks like edges everywhere:

   * Sobel x / y: first derivatives, smoothed across the other axis; edges are maxima of
     the gradient magnitude sqrt(gx^2 + gy^2).
   * Laplacian (4- and 8-neighbour): second derivative; edges are its zero crossings.
   * LoG (Laplacian of Gaussian, the "Mexican hat") and DoG (difference of two Gaussians,
     sigma ratio 1.6, its cheap approximation): smooth first, so noise does not dominate.

   All six filters run as ONE conv2d call: they are stacked as six output channels of a
   (6, 1, 9, 9) weight (the 3x3 ones centred in zeros), with padding="same".

Run:  python examples/edge_detection.py [--out edge_detection.png] [--size 256]
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minidl import functional as F  # noqa: E402
from seg import classical  # noqa: E402  (the one home of the talk's kernels: seg/classical.py)


def vertical_edge_example():
    """The talk's numbers: returns (image 6x6, kernel 3x3, edges 4x4) as numpy arrays."""
    image = np.zeros((6, 6), dtype=np.float32)
    image[:, :3] = 10
    kernel = classical.VERTICAL_EDGE.copy()     # 1 0 -1 on every row
    edges = F.conv2d(image[None, None], kernel[None, None])     # (1, 1, 4, 4), no padding
    return image, kernel, edges.numpy()[0, 0]


def filter_bank(size=9):
    """name -> kernel, every kernel centred in a size x size array (kernels from seg.classical)."""
    def centred(k):
        k = np.asarray(k, dtype=np.float64)
        out = np.zeros((size, size))
        o = (size - k.shape[0]) // 2
        out[o:o + k.shape[0], o:o + k.shape[1]] = k
        return out
    return {
        "Sobel x": centred(classical.SOBEL_X),
        "Sobel y": centred(classical.SOBEL_Y),
        "Laplacian (4)": centred(classical.LAPLACIAN_4),
        "Laplacian (8)": centred(classical.LAPLACIAN_8),
        # truncate so both fit the 9x9 grid: radius ceil(2.8 * 1.4) = ceil(2.5 * 1.6) = 4
        "LoG": centred(classical.log_kernel(1.4, truncate=2.8)),
        "DoG": centred(classical.dog_kernel(1.0, k=1.6, truncate=2.5)),
    }


def test_image(size):
    """A synthetic ultrasound frame in [0, 1], or a procedural one (disc, square, ramp)."""
    try:
        from seg.data.synthetic import synthetic_image
        image, _ = synthetic_image(seed=0, size=(size, size), nerve=True)
        return image.astype(np.float32) / 255.0
    except ImportError:
        yy, xx = np.mgrid[:size, :size] / size
        img = 0.3 * xx + 0.5 * ((yy - 0.4) ** 2 + (xx - 0.35) ** 2 < 0.04)
        img += 0.4 * ((np.abs(yy - 0.7) < 0.12) & (np.abs(xx - 0.7) < 0.12))
        return (img + 0.02 * np.random.default_rng(0).standard_normal(img.shape)).astype(np.float32)


def output_path(out, default_name="edge_detection.png"):
    """The PNG file to write: `out`, or default_name inside `out` when it is a folder (an
    existing one, or a name ending in a slash). Creates the folder it goes into."""
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        out = os.path.join(out, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    return out


def main(out="edge_detection.png", size=256):
    out = output_path(out)
    image, kernel, edges = vertical_edge_example()
    print("image:\n", image.astype(int), "\n* kernel:\n", kernel.astype(int))
    print("= edges:\n", edges.astype(int))

    raw = test_image(size)
    # Ultrasound speckle is edge-like at every pixel; a Gaussian blur (also a conv2d) first
    # keeps the filters on the anatomy. Zero padding makes false edges at the border, so
    # the panels crop it.
    blur = classical.gaussian_kernel(2.0, truncate=2.0).astype(np.float32)[None, None]   # 9x9
    img = F.conv2d(raw[None, None], blur, padding="same").numpy()[0, 0]
    bank = filter_bank()
    weight = np.stack(list(bank.values()))[:, None].astype(np.float32)   # (6, 1, 9, 9)
    responses = F.conv2d(img[None, None], weight, padding="same").numpy()[0]
    magnitude = np.hypot(responses[0], responses[1])
    vertical = F.conv2d(img[None, None], kernel[None, None], padding="same").numpy()[0, 0]
    m = 8
    raw, vertical, magnitude = raw[m:-m, m:-m], vertical[m:-m, m:-m], magnitude[m:-m, m:-m]
    responses = responses[:, m:-m, m:-m]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("image", raw, "gray"), ("blurred, then the talk's kernel", vertical, "RdBu"),
              ("Sobel magnitude", magnitude, "magma")]
    panels += [(name, r, "RdBu") for name, r in zip(bank, responses)]
    fig, axes = plt.subplots(3, 3, figsize=(10, 10))
    for ax, (title, a, cmap) in zip(axes.ravel(), panels):
        if cmap == "RdBu":          # signed responses: symmetric colour range around 0
            lim = np.percentile(np.abs(a), 99) or 1.0
            ax.imshow(a, cmap=cmap, vmin=-lim, vmax=lim)
        else:
            ax.imshow(a, cmap=cmap)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    # Write to a temporary file first so a crash never leaves half a PNG behind.
    folder = os.path.dirname(os.path.abspath(out))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"saved {out}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="edge_detection.png", metavar="FILE_OR_DIR",
                        help="the PNG to write, or a folder to write edge_detection.png into "
                             "(created if missing); default %(default)s")
    parser.add_argument("--size", type=int, default=256, help="test image size; default %(default)s")
    args = parser.parse_args()
    main(args.out, args.size)

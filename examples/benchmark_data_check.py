"""How long the data check takes on a data set the size of the Kaggle ultrasound set.

    python examples/benchmark_data_check.py                 # 5,635 frames of 420x580, like Kaggle
    python examples/benchmark_data_check.py --size 64x88    # small frames: the header cost alone
    python examples/benchmark_data_check.py --quick         # 200 small frames (a smoke test)

It writes a Kaggle-layout folder (47 subjects; 8-bit TIFF images and 0/255 masks, about 58% of
the masks empty like the real set, a few files damaged on purpose) into a temporary folder and
times `python -m seg check-data`'s work (seg.setup.open_checked_dataset) twice:

- headers only: every image's and mask's header (tifffile, no pixels), the pairing;
- the default: image headers plus every mask's pixels (values, sizes, the empty-mask share).

The files were just written, so they come from the page cache: a first read from a cold disk
adds the disk's time to read the masks (about 1.4 GB at the real size). Prints one line per
mode and, with --json FILE, writes the figures there.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.setup import open_checked_dataset  # noqa: E402

KAGGLE_FRAMES, KAGGLE_SUBJECTS = 5635, 47
DAMAGED = 3        # files cut short on purpose: the check must find exactly these


def write_folder(root, frames, subjects, size, seed=0):
    """A Kaggle-layout train/ folder of `frames` image/mask pairs; returns the damaged paths."""
    rng = np.random.default_rng(seed)
    train = Path(root) / "train"
    train.mkdir(parents=True)
    h, w = size
    image = rng.integers(0, 256, size, dtype=np.uint8)      # content does not matter here
    nerve = np.zeros(size, np.uint8)
    nerve[h // 3: h // 2, w // 3: w // 2] = 255
    empty = np.zeros(size, np.uint8)
    per_subject = -(-frames // subjects)
    names = []
    for k in range(frames):
        subject, n = k // per_subject + 1, k % per_subject + 1
        tifffile.imwrite(train / f"{subject}_{n}.tif", image)
        tifffile.imwrite(train / f"{subject}_{n}_mask.tif", nerve if rng.random() < 0.42 else empty)
        names.append(f"{subject}_{n}.tif")
    damaged = []
    for name in rng.choice(names, DAMAGED, replace=False):
        path = train / name
        path.write_bytes(path.read_bytes()[:200])
        damaged.append(str(path))
    return sorted(damaged)


def time_check(root, read_masks):
    start = time.perf_counter()
    _, _, _, report = open_checked_dataset(root, read_masks=read_masks)
    return time.perf_counter() - start, report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=KAGGLE_FRAMES)
    p.add_argument("--size", default="420x580", help="frame size HxW; default the Kaggle frames'")
    p.add_argument("--quick", action="store_true", help="200 frames of 64x88")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.size = 200, "64x88"
    size = tuple(int(v) for v in args.size.lower().split("x"))
    folder = tempfile.mkdtemp(prefix="data-check-bench-")
    try:
        t0 = time.perf_counter()
        damaged = write_folder(folder, args.frames, min(KAGGLE_SUBJECTS, args.frames), size)
        print(f"wrote {args.frames:,} pairs of {size[0]}x{size[1]} in {time.perf_counter() - t0:.1f} s "
              f"into {folder}")
        results = {"frames": args.frames, "size": list(size)}
        for mode, read_masks in (("headers_only", False), ("with_mask_pixels", True)):
            seconds, report = time_check(folder, read_masks)
            found = sorted(p.path for p in report.problems)
            if found != damaged:
                raise SystemExit(f"the check found {found}, expected the damaged files {damaged}")
            results[mode] = {"seconds": seconds, "ms_per_pair": 1000 * seconds / args.frames}
            print(f"{mode:>16}: {seconds:6.2f} s for {args.frames:,} pairs "
                  f"({1000 * seconds / args.frames:.2f} ms per pair), {len(found)} damaged files found")
        print(report.format_summary())
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return results
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The data check: every problem of a data set on disk, found before training starts.

    problems = []
    reader = KaggleUltrasound(root, problems=problems)      # pairing problems are collected
    report = check_dataset(reader, listing_problems=problems)
    print(report)              # the problems (the first 20 and a count), then the summary
    report.ok                  # no problems
    report.samples             # the pairs without problems (what --skip-bad trains on)

What is checked, per image/mask pair:

- naming and pairing (by the reader: an image without its mask, a mask without its image,
  a file that breaks the naming, two files for one item);
- every image's header, read without decoding the pixels (seg.data.headers): the file opens,
  is not cut short, holds one 2-D image with 1, 3 or 4 channels;
- every mask's pixels: masks are small (a Kaggle mask is 420x580 bytes, uncompressed), and only
  the pixels show whether a mask holds valid values (0/255 or 0/1 for binary masks, class ids
  below num_classes otherwise) and whether it is empty. ``read_masks=False`` reads mask headers
  only: faster, but values are not checked and the empty-mask share is not known;
- that each image and its mask have the same size.

What it cannot see: damage inside an image's compressed pixel data, or a file changed after
the check. Such a file stops training with one sentence naming it (seg.data.loader).
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

from .headers import read_header
from .readers import check_same_size, load_mask

__all__ = ["Problem", "DataReport", "DataCheckError", "check_dataset", "check_samples"]

#: How many problems a report prints; the rest are counted.
SHOWN_PROBLEMS = 20

#: Channel counts the readers turn into a network input (gray, RGB, RGBA).
IMAGE_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class Problem:
    """One problem: the file it is about and one sentence saying what is wrong (naming it)."""

    path: str
    message: str


@dataclass
class DataReport:
    """What check_dataset found.

    problems: list of Problem, in the order found; samples: the pairs without problems;
    summary: counts (pairs, subjects, image sizes and types, empty masks), see format_summary.
    """

    root: str
    problems: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self):
        return not self.problems

    def format_problems(self, limit=SHOWN_PROBLEMS):
        """The first `limit` problems, one per line, and how many more there are."""
        n = len(self.problems)
        if not n:
            return f"No problems found in {self.root}."
        lines = [f"{n} problem{'s' if n != 1 else ''} in {self.root}:"]
        lines += [f"  - {p.message}" for p in self.problems[:limit]]
        if n > limit:
            lines.append(f"  ... and {n - limit} more (the first {limit} are shown).")
        return "\n".join(lines)

    def format_summary(self):
        """Counts, subjects, image sizes and types, and the share of empty masks."""
        s = self.summary

        def counted(counter):
            return ", ".join(f"{key} ({n:,})" for key, n in counter.most_common())
        empty = ("not read (mask headers only)" if s["masks_read"] == 0 and s["pairs"] else
                 f"{s['empty_masks']:,} of {s['masks_read']:,} "
                 f"({100.0 * s['empty_masks'] / max(s['masks_read'], 1):.1f}%)")
        return "\n".join([
            f"{s['pairs']:,} image/mask pairs ({s['usable']:,} without problems) from "
            f"{s['subjects']:,} subjects, checked in {s['seconds']:.1f} s",
            f"image sizes (HxW): {counted(s['sizes']) or '-'}",
            f"image types: {counted(s['types']) or '-'}",
            f"empty masks: {empty}",
        ])

    def __str__(self):
        return self.format_problems() + "\n" + self.format_summary()

    def write_problems(self, path):
        """Write the problems as CSV (file, problem) to `path` (temp file, then renamed)."""
        tmp = f"{path}.{os.getpid()}.tmp"      # own name: every rank of a --distributed run writes it
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "problem"])
            writer.writerows((p.path, p.message) for p in self.problems)
        os.replace(tmp, path)
        return path


class DataCheckError(ValueError):
    """The data check found problems; the message lists them (the first 20 and a count)."""

    def __init__(self, report, advice="fix or remove these files"):
        self.report = report
        super().__init__(f"{report.format_problems()}\nThe data check stopped the run: {advice}.")


def _describe(channels, dtype):
    kind = {1: "gray", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels} channels")
    return f"{dtype} {kind}"


def check_samples(samples, binary=True, num_classes=None, read_masks=True):
    """Check a list of Samples -> (good samples, problems, summary); see the module docstring.

    binary / num_classes: how the masks are read (seg.data.readers.to_class_ids).
    """
    start = time.perf_counter()
    problems, good = [], []
    sizes, types = Counter(), Counter()
    empty = masks_read = 0
    for sample in samples:
        found = []
        try:
            image = read_header(sample.image_path)
        except (ValueError, FileNotFoundError) as exc:
            found.append(Problem(sample.image_path, str(exc)))
            image = None
        if image is not None:
            sizes[f"{image.shape[0]}x{image.shape[1]}"] += 1
            types[_describe(image.channels, image.dtype)] += 1
            if image.channels not in IMAGE_CHANNELS:
                found.append(Problem(sample.image_path, (
                    f"Image file {sample.image_path} has {image.channels} channels; save it as gray, "
                    "RGB or RGBA.")))
            elif image.dtype.kind not in "biuf":
                found.append(Problem(sample.image_path, (
                    f"Image file {sample.image_path} has unsupported dtype {image.dtype}; expected "
                    "integers or floats.")))
        mask_shape = None
        if sample.mask_path is not None:
            try:
                if read_masks:
                    mask = load_mask(sample.mask_path, binary=binary, num_classes=num_classes)
                    mask_shape = mask.shape
                    masks_read += 1
                    empty += not mask.any()
                else:
                    mask_shape = read_header(sample.mask_path).shape
            except (ValueError, FileNotFoundError) as exc:
                found.append(Problem(sample.mask_path, str(exc)))
        if image is not None and mask_shape is not None:
            try:
                check_same_size(SimpleNamespace(shape=image.shape), SimpleNamespace(shape=mask_shape),
                                sample.image_path, sample.mask_path)
            except ValueError as exc:
                found.append(Problem(sample.mask_path, str(exc)))
        problems += found
        if not found:
            good.append(sample)
    summary = {"pairs": len(samples), "usable": len(good),
               "subjects": len({s.subject for s in samples}), "sizes": sizes, "types": types,
               "empty_masks": empty, "masks_read": masks_read,
               "seconds": time.perf_counter() - start}
    return good, problems, summary


def check_dataset(reader, listing_problems=(), read_masks=True):
    """Check every pair of an opened data set (KaggleUltrasound, ImageMaskFolder) -> DataReport.

    listing_problems: the (path, sentence) pairs the reader collected while pairing the files
        (its ``problems=`` list); they come first in the report.
    read_masks: read the mask pixels (values and the empty-mask share) or only their headers.
    """
    good, problems, summary = check_samples(reader.samples, binary=getattr(reader, "binary", True),
                                            num_classes=getattr(reader, "num_classes", None),
                                            read_masks=read_masks)
    listed = [Problem(os.fspath(path), message) for path, message in listing_problems]
    return DataReport(str(reader.root), listed + problems, good, summary)

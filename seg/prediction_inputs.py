"""What `python -m seg predict` checks before it predicts: inputs, checkpoint, output folder.

    scan = scan_inputs("data/test")                  # every file of the folder, headers only
    model, config = load_model_checked("runs/unet/best.npz")
    scan = scan.for_channels(config.get("in_channels", 1), "runs/unet/best.npz")
    prepare_output_folder("masks/")
    scan.files          # [(path, Header)] the images that can be predicted
    scan.skipped        # [Problem] the files left out, each with one sentence why

A folder of images often holds other things (a README, a damaged copy, a colour image among
gray ones): those are listed and skipped, and the command's exit code says some were skipped;
a checkpoint or an output folder that cannot be used stops the command with one sentence.
"""
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .data.check import Problem
from .data.headers import read_header
from .data.readers import IMAGE_SUFFIXES
from .errors import UsageError
from .inference import load_for_inference

__all__ = ["InputScan", "scan_inputs", "accepted_channels", "load_model_checked", "prepare_output_folder"]


@dataclass
class InputScan:
    """files: [(Path, Header)] that can be predicted, sorted; skipped: [Problem] left out."""

    files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def for_channels(self, expected, checkpoint):
        """A new scan without the images whose channel count the model cannot take."""
        kept, skipped = [], list(self.skipped)
        for path, header in self.files:
            if header.channels in accepted_channels(expected):
                kept.append((path, header))
            else:
                skipped.append(Problem(str(path), (
                    f"Image {path} has {header.channels} channel(s) but the model in {checkpoint} "
                    f"takes {expected}-channel images; convert the image, or use a checkpoint trained "
                    f"on {header.channels}-channel images.")))
        return InputScan(kept, skipped)

    def format_skipped(self):
        """One line per skipped file."""
        n = len(self.skipped)
        return "\n".join([f"skipped {n} file{'s' if n != 1 else ''}:"]
                         + [f"  - {p.message}" for p in self.skipped])


def accepted_channels(expected):
    """Channel counts of images a model taking `expected` channels can predict: a gray model
    also takes RGB(A) images, which the readers turn into gray (seg.data.readers)."""
    return (1, 3, 4) if expected == 1 else (expected,)


def scan_inputs(folder):
    """Read the header of every file in `folder` -> InputScan (masks `*_mask.*` and hidden files
    are passed over silently; files that are not readable images are skipped with a reason).
    `folder` may also name one image file.
    A path that does not exist, a file that is not an image, or a folder without any usable
    image is a UsageError."""
    folder = Path(folder)
    candidates = sorted(folder.iterdir()) if folder.is_dir() else [_one_image(folder)]
    scan = InputScan()
    for path in candidates:
        if path.name.startswith(".") or not path.is_file() or path.stem.endswith("_mask"):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            scan.skipped.append(Problem(str(path), (
                f"File {path} is not an image ({path.suffix or 'no suffix'}); predict reads "
                f"{'/'.join(IMAGE_SUFFIXES)} files.")))
            continue
        try:
            scan.files.append((path, read_header(path)))
        except (ValueError, FileNotFoundError) as exc:
            scan.skipped.append(Problem(str(path), str(exc)))
    if not scan.files and folder.is_dir():     # one damaged file given: listed and skipped (exit 1)
        listed = f"; {scan.format_skipped()}" if scan.skipped else ""
        raise UsageError(f"--input folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images{listed}")
    return scan


def _one_image(path):
    """`path` itself, when it names an image file (UsageError otherwise)."""
    kinds = "/".join(IMAGE_SUFFIXES)
    if not path.is_file():
        raise UsageError(f"--input {path} does not exist (give an image file or a folder of images).")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--input file {path} is not a {kinds} image.")
    return path


def load_model_checked(checkpoint, device="cpu"):
    """load_for_inference with its failures as one sentence each (UsageError): no such file, a
    damaged or truncated file, weights that do not fit the architecture its config names."""
    if not os.path.exists(checkpoint):
        raise UsageError(f"--checkpoint {checkpoint} does not exist.")
    try:
        return load_for_inference(checkpoint, device)
    except ValueError as exc:        # damaged, or weights of another architecture (both name it)
        raise UsageError(str(exc)) from None
    except TypeError as exc:         # options the model builder does not know
        raise UsageError(f"checkpoint {checkpoint} cannot be used: {exc}") from None


def prepare_output_folder(folder):
    """Create `folder` if needed and make sure a file can be written there (UsageError if not),
    before any time is spent predicting."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--output folder {folder} cannot be written ({exc.strerror or exc}); "
                         "choose another folder or fix its permissions.") from None

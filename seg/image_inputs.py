"""The images a command reads: one file, or every image of a folder.

    image_files("scans/")        # [scans/a.png, scans/b.tif, ...] (sorted; *_mask files left out)
    image_files("scans/a.png")   # [scans/a.png]
"""
from pathlib import Path

from .data import IMAGE_SUFFIXES
from .errors import UsageError

__all__ = ["image_files"]


def image_files(path, option="--input"):
    """Image files named by `path` (a file or a folder) as a sorted list of Paths.

    UsageError (naming the command-line `option`) when the path does not exist, is a file of
    another type, or is a folder without images.
    """
    path = Path(path)
    kinds = "/".join(IMAGE_SUFFIXES)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsageError(f"{option} file {path} is not a {kinds} image.")
        return [path]
    if not path.is_dir():
        raise UsageError(f"{option} {path} does not exist (give an image file or a folder of images).")
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
    if not files:
        raise UsageError(f"{option} folder {path} holds no {kinds} images.")
    return files

"""Where the commands write, chosen so that no run or image is ever replaced by accident.

    folder, note = choose_run_folder("runs/unet", given=False, resume=None, overwrite=False)
    pairs, note = mask_outputs(image_paths, "masks/", ".png")     # [(image, mask path)]

Training (`python -m seg train`, the examples):

- a folder that holds no run (no metrics.csv or checkpoint) is used as it is;
- `--resume CKPT` continues the run in CKPT's folder unless --out says otherwise, and a run
  may always continue in its own folder;
- the default folder (--out not given) holding another run gives way to a fresh numbered
  one beside it (runs/unet-2, runs/unet-3, ...), announced in one line, so a second
  `make demo` keeps the first one's results;
- an explicit --out holding another run is refused with one sentence, unless --overwrite,
  which removes that run's files (only the names seg.train writes) first.

Prediction (`python -m seg predict`): masks never go into a folder holding the input images
(they would replace them, or be read as images next time); and inputs that share a file stem
(a.png and a.tif) get masks named after the whole file name (a.png.png, a.tif.png).
"""
import glob
import os
from pathlib import Path

from .errors import UsageError

__all__ = ["RUN_FILES", "holds_run", "choose_run_folder", "remove_run", "mask_outputs"]

#: The files whose presence marks a folder as holding a training run (seg.train writes them).
RUN_FILES = ("metrics.csv", "last.npz", "best.npz", "interrupted.npz")
#: Everything else seg.train writes, removed with a run by --overwrite.
_RUN_PICTURES = ("curves.png", "samples_last.png", "samples_epoch*.png")


def holds_run(folder):
    """True when `folder` holds a training run's metrics or checkpoints."""
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES)


def _same_folder(a, b):
    return Path(a).resolve() == Path(b).resolve()


def remove_run(folder):
    """Delete the files a training run wrote into `folder` (and nothing else); returns them."""
    removed = []
    for pattern in RUN_FILES + _RUN_PICTURES:
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern))):
            os.remove(path)
            removed.append(path)
    return removed


def choose_run_folder(out, given=True, resume=None, overwrite=False):
    """The folder a training run writes to -> (folder, note: a line to print, or None).

    out: the --out value; given: whether the user typed it (False: the default);
    resume: the --resume checkpoint or None; overwrite: --overwrite.
    Raises UsageError (one sentence) when `out` holds another run and may not be replaced.
    """
    out = os.path.normpath(os.fspath(out))
    if resume is not None and not given:
        folder = os.path.dirname(os.path.normpath(os.fspath(resume))) or "."
        if not _same_folder(folder, out):
            return folder, f"Continuing the run in {folder} (the folder of --resume)."
        return out, None
    if not holds_run(out) or (resume is not None and _same_folder(os.path.dirname(os.path.abspath(resume)), out)):
        return out, None
    if overwrite:
        removed = remove_run(out)
        return out, f"--overwrite: removed the previous run's {len(removed)} file(s) from {out}."
    if not given:
        n = 2
        while holds_run(f"{out}-{n}"):
            n += 1
        return f"{out}-{n}", f"{out} holds an earlier run, so this one goes to {out}-{n} (--out to choose)."
    raise UsageError(f"--out {out} already holds a training run (metrics.csv or checkpoints); "
                     f"choose another --out, continue it with --resume {os.path.join(out, 'last.npz')}, "
                     "or pass --overwrite to replace it.")


def mask_outputs(images, output, suffix):
    """The mask file for each input image -> ([(image path, mask path)], note or None).

    images: the input image paths; output: the output folder; suffix: ".png" or ".tif".
    A mask is named <stem><suffix>; inputs sharing a stem (compared ignoring case, as macOS
    and Windows file systems do) are named after the whole file name instead, and a name
    still taken gets -2, -3, ... so no mask overwrites another.
    Raises UsageError when `output` is a file or a folder holding input images.
    """
    images = [Path(p) for p in images]
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output} is a file; give a folder for the masks.")
    for folder in sorted({str(p.parent) for p in images}):
        if os.path.isdir(output) and _same_folder(folder, output):
            raise UsageError(f"--output {output} is the folder of the input images, where the masks "
                             "would replace or mix with them; choose another folder, e.g. --output "
                             f"{os.path.normpath(folder)}-masks.")
    stems = {}
    for p in images:
        stems[p.stem.casefold()] = stems.get(p.stem.casefold(), 0) + 1
    pairs, taken, renamed = [], set(), []
    for p in images:
        name = p.stem if stems[p.stem.casefold()] == 1 else p.name
        candidate, n = name, 2
        while (candidate + suffix).casefold() in taken:
            candidate, n = f"{name}-{n}", n + 1
        taken.add((candidate + suffix).casefold())
        if candidate != p.stem:
            renamed.append(f"{p.name} -> {candidate}{suffix}")
        pairs.append((p, os.path.join(output, candidate + suffix)))
    note = None
    if renamed:
        note = (f"{len(renamed)} input(s) share a file stem, so their masks are named after the whole "
                f"file name: {', '.join(renamed[:4])}{', ...' if len(renamed) > 4 else ''}.")
    return pairs, note

"""The errors seg raises on purpose, each with a message that says what to do.

UsageError           a bad command-line argument (`python -m seg` prints it, exit code 2)
NonFiniteLossError   the loss became NaN or infinite during training (exit code 1)
GPUOutOfMemoryError  the GPU ran out of memory on a batch (exit code 1);
                     `explain_gpu_out_of_memory` turns CuPy's error into this one.
TrainingDataError    a data file could not be loaded during training (exit code 1); the
                     message names the file and the checkpoint to resume from.
"""
import contextlib

import numpy as np

from minidl import backend

__all__ = ["UsageError", "NonFiniteLossError", "GPUOutOfMemoryError", "TrainingDataError",
           "explain_gpu_out_of_memory"]


class UsageError(Exception):
    """A bad command-line argument: printed as one sentence, exit code 2."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to do."""


class GPUOutOfMemoryError(MemoryError):
    """The GPU ran out of memory; the message names the batch and what to lower."""


class TrainingDataError(RuntimeError):
    """A sample failed to load during training (a file changed after the data check, a disk
    error); the message names the file and the checkpoint to resume from."""


@contextlib.contextmanager
def explain_gpu_out_of_memory(what, images, advice=None):
    """Turn CuPy's out-of-memory error inside the block into one sentence naming the batch
    (its size and image size) that did not fit and what to change (`advice`; by default the
    training options that shrink memory)."""
    try:
        yield
    except Exception as exc:
        if not backend.is_out_of_memory(exc):
            raise
        n = len(images)
        h, w = np.shape(images)[-2:]
        if advice is None:
            smaller = (f"a smaller batch (--batch-size {n // 2}), " if n > 1 else "")
            advice = (f"{smaller}smaller images (--size) or a smaller model "
                      "(--features-root, --depth)")
        raise GPUOutOfMemoryError(
            f"The GPU ran out of memory on a {what} batch of {n} image(s) of {h}x{w} pixels "
            f"({exc}); try {advice}.") from exc

"""Checks of GPU data that do not wait for the GPU: PyTorch's device-side asserts, in Python.

Checking device data on the host (`int(t.max())`) is a device-to-host read: the CPU waits
until the GPU has caught up, and inside a CUDA graph capture it is refused outright. So an op
that validates GPU data computes, on the device, a small record of the first problem it found
and registers it here with the sentence to raise; the records are read at the next host read
that happens anyway (`Tensor.item()`, `.numpy()`, `.tolist()`, printing, `backend.to_numpy`),
and the first failed check raises its error there.

    defer(key, record, error)   record: (k,) int64 device array [failed, value, ...];
                                error(*values) -> the exception to raise; key: what the check
                                is (records of one key are merged on the device: the first
                                failure is kept, so many unread steps keep one record);
                                merged=True: the record already holds unread(key)'s failure
    unread(key)                 that key's pending record, or None
    check()                     read the pending records (one transfer) and raise

So on the GPU a bad label is reported one host read late: after the step that used it (whose
bad elements counted for nothing), like a CUDA device assert. Host (NumPy) data is still
checked on the spot by the ops. minidl.cuda takes the records a captured step makes and
re-arms them after every replay, so a graph's batches are checked too.
"""
import numpy

from kernels.cuda import load_cupy

_pending = {}       # key -> (record, error), in the order the checks were made


def defer(key, record, error, merged=False):
    """Register a device-side check (see the module docstring). merged: the record already
    keeps the failure of unread(key) (a kernel merged them), so it replaces it as it is."""
    if key in _pending and not merged:
        old, _ = _pending[key]
        xp = _array_module(record)
        record = xp.where(old[0] != 0, old, record)        # keep the first failure
    _pending[key] = (record, error)


def unread(key):
    """The record of key's check not read yet, or None (for a kernel that merges records)."""
    entry = _pending.get(key)
    return None if entry is None else entry[0]


def pending():
    """The checks not read yet: [(key, record, error)]."""
    return [(key, record, error) for key, (record, error) in _pending.items()]


def take():
    """Remove and return the pending checks (minidl.cuda: the ones a captured step made)."""
    entries = pending()
    _pending.clear()
    return entries


def rearm(entries):
    """Register again checks whose records a graph replay has just rewritten."""
    for key, record, error in entries:
        defer(key, record.copy(), error)


def check():
    """Read every pending record in one transfer and raise the first failure's error."""
    if not _pending:
        return
    entries = take()
    records = [record for _, record, _ in entries]
    xp = _array_module(records[0])
    width = max(r.shape[0] for r in records)
    table = xp.stack([xp.pad(r, (0, width - r.shape[0])) for r in records])
    values = table.get() if hasattr(table, "get") else table
    for (_, record, error), row in zip(entries, values):
        if row[0]:
            raise error(*(int(v) for v in row[1:record.shape[0]]))


def _array_module(a):
    # Not through minidl.backend, which calls check() from to_numpy: this module stays below
    # it. The test is backend.is_gpu_array's (by type name, so the CPU never imports CuPy).
    return load_cupy() if type(a).__module__.startswith("cupy") else numpy

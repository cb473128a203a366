"""Collective communication between processes (torch.distributed's names), on MPI and NCCL.

Data-parallel training runs one process per device; each computes gradients on its own part
of the batch and the processes then sum them with an all-reduce. The processes are started by
MPI (`mpiexec -n 4 python train.py`), which also carries the collectives:

    backend "mpi":  mpi4py on NumPy arrays; CuPy arrays are copied to the host and back
                    ("host-staged"). Works on any machine and across machines.
    backend "nccl": NVIDIA's GPU-to-GPU collectives through CuPy (`cupy.cuda.nccl`) for CuPy
                    arrays (NumPy arrays still go over MPI). NCCL needs a shared secret (its
                    unique id) to connect the ranks: rank 0 creates it and MPI broadcasts it
                    (the design ChainerMN used).

    import minidl.distributed as dist
    dist.init_process_group()            # "nccl" when a GPU is visible, else "mpi"
    dist.all_reduce(grad)                # in place: every rank now holds the sum
    dist.destroy_process_group()

Errors: after init_process_group, an uncaught exception on one rank prints its traceback and
calls MPI Abort, which ends every rank of the job (otherwise the others would wait for it in
their next collective forever). docs/DISTRIBUTED.md has the launch commands.
"""
import sys
import time

import numpy

from . import backend
from .backend import gpu_available, require_cupy   # the `backend` argument hides the module
from .tensor import Tensor

__all__ = ["init_process_group", "is_available", "is_initialized", "get_backend", "get_rank",
           "get_world_size", "get_local_rank", "get_local_world_size", "all_reduce", "broadcast",
           "all_gather", "barrier", "destroy_process_group"]

BACKENDS = ("mpi", "nccl")
OPS = ("sum", "avg", "max", "min")
_group = None   # the one process group of this process (a _Group), or None


def _import_mpi():
    """mpi4py's MPI module, or one clear sentence saying which extra brings it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError(
            f"minidl.distributed needs MPI, which could not be imported ({exc}); install the "
            "`dist` extra with `pip install -e \".[dist]\"` (mpi4py and MPICH, whose wheel "
            "provides mpiexec) and launch with `mpiexec -n N python ...`.") from None
    return MPI


def is_available():
    """Whether mpi4py (and so MPI) can be imported."""
    try:
        _import_mpi()
        return True
    except RuntimeError:
        return False


class _Group:
    """What init_process_group sets up: the MPI communicator and, for "nccl", NCCL's."""

    def __init__(self, backend_name, comm, nccl_comm=None, stream=None):
        self.backend, self.comm = backend_name, comm
        self.nccl_comm, self.stream = nccl_comm, stream   # stream: NCCL's own CUDA stream
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(_import_mpi().COMM_TYPE_SHARED)   # the ranks on this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()


def abort_job(code=1):
    """End every rank of the MPI job with exit code `code`, after this rank's output is out.

    mpiexec forwards each rank's stdout and stderr through a proxy process, and Abort kills
    the proxies too: what was still on its way (often the very error message that explains
    the abort) would be lost. So flush, and give the proxy a moment before aborting.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.5)
    _import_mpi().COMM_WORLD.Abort(int(code))


def _abort_on_uncaught_error(previous_hook):
    """An excepthook that reports the error, then ends the whole MPI job."""
    def hook(kind, value, traceback):
        previous_hook(kind, value, traceback)
        abort_job(1)
    hook.previous = previous_hook
    return hook


def init_process_group(backend=None):
    """Join the job's processes (every rank must call it). backend: "mpi", "nccl" or None
    (None: "nccl" when CuPy sees a GPU, else "mpi"). Returns the backend's name.

    With "nccl" each rank first selects the GPU given by its rank within its machine.
    """
    global _group
    MPI = _import_mpi()
    if backend is None:
        backend = "nccl" if gpu_available() else "mpi"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use 'mpi', 'nccl' or None (automatic).")
    if _group is not None:
        raise RuntimeError("init_process_group() was already called; call "
                           "destroy_process_group() first to start a new one.")
    comm = MPI.COMM_WORLD.Dup()   # our own communicator: never mixes with a user's messages
    if comm.Get_size() > 1:
        sys.excepthook = _abort_on_uncaught_error(sys.excepthook)
    group = _Group(backend, comm)
    if backend == "nccl":
        cp = require_cupy()
        from cupy.cuda import nccl
        cp.cuda.Device(group.local_rank % cp.cuda.runtime.getDeviceCount()).use()
        uid = comm.bcast(nccl.get_unique_id() if group.rank == 0 else None, root=0)
        group.nccl_comm = nccl.NcclCommunicator(group.size, uid, group.rank)
        group.stream = cp.cuda.Stream(non_blocking=True)
    _group = group
    return backend


def is_initialized():
    return _group is not None


def _require_group():
    if _group is None:
        raise RuntimeError("the distributed process group is not initialised; call "
                           "minidl.distributed.init_process_group() first (on every rank).")
    return _group


def get_backend():
    return _require_group().backend


def get_rank():
    """This process's number, 0 .. world_size - 1 (0 when not initialised)."""
    return 0 if _group is None else _group.rank


def get_world_size():
    """The number of processes (1 when not initialised)."""
    return 1 if _group is None else _group.size


def get_local_rank():
    """This process's number among the ranks on the same machine (picks its GPU). Works
    before init_process_group too (then from MPI directly, or 0 without MPI)."""
    if _group is not None:
        return _group.local_rank
    if not is_available():
        return 0
    MPI = _import_mpi()
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    rank = node.Get_rank()
    node.Free()
    return rank


def get_local_world_size():
    return 1 if _group is None else _group.local_size


def destroy_process_group():
    """Leave the group (MPI itself stays up until the process exits)."""
    global _group
    if _group is not None:
        _group.comm.Free()
        _group = None
        previous = getattr(sys.excepthook, "previous", None)
        if previous is not None:       # errors no longer need to end the other ranks
            sys.excepthook = previous


# ---------------------------------------------------------------------- collectives
def _array(x, what):
    """The backend ndarray of x (a Tensor's data), checked to be usable in place."""
    a = x.data if isinstance(x, Tensor) else x
    if not hasattr(a, "flags") or not a.flags.c_contiguous:
        raise ValueError(f"{what} works in place on a C-contiguous ndarray or Tensor, got "
                         f"{type(a).__name__}; make it contiguous first (xp.ascontiguousarray).")
    return a


def _check_op(op):
    if op not in OPS:
        raise ValueError(f"unknown reduction op {op!r}; use one of {', '.join(OPS)}.")


class _Work:
    """A started all-reduce; wait() finishes it (results are in the array afterwards).
    poll() lets MPI move it on without waiting (MPICH progresses only inside MPI calls)."""

    def __init__(self, finish, request=None):
        self._finish, self._request = finish, request

    def poll(self):
        if self._request is not None and self._finish is not None:
            self._request.Test()

    def wait(self):
        if self._finish is not None:
            self._finish()
            self._finish = None


def _nccl_dtype(a):
    from cupy.cuda import nccl
    names = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
             "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64}
    if a.dtype.name not in names:
        raise TypeError(f"NCCL cannot reduce dtype {a.dtype}; use float16/32/64 or int32/64.")
    return names[a.dtype.name]


def _nccl_op(op):
    from cupy.cuda import nccl
    return {"sum": nccl.NCCL_SUM, "avg": nccl.NCCL_SUM, "max": nccl.NCCL_MAX,
            "min": nccl.NCCL_MIN}[op]


def all_reduce_async(array, op="sum"):
    """Start an in-place all-reduce of `array` and return a handle; handle.wait() completes it.

    "mpi" (and NumPy arrays under "nccl"): a non-blocking MPI Iallreduce, host-staged for CuPy
    arrays (the copy to the host happens now, the copy back in wait()); "nccl" on CuPy arrays:
    queued on NCCL's own CUDA stream after the work already queued on the current stream, so
    the caller's stream keeps computing.
    """
    group, a = _require_group(), _array(array, "all_reduce")
    _check_op(op)
    if group.size == 1:
        return _Work(None)
    if group.backend == "nccl" and backend.is_gpu_array(a):
        cp = backend.require_cupy()
        ready = cp.cuda.get_current_stream().record()
        group.stream.wait_event(ready)
        group.nccl_comm.allReduce(a.data.ptr, a.data.ptr, a.size, _nccl_dtype(a), _nccl_op(op),
                                  group.stream.ptr)
        done = group.stream.record()

        def finish():
            cp.cuda.get_current_stream().wait_event(done)
            if op == "avg":
                a[...] /= group.size
        return _Work(finish)
    MPI = _import_mpi()
    host = backend.to_numpy(a) if backend.is_gpu_array(a) else a
    mpi_op = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
    request = group.comm.Iallreduce(MPI.IN_PLACE, host, op=mpi_op)

    def finish():
        request.Wait()
        if op == "avg":
            host[...] /= group.size
        if host is not a:
            a[...] = backend.get_array_module(a).asarray(host)   # back to the GPU
    return _Work(finish, request)


def all_reduce(array, op="sum"):
    """Reduce `array` (ndarray or Tensor) over all ranks, in place: every rank gets the
    result. op: "sum", "avg", "max" or "min". Returns the array."""
    all_reduce_async(array, op).wait()
    return array


def broadcast(array, src=0):
    """Overwrite `array` (ndarray or Tensor) on every rank with rank src's values, in place."""
    group, a = _require_group(), _array(array, "broadcast")
    if not 0 <= src < group.size:
        raise ValueError(f"broadcast: src={src} is not a rank of this job (0 .. {group.size - 1}).")
    if group.size == 1:
        return array
    if group.backend == "nccl" and backend.is_gpu_array(a):
        cp = backend.require_cupy()
        stream = cp.cuda.get_current_stream()
        group.nccl_comm.bcast(a.data.ptr, a.size, _nccl_dtype(a), src, stream.ptr)
        return array
    host = backend.to_numpy(a) if backend.is_gpu_array(a) else a
    group.comm.Bcast(host, root=src)
    if host is not a:
        a[...] = backend.get_array_module(a).asarray(host)
    return array


def all_gather(array_list, array):
    """Fill array_list[r] (world_size ndarrays of array's shape and dtype) with rank r's
    `array`, on every rank (torch.distributed.all_gather). Returns array_list."""
    group, a = _require_group(), _array(array, "all_gather")
    if len(array_list) != group.size:
        raise ValueError(f"all_gather needs a list of {group.size} arrays (one per rank), "
                         f"got {len(array_list)}.")
    outs = [o.data if isinstance(o, Tensor) else o for o in array_list]
    for r, o in enumerate(outs):
        if tuple(o.shape) != tuple(a.shape) or o.dtype != a.dtype:
            raise ValueError(f"all_gather: output {r} has shape {tuple(o.shape)} and dtype "
                             f"{o.dtype}, the input {tuple(a.shape)} and {a.dtype}; they must match.")
    xp = backend.get_array_module(a)
    gathered = xp.empty((group.size,) + tuple(a.shape), dtype=a.dtype)
    if group.size == 1:
        gathered[0] = a
    elif group.backend == "nccl" and backend.is_gpu_array(a):
        stream = backend.require_cupy().cuda.get_current_stream()
        group.nccl_comm.allGather(a.data.ptr, gathered.data.ptr, a.size, _nccl_dtype(a),
                                  stream.ptr)
    else:
        host = numpy.empty(gathered.shape, dtype=a.dtype)
        group.comm.Allgather(backend.to_numpy(a), host)
        gathered = xp.asarray(host)
    for r, o in enumerate(outs):
        o[...] = gathered[r]
    return array_list


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable Python objects)."""
    group = _require_group()
    return group.comm.allgather(obj)


def barrier():
    """Wait until every rank has reached this call (GPU work queued before it included)."""
    group = _require_group()
    if backend.gpu_available() and group.backend == "nccl":
        backend.require_cupy().cuda.get_current_stream().synchronize()
    group.comm.Barrier()

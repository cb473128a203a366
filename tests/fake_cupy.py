"""A stand-in for CuPy on machines without a GPU, for dry-running the GPU tests and benchmark.

    PYTHONPATH=tests python3 -m pytest -p fake_cupy tests/test_gpu.py tests/test_kernels.py -q
    PYTHONPATH=tests python3 -c "import fake_cupy; fake_cupy.install(); ..."

As a pytest plugin (`-p fake_cupy`) it installs itself before conftest.py asks whether a GPU
is present, so every "gpu" test case runs. It is a debugging aid, not part of the test suite:
passing under it is no substitute for the real GPU run (scripts/gpu_check.sh), but a test or
an op that fails under it would fail on the GPU too, and it costs no GPU time to find out.

What it imitates:

* `cupy.ndarray` is a NumPy subclass whose type lives in a module named "cupy", which is how
  minidl.backend recognises device arrays; `.get()` copies to a plain numpy.ndarray.
* Like CuPy, it refuses plain NumPy arrays mixed into its ufuncs and functions (a host array
  reaching GPU code is a bug: real CuPy raises TypeError), turns reductions into 0-d arrays
  instead of NumPy scalars, and has no attribute that CuPy 14 lacks (names listed below).
* `cupy.RawModule` compiles the CUDA source for the host (tests/gpu_emulation.py) and runs
  every thread of each launch (grid x block, one after another), checking the arguments
  against the kernel's C signature. Sources whose threads cooperate (__syncthreads, shared
  memory, WMMA: kernels/implicit_gemm.py) run through tests/gpu_emulation_blocks.py instead.
* `cupy_backends.cuda.libs.cublas.setMathMode/getMathMode` on `cupy.cuda.device.get_cublas_handle()`
  only remember the mode (no TF32 arithmetic).
* Matrix products get a fixed relative wobble of MATMUL_WOBBLE epsilons, standing in for cuBLAS's
  different summation order, so GPU-vs-CPU tolerances are exercised.
* `cupy.random.RandomState`, `cupyx.scatter_add`, events, streams, the memory pool and
  `cuda.runtime` have small host versions.
* Device-to-host reads (`.get()`, `.item()`, `.tolist()`, `int()`/`float()`/`bool()`, printing,
  `cupy.asnumpy`, `numpy.asarray`/`numpy.array` of a device array) and host-to-device copies
  are counted (`count_host_reads()`, `assert_no_host_reads(step, ...)`), and indexing one
  element gives a 0-d device array, as in CuPy, not a host scalar.
* CUDA graph capture (`Stream.begin_capture()`, `end_capture()`, `is_capturing()`, and the
  graph's `launch()`): a host read while a stream captures raises the CUDARuntimeError CUDA
  gives (cudaErrorStreamCaptureUnsupported) and breaks the capture, as on a GPU. See
  "Graph capture" below for what a replay can and cannot emulate.

What it cannot imitate: CUDA itself (races, memory limits, NVRTC's dialect), numerical
differences of cuBLAS, and the exact set of keyword arguments each CuPy function accepts.
"""
import contextlib
import gc
import re
import sys
import time
import types

import numpy as np

import gpu_emulation

# NumPy names CuPy 14.2 does not have (dir(numpy) minus dir(cupy)), and ndarray attributes
# cupy.ndarray does not have. Code that reaches them through `xp.` would fail on the GPU.
MISSING_NAMES = set("""
False_ ScalarType True_ asmatrix block bmat busday_count busday_offset busdaycalendar bytes_
char character clongdouble complex256 core ctypeslib datetime64 datetime_as_string datetime_data
dtypes einsum_path emath errstate f2py flexible float128 frompyfunc fromregex geomspace get_include
getbufsize geterr geterrcall histogram_bin_edges info insert is_busday isnat little_endian
longdouble ma matrix matvec memmap nanpercentile nanquantile ndenumerate nditer nested_iters
object_ polyder polydiv polyint rec recarray record sctypeDict setbufsize seterr seterrcall
show_runtime spacing str_ strings test timedelta64 typecodes unstack vecdot vecmat void
""".split())
MISSING_METHODS = {"ctypes", "getfield", "resize", "setfield", "setflags", "to_device"}
# Module functions that accept host data (they are how data gets to the device).
_CONVERTERS = {"asarray", "array", "asanyarray"}


# ---------------------------------------------------------------------------- launch census
# scripts/launch_census.py sets `census` to a callable census(category, name) that is told of
# every device operation: "elementwise", "reduction", "gemm", "scatter" (a[idx] op= b),
# "gather" (a[idx]), "copy" (astype, setitem, non-contiguous ascontiguousarray...), "fill"
# (zeros, ones, arange...), "function" (any other cupy function), "kernel" (a RawKernel
# launch; name = the kernel), "d2h" (a read of device values on the host) and "h2d".
# None (the default) costs one test per operation.
census = None
# cupy functions that only make a view or allocate (no launch on the GPU).
_NO_LAUNCH = {"empty", "empty_like", "broadcast_to", "expand_dims", "squeeze", "reshape",
              "transpose", "moveaxis", "swapaxes", "atleast_1d", "atleast_2d", "atleast_3d",
              "result_type", "can_cast", "promote_types", "iinfo", "finfo", "dtype", "ndim",
              "shape", "size", "isscalar", "get_array_module", "split", "array_split"}
_FILLS = {"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "arange", "eye",
          "linspace", "identity", "tri"}


def _count(category, name):
    if census is not None:
        census(category, name)


def _count_function(name, args, kwargs):
    """Whether cupy.<name>(*args) launches work, and of which kind, told to the census."""
    if census is None or name in _NO_LAUNCH:
        return
    if name in _CONVERTERS or name == "ascontiguousarray":
        src = args[0] if args else None
        dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
        if not isinstance(src, ndarray):
            _count("h2d", name)
        elif ((dtype is not None and np.dtype(dtype) != src.dtype)
              or (name == "ascontiguousarray" and not src.flags.c_contiguous)
              or (name == "array" and kwargs.get("copy", True))):
            _count("copy", name)        # CuPy returns a device array that is already right as is
        return
    if name in _FILLS:
        _count("fill", name)
    elif name in ("matmul", "dot", "tensordot", "einsum", "inner", "outer", "vdot"):
        _count("gemm", name)
    else:
        _count("function", name)


class _CensusMethods:
    """ndarray methods that launch a kernel, told to the census (reads: _host_read)."""

    def astype(self, dtype, *args, **kwargs):
        if census is not None and (np.dtype(dtype) != self.dtype or kwargs.get("copy", True)):
            _count("copy", "astype")
        return super().astype(dtype, *args, **kwargs)

    def copy(self, *args, **kwargs):
        _count("copy", "copy")
        return super().copy(*args, **kwargs)

    def fill(self, value):
        _count("fill", "fill")
        return super().fill(value)

    def __getitem__(self, key):
        if census is not None and _advanced(key):
            _count("gather", "getitem")
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        if census is not None:
            _count("scatter" if _advanced(key) else "copy", "setitem")
        return super().__setitem__(key, value)


def _advanced(key):
    """Whether an index key is advanced (an array or list: a gather/scatter kernel), not a
    view (ints, slices, None, Ellipsis)."""
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (np.ndarray, list)) for k in keys)


class ndarray(_CensusMethods, np.ndarray):
    """Fake cupy.ndarray: NumPy storage, CuPy's type name and rules."""

    def get(self, stream=None, order="C", out=None):
        _host_read("ndarray.get()")
        return np.array(self.view(np.ndarray), copy=True, order=order)

    # Every way a value comes back to the host is a device-to-host copy, which a CUDA graph
    # capture refuses: counted, and refused while capturing (see _host_read).
    def item(self, *args):
        _host_read("ndarray.item()")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _host_read("ndarray.tolist()")
        return self.view(np.ndarray).tolist()

    def __int__(self):
        _host_read("int() of a device array")
        return int(self.view(np.ndarray))

    def __float__(self):
        _host_read("float() of a device array")
        return float(self.view(np.ndarray))

    def __complex__(self):
        _host_read("complex() of a device array")
        return complex(self.view(np.ndarray))

    def __index__(self):
        _host_read("a device array used as an index or size")
        return self.view(np.ndarray).__index__()

    def __bool__(self):
        _host_read("bool() of a device array (an `if` on device data)")
        return bool(self.view(np.ndarray))

    def __repr__(self):
        _host_read("printing a device array")
        return repr(self.view(np.ndarray)).replace("array(", "cupy.ndarray(", 1)

    def __str__(self):
        _host_read("printing a device array")
        return str(self.view(np.ndarray))

    def __format__(self, spec):
        _host_read("formatting a device array")
        return format(self.view(np.ndarray), spec)

    def __getitem__(self, key):
        result = super().__getitem__(key)
        # CuPy indexing stays on the device: one element is a 0-d array, not a host scalar.
        return np.asarray(result).view(ndarray) if isinstance(result, np.generic) else result

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def data(self):
        # cupy.ndarray.data is a device MemoryPointer, not a buffer of the values: code that
        # reads values through it works on NumPy and breaks on the GPU, so here it breaks too.
        return _MemoryPointer()

    def __getattribute__(self, name):
        if name in MISSING_METHODS:
            raise AttributeError(f"cupy.ndarray has no attribute {name!r} (fake CuPy)")
        return super().__getattribute__(name)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_host(inputs, f"cupy ufunc {ufunc.__name__}.{method}")
        _count(_UFUNC_CATEGORY.get(method, "elementwise") if ufunc is not np.matmul else "gemm",
               f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__)
        out = kwargs.get("out")
        if out is not None:
            _refuse_host(out, f"cupy ufunc {ufunc.__name__} out=")
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        result = getattr(ufunc, method)(*(_unwrap(x) for x in inputs), **kwargs)
        if method == "at":
            return None
        if ufunc is np.matmul and method == "__call__":
            _blas_rounding(kwargs["out"][0] if out is not None else result)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        _refuse_host(args, f"numpy.{func.__name__} on cupy arrays")
        _count_function(func.__name__, args, kwargs)
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))


_UFUNC_CATEGORY = {"reduce": "reduction", "accumulate": "reduction", "reduceat": "reduction",
                   "at": "scatter", "outer": "elementwise"}


class _MemoryPointer:
    """Stands in for cupy.cuda.MemoryPointer: an address, nothing NumPy can read values from."""


ndarray.__module__ = "cupy._core.core"
ndarray.__qualname__ = ndarray.__name__ = "ndarray"


# cuBLAS sums in another order than NumPy's BLAS, so GPU products differ from CPU ones in the
# last bits. The fake imitates that with a fixed relative wobble on every matmul result (the
# same on every run, as cuBLAS is), so tolerances and noise-sensitive tests meet it too.
MATMUL_WOBBLE = 8     # in units of the dtype's epsilon: 1e-6 for float32, 2e-15 for float64


def _blas_rounding(result):
    if MATMUL_WOBBLE and result.dtype.kind == "f" and result.size:
        pattern = np.cos(np.arange(result.size, dtype=np.float64) * 0.7).reshape(result.shape)
        eps = MATMUL_WOBBLE * np.finfo(result.dtype).eps
        result *= (1 + eps * pattern).astype(result.dtype)


def _refuse_host(objs, what):
    for o in objs:
        if isinstance(o, (list, tuple)):
            _refuse_host(o, what)
        elif type(o) is np.ndarray:
            raise TypeError(f"{what}: got a host numpy.ndarray of shape {o.shape} next to GPU "
                            "arrays; CuPy refuses implicit host arrays (move it with cupy.asarray).")


def _unwrap(o):
    if isinstance(o, ndarray):
        return o.view(np.ndarray)
    if isinstance(o, (list, tuple)):
        return type(o)(_unwrap(x) for x in o)
    if isinstance(o, dict):
        return {k: _unwrap(v) for k, v in o.items()}
    return o


def _wrap(o):
    """Results on the device: arrays become fake cupy arrays, NumPy scalars 0-d arrays."""
    if isinstance(o, np.ndarray):
        return o if isinstance(o, ndarray) else o.view(ndarray)
    if isinstance(o, np.generic):
        return np.asarray(o).view(ndarray)
    if isinstance(o, tuple):
        return tuple(_wrap(x) for x in o)
    if isinstance(o, list):
        return [_wrap(x) for x in o]
    return o


def _function(name, fn):
    def call(*args, **kwargs):
        if name not in _CONVERTERS:
            _refuse_host(args, f"cupy.{name}")
        _count_function(name, args, kwargs)
        if name in _CONVERTERS or name == "ascontiguousarray":
            if name in _CONVERTERS and not isinstance(args[0], ndarray):
                _host_upload(f"cupy.{name}() of host data")
            dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
            order = "C" if name == "ascontiguousarray" else "K"
            return np.array(_unwrap(args[0]), dtype=dtype, copy=True, order=order).view(ndarray)
        return _wrap(fn(*_unwrap(args), **_unwrap(kwargs)))
    call.__name__ = name
    return call


class _UFunc:
    """cupy.<ufunc>: refuses host arrays, returns device arrays; .reduce/.at etc. delegate."""

    def __init__(self, ufunc):
        self._u = ufunc

    def __call__(self, *args, **kwargs):
        _refuse_host(args, f"cupy.{self._u.__name__}")
        _count("gemm" if self._u is np.matmul else "elementwise", self._u.__name__)
        result = self._u(*_unwrap(args), **_unwrap(kwargs))
        if self._u is np.matmul:
            _blas_rounding(result)
        return _wrap(result)

    def __getattr__(self, name):
        return getattr(self._u, name)


# ---------------------------------------------------------------------------- cupy.cuda & co
class _Event:
    def __init__(self, *args, **kwargs):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


# ---------------------------------------------------------------------------- graph capture
# How a CUDA graph capture behaves, and how far a host emulation can follow it:
#
# * While a stream captures, kernels are recorded, not run. The emulation runs the captured
#   step (it has no kernels to record) and then puts back every device array that existed
#   before the capture (_snapshot), so a capture changes no state, as on a GPU; arrays made
#   during the capture keep values there, where a GPU's hold nothing until the first launch.
# * A device-to-host read while a stream captures is refused: cudaMemcpy's synchronisation is
#   not allowed on a capturing stream, CUDA answers cudaErrorStreamCaptureUnsupported and the
#   capture is invalidated (end_capture then fails with cudaErrorStreamCaptureInvalidated).
#   Here any capture in progress refuses every read; CUDA's relaxed mode would allow a read on
#   an unrelated stream, which nothing in this project does.
# * graph.launch() replays: the emulation runs the Python step again (the function given to
#   set_python_replay by the code that captured it, minidl/cuda.py) with reads still refused,
#   and writes its results into the captured outputs' arrays. Python code in the step runs on
#   every emulated replay, but only once (at the capture) on a GPU, and values a GPU graph
#   freezes at the capture (host numbers, addresses of arrays rebound later) are recomputed
#   here: whether a replay equals eager bit for bit is checked only on a real GPU
#   (tests/test_cuda_graphs.py::test_replay_equals_eager_bit_for_bit).

class CUDARuntimeError(RuntimeError):
    """cupy_backends.cuda.api.runtime.CUDARuntimeError: a CUDA status and its text."""

    def __init__(self, status, detail=""):
        self.status = status
        name, text = _CUDA_ERRORS[status]
        super().__init__(f"{name}: {text}" + (f" (fake CuPy: {detail})" if detail else ""))


# cudaError_t values (driver_types.h) and their cudaGetErrorString texts.
CAPTURE_UNSUPPORTED, CAPTURE_INVALIDATED = 900, 901
_CUDA_ERRORS = {
    CAPTURE_UNSUPPORTED: ("cudaErrorStreamCaptureUnsupported",
                          "operation not permitted when stream is capturing"),
    CAPTURE_INVALIDATED: ("cudaErrorStreamCaptureInvalidated",
                          "operation failed due to a previous error during capture"),
}


class _Capture:
    """The process's capture state (one capture at a time, as the code here does)."""
    stream = None           # the stream recording a graph, or None
    replaying = False       # an emulated graph launch is running its step
    counters = []           # the active HostReads


class HostReads:
    """The device-to-host reads made while it is active: `where` lists one line per read
    (what was read and the line of code, outside this file and NumPy, that read it).
    `uploads` lists the host-to-device copies the same way: CUDA allows them in a capture,
    but the graph keeps the host buffer's address and replays the copy from it, so data that
    changes per step must be a graph input instead."""

    def __init__(self):
        self.where = []
        self.uploads = []

    def __len__(self):
        return len(self.where)

    def __enter__(self):
        _Capture.counters.append(self)
        _guard_numpy()
        return self

    def __exit__(self, *exc):
        _Capture.counters.remove(self)
        _guard_numpy()
        return False


def count_host_reads():
    """`with count_host_reads() as reads: ...` then len(reads), reads.where."""
    return HostReads()


def assert_no_host_reads(step, *args, **kwargs):
    """Run step(*args, **kwargs) and fail, listing them, if it read device data back to the
    host (what a CUDA graph capture refuses) or copied host data in (what a graph would
    replay from a stale host buffer). Returns the step's result."""
    with count_host_reads() as reads:
        result = step(*args, **kwargs)
    assert not reads.where, "host reads inside the step:\n  " + "\n  ".join(reads.where)
    assert not reads.uploads, "host data copied in inside the step:\n  " + "\n  ".join(
        reads.uploads)
    return result


def _call_site():
    import traceback
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__ and "/numpy/" not in frame.filename:
            return f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno} ({frame.name})"
    return "?"


def _host_read(what):
    """Every device-to-host read comes through here: counted, and refused while capturing."""
    _count("d2h", what)
    if _Capture.counters:
        site = f"{what} at {_call_site()}"
        for counter in _Capture.counters:
            counter.where.append(site)
    if _Capture.stream is not None:
        _Capture.stream._invalidated = True
        raise CUDARuntimeError(CAPTURE_UNSUPPORTED, f"{what} while a graph is being captured")
    if _Capture.replaying:
        raise CUDARuntimeError(CAPTURE_UNSUPPORTED, f"{what} inside an emulated graph replay")


def _host_upload(what):
    """Host-to-device copies are only counted (see HostReads)."""
    if _Capture.counters:
        site = f"{what} at {_call_site()}"
        for counter in _Capture.counters:
            counter.uploads.append(site)


def _asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        _host_read("cupy.asnumpy()")
    return np.array(_unwrap(a), copy=True, order=order)


# NumPy turns an ndarray subclass into a host array without asking it, so numpy.asarray(x)
# and friends cannot be seen by the fake array itself; while a graph is captured or replayed,
# or reads are counted, these module functions are wrapped to count and refuse device arrays.
# (Real CuPy refuses them always; code that binds them under other names is not seen.)
_NUMPY_CONVERTERS = ("asarray", "array", "asanyarray", "ascontiguousarray")
_numpy_originals = {}


def _refusing(convert):
    def call(a, *args, **kwargs):
        if isinstance(a, ndarray) or (isinstance(a, (list, tuple))
                                      and any(isinstance(x, ndarray) for x in a)):
            _host_read(f"numpy.{convert.__name__}() of a device array")
        return convert(a, *args, **kwargs)
    return call


def _guard_numpy():
    on = _Capture.stream is not None or _Capture.replaying or bool(_Capture.counters)
    for name in _NUMPY_CONVERTERS:
        if on:
            if name not in _numpy_originals:
                _numpy_originals[name] = getattr(np, name)
                setattr(np, name, _refusing(_numpy_originals[name]))
        elif name in _numpy_originals:
            setattr(np, name, _numpy_originals.pop(name))


def _snapshot():
    """[(memory, copy)] of the memory behind every live device array. (Instances of a Python
    subclass of ndarray are tracked by the garbage collector, so gc finds them all; scanning
    once per capture costs less than registering every array made.)"""
    owners = {}
    for a in [o for o in gc.get_objects() if type(o) is ndarray]:
        base = a
        while isinstance(base.base, np.ndarray):
            base = base.base
        if id(base) not in owners and base.flags.writeable:
            owners[id(base)] = (base, base.view(np.ndarray).copy())
    return list(owners.values())


def _arrays_in(obj):
    """The device arrays in a step's outputs: arrays, Tensors (.data), tuples, lists, dicts."""
    if isinstance(obj, ndarray):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [a for x in obj for a in _arrays_in(x)]
    if isinstance(obj, dict):
        return [a for x in obj.values() for a in _arrays_in(x)]
    data = getattr(obj, "data", None)
    return [data] if isinstance(data, ndarray) else []


class _Graph:
    """cupy.cuda.graph.Graph: launch() replays the capture (see "graph capture" above)."""

    def __init__(self):
        self._replay = None

    def set_python_replay(self, step, inputs, outputs):
        """What launch() runs: step(*inputs), its results written into `outputs`' arrays."""
        self._replay = (step, inputs, outputs)

    def launch(self, stream=None):
        if self._replay is None:
            raise NotImplementedError("fake CuPy replays a graph by running its Python step "
                                      "again; the code that captured it gave none "
                                      "(graph.set_python_replay).")
        step, inputs, outputs = self._replay
        _Capture.replaying = True
        _guard_numpy()
        try:
            fresh = step(*inputs)
        finally:
            _Capture.replaying = False
            _guard_numpy()
        old, new = _arrays_in(outputs), _arrays_in(fresh)
        if [a.shape for a in old] != [a.shape for a in new]:
            raise RuntimeError("fake CuPy: the replayed step returned other arrays than the "
                               "captured one; a graph replays one fixed set of kernels.")
        for dst, src in zip(old, new):
            dst.view(np.ndarray)[...] = src.view(np.ndarray)

    def upload(self, stream=None):
        pass


class _Stream:
    """cupy.cuda.Stream: `with stream:` makes it current; capture as described above."""
    _current = []           # the `with` stack; empty: the null stream

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self._capturing = False
        self._invalidated = False
        self._saved = None

    def synchronize(self):
        if self._capturing:
            self._invalidated = True
            raise CUDARuntimeError(CAPTURE_UNSUPPORTED, "Stream.synchronize() while capturing")

    def record(self, event=None):
        event = event if event is not None else _Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    def use(self):
        _Stream._current[:] = [self]
        return self

    def __enter__(self):
        _Stream._current.append(self)
        return self

    def __exit__(self, *exc):
        _Stream._current.pop()
        return False

    def begin_capture(self, mode=None):
        if _Capture.stream is not None:
            raise CUDARuntimeError(CAPTURE_UNSUPPORTED, "a second capture while one is open")
        self._capturing, self._invalidated = True, False
        self._saved = _snapshot()
        _Capture.stream = self
        _guard_numpy()

    def is_capturing(self):
        if self._capturing and self._invalidated:
            raise RuntimeError("the current capture sequence on this stream has been "
                               "invalidated due to a previous error")
        return self._capturing

    def end_capture(self):
        if not self._capturing:
            raise RuntimeError("this stream is not capturing; call begin_capture() first")
        # A capture runs no kernels: what the step wrote here is put back.
        for memory, values in self._saved:
            memory.view(np.ndarray)[...] = values
        self._capturing, self._saved = False, None
        _Capture.stream = None
        _guard_numpy()
        if self._invalidated:
            raise CUDARuntimeError(CAPTURE_INVALIDATED, "a host read broke this capture")
        return _Graph()


_Stream.null = _Stream(null=True)


def _current_stream():
    return _Stream._current[-1] if _Stream._current else _Stream.null


class _Pool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


class _MemoryPool(_Pool):
    """cupy.cuda.MemoryPool: arrays come from NumPy here, so malloc is only passed around."""

    def malloc(self, size):
        raise NotImplementedError("fake CuPy: arrays are allocated by NumPy")


class _MemoryHook:
    name = "fake"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Device:
    # The WMMA stand-ins of tests/gpu_emulation_blocks.py run every tensor-core mode: an sm_90.
    compute_capability = "90"

    def __init__(self, device=0):
        self.id = int(device)

    def synchronize(self):
        if _Capture.stream is not None:      # waits for the capturing stream too
            _Capture.stream._invalidated = True
            raise CUDARuntimeError(CAPTURE_UNSUPPORTED, "Device.synchronize() while capturing")

    def use(self):
        pass


_runtime = types.SimpleNamespace(
    CUDARuntimeError=CUDARuntimeError,
    getDeviceCount=lambda: 1,
    runtimeGetVersion=lambda: 0,
    driverGetVersion=lambda: 0,
    getDeviceProperties=lambda i: {"name": b"fake GPU (host emulation)", "major": 0, "minor": 0,
                                   "totalGlobalMem": 0, "multiProcessorCount": 1},
)


class _RawKernel:
    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, grid, block, args, **kwargs):
        _count("kernel", self.name)
        grid, block = tuple(grid), tuple(block)
        # Threads of a block cooperate (a barrier call, not the word in a comment).
        if re.search(r"__syncthreads\s*\(", self.module.code):
            import gpu_emulation_blocks
            code = re.sub(r"^#include <\w+\.h>$", "", self.module.code, flags=re.M)
            grid = grid + (1,) * (3 - len(grid))
            gpu_emulation_blocks.BlockModule(code).launch(self.name, grid, block[0],
                                                          tuple(_unwrap(a) for a in args))
            return
        if any(g != 1 for g in grid[1:]) or any(b != 1 for b in block[1:]):
            raise NotImplementedError("fake CuPy: only 1-D grids and blocks are emulated")
        host = gpu_emulation.HostModule(self.module.code)
        host.launch(self.name, grid[0], block[0], tuple(_unwrap(a) for a in args))


class RawModule:
    """Compiles nothing until a kernel is fetched; then g++ builds the source for the host."""

    def __init__(self, code=None, *, path=None, options=(), backend="nvrtc", **kwargs):
        if code is None:
            raise NotImplementedError("fake CuPy: RawModule needs code=")
        self.code = code

    def get_function(self, name):
        if name not in gpu_emulation.signatures(self.code):
            raise AttributeError(f"RawModule has no kernel {name!r}")
        return _RawKernel(self, name)


class _RandomState:
    """cupy.random.RandomState's signatures (dtype= on the samplers) over NumPy's generator."""

    def __init__(self, seed=None):
        # CuPy takes any 64-bit seed; NumPy's RandomState only 32-bit ones: fold it.
        if seed is not None:
            seed = int(np.random.SeedSequence(int(seed)).generate_state(1)[0])
        self._rs = np.random.RandomState(seed)

    def random_sample(self, size=None, dtype=float):
        return _wrap(self._rs.random_sample(size).astype(dtype))

    def standard_normal(self, size=None, dtype=float):
        return _wrap(self._rs.standard_normal(size).astype(dtype))

    def randint(self, low, high=None, size=None, dtype=int):
        return _wrap(self._rs.randint(low, high, size=size, dtype=dtype))

    def permutation(self, num):
        return _wrap(self._rs.permutation(num))


def _make_modules():
    cp = types.ModuleType("cupy")
    cp.__version__ = "fake (tests/fake_cupy.py)"
    cp.ndarray = ndarray
    cp.RawModule = RawModule
    cp.asnumpy = _asnumpy
    cp.get_array_module = lambda *args: cp if any(isinstance(a, ndarray) for a in args) else np
    cp.get_default_memory_pool = lambda: _Pool()
    cp.get_default_pinned_memory_pool = lambda: _Pool()
    cp.cuda = types.SimpleNamespace(
        runtime=_runtime, Device=_Device, Event=_Event, Stream=_Stream,
        get_current_stream=_current_stream, MemoryPool=_MemoryPool,
        using_allocator=lambda allocator=None: contextlib.nullcontext(),
        graph=types.SimpleNamespace(Graph=_Graph),
        get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3, MemoryHook=_MemoryHook,
        device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
        compiler=types.SimpleNamespace(CompileException=type("CompileException", (Exception,), {})))
    cp.random = types.SimpleNamespace(RandomState=_RandomState,
                                      standard_normal=lambda size=None, dtype=float:
                                      _RandomState().standard_normal(size, dtype))

    def __getattr__(name):
        if name.startswith("__") or name in MISSING_NAMES or not hasattr(np, name):
            raise AttributeError(f"module 'cupy' has no attribute {name!r} (fake CuPy)")
        value = getattr(np, name)
        if isinstance(value, np.ufunc):
            return _UFunc(value)
        if callable(value) and not isinstance(value, type):
            return _function(name, value)
        return value
    cp.__getattr__ = __getattr__

    cupyx = types.ModuleType("cupyx")

    def scatter_add(a, slices, value):
        _refuse_host([value], "cupyx.scatter_add value")
        _count("scatter", "scatter_add")
        np.add.at(_unwrap(a), _unwrap(slices), _unwrap(value))
    cupyx.scatter_add = scatter_add

    # cupyx.scipy.special.erf (the exact GELU), via SciPy's on the host.
    from scipy import special as host_special
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.special = types.ModuleType("cupyx.scipy.special")
    cupyx.scipy.special.erf = _function("erf", host_special.erf)
    return cp, cupyx


def _cublas_module():
    """cupy_backends.cuda.libs.cublas with only the math mode of a handle."""
    modes = {}
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.setMathMode = lambda handle, mode: modes.__setitem__(handle, int(mode))
    cublas.getMathMode = lambda handle: modes.get(handle, 0)
    return cublas


def install():
    """Put the fake into sys.modules (as `cupy`, `cupyx`, and cupy_backends' cublas) and into
    the CuPy loader's cache."""
    cp, cupyx = _make_modules()
    sys.modules["cupy"], sys.modules["cupyx"] = cp, cupyx
    sys.modules["cupyx.scipy"], sys.modules["cupyx.scipy.special"] = cupyx.scipy, cupyx.scipy.special
    names = ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs")
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    cublas = sys.modules["cupy_backends.cuda.libs.cublas"] = _cublas_module()
    sys.modules["cupy_backends.cuda.libs"].cublas = cublas
    from kernels import cuda
    cuda._cupy, cuda._cupy_error = cp, None
    return cp


# As a pytest plugin: install at import, before conftest.py checks for a GPU.
if "pytest" in sys.modules:
    install()

"""Dtype names as PyTorch spells them: minidl.float32, float16, bfloat16, float64, int64, ...

Each name is a NumPy dtype, so `t.dtype == minidl.float32` and `tensor(x, dtype=minidl.int64)`
work, and NumPy strings ("float32") and types (numpy.float32) keep working wherever a
dtype is asked for.

bfloat16: NumPy has no bfloat16. When the optional `ml_dtypes` package is installed (it
ships with JAX and TensorFlow; `pip install ml_dtypes`), minidl.bfloat16 is its NumPy dtype
and CPU tensors can store it: a storage format, outside autograd (NumPy files it as a
non-float kind, so casting to it leaves the graph, as integer casts do; compute in float32).
Without it, minidl.bfloat16 is a placeholder that raises a TypeError, saying so, as soon
as a tensor is asked to use it. CuPy has no bfloat16 arrays either.
"""
import numpy

float16 = half = numpy.dtype("float16")
float32 = float = numpy.dtype("float32")   # noqa: A001 - torch.float
float64 = double = numpy.dtype("float64")
int8 = numpy.dtype("int8")
uint8 = numpy.dtype("uint8")
int16 = short = numpy.dtype("int16")
int32 = int = numpy.dtype("int32")         # noqa: A001 - torch.int
int64 = long = numpy.dtype("int64")
bool = numpy.dtype("bool")                 # noqa: A001 - torch.bool


class _Unavailable:
    """A dtype name whose NumPy type is not installed; using it raises a clear TypeError."""
    def __init__(self, name, advice):
        self.name, self.advice = name, advice

    def __repr__(self):
        return f"minidl.{self.name} (unavailable: {self.advice})"


def __getattr__(name):
    """minidl.dtypes.bfloat16, looked up on first use: importing ml_dtypes takes about half a
    second, which every `import minidl` would otherwise pay."""
    if name != "bfloat16":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import ml_dtypes
        value = numpy.dtype(ml_dtypes.bfloat16)
    except ImportError:
        value = _Unavailable("bfloat16", "NumPy has no bfloat16; pip install ml_dtypes to "
                                         "store bfloat16 tensors on the CPU")
    globals()["bfloat16"] = value
    return value


def resolve(dtype):
    """A NumPy dtype for any accepted spelling (None stays None)."""
    if dtype is None or isinstance(dtype, numpy.dtype):
        return dtype
    if isinstance(dtype, str) and dtype == "bfloat16":
        dtype = __getattr__("bfloat16")
    if isinstance(dtype, _Unavailable):
        raise TypeError(f"dtype {dtype.name} is not available: {dtype.advice}.")
    return numpy.dtype(dtype)

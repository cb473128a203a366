"""Run CUDA kernel source on the host: the tool behind tests/test_gpu_source.py and tests/fake_cupy.py.

The kernels of kernels/gpu.py are plain C++ apart from five CUDA names: `__global__`,
`__device__` (a function that kernels call), the built-in thread coordinates (threadIdx,
blockIdx, blockDim, gridDim) and the integer atomics (and sqrt, which C++ has in <cmath>).
A short shim defines those, g++ compiles the unchanged source into a shared library, and
ctypes calls a kernel as a number of emulated threads, one after another in any order. Each
call's arguments are checked against the kernel's C signature first, which catches the
glue mistakes a GPU would not report (an int32 array where the kernel reads long long, a
float64 scalar for a float parameter, a missing argument).
"""
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

SHIM = r"""
#include <cstddef>
#include <cmath>
using std::sqrt; using std::exp; using std::log;  // CUDA's math functions (sqrt, exp, log) are overloaded for float and double
#define __global__
#define __device__
struct emu_uint3 { unsigned int x, y, z; };
static emu_uint3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
static emu_uint3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
static int atomicExch(int* a, int v) { int old = *a; *a = v; return old; }
static int atomicMax(int* a, int v) { int old = *a; if (v > old) *a = v; return old; }
static int atomicAdd(int* a, int v) { int old = *a; *a += v; return old; }
static float atomicAdd(float* a, float v) { float old = *a; *a += v; return old; }
static double atomicAdd(double* a, double v) { double old = *a; *a += v; return old; }
static long long atomicMin(long long* a, long long v) { long long old = *a; if (v < old) *a = v; return old; }
extern "C" void emu_set_thread(unsigned int tid, unsigned int nthreads) {
    threadIdx.x = tid; blockDim.x = nthreads; blockIdx.x = 0; gridDim.x = 1;
}
"""

C_TYPES = {"float": np.float32, "double": np.float64, "long long": np.int64, "int": np.int32}
_CTYPES_SCALAR = {np.dtype(np.int64): ctypes.c_longlong, np.dtype(np.int32): ctypes.c_int,
                  np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def compiler():
    """Path of a C++ compiler, or None."""
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def typedefs(source):
    """{"T": dtype, "I": dtype, ...} from the `typedef <c type> <name>;` lines of the source."""
    return {name: np.dtype(C_TYPES[ctype])
            for ctype, name in re.findall(r"typedef\s+(float|double|long long|int)\s+(\w+)\s*;", source)}


def _launchers(source):
    """C++ for `emu_launch_<kernel>(grid, block, params...)`: runs every thread of a launch
    (all blocks x all threads per block, in order), as the GPU would run them in parallel."""
    out = []
    for name, params in re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\((.*?)\)\s*\{", source, re.S):
        names = [re.findall(r"\w+", p)[-1] for p in params.split(",")]
        out.append(f"""
extern "C" void emu_launch_{name}(unsigned int emu_grid, unsigned int emu_block, {params}) {{
    gridDim.x = emu_grid; blockDim.x = emu_block;
    for (unsigned int emu_b = 0; emu_b < emu_grid; ++emu_b)
        for (unsigned int emu_t = 0; emu_t < emu_block; ++emu_t) {{
            blockIdx.x = emu_b; threadIdx.x = emu_t;
            {name}({", ".join(names)});
        }}
}}""")
    return "\n".join(out)


def signatures(source):
    """{kernel name: [(is_pointer, element dtype), ...]} parsed from the source."""
    types = {k: np.dtype(v) for k, v in C_TYPES.items()}
    types.update(typedefs(source))
    sigs = {}
    for name, params in re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\((.*?)\)\s*\{", source, re.S):
        args = []
        for p in params.split(","):
            p = " ".join(p.replace("const", " ").split())
            is_ptr = "*" in p
            ctype = p.replace("*", " ").rsplit(" ", 1)[0].strip()
            args.append((is_ptr, types[ctype]))
        sigs[name] = args
    return sigs


class HostModule:
    """One CUDA source compiled for the host (cached by the source's hash)."""

    _cache = {}

    def __init__(self, source, workdir=None):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++/clang++) to build the host emulation")
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        if digest not in HostModule._cache:
            workdir = workdir or tempfile.mkdtemp(prefix="minidl_gpu_emulation_")
            path = os.path.join(workdir, f"emu_{digest}")
            with open(path + ".cpp", "w") as f:
                f.write(SHIM + source + _launchers(source))
            proc = subprocess.run([cxx, "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unused-function",
                                   "-o", path + ".so", path + ".cpp"], capture_output=True, text=True)
            if proc.returncode != 0 or "warning" in proc.stderr:
                raise AssertionError(f"host compile of the CUDA source failed or warned:\n{proc.stderr}")
            HostModule._cache[digest] = (ctypes.CDLL(path + ".so"), signatures(source))
        self.lib, self.sigs = HostModule._cache[digest]

    def check_args(self, name, args):
        """ctypes arguments for kernel `name`, after checking each against its C parameter."""
        sig = self.sigs[name]
        assert len(args) == len(sig), f"{name}: {len(args)} arguments for {len(sig)} parameters"
        c_args = []
        for k, (a, (is_ptr, want)) in enumerate(zip(args, sig)):
            if is_ptr:
                assert isinstance(a, np.ndarray), f"{name} argument {k}: expected an array, got {type(a)}"
                assert a.dtype == want, f"{name} argument {k}: array dtype {a.dtype}, kernel wants {want}"
                assert a.flags.c_contiguous, f"{name} argument {k}: array is not C-contiguous"
                c_args.append(ctypes.c_void_p(a.view(np.ndarray).ctypes.data))
            else:
                assert isinstance(a, np.generic) and a.dtype == want, \
                    f"{name} argument {k}: scalar {a!r} of type {type(a).__name__}, kernel wants {want}"
                c_args.append(_CTYPES_SCALAR[want](a.item()))
        return c_args

    def launch(self, name, grid, block, args):
        """Run kernel `name` with a real launch configuration: grid x block threads."""
        c_args = self.check_args(name, args)
        getattr(self.lib, f"emu_launch_{name}")(ctypes.c_uint(int(grid)), ctypes.c_uint(int(block)),
                                                 *c_args)

    def run(self, name, args, nthreads=1, order=None):
        """Run kernel `name` as `nthreads` emulated threads, in `order` (default 0, 1, ...)."""
        c_args = self.check_args(name, args)
        kernel = getattr(self.lib, name)
        for tid in (range(nthreads) if order is None else order):
            self.lib.emu_set_thread(ctypes.c_uint(int(tid)), ctypes.c_uint(nthreads))
            kernel(*c_args)

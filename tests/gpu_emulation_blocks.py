"""Run block-cooperative CUDA kernels on the host: shared memory, __syncthreads and WMMA.

tests/gpu_emulation.py runs kernels whose threads never talk to each other, one thread after
another. The implicit-GEMM kernels (kernels/implicit_gemm.py) cannot run that way: the threads
of a block fill shared tiles together and wait for each other at __syncthreads. Here:

* every CUDA thread of a block is an OS thread (std::thread), `threadIdx` is thread_local;
* `__syncthreads()` is a std::barrier over the block's threads;
* `__shared__` variables are `static`: one copy, shared by the threads of the one block that
  runs at a time (blocks run one after another, with a barrier between them);
* WMMA is a stand-in with the same arithmetic: every lane holds the whole 16 x 16 fragment
  (a real warp spreads it over its 32 lanes in an unspecified layout, which the kernel never
  looks at), mma_sync multiplies in float32, only lane 0 stores; bfloat16 and float16 round
  to nearest even, TF32 to nearest with ties away from zero (the cvt.rna of __float_to_tf32).

So a wrong tile index, a missing __syncthreads (the barrier makes the others' writes visible,
and only there), an out-of-range gather or a wrong kernel argument shows up on a CPU.
"""
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile

import numpy as np

from gpu_emulation import _CTYPES_SCALAR, compiler, signatures

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)            // a register budget for ptxas: nothing on the host
using std::min;
using std::max;
struct emu_uint3 { unsigned int x, y, z; };
static thread_local emu_uint3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0};
static emu_uint3 blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
static std::barrier<>* emu_barrier = nullptr;
static void __syncthreads() { emu_barrier->arrive_and_wait(); }

static float emu_bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
static uint32_t emu_float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }
// Keep the top `keep` mantissa bits: round to nearest even (bf16) or ties away (tf32).
static float emu_round_mantissa(float v, int drop, bool ties_away) {
    uint32_t b = emu_float_to_bits(v);
    if ((b & 0x7f800000u) == 0x7f800000u) return v;          // inf / nan unchanged
    const uint32_t half = 1u << (drop - 1);
    b += ties_away ? half : half - 1 + ((b >> drop) & 1u);
    return emu_bits_to_float(b & ~((1u << drop) - 1));
}
struct __nv_bfloat16 { uint16_t bits; };
static __nv_bfloat16 __float2bfloat16(float v) {
    return __nv_bfloat16{(uint16_t)(emu_float_to_bits(emu_round_mantissa(v, 16, false)) >> 16)};
}
static float emu_to_float(__nv_bfloat16 v) { return emu_bits_to_float((uint32_t)v.bits << 16); }
struct __half { _Float16 h; };
static __half __float2half(float v) { return __half{(_Float16)v}; }   // round to nearest even
static float emu_to_float(__half v) { return (float)v.h; }
static float emu_to_float(float v) { return v; }

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {};
enum layout_t { mem_row_major };
namespace precision { struct tf32 {}; }
static float __float_to_tf32(float v) { return emu_round_mantissa(v, 13, true); }
template <class Use, int M, int N, int K> struct dims;
template <int M, int N, int K> struct dims<matrix_a, M, N, K> { enum { R = M, C = K }; };
template <int M, int N, int K> struct dims<matrix_b, M, N, K> { enum { R = K, C = N }; };
template <int M, int N, int K> struct dims<accumulator, M, N, K> { enum { R = M, C = N }; };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    enum { R = dims<Use, M, N, K>::R, C = dims<Use, M, N, K>::C };
    float v[R * C];                                   // the whole fragment, in every lane
};
template <class F> static void fill_fragment(F& f, float x) { for (float& e : f.v) e = x; }
template <class F, class E> static void load_matrix_sync(F& f, const E* p, unsigned ldm) {
    for (int r = 0; r < F::R; ++r) for (int c = 0; c < F::C; ++c) f.v[r * F::C + c] = emu_to_float(p[r * ldm + c]);
}
template <class D, class A, class B, class C> static void mma_sync(D& d, const A& a, const B& b, const C& c) {
    float out[D::R * D::C];
    for (int i = 0; i < D::R; ++i)
        for (int j = 0; j < D::C; ++j) {
            float s = c.v[i * D::C + j];
            for (int k = 0; k < A::C; ++k) s += a.v[i * A::C + k] * b.v[k * B::C + j];
            out[i * D::C + j] = s;
        }
    std::memcpy(d.v, out, sizeof out);
}
template <class F> static void store_matrix_sync(float* p, const F& f, unsigned ldm, layout_t) {
    if (threadIdx.x % 32 != 0) return;                // one lane writes, as one warp would
    for (int r = 0; r < F::R; ++r) for (int c = 0; c < F::C; ++c) p[r * ldm + c] = f.v[r * F::C + c];
}
} }
"""


def _launchers(source):
    """C++ `emu_launch_<kernel>(gx, gy, gz, block, params...)`: `block` OS threads run every
    block of the grid in turn, meeting at a barrier between blocks."""
    out = []
    for name, params in re.findall(r"__global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\((.*?)\)\s*\{", source, re.S):
        names = [re.findall(r"\w+", p)[-1] for p in params.split(",")]
        out.append(f"""
extern "C" void emu_launch_{name}(unsigned int emu_gx, unsigned int emu_gy, unsigned int emu_gz,
                                  unsigned int emu_block, {params}) {{
    gridDim = {{emu_gx, emu_gy, emu_gz}}; blockDim = {{emu_block, 1, 1}};
    std::barrier<> bar(emu_block);
    emu_barrier = &bar;
    std::vector<std::thread> team;
    for (unsigned int emu_t = 0; emu_t < emu_block; ++emu_t)
        team.emplace_back([&, emu_t] {{
            threadIdx = {{emu_t, 0, 0}};
            for (unsigned int z = 0; z < emu_gz; ++z)
                for (unsigned int y = 0; y < emu_gy; ++y)
                    for (unsigned int x = 0; x < emu_gx; ++x) {{
                        blockIdx = {{x, y, z}};
                        {name}({", ".join(names)});
                        __syncthreads();          // the next block reuses the shared memory
                    }}
        }});
    for (auto& t : team) t.join();
}}""")
    return "\n".join(out)


class BlockModule:
    """One CUDA source compiled for the host with the block shim (cached by its hash)."""

    _cache = {}

    def __init__(self, source):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++/clang++) to build the host emulation")
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        if digest not in BlockModule._cache:
            path = os.path.join(tempfile.mkdtemp(prefix="minidl_block_emulation_"), f"emu_{digest}")
            with open(path + ".cpp", "w") as f:
                f.write(SHIM + source + _launchers(source))
            proc = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall",
                                   "-Wno-unused-function", "-o", path + ".so", path + ".cpp"],
                                  capture_output=True, text=True)
            if proc.returncode != 0 or "warning" in proc.stderr:
                raise AssertionError(f"host compile of the CUDA source failed or warned:\n{proc.stderr}")
            BlockModule._cache[digest] = (ctypes.CDLL(path + ".so"), signatures(source))
        self.lib, self.sigs = BlockModule._cache[digest]

    def launch(self, name, grid, block, args):
        """Run kernel `name` over grid (x, y, z) blocks of `block` threads, after checking each
        argument against the kernel's C signature."""
        sig = self.sigs[name]
        assert len(args) == len(sig), f"{name}: {len(args)} arguments for {len(sig)} parameters"
        c_args = []
        for k, (a, (is_ptr, want)) in enumerate(zip(args, sig)):
            if is_ptr:
                assert isinstance(a, np.ndarray) and a.dtype == want and a.flags.c_contiguous, \
                    f"{name} argument {k}: want a C-contiguous {want} array, got {type(a)} {getattr(a, 'dtype', '')}"
                c_args.append(ctypes.c_void_p(a.ctypes.data))
            else:
                assert isinstance(a, np.generic) and a.dtype == want, \
                    f"{name} argument {k}: scalar {a!r} of type {type(a).__name__}, kernel wants {want}"
                c_args.append(_CTYPES_SCALAR[want](a.item()))
        gx, gy, gz = (ctypes.c_uint(int(v)) for v in grid)
        getattr(self.lib, f"emu_launch_{name}")(gx, gy, gz, ctypes.c_uint(int(block)), *c_args)

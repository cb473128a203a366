"""Implicit-GEMM convolution on the GPU: im2col tiles gathered into shared memory, never to global.

Read kernels/implicit_gemm_reference.py first: it is the same computation in NumPy, with the
gathered matrices written out whole. minidl/ops/conv.py does a convolution as im2col (a column matrix written to global
memory) + one cuBLAS GEMM + col2im (read back). Here each thread block computes one tile of
the GEMM's output and gathers the pieces of the column matrix it needs straight from the
image into shared memory, so the column matrix never exists.

The three products of a convolution are one GEMM each, C (M x Q) = A (M x R) @ B (R x Q),
per group g (blockIdx.z), with A and B *gathered* from the arrays by index arithmetic:

    kind    M         Q             R                 A[m, r]              B[r, q]
    fwd     C_out/G   N*ho*wo       C_in/G*kh*kw      weight               im2col(x)
    dgrad   C_in/G    N*H*W         C_out/G*kh*kw     weight, transposed   gy read through the taps
    wgrad   C_out/G   C_in/G*kh*kw  N*ho*wo           gy                   im2col(x), transposed

* fwd:   y[n, co, oy, ox]  = sum over (ci, i, j) of w[co, ci, i, j] * x[n, ci, iy, ix]
* dgrad: gx[n, ci, iy, ix] = sum over (co, i, j) of w[co, ci, i, j] * gy[n, co, oy, ox], where
  (oy, ox) is the output that reads (iy, ix) through tap (i, j): iy + ph - i*dh = oy*sh. A
  gather (one output element, one thread's accumulator), so no atomics: deterministic.
* wgrad: gw[co, ci, i, j]  = sum over (n, oy, ox) of gy[n, co, oy, ox] * x[n, ci, iy, ix]. R is
  long and M x Q small, so R is split over `splits` blocks (blockIdx.z = g * splits + split)
  that write partial sums; the host adds them in a fixed order (deterministic again).

with iy = oy*sh - ph + i*dh, ix = ox*sw - pw + j*dw, and 0 outside the image (padding).
The transposed convolution is the adjoint of a convolution (ops/conv.py's Geometry describes
that convolution): its forward pass is `dgrad`, its input gradient `fwd`, its weight gradient
`wgrad` with the roles of x and gy exchanged (conv_transpose2d_* below).

Precision ("highest" keeps PyTorch's exact float32; the others are tensor-core modes with
float32 accumulation, chosen per call):

    "highest"   float32 FMA on the CUDA cores (no tensor cores)
    "tf32"      operands rounded to TF32 (10-bit mantissa), WMMA m16n16k8
    "bf16"      operands rounded to bfloat16 (7-bit mantissa),  WMMA m16n16k16
    "fp16"      operands rounded to float16 (10-bit mantissa, 5-bit exponent), WMMA m16n16k16

Inputs and outputs are float32 arrays in every mode: the rounding happens as a tile is
stored into shared memory. Tensor-core modes need compute capability 8.0 (A100) or later.

Tiling: a block of 128 threads (4 warps) computes a BM x BN = 64 x 64 tile of C, walking R in
steps of BK = 16: gather A's 64 x 16 tile and B's 16 x 64 tile into shared memory, sync,
multiply-accumulate. In the WMMA modes warp (wm, wn) owns the 32 x 32 quarter of the tile
at (32 wm, 32 wn), as 2 x 2 fragments of 16 x 16; in "highest" thread t owns rows
8 (t / 16) ... + 7 and columns t % 16 + 16 c (c = 0..3). At the end the accumulators go through
shared memory (Cs, 64 x 64) so that every kind writes its output with one scatter loop.

Index arithmetic is 32-bit (int): the wrappers refuse arrays of 2^31 elements or more.

Python entry points (float32 arrays in, float32 arrays out; geometry as in kernels/reference.py:
stride sh, sw, padding ph, pw, dilation dh, dw, output size given): conv2d_forward,
conv2d_input_grad, conv2d_weight_grad, conv_transpose2d_forward / _input_grad / _weight_grad.

Testing without a GPU: tests/test_implicit_gemm.py compiles this source with nvcc -ptx where
nvcc exists (every instantiation), and runs it on the host (tests/gpu_emulation_blocks.py: one
OS thread per CUDA thread, a barrier for __syncthreads, a WMMA stand-in with the same rounding).
"""
import re

import numpy as np

PRECISIONS = ("highest", "tf32", "bf16", "fp16")
KINDS = ("fwd", "dgrad", "wgrad")
BM, BN, BK, THREADS = 64, 64, 16, 128     # must match the #defines in the source

# ---------------------------------------------------------------------------- CUDA source
# The source is put together per precision: the common part (geometry, the three kinds, the
# float32 FMA mode and the tile loop) needs no header, so "highest" compiles anywhere; each
# tensor-core mode adds the WMMA template and its own struct, with the headers it needs.
COMMON = r"""
#define BM 64          // rows of the C tile (output channels for fwd/wgrad, input channels for dgrad)
#define BN 64          // columns of the C tile (pixels for fwd/dgrad, (ci, i, j) for wgrad)
#define BK 16          // the slice of the reduction axis R loaded per step
#define THREADS 128    // 4 warps
#define PAD_F 4        // shared rows padded by 4 or 8 elements so that WMMA's alignment
#define PAD_H 8        // holds and rows fall on different banks (each mode's LDA, LDB, LDC)


// Geometry of the convolution (the forward one; the transposed conv is its adjoint).
struct Conv {
    int N, Cin, H, W, Cout, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, G;
    __device__ int Cin_g() const { return Cin / G; }
    __device__ int Cout_g() const { return Cout / G; }
};

// ---------------------------------------------------------------- the three GEMMs as gathers
// Each kind says how big its GEMM is and where A[m, r], B[r, q] and C[m, q] live.
// The integer divisions that split an index into coordinates are done once per row r of a
// BK slice (`Row`, kept in shared memory for the whole block) and once per column q a thread
// gathers (`Col`, kept in registers for all R steps), not once per element.

struct Fwd {
    // A = weight (C_out/G, C_in/G*kh*kw) of group g; B = im2col(x); C = y (N, C_out, ho, wo)
    static __device__ int M(const Conv& c) { return c.Cout_g(); }
    static __device__ int Q(const Conv& c) { return c.N * c.ho * c.wo; }
    static __device__ int R(const Conv& c) { return c.Cin_g() * c.kh * c.kw; }
    struct Row { int ci, di, dj; };          // row r = tap (ci, i, j), offsets i*dh, j*dw
    static __device__ Row row(const Conv& c, int r) {
        const int j = r % c.kw, t = r / c.kw;
        return Row{t / c.kh, (t % c.kh) * c.dh, j * c.dw};
    }
    struct Col { int n, y0, x0; };           // column q = output pixel (n, oy, ox)
    static __device__ Col col(const Conv& c, int q) {
        const int ox = q % c.wo, t = q / c.wo, oy = t % c.ho;
        return Col{t / c.ho, oy * c.sh - c.ph, ox * c.sw - c.pw};
    }
    static __device__ float a(const Conv& c, const float* w, int g, int m, const Row&, int r) {
        return w[(g * c.Cout_g() + m) * R(c) + r];
    }
    static __device__ float b(const Conv& c, const float* x, int g, const Row& k, const Col& p) {
        // input channel ci at pixel (y0 + i*dh, x0 + j*dw), 0 in the padding
        const int iy = p.y0 + k.di, ix = p.x0 + k.dj;
        if (iy < 0 || iy >= c.H || ix < 0 || ix >= c.W) return 0.f;
        return x[((p.n * c.Cin + g * c.Cin_g() + k.ci) * c.H + iy) * c.W + ix];
    }
    static __device__ void store(const Conv& c, float* y, int g, int, int m, int q, float v) {
        const int pix = q % (c.ho * c.wo), n = q / (c.ho * c.wo);
        y[(n * c.Cout + g * c.Cout_g() + m) * c.ho * c.wo + pix] = v;
    }
};

struct Dgrad {
    // A = weight read as (C_in/G, C_out/G*kh*kw); B = gy through the taps; C = gx (N, C_in, H, W)
    static __device__ int M(const Conv& c) { return c.Cin_g(); }
    static __device__ int Q(const Conv& c) { return c.N * c.H * c.W; }
    static __device__ int R(const Conv& c) { return c.Cout_g() * c.kh * c.kw; }
    struct Row { int co, ij, di, dj; };      // row r = (co, i, j): ij = i*kw + j
    static __device__ Row row(const Conv& c, int r) {
        const int j = r % c.kw, t = r / c.kw, i = t % c.kh;
        return Row{t / c.kh, i * c.kw + j, i * c.dh, j * c.dw};
    }
    struct Col { int n, ty, tx; };           // column q = input pixel (n, iy, ix), shifted by padding
    static __device__ Col col(const Conv& c, int q) {
        const int ix = q % c.W, t = q / c.W, iy = t % c.H;
        return Col{t / c.H, iy + c.ph, ix + c.pw};
    }
    static __device__ float a(const Conv& c, const float* w, int g, int m, const Row& k, int) {
        return w[((g * c.Cout_g() + k.co) * c.Cin_g() + m) * c.kh * c.kw + k.ij];
    }
    static __device__ float b(const Conv& c, const float* gy, int g, const Row& k, const Col& p) {
        // gy at the output (oy, ox) whose tap (i, j) read this pixel, 0 if no output did
        const int ty = p.ty - k.di, tx = p.tx - k.dj;                      // = oy*sh, ox*sw
        if (ty < 0 || tx < 0 || ty % c.sh || tx % c.sw) return 0.f;
        const int oy = ty / c.sh, ox = tx / c.sw;
        if (oy >= c.ho || ox >= c.wo) return 0.f;
        return gy[((p.n * c.Cout + g * c.Cout_g() + k.co) * c.ho + oy) * c.wo + ox];
    }
    static __device__ void store(const Conv& c, float* gx, int g, int, int m, int q, float v) {
        const int pix = q % (c.H * c.W), n = q / (c.H * c.W);
        gx[(n * c.Cin + g * c.Cin_g() + m) * c.H * c.W + pix] = v;
    }
};

struct Wgrad {
    // A = gy (C_out/G, N*ho*wo) of group g; B = im2col(x) transposed; C = partial gw of one split
    static __device__ int M(const Conv& c) { return c.Cout_g(); }
    static __device__ int Q(const Conv& c) { return c.Cin_g() * c.kh * c.kw; }
    static __device__ int R(const Conv& c) { return c.N * c.ho * c.wo; }
    struct Row { int n, pix, y0, x0; };      // row r = output pixel (n, oy, ox): pix = oy*wo + ox
    static __device__ Row row(const Conv& c, int r) {
        const int ox = r % c.wo, t = r / c.wo, oy = t % c.ho;
        return Row{t / c.ho, oy * c.wo + ox, oy * c.sh - c.ph, ox * c.sw - c.pw};
    }
    struct Col { int ci, di, dj; };          // column q = tap (ci, i, j): its offsets i*dh, j*dw
    static __device__ Col col(const Conv& c, int q) {
        const int j = q % c.kw, t = q / c.kw;
        return Col{t / c.kh, (t % c.kh) * c.dh, j * c.dw};
    }
    static __device__ float a(const Conv& c, const float* gy, int g, int m, const Row& k, int) {
        return gy[(k.n * c.Cout + g * c.Cout_g() + m) * c.ho * c.wo + k.pix];
    }
    static __device__ float b(const Conv& c, const float* x, int g, const Row& k, const Col& p) {
        // the input pixel that output pixel (oy, ox) reads through tap (i, j)
        const int iy = k.y0 + p.di, ix = k.x0 + p.dj;
        if (iy < 0 || iy >= c.H || ix < 0 || ix >= c.W) return 0.f;
        return x[((k.n * c.Cin + g * c.Cin_g() + p.ci) * c.H + iy) * c.W + ix];
    }
    static __device__ void store(const Conv& c, float* part, int g, int split, int m, int q, float v) {
        // part (splits, G, C_out/G, C_in/G*kh*kw): the host sums over splits
        part[((split * c.G + g) * M(c) + m) * Q(c) + q] = v;
    }
};

// ---------------------------------------------------------------- precision modes
// Each mode names the element type of the shared tiles, how a float32 is rounded into it,
// and how one BK-slice of the tiles is multiplied into the accumulators.

struct Highest {                               // float32 FMA on the CUDA cores
    typedef float elem;
    // LDC: to_shared's half-warps write rows 8 apart; 8 * 66 = 16 (mod 32) puts them on
    // different banks (with 68, on the same ones: a 2-way conflict).
    enum { LDA = BK + PAD_F, LDB = BN + PAD_F, LDC = BN + 2 };
    // Blocks per SM that __launch_bounds__ asks ptxas to make room for: 6 keeps this mode at
    // 80 registers without spills (8 would need 64 and spills 44-76 bytes); it had 95-127.
    enum { MIN_BLOCKS = 6 };
    static __device__ elem round(float v) { return v; }
    float acc[8][4];                           // rows 8*(t/16)+i, columns t%16 + 16*jj
    __device__ void zero() {
        for (int i = 0; i < 8; ++i) for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.f;
    }
    __device__ void mma(const elem* As, const elem* Bs) {
        const int r0 = 8 * (threadIdx.x / 16), c0 = threadIdx.x % 16;
        for (int k = 0; k < BK; ++k)
            for (int i = 0; i < 8; ++i) {
                const float a = As[(r0 + i) * LDA + k];
                for (int jj = 0; jj < 4; ++jj) acc[i][jj] += a * Bs[k * LDB + c0 + 16 * jj];
            }
    }
    __device__ void to_shared(float* Cs) {
        const int r0 = 8 * (threadIdx.x / 16), c0 = threadIdx.x % 16;
        for (int i = 0; i < 8; ++i)
            for (int jj = 0; jj < 4; ++jj) Cs[(r0 + i) * LDC + c0 + 16 * jj] = acc[i][jj];
    }
};

// ---------------------------------------------------------------- the tile loop
// One block: the C tile at rows m0 = BM * blockIdx.y, columns q0 = BN * blockIdx.x, of group g,
// over the R range of split `split` (the whole of R unless the kind is wgrad).
template <typename Kind, typename Mode>
__device__ void conv_tile(const Conv c, const float* a_src, const float* b_src, float* out,
                          const int splits, const int r_per_split) {
    typedef typename Mode::elem elem;
    // Shared memory: the A and B tiles while R is walked, then (after a barrier) the finished
    // C tile in the same bytes: 18 KB a block instead of 27 KB, so that shared memory does
    // not cap the blocks per SM before registers do (an A100 has 164 KB per SM).
    enum { AB_BYTES = sizeof(elem) * (BM * Mode::LDA + BK * Mode::LDB),
           C_BYTES = sizeof(float) * BM * Mode::LDC };
    __shared__ __align__(32) unsigned char tiles[AB_BYTES > C_BYTES ? AB_BYTES : C_BYTES];
    elem* const As = reinterpret_cast<elem*>(tiles);        // A[m0 + m, r0 + k]: BM x BK
    elem* const Bs = As + BM * Mode::LDA;                   // B[r0 + k, q0 + q]: BK x BN
    float* const Cs = reinterpret_cast<float*>(tiles);      // C[m0 + m, q0 + q]: BM x BN
    __shared__ typename Kind::Row rows[BK];                 // rows r0 .. r0+BK as coordinates

    const int g = blockIdx.z / splits, split = blockIdx.z % splits;
    const int m0 = BM * blockIdx.y, q0 = BN * blockIdx.x;
    const int M = Kind::M(c), Q = Kind::Q(c), R = Kind::R(c);
    const int r_begin = split * r_per_split;
    const int r_end = min(R, r_begin + r_per_split);

    // This thread gathers column bq = t % BN of every B tile (rows bk0, bk0 + 2, ...): its
    // column's coordinates are worked out once. Neighbouring threads take neighbouring
    // columns, i.e. neighbouring pixels for fwd/dgrad (coalesced reads).
    const int bq = threadIdx.x % BN, bk0 = threadIdx.x / BN;
    const bool bq_inside = q0 + bq < Q;
    const typename Kind::Col col = Kind::col(c, bq_inside ? q0 + bq : 0);
    // ... and column ak = t % BK of every A tile, rows am0, am0 + 8, ...: a warp's two
    // half-warps take rows 4 apart, 4 * LDA = 80 floats, i.e. 16 banks apart (rows 1
    // apart would put 4 of their 16 banks on the same ones).
    const int ak = threadIdx.x % BK, am0 = threadIdx.x / 32 + 4 * (threadIdx.x / 16 % 2);

    Mode mode;
    mode.zero();
    for (int r0 = r_begin; r0 < r_end; r0 += BK) {
        // 0. The slice's BK rows of the reduction axis as coordinates (a tap, or a pixel for
        //    wgrad), split once here for the whole block. (Rows past r_end are never read.)
        //    The barrier after it also keeps every thread from overwriting As, Bs below
        //    before all warps have multiplied the previous slice (step 3).
        if (threadIdx.x < BK) rows[threadIdx.x] = Kind::row(c, min(r0 + (int)threadIdx.x, r_end - 1));
        __syncthreads();
        // 1. A tile: A[m0 .. m0+BM, r0 .. r0+BK] into As, rounded to the mode's type; zeros
        //    past the end of M or of this split's R range.
        for (int m = am0; m < BM; m += THREADS / BK) {
            const int r = r0 + ak;
            const float v = (m0 + m < M && r < r_end) ? Kind::a(c, a_src, g, m0 + m, rows[ak], r) : 0.f;
            As[m * Mode::LDA + ak] = Mode::round(v);
        }
        // 2. B tile: B[r0 .. r0+BK, q0 .. q0+BN], the im2col values (or gy through the taps)
        //    gathered straight from the image into Bs: the column matrix is never stored.
        for (int k = bk0; k < BK; k += THREADS / BN) {
            const float v = (bq_inside && r0 + k < r_end) ? Kind::b(c, b_src, g, rows[k], col) : 0.f;
            Bs[k * Mode::LDB + bq] = Mode::round(v);
        }
        __syncthreads();
        // 3. C tile += As @ Bs (tensor cores or FMA, per mode).
        mode.mma(As, Bs);
        // (No barrier here: step 0 writes only `rows`, which step 3 does not read.)
    }
    // 4. Accumulators -> Cs -> the output, each element through the kind's own index map.
    //    Cs overwrites As and Bs: every warp must be done multiplying first.
    __syncthreads();
    mode.to_shared(Cs);
    __syncthreads();
    for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
        const int m = e / BN, q = e % BN;      // consecutive threads: consecutive pixels
        if (m0 + m < M && q0 + q < Q) Kind::store(c, out, g, split, m0 + m, q0 + q, Cs[m * Mode::LDC + q]);
    }
}
"""

TENSOR_CORE = r"""
#include <mma.h>
using namespace nvcuda;

// Fragments to and from the shared tiles. wmma::load_matrix_sync / store_matrix_sync take a
// generic pointer, and for the tf32 and bf16 shapes nvcc keeps it generic: the SASS has LD/ST,
// which look up the address space at run time, where the fp16 ones become LDS/STS
// (scripts/kernel_report.py, column "generic LD/ST"). A mode may specialise this with the
// `.shared` form of the same PTX instruction (same fragment layout, PTX ISA "wmma.load").
template <typename FragElem>
struct SharedFragments {
    template <typename F, typename E>
    static __device__ void load(F& f, const E* p, unsigned ldm) { wmma::load_matrix_sync(f, p, ldm); }
    template <typename F>
    static __device__ void store(float* p, const F& f, unsigned ldm) {
        wmma::store_matrix_sync(p, f, ldm, wmma::mem_row_major);
    }
};

#if defined(__CUDA_ARCH__)
// PTX wmma.load `op` of a fragment held in 4 registers, from shared address p (a "memory"
// clobber: the compiler must not move it across the __syncthreads that filled the tile).
#define WMMA_LOAD_SHARED(op, f, p, ldm)                                                       \
    asm volatile(op " {%0, %1, %2, %3}, [%4], %5;"                                            \
                 : "=r"(((unsigned*)&(f))[0]), "=r"(((unsigned*)&(f))[1]),                    \
                   "=r"(((unsigned*)&(f))[2]), "=r"(((unsigned*)&(f))[3])                     \
                 : "r"((unsigned)__cvta_generic_to_shared(p)), "r"(ldm) : "memory")
#else   // the host emulation (tests/gpu_emulation_blocks.py): WMMA's own load, same values
#define WMMA_LOAD_SHARED(op, f, p, ldm) wmma::load_matrix_sync(f, p, ldm)
#endif

// The three tensor-core modes differ only in types and the k of one MMA (KS).
template <typename Elem, typename FragElem, int KS>
struct TensorCore {
    typedef Elem elem;
    // Padding, in elements (WMMA needs rows of a multiple of 16 bytes and fragments 32-byte
    // aligned), chosen so that each fragment load or store touches every bank once. tf32
    // (mma m16n8k4 layouts): an A load reads 8 rows x 4 columns, and rows 20 floats apart
    // fall on 8 different groups of 4 banks; a B load reads 4 rows x 8 columns and C is
    // stored as pairs from 4 rows x 4, and rows 72 floats apart fall on 4 different groups
    // of 8 (68 would share banks: 2-way conflicts). 16-bit elements: ldmatrix reads 8 rows
    // of 16 bytes, and rows of 48 (A) or 144 bytes (B) fall on 8 different 16-byte groups.
    enum { LDA = BK + (sizeof(Elem) == 4 ? PAD_F : PAD_H), LDB = BN + PAD_H, LDC = BN + PAD_H };
    // 8 blocks (32 warps) per SM: at most 64 registers a thread, which ptxas meets without
    // spills (it used 68-95); shared memory, 8 x 19.7 KB, fits an A100's SM too.
    enum { MIN_BLOCKS = 8 };
    wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[2][2];   // this warp's 32 x 32
    __device__ void zero() {
        for (int i = 0; i < 2; ++i) for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    }
    __device__ void mma(const elem* As, const elem* Bs) {
        const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
        for (int k = 0; k < BK; k += KS) {
            wmma::fragment<wmma::matrix_a, 16, 16, KS, FragElem, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, KS, FragElem, wmma::row_major> b[2];
            for (int i = 0; i < 2; ++i) SharedFragments<FragElem>::load(a[i], As + (32 * wm + 16 * i) * LDA + k, LDA);
            for (int j = 0; j < 2; ++j) SharedFragments<FragElem>::load(b[j], Bs + k * LDB + 32 * wn + 16 * j, LDB);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    __device__ void to_shared(float* Cs) {
        const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j)
                SharedFragments<FragElem>::store(Cs + (32 * wm + 16 * i) * LDC + 32 * wn + 16 * j,
                                                 acc[i][j], LDC);
    }
};

"""

TF32 = r"""
template <>
struct SharedFragments<wmma::precision::tf32> {
    typedef wmma::precision::tf32 tf32;
    static __device__ void load(wmma::fragment<wmma::matrix_a, 16, 16, 8, tf32, wmma::row_major>& f,
                                const float* p, unsigned ldm) {
        WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.row.m16n16k8.shared.tf32", f, p, ldm);
    }
    static __device__ void load(wmma::fragment<wmma::matrix_b, 16, 16, 8, tf32, wmma::row_major>& f,
                                const float* p, unsigned ldm) {
        WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.row.m16n16k8.shared.tf32", f, p, ldm);
    }
    static __device__ void store(float* p, const wmma::fragment<wmma::accumulator, 16, 16, 8, float>& f,
                                 unsigned ldm) {
#if defined(__CUDA_ARCH__)
        asm volatile("wmma.store.d.sync.aligned.row.m16n16k8.shared.f32 [%0], "
                     "{%1, %2, %3, %4, %5, %6, %7, %8}, %9;"
                     :: "r"((unsigned)__cvta_generic_to_shared(p)),
                        "f"(f.x[0]), "f"(f.x[1]), "f"(f.x[2]), "f"(f.x[3]),
                        "f"(f.x[4]), "f"(f.x[5]), "f"(f.x[6]), "f"(f.x[7]), "r"(ldm) : "memory");
#else
        wmma::store_matrix_sync(p, f, ldm, wmma::mem_row_major);
#endif
    }
};
struct Tf32 : TensorCore<float, wmma::precision::tf32, 8> {
    static __device__ float round(float v) { return wmma::__float_to_tf32(v); }
};
"""

BF16 = r"""
#include <cuda_bf16.h>
template <>
struct SharedFragments<__nv_bfloat16> {
    typedef __nv_bfloat16 bf16;
    static __device__ void load(wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>& f,
                                const bf16* p, unsigned ldm) {
        WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16", f, p, ldm);
    }
    static __device__ void load(wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>& f,
                                const bf16* p, unsigned ldm) {
        WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16", f, p, ldm);
    }
    template <typename F>     // the float accumulators: WMMA's own store is already STS here
    static __device__ void store(float* p, const F& f, unsigned ldm) {
        wmma::store_matrix_sync(p, f, ldm, wmma::mem_row_major);
    }
};
struct Bf16 : TensorCore<__nv_bfloat16, __nv_bfloat16, 16> {
    static __device__ __nv_bfloat16 round(float v) { return __float2bfloat16(v); }
};
"""

FP16 = r"""
#include <cuda_fp16.h>
struct Fp16 : TensorCore<__half, __half, 16> {
    static __device__ __half round(float v) { return __float2half(v); }
};

"""


# One extern "C" entry point per (kind, mode): plain names for RawModule.get_function and for
# the host emulation. The parameter list is the same for all.
_ENTRY = r"""
extern "C" __global__ void __launch_bounds__(THREADS, {Mode}::MIN_BLOCKS) conv_{kind}_{precision}(
        const float* a_src, const float* b_src, float* out,
        const int N, const int Cin, const int H, const int W, const int Cout,
        const int ho, const int wo, const int kh, const int kw, const int sh, const int sw,
        const int ph, const int pw, const int dh, const int dw, const int G,
        const int splits, const int r_per_split) {{
    const Conv c = {{N, Cin, H, W, Cout, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, G}};
    conv_tile<{Kind}, {Mode}>(c, a_src, b_src, out, splits, r_per_split);
}}
"""
_KIND_STRUCT = {"fwd": "Fwd", "dgrad": "Dgrad", "wgrad": "Wgrad"}
_MODE_STRUCT = {"highest": "Highest", "tf32": "Tf32", "bf16": "Bf16", "fp16": "Fp16"}


def kernel_name(kind, precision):
    return f"conv_{kind}_{precision}"


_MODE_SOURCE = {"tf32": TF32, "bf16": BF16, "fp16": FP16}


def cuda_source(precisions=PRECISIONS, includes=True):
    """The CUDA source with one entry point per (kind, precision) for the given precisions.

    includes=False drops the CUDA headers (the host emulation brings its own stand-ins)."""
    parts = [COMMON]
    tensor_core = [p for p in precisions if p != "highest"]
    if tensor_core:
        parts.append(TENSOR_CORE)
        parts += [_MODE_SOURCE[p] for p in tensor_core]
    parts += [_ENTRY.format(kind=k, precision=p, Kind=_KIND_STRUCT[k], Mode=_MODE_STRUCT[p])
              for p in precisions for k in KINDS]
    source = "".join(parts)
    if not includes:
        source = re.sub(r"^#include <\w+\.h>$", "", source, flags=re.M)
    return source


# ---------------------------------------------------------------------------- host side
_modules = {}         # precision -> cupy.RawModule, compiled on first use
_unavailable = {}     # precision -> why its module did not compile (not tried again)


class KernelsUnavailable(RuntimeError):
    """One precision's kernels did not compile on this machine (a CUDA header NVRTC cannot
    find, say); `reason` is one line. The conv plan then takes its im2col route instead."""

    def __init__(self, precision, reason, log):
        self.precision, self.reason = precision, reason
        super().__init__(
            f"the implicit-GEMM {precision!r} kernels did not compile with NVRTC ({reason}); the "
            "tensor-core modes need compute capability 8.0+ and CUDA's mma.h (with crt/mma.h), "
            "cuda_bf16.h, cuda_fp16.h: set CUDA_PATH to a CUDA toolkit, or pip install "
            "nvidia-cuda-crt next to CuPy's CUDA headers; 'highest' needs none. "
            f"Compiler output:\n{log}")


def _first_error(log):
    """The compiler's first error line, shortened: what a one-line warning says."""
    lines = [ln.strip() for ln in str(log).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln] or lines or ["no compiler output"]
    return errors[0][:200]


def _cupy():
    # Imported on first use, so that this module loads (and its source compiles in tests)
    # on machines without CuPy. (kernels sits below minidl: no minidl.backend here.)
    try:
        import cupy
    except ImportError:
        raise ImportError("the implicit-GEMM convolution runs on a GPU through CuPy, which is "
                          "not installed: pip install cupy-cuda12x (or cupy-cuda13x).") from None
    return cupy


def _xp():
    """The array module (CuPy; the host emulation test swaps in NumPy)."""
    return _cupy()


def _run_kernel(name, grid, args):
    """Launch one entry point: grid (x, y, z) blocks of THREADS threads."""
    precision = name.rsplit("_", 1)[1]
    module = _modules.get(precision)
    if module is None:
        if precision in _unavailable:          # failed before: do not compile again
            raise _unavailable[precision]
        cp = _cupy()
        # One module per precision, so that a missing CUDA header (the tensor-core modes
        # include mma.h and cuda_bf16.h / cuda_fp16.h) leaves the other modes working.
        try:
            module = cp.RawModule(code=cuda_source((precision,)))
            module.get_function(name)          # compiles now, inside the try
        except cp.cuda.compiler.CompileException as exc:
            _unavailable[precision] = KernelsUnavailable(precision, _first_error(exc), exc)
            raise _unavailable[precision] from None
        _modules[precision] = module
    module.get_function(name)(grid, (THREADS,), args)


def tensor_cores_available():
    """Whether the current GPU has the tensor-core modes: compute capability 8.0 or later."""
    return int(_cupy().cuda.Device().compute_capability) >= 80


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"implicit-GEMM convolution: precision must be one of {PRECISIONS}, "
                         f"got {precision!r}.")


def _float32(a, what):
    if np.dtype(a.dtype) != np.float32:
        raise TypeError(f"implicit-GEMM convolution: {what} must be float32 (the tensor-core "
                        f"modes round it themselves), got {a.dtype}; cast with .astype('float32').")
    return _xp().ascontiguousarray(a)


def _check_size(*sizes):
    if max(sizes) >= 2 ** 31:
        raise ValueError("implicit-GEMM convolution indexes with 32-bit ints: every array must "
                         f"have fewer than 2^31 elements, got {max(sizes)}; split the batch.")


def _check_shapes(op, ok, what):
    # A mismatch would make the kernel read outside an array: refuse it here.
    if not ok:
        raise ValueError(f"implicit-GEMM {op}: {what}.")


def _i32(*values):
    return tuple(np.int32(v) for v in values)


def _conv_args(n, c_in, h, w, c_out, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, groups):
    if c_in % groups or c_out % groups:
        raise ValueError(f"implicit-GEMM convolution: groups={groups} must divide both channel "
                         f"counts ({c_in} in, {c_out} out).")
    return _i32(n, c_in, h, w, c_out, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, groups)


def wgrad_splits(r, m_tiles, q_tiles, groups, target_blocks=264):
    """How many pieces the weight gradient's reduction (length r = N*ho*wo) is cut into: enough
    blocks to fill the GPU (about 2 per SM of an H100/H200, 132 SMs) without pieces shorter
    than 8 tiles of BK. Returns (splits, rows per split, a multiple of BK)."""
    blocks = max(1, m_tiles * q_tiles * groups)
    splits = max(1, min(target_blocks // blocks, r // (8 * BK)))
    per = -(-r // splits)
    per = -(-per // BK) * BK
    return -(-r // per), per


def conv2d_forward(x, w, sh, sw, ph, pw, dh, dw, ho, wo, groups, precision="highest"):
    """y = conv2d(x, w): x (N, C_in, H, W), w (C_out, C_in/G, kh, kw) -> y (N, C_out, ho, wo).

    ho, wo are given (as in kernels/reference.py), so asymmetric "same" padding works too.
    """
    check_precision(precision)
    x, w = _float32(x, "x"), _float32(w, "weight")
    n, c_in, h, wd = x.shape
    c_out, c_in_g, kh, kw = w.shape
    _check_shapes("conv2d_forward", x.ndim == 4 and c_in_g * groups == c_in,
                  f"x {tuple(x.shape)} needs weight.shape[1] * groups = its {c_in} channels, got "
                  f"weight {tuple(w.shape)} and groups={groups}")
    y = _xp().empty((n, c_out, ho, wo), dtype=np.float32)
    _check_size(x.size, w.size, y.size)
    if y.size == 0:
        return y
    args = _conv_args(n, c_in, h, wd, c_out, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, groups)
    grid = (-(-n * ho * wo // BN), -(-(c_out // groups) // BM), groups)
    _run_kernel(kernel_name("fwd", precision), grid, (w, x, y) + args + _i32(1, c_in // groups * kh * kw))
    return y


def conv2d_input_grad(gy, w, h, wd, sh, sw, ph, pw, dh, dw, groups, precision="highest"):
    """gx = the adjoint of conv2d applied to gy: gy (N, C_out, ho, wo), w (C_out, C_in/G, kh, kw)
    -> gx (N, C_in, h, wd). Also conv_transpose2d's forward pass."""
    check_precision(precision)
    gy, w = _float32(gy, "gy"), _float32(w, "weight")
    n, c_out, ho, wo = gy.shape
    _, c_in_g, kh, kw = w.shape
    _check_shapes("conv2d_input_grad", gy.ndim == 4 and w.shape[0] == c_out,
                  f"gy {tuple(gy.shape)} needs as many channels as weight.shape[0], got weight "
                  f"{tuple(w.shape)}")
    c_in = c_in_g * groups
    gx = _xp().empty((n, c_in, h, wd), dtype=np.float32)
    _check_size(gy.size, w.size, gx.size)
    if gx.size == 0:
        return gx
    args = _conv_args(n, c_in, h, wd, c_out, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, groups)
    grid = (-(-n * h * wd // BN), -(-c_in_g // BM), groups)
    _run_kernel(kernel_name("dgrad", precision), grid,
                (w, gy, gx) + args + _i32(1, c_out // groups * kh * kw))
    return gx


def conv2d_weight_grad(x, gy, kh, kw, sh, sw, ph, pw, dh, dw, groups, precision="highest"):
    """gw = d(sum(conv2d(x, w) * gy)) / dw: x (N, C_in, H, W), gy (N, C_out, ho, wo)
    -> gw (C_out, C_in/G, kh, kw)."""
    check_precision(precision)
    x, gy = _float32(x, "x"), _float32(gy, "gy")
    n, c_in, h, wd = x.shape
    _check_shapes("conv2d_weight_grad", x.ndim == 4 and gy.ndim == 4 and gy.shape[0] == n,
                  f"x {tuple(x.shape)} and gy {tuple(gy.shape)} must be 4-D with the same batch size")
    _, c_out, ho, wo = gy.shape
    c_out_g, c_in_g = c_out // groups, c_in // groups
    args = _conv_args(n, c_in, h, wd, c_out, ho, wo, kh, kw, sh, sw, ph, pw, dh, dw, groups)
    q, r = c_in_g * kh * kw, n * ho * wo
    xp = _xp()
    _check_size(x.size, gy.size)
    if r == 0 or q * c_out_g == 0:
        return xp.zeros((c_out, c_in_g, kh, kw), dtype=np.float32)
    m_tiles, q_tiles = -(-c_out_g // BM), -(-q // BN)
    splits, per = wgrad_splits(r, m_tiles, q_tiles, groups)
    part = xp.empty((splits, groups, c_out_g, q), dtype=np.float32)
    _check_size(part.size)
    _run_kernel(kernel_name("wgrad", precision), (q_tiles, m_tiles, groups * splits),
                (gy, x, part) + args + _i32(splits, per))
    # The pieces added in a fixed order: the same result every run.
    return part.sum(axis=0).reshape(c_out, c_in_g, kh, kw)


# The transposed convolution: conv_transpose2d(x, w) with w (C_in, C_out/G, kh, kw) is the
# adjoint of the conv2d from its output (C_out channels, size out_hw) to its input, whose
# weight has exactly w's layout (that conv's C_out is C_in here).
def conv_transpose2d_forward(x, w, out_hw, sh, sw, ph, pw, dh, dw, groups, precision="highest"):
    """x (N, C_in, h, w), w (C_in, C_out/G, kh, kw) -> y (N, C_out, *out_hw)."""
    return conv2d_input_grad(x, w, out_hw[0], out_hw[1], sh, sw, ph, pw, dh, dw, groups, precision)


def conv_transpose2d_input_grad(gy, w, sh, sw, ph, pw, dh, dw, groups, in_hw, precision="highest"):
    """gy (N, C_out, H, W) -> gx (N, C_in, *in_hw): the conv2d of gy with w."""
    return conv2d_forward(gy, w, sh, sw, ph, pw, dh, dw, in_hw[0], in_hw[1], groups, precision)


def conv_transpose2d_weight_grad(x, gy, kh, kw, sh, sw, ph, pw, dh, dw, groups, precision="highest"):
    """x (N, C_in, h, w), gy (N, C_out, H, W) -> gw (C_in, C_out/G, kh, kw)."""
    return conv2d_weight_grad(gy, x, kh, kw, sh, sw, ph, pw, dh, dw, groups, precision)

"""GPU kernels: the same functions and signatures as kernels/reference.py, as CUDA C run by CuPy.

Read reference.py first for *what* each kernel computes; this file is about doing it on a GPU.

* One CUDA thread per **output** element, in a grid-stride loop (`for (t = first; t < total;
  t += all threads)`), so any size runs with a fixed launch and neighbouring threads write
  neighbouring addresses (coalesced stores).
* Every adjoint ("backward") is written as a **gather**: the thread that owns an output
  element reads all the values that should be added into it, in a fixed order. No two
  threads write one address, so no floating-point atomics are needed and results are
  bit-for-bit the same from run to run (and the same summation order as kernels/cpu.py).
  Where the reverse map is not known in closed form (max-pool indices, unpooling), a first
  kernel builds it with *integer* atomics, whose result does not depend on thread order
  once it is read back in sorted order.
* Index arithmetic uses the type `I`: `long long` when an array of the launch has 2^31
  elements or more (im2col's column matrix gets there easily: 8 x 64*9 x 256*256 is 302
  million, one more factor of 8 passes 2^31), `int` otherwise, because 64-bit integer
  division is emulated on GPUs and several times slower than 32-bit.
* float32 and float64 (and each index type) get their own compiled copy of the source: it
  starts with `typedef float T;` or `typedef double T;` and `typedef int I;` or
  `typedef long long I;`. Compiled once each (CuPy also keeps the binaries in
  ~/.cupy/kernel_cache, so later runs skip NVRTC).

CuPy is imported lazily (through kernels/cuda.py's require_cupy), so `import kernels.gpu`
works on a machine without CuPy; calling a kernel there raises the clear "install CuPy" error.

Testing without a GPU: tests/test_gpu_source.py compiles this same CUDA source as plain C++
on the host (tests/gpu_emulation.py) and runs the Python wrappers below on NumPy arrays by
replacing two seams, `_xp()` (the array module) and `_run_kernel(name, dtype, itype, total,
args)` (launch one kernel); tests/fake_cupy.py runs everything through a stand-in CuPy.
"""
import functools

import numpy as np

from .cuda import require_cupy

# ---------------------------------------------------------------------------- CUDA source
# The whole bundle is one source string, compiled into one RawModule per (T, I): `T` is the
# floating type (float or double), `I` the index type. Loops are grid-stride loops over
# `total` elements.

# The loop index and all index arithmetic use the type I: int when every array of the launch
# has fewer than _INT32_LIMIT elements (32-bit division is several times cheaper on a GPU),
# long long otherwise.
_GRID_STRIDE = ("for (I t = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; t < total; "
                "t += (I)blockDim.x * (I)gridDim.x)")

IM2COL_SRC = r"""
// cols from x (N, C, H, W). One thread per (n, c, oy, ox) writes that output position's
// kh*kw taps of channel c: rows (c, i, j) of cols, row_step apart. Padding reads 0. Why not
// one thread per element of cols: the index arithmetic (integer divisions, emulated in
// software on a GPU) then costs more than moving the data; here it is done once per kh*kw
// elements. Neighbouring threads (ox, ox+1) still write neighbouring addresses in every row,
// so the stores stay coalesced. The columns' layout is two strides, as in col2im_kernel:
// (N, C*kh*kw, L) has sample_step L*C*kh*kw and row_step L; im2col_rows' (C*kh*kw, N*L),
// the samples side by side, has L and N*L.
extern "C" __global__ void im2col_kernel(
        const T* x, T* cols, const I total,
        const I C, const I H, const I W,
        const I kh, const I kw, const I sh, const I sw,
        const I ph, const I pw, const I dh, const I dw,
        const I ho, const I wo, const I sample_step, const I row_step) {
    GRID_STRIDE {
        I r = t;
        const I ox = r % wo; r /= wo;
        const I oy = r % ho; r /= ho;           // now r = n * C + c
        const T* plane = x + r * H * W;
        T* out = cols + (r / C) * sample_step + (r % C) * kh * kw * row_step
                 + oy * wo + ox;                // row (c, i=0, j=0)
        const I y0 = oy * sh - ph, x0 = ox * sw - pw;
        for (I i = 0; i < kh; ++i) {
            const I iy = y0 + i * dh;
            const bool row_inside = iy >= 0 && iy < H;
            for (I j = 0; j < kw; ++j, out += row_step) {
                const I ix = x0 + j * dw;
                *out = (row_inside && ix >= 0 && ix < W) ? plane[iy * W + ix] : (T)0;
            }
        }
    }
}
"""

COL2IM_SRC = r"""
// x (N, C, H, W) = sum of the cols entries that im2col copied from each pixel.
// A gather: one thread per pixel visits the kh*kw taps; tap (i, j) was read by output
// position (oy, ox) only if iy + ph - i*dh is a non-negative multiple of sh (same for x).
// Stride 1 (most layers) skips the divisibility test, which costs an integer division.
// The columns' layout is two strides: from one sample's columns to the next (sample_step)
// and from one row (c, i, j) to the next (row_step): (N, C*kh*kw, L) has L*C*kh*kw and L,
// im2col_rows' (C*kh*kw, N*L) has L and N*L.
extern "C" __global__ void col2im_kernel(
        const T* cols, T* x, const I total,
        const I C, const I H, const I W,
        const I kh, const I kw, const I sh, const I sw,
        const I ph, const I pw, const I dh, const I dw,
        const I ho, const I wo, const I sample_step, const I row_step) {
    GRID_STRIDE {
        I r = t;
        const I ix = r % W; r /= W;
        const I iy = r % H; r /= H;             // now r = n * C + c
        const T* rows = cols + (r / C) * sample_step + (r % C) * kh * kw * row_step;
        T s = (T)0;
        for (I i = 0; i < kh; ++i) {
            const I ty = iy + ph - i * dh;      // = oy * sh
            if (ty < 0) break;                  // ty only falls as i grows
            if (sh != 1 && ty % sh != 0) continue;
            const I oy = sh == 1 ? ty : ty / sh;
            if (oy >= ho) continue;
            for (I j = 0; j < kw; ++j) {
                const I tx = ix + pw - j * dw;  // = ox * sw
                if (tx < 0) break;
                if (sw != 1 && tx % sw != 0) continue;
                const I ox = sw == 1 ? tx : tx / sw;
                if (ox >= wo) continue;
                s += rows[(i * kw + j) * row_step + oy * wo + ox];
            }
        }
        x[t] = s;
    }
}
"""

MAXPOOL_SRC = r"""
// y, idx (N, C, ho, wo): one thread per output. Taps are scanned row by row; only a
// strictly larger value (or a NaN) replaces the best, so the first maximum wins ties.
// Padding is never a candidate; a window with no pixel inside gives (lowest, -1).
extern "C" __global__ void maxpool_forward_kernel(
        const T* x, T* y, long long* idx, const I total,
        const I H, const I W,
        const I kh, const I kw, const I sh, const I sw,
        const I ph, const I pw, const I dh, const I dw,
        const I ho, const I wo, const T lowest) {
    GRID_STRIDE {
        I r = t;
        const I ox = r % wo; r /= wo;
        const I oy = r % ho;
        const I plane = r / ho;               // n * C + c
        const T* src = x + plane * H * W;
        T best = lowest;
        I where = -1;
        for (I i = 0; i < kh; ++i) {
            const I iy = oy * sh - ph + i * dh;
            if (iy < 0 || iy >= H) continue;
            for (I j = 0; j < kw; ++j) {
                const I ix = ox * sw - pw + j * dw;
                if (ix < 0 || ix >= W) continue;
                const T v = src[iy * W + ix];
                if (where < 0 || v > best || v != v) {  // v != v: NaN wins, as in PyTorch
                    best = v;
                    where = iy * W + ix;
                }
            }
        }
        y[t] = best;
        idx[t] = where;
    }
}

// Backward, step 1 of 2: build, for every input pixel, the list of outputs whose window
// picked it. head[pixel] is the newest output in its list, next[output] the one after.
// Only integer atomics; the list order varies from run to run, step 2 does not depend on it.
// Indices inside a plane are int (the wrapper checks that a plane has < 2^31 elements).
extern "C" __global__ void maxpool_link_kernel(
        const long long* idx, int* head, int* next, const I total,
        const I plane_in, const I plane_out) {
    GRID_STRIDE {
        const I plane = t / plane_out;
        const int local = (int)(t - plane * plane_out);
        const long long p = idx[t];
        if (p < 0 || p >= plane_in) { next[t] = -1; continue; }   // no valid pixel: skip
        next[t] = atomicExch(&head[plane * plane_in + p], local);
    }
}

// Backward, step 2 of 2: one thread per input pixel sums the gradients of its list in
// increasing output order (the order kernels/cpu.py adds them in), so the result is
// deterministic. A list is short (at most kh*kw entries), so picking the next-smallest
// by rescanning it is cheap.
extern "C" __global__ void maxpool_gather_kernel(
        const T* gy, const int* head, const int* next, T* gx, const I total,
        const I plane_in, const I plane_out) {
    GRID_STRIDE {
        const I base = (t / plane_in) * plane_out;   // this plane's first output
        T s = (T)0;
        int last = -1;
        while (true) {
            int best = -1;
            for (int o = head[t]; o >= 0; o = next[base + o]) {
                if (o > last && (best < 0 || o < best)) best = o;
            }
            if (best < 0) break;
            s += gy[base + best];
            last = best;
        }
        gx[t] = s;
    }
}
"""

MAXUNPOOL_SRC = r"""
// Unpooling forward, step 1 of 2: for every output pixel, the last input (in plane order)
// that points at it, as in NumPy's y[idx] = x where the last repeated index wins.
extern "C" __global__ void maxunpool_claim_kernel(
        const long long* idx, int* winner, const I total,
        const I plane_in, const I plane_out) {
    GRID_STRIDE {
        const I plane = t / plane_in;
        const long long p = idx[t];
        if (p < 0 || p >= plane_out) continue;          // out of range: dropped
        atomicMax(&winner[plane * plane_out + p], (int)(t - plane * plane_in));
    }
}

// Unpooling forward, step 2 of 2: one thread per output pixel copies its winner (or 0).
extern "C" __global__ void maxunpool_fill_kernel(
        const T* x, const int* winner, T* y, const I total,
        const I plane_in, const I plane_out) {
    GRID_STRIDE {
        const int w = winner[t];
        y[t] = w >= 0 ? x[(t / plane_out) * plane_in + w] : (T)0;
    }
}

// Unpooling backward: a plain gather, gx[n, c, k] = gy[n, c, idx[n, c, k]].
extern "C" __global__ void maxunpool_backward_kernel(
        const T* gy, const long long* idx, T* gx, const I total,
        const I plane_in, const I plane_out) {
    GRID_STRIDE {
        const long long p = idx[t];
        gx[t] = (p >= 0 && p < plane_out) ? gy[(t / plane_in) * plane_out + p] : (T)0;
    }
}
"""

BILINEAR_SRC = r"""
// Bilinear resize. Per output row oy the wrapper precomputes (y0, y1, a0, a1): the two
// source rows and their weights (PyTorch's source-coordinate rule), likewise per column.
// y = a0 * (b0 * x[y0, x0] + b1 * x[y0, x1]) + a1 * (b0 * x[y1, x0] + b1 * x[y1, x1])
extern "C" __global__ void bilinear_forward_kernel(
        const T* x, T* y, const I total,
        const I H, const I W, const I ho, const I wo,
        const long long* y0, const long long* y1, const T* a0, const T* a1,
        const long long* x0, const long long* x1, const T* b0, const T* b1) {
    GRID_STRIDE {
        I r = t;
        const I ox = r % wo; r /= wo;
        const I oy = r % ho;
        const I plane = r / ho;
        const T* src = x + plane * H * W;
        const T top = b0[ox] * src[y0[oy] * W + x0[ox]] + b1[ox] * src[y0[oy] * W + x1[ox]];
        const T bottom = b0[ox] * src[y1[oy] * W + x0[ox]] + b1[ox] * src[y1[oy] * W + x1[ox]];
        y[t] = a0[oy] * top + a1[oy] * bottom;
    }
}

// Bilinear backward as a gather: one thread per input pixel (iy, ix). The output rows that
// read row iy are exactly those whose y0 is iy - 1 or iy (y1 = min(y0 + 1, H - 1)), a
// contiguous range [ylo[iy], yhi[iy]) because y0 never decreases; likewise for columns.
extern "C" __global__ void bilinear_backward_kernel(
        const T* gy, T* gx, const I total,
        const I H, const I W, const I ho, const I wo,
        const long long* y0, const long long* y1, const T* a0, const T* a1,
        const long long* x0, const long long* x1, const T* b0, const T* b1,
        const long long* ylo, const long long* yhi,
        const long long* xlo, const long long* xhi) {
    GRID_STRIDE {
        I r = t;
        const I ix = r % W; r /= W;
        const I iy = r % H;
        const I plane = r / H;
        const T* g = gy + plane * ho * wo;
        T s = (T)0;
        for (I oy = ylo[iy]; oy < yhi[iy]; ++oy) {
            for (I ox = xlo[ix]; ox < xhi[ix]; ++ox) {
                const T go = g[oy * wo + ox];
                // The same four products as the forward; a tap counts when it lands on (iy, ix).
                if (y0[oy] == iy && x0[ox] == ix) s += a0[oy] * b0[ox] * go;
                if (y0[oy] == iy && x1[ox] == ix) s += a0[oy] * b1[ox] * go;
                if (y1[oy] == iy && x0[ox] == ix) s += a1[oy] * b0[ox] * go;
                if (y1[oy] == iy && x1[ox] == ix) s += a1[oy] * b1[ox] * go;
            }
        }
        gx[t] = s;
    }
}
"""

BATCHNORM_SRC = r"""
// Batch norm (+ ReLU) on x viewed as (N, C, S); per channel c, over its M = N*S values.
// Forward, one thread per element: xhat = (x - mean[c]) * inv_std[c],
// y = xhat * scale[c] + shift[c], and y = max(y, 0) when relu (NaN stays NaN, as in the
// reference). y and xhat are written in the same pass: one read of x instead of four.
extern "C" __global__ void batchnorm_forward_kernel(
        const T* x, const T* mean, const T* inv_std, const T* scale, const T* shift,
        T* y, T* xhat, const I total, const I C, const I S, const int relu) {
    GRID_STRIDE {
        const I c = (t / S) % C;
        const T h = (x[t] - mean[c]) * inv_std[c];
        T v = h * scale[c] + shift[c];
        if (relu && v < (T)0) v = (T)0;
        xhat[t] = h;
        y[t] = v;
    }
}

// Statistics, step 1 (one read of x): thread (c, k), k < K, runs Welford's update over values
// k, k + K, k + 2K, ... of channel c (in that order: deterministic), keeping their mean and
// their sum of squared deviations M2, which unlike sum(x^2) - sum(x)^2 / n loses no digits when
// the mean is large next to the spread. batchnorm_merge_kernel merges the K (mean, M2) pairs.
extern "C" __global__ void batchnorm_stats_kernel(
        const T* x, T* part_mean, T* part_m2, const I total, const I C, const I S, const I M,
        const I K) {
    GRID_STRIDE {
        const I c = t / K;
        T mean = (T)0, m2 = (T)0, count = (T)0;
        for (I j = t % K; j < M; j += K) {
            const T v = x[((j / S) * C + c) * S + j % S];
            count += (T)1;
            const T d = v - mean;
            mean += d / count;
            m2 += d * (v - mean);
        }
        part_mean[t] = mean;
        part_m2[t] = m2;
    }
}

// Backward, step 1: per-channel sums of g and g * xhat, where g = gy, or with relu gy where
// xhat * scale + shift > 0 (the forward's mask, recomputed instead of stored). Thread
// (c, k), k < K, sums values k, k + K, k + 2K, ... of channel c in that order, so the
// result does not depend on thread scheduling; neighbouring k read neighbouring addresses.
// batchnorm_sum_lanes_kernel adds up the K partial sums per channel.
// (One kernel for the whole backward would need a block-wide reduction with a barrier,
// which the host emulation that tests this source, tests/gpu_emulation.py, cannot run.)
extern "C" __global__ void batchnorm_backward_reduce_kernel(
        const T* gy, const T* xhat, const T* scale, const T* shift,
        T* part_g, T* part_gx, const I total, const I C, const I S, const I M, const I K,
        const int relu) {
    GRID_STRIDE {
        const I c = t / K;
        T sg = (T)0, sgx = (T)0;
        for (I j = t % K; j < M; j += K) {
            const I a = ((j / S) * C + c) * S + j % S;
            T g = gy[a];
            if (relu) g *= (T)(xhat[a] * scale[c] + shift[c] > (T)0);
            sg += g;
            sgx += g * xhat[a];
        }
        part_g[t] = sg;
        part_gx[t] = sgx;
    }
}

// Backward, step 2, one thread per element (g masked as in step 1; m = N*S):
//   training: gx = scale * inv_std * (g - gshift / m - xhat * gscale / m)
//   eval:     gx = scale * inv_std * g
extern "C" __global__ void batchnorm_backward_apply_kernel(
        const T* gy, const T* xhat, const T* scale, const T* shift, const T* inv_std,
        const T* gshift, const T* gscale, T* gx, const I total, const I C, const I S,
        const T m, const int training, const int relu) {
    GRID_STRIDE {
        const I c = (t / S) % C;
        T g = gy[t];
        if (relu) g *= (T)(xhat[t] * scale[c] + shift[c] > (T)0);
        const T k = scale[c] * inv_std[c];
        gx[t] = training ? k * (g - gshift[c] / m - xhat[t] * (gscale[c] / m)) : k * g;
    }
}

// Statistics, step 2, one thread per channel c: merge its K lanes from step 1 with Chan et
// al.'s formula for combining groups (lane k holds count_k = ceil((M - k) / K) values):
//   mean = sum(count_k mean_k) / M,   M2 = sum(M2_k + count_k (mean_k - mean)^2),
// then var = M2 / M (biased), inv_std = 1 / sqrt(var + eps) and, when update, the running
// statistics in place (keep = 1 - momentum, momentum_unbiased = momentum * M / (M - 1)):
//   running_mean = keep * running_mean + momentum * mean
//   running_var  = keep * running_var  + momentum_unbiased * var
// One launch for what were about twenty CuPy expressions, and no host read (graph-safe).
extern "C" __global__ void batchnorm_merge_kernel(
        const T* part_mean, const T* part_m2, T* mean, T* var, T* inv_std,
        T* running_mean, T* running_var, const I total, const I M, const I K, const T eps,
        const T keep, const T momentum, const T momentum_unbiased, const int update) {
    GRID_STRIDE {
        const T* lane_mean = part_mean + t * K;
        const T* lane_m2 = part_m2 + t * K;
        T s = (T)0;
        for (I k = 0; k < K; ++k) s += (T)((M - k + K - 1) / K) * lane_mean[k];
        const T mu = s / (T)M;
        T m2 = (T)0;
        for (I k = 0; k < K; ++k) {
            const T d = lane_mean[k] - mu;
            m2 += lane_m2[k] + (T)((M - k + K - 1) / K) * d * d;
        }
        const T v = m2 / (T)M;
        mean[t] = mu;
        var[t] = v;
        inv_std[t] = (T)1 / sqrt(v + eps);
        if (update) {
            running_mean[t] = keep * running_mean[t] + momentum * mu;
            running_var[t] = keep * running_var[t] + momentum_unbiased * v;
        }
    }
}

// Evaluation, one thread per channel: inv_std = 1 / sqrt(running_var + eps).
extern "C" __global__ void batchnorm_inv_std_kernel(
        const T* var, T* inv_std, const I total, const T eps) {
    GRID_STRIDE {
        inv_std[t] = (T)1 / sqrt(var[t] + eps);
    }
}

// Backward, between steps 1 and 2, one thread per channel c: add up its K partial sums of g
// and of g * xhat, in lane order (deterministic).
extern "C" __global__ void batchnorm_sum_lanes_kernel(
        const T* part_g, const T* part_gx, T* gshift, T* gscale, const I total, const I K) {
    GRID_STRIDE {
        T sg = (T)0, sgx = (T)0;
        for (I k = 0; k < K; ++k) {
            sg += part_g[t * K + k];
            sgx += part_gx[t * K + k];
        }
        gshift[t] = sg;
        gscale[t] = sgx;
    }
}
"""

OPTIM_SRC = r"""
// Optimizer updates, one thread per element, in place. Called on one parameter or on a
// flat buffer holding every parameter (minidl/optim/flat.py): then one launch updates all.
// Coefficients such as 1 - beta1 come precomputed from Python, in T, as the reference
// computes them (a float32 1 - 0.9f would differ from float32(1 - 0.9) in the last bit).
// found_inf: the GradScaler's inf/NaN flag (0-d, on the device; a zero one when there is no
// scaler): when it is set the whole step is skipped, so the decision needs no host read.
// Adam (see reference.adam_update), element t; v_max is read and written only when amsgrad.
__device__ inline void adam_element(
        T* p, const T* g, T* m, T* v, T* v_max, const I t,
        const T beta1, const T one_minus_beta1, const T beta2, const T one_minus_beta2,
        const T step_size, const T bias2_sqrt, const T eps, const T weight_decay,
        const int amsgrad) {
    T gv = g[t];
    if (weight_decay != (T)0) gv = gv + weight_decay * p[t];
    const T mv = beta1 * m[t] + one_minus_beta1 * gv;
    T vv = beta2 * v[t] + one_minus_beta2 * (gv * gv);
    m[t] = mv;
    v[t] = vv;
    if (amsgrad) {
        const T a = v_max[t];
        vv = (a != a || a >= vv) ? a : vv;     // max, NaN wins as in np.maximum
        v_max[t] = vv;
    }
    p[t] -= step_size * mv / (sqrt(vv) / bias2_sqrt + eps);
}

// The bias corrections step_size and bias2_sqrt as numbers (plain Adam: its step count is a
// Python number) ...
extern "C" __global__ void adam_update_kernel(
        T* p, const T* g, T* m, T* v, T* v_max, const I total,
        const T beta1, const T one_minus_beta1, const T beta2, const T one_minus_beta2,
        const T step_size, const T bias2_sqrt, const T eps, const T weight_decay,
        const int amsgrad, const float* found_inf) {
    if (*found_inf != 0.0f) return;
    GRID_STRIDE {
        adam_element(p, g, m, v, v_max, t, beta1, one_minus_beta1, beta2, one_minus_beta2,
                     step_size, bias2_sqrt, eps, weight_decay, amsgrad);
    }
}

// ... or computed here from the step count *step, a 0-d array on the device (capturable
// Adam: a CUDA graph replays each step with its own bias correction, and no other launch is
// needed to compute it). In double, as Python computes them, then rounded to T.
extern "C" __global__ void adam_update_at_step_kernel(
        T* p, const T* g, T* m, T* v, T* v_max, const I total,
        const double beta1, const double beta2, const double lr, const double* step,
        const T eps, const T weight_decay, const int amsgrad, const float* found_inf) {
    if (*found_inf != 0.0f) return;
    const T step_size = (T)(lr / (1.0 - pow(beta1, *step)));
    const T bias2_sqrt = (T)sqrt(1.0 - pow(beta2, *step));
    GRID_STRIDE {
        adam_element(p, g, m, v, v_max, t, (T)beta1, (T)(1.0 - beta1), (T)beta2,
                     (T)(1.0 - beta2), step_size, bias2_sqrt, eps, weight_decay, amsgrad);
    }
}

// SGD with momentum (see reference.sgd_update); buf is read and written only when momentum.
extern "C" __global__ void sgd_update_kernel(
        T* p, const T* g, T* buf, const I total, const T lr, const T momentum,
        const T one_minus_dampening, const T weight_decay, const int first,
        const int nesterov, const float* found_inf) {
    if (*found_inf != 0.0f) return;
    GRID_STRIDE {
        T gv = g[t];
        if (weight_decay != (T)0) gv = gv + weight_decay * p[t];
        if (momentum != (T)0) {
            const T b = first ? gv : momentum * buf[t] + one_minus_dampening * gv;
            buf[t] = b;
            gv = nesterov ? gv + momentum * b : b;
        }
        p[t] -= lr * gv;
    }
}
"""

LOSS_SCALING_SRC = r"""
// The GradScaler's two kernels (see reference.unscale_and_check and reference.update_scale).
// The scale, the growth tracker and the inf/NaN flag stay on the device: no host read, so
// eager steps do not stall the GPU's queue and a CUDA graph can replay them.
// out = g * (1 / scale) (out may be g); found_inf = 1 when a value of out is inf or NaN. Many
// threads may write the flag, all the same 1, so the race is harmless. v - v is 0 for a
// finite v and NaN for inf or NaN (no isfinite needed in the host emulation).
extern "C" __global__ void unscale_check_kernel(
        const T* g, T* out, const float* scale, float* found_inf, const I total) {
    const T inv = (T)(float)(1.0 / (double)*scale);   // rounded to float32, as PyTorch's
    GRID_STRIDE {
        const T v = g[t] * inv;
        out[t] = v;
        if (v - v != (T)0) *found_inf = 1.0f;
    }
}

// The scale's update after a step, by one thread (total = 1): back off on an inf/NaN, grow
// after growth_interval clean steps in a row (unless the grown scale is inf).
extern "C" __global__ void update_scale_kernel(
        float* scale, int* growth_tracker, const float* found_inf, const I total,
        const float growth_factor, const float backoff_factor, const int growth_interval) {
    GRID_STRIDE {
        if (*found_inf > 0.0f) {
            *scale = *scale * backoff_factor;
            *growth_tracker = 0;
        } else if (*growth_tracker + 1 >= growth_interval) {
            const float grown = *scale * growth_factor;
            if (grown - grown == 0.0f) *scale = grown;
            *growth_tracker = 0;
        } else {
            *growth_tracker += 1;
        }
    }
}
"""

SOURCES = (IM2COL_SRC, COL2IM_SRC, MAXPOOL_SRC, MAXUNPOOL_SRC, BILINEAR_SRC,
           BATCHNORM_SRC, OPTIM_SRC, LOSS_SCALING_SRC)
KERNEL_NAMES = (
    "im2col_kernel", "col2im_kernel",
    "maxpool_forward_kernel", "maxpool_link_kernel", "maxpool_gather_kernel",
    "maxunpool_claim_kernel", "maxunpool_fill_kernel", "maxunpool_backward_kernel",
    "bilinear_forward_kernel", "bilinear_backward_kernel",
    "batchnorm_stats_kernel", "batchnorm_forward_kernel", "batchnorm_backward_reduce_kernel",
    "batchnorm_backward_apply_kernel", "batchnorm_merge_kernel", "batchnorm_inv_std_kernel",
    "batchnorm_sum_lanes_kernel", "adam_update_kernel", "adam_update_at_step_kernel",
    "sgd_update_kernel", "unscale_check_kernel", "update_scale_kernel",
)
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_ITYPES = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long"}


def cuda_source(dtype, itype=np.int64):
    """The complete CUDA source for one floating dtype (float32 or float64) and one index
    type (int32 or int64)."""
    body = "\n".join(SOURCES).replace("GRID_STRIDE", _GRID_STRIDE)
    return (f"typedef {_CTYPES[np.dtype(dtype)]} T;\n"
            f"typedef {_ITYPES[np.dtype(itype)]} I;\n{body}")


# ---------------------------------------------------------------------------- launching
_BLOCK = 256          # threads per block
_MAX_BLOCKS = 65535   # more work than this many blocks is covered by the grid-stride loop
# 32-bit indexing when every array of a launch is smaller than this. The margin below 2^31
# keeps `t + threads in the grid` (at most 65535 * 256 < 2^24) from overflowing an int.
_INT32_LIMIT = 2 ** 31 - 2 ** 26
_modules = {}         # (dtype, index dtype) -> cupy.RawModule, compiled on first use


class _Index(int):
    """A scalar kernel argument of the index type I (int or long long, chosen per launch)."""


def _i(*values):
    return tuple(_Index(v) for v in values)


def _xp():
    """The array module the wrappers allocate with (CuPy; the host test swaps in NumPy)."""
    return require_cupy()


def _module(dtype, itype):
    key = (np.dtype(dtype), np.dtype(itype))
    mod = _modules.get(key)
    if mod is None:
        cp = require_cupy()
        mod = cp.RawModule(code=cuda_source(dtype, itype))
        _modules[key] = mod
    return mod


def _launch(name, dtype, total, args):
    """Run kernel `name` over `total` elements: pick the index type from the sizes of the
    array arguments, turn the _Index scalars into it, and launch (nothing when total == 0)."""
    if total == 0:
        return
    biggest = max([total] + [a.size for a in args if hasattr(a, "size") and hasattr(a, "shape")])
    itype = np.dtype(np.int32 if biggest < _INT32_LIMIT else np.int64)
    args = tuple(itype.type(a) if isinstance(a, _Index) else a for a in args)
    _run_kernel(name, dtype, itype, total, args)


def _run_kernel(name, dtype, itype, total, args):
    """Launch one compiled kernel with a fixed-size grid (the loops are grid-stride)."""
    kernel = _module(dtype, itype).get_function(name)
    blocks = min((total + _BLOCK - 1) // _BLOCK, _MAX_BLOCKS)
    kernel((blocks,), (_BLOCK,), args)


def _float_input(a, what):
    """a as a C-contiguous float32/float64 device array, or a clear TypeError."""
    dtype = np.dtype(a.dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"the GPU kernel {what} supports float32 and float64 arrays, got {dtype}; "
                        "cast the input with .astype('float32') first.")
    return _xp().ascontiguousarray(a), dtype


def _index_input(idx):
    return _xp().ascontiguousarray(idx, dtype=np.int64)


def _check_plane(size, what):
    # The pooling lists store positions inside one plane as int32.
    if size >= 2 ** 31:
        raise ValueError(f"{what} on the GPU needs planes of fewer than 2^31 elements, got {size}.")


# ---------------------------------------------------------------------- im2col / col2im
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """x (N, C, H, W) -> cols (N, C*kh*kw, ho*wo); see reference.im2col."""
    x, dtype = _float_input(x, "im2col")
    n, c, h, w = x.shape
    cols = _xp().empty((n, c * kh * kw, ho * wo), dtype=dtype)
    total = n * c * ho * wo        # threads: one per (n, c, oy, ox), each writing kh*kw values
    L = ho * wo
    _launch("im2col_kernel", dtype, total,
            (x, cols) + _i(total, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo,
                           c * kh * kw * L, L))
    return cols


def col2im(cols, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """cols (N, C*kh*kw, ho*wo) -> x (N, C, h, w), summing overlaps (a gather per pixel)."""
    cols, dtype = _float_input(cols, "col2im")
    n, L = cols.shape[0], ho * wo
    x = _xp().empty((n, c, h, w), dtype=dtype)
    _launch("col2im_kernel", dtype, x.size,
            (cols, x) + _i(x.size, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo,
                           c * kh * kw * L, L))
    return x


# ---------------------------------------------------------------------- max pooling
def maxpool2d_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """x (N, C, H, W) -> (y, idx int64), both (N, C, ho, wo); see reference.maxpool2d_forward."""
    x, dtype = _float_input(x, "maxpool2d_forward")
    xp = _xp()
    n, c, h, w = x.shape
    y = xp.empty((n, c, ho, wo), dtype=dtype)
    idx = xp.empty((n, c, ho, wo), dtype=np.int64)
    _launch("maxpool_forward_kernel", dtype, y.size,
            (x, y, idx) + _i(y.size, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)
            + (dtype.type(-np.inf),))
    return y, idx


def maxpool2d_backward(gy, idx, h, w):
    """gy, idx (N, C, ho, wo) -> gx (N, C, h, w); repeated indices add (deterministically)."""
    gy, dtype = _float_input(gy, "maxpool2d_backward")
    idx = _index_input(idx)
    xp = _xp()
    n, c, ho, wo = gy.shape
    plane_in, plane_out = h * w, ho * wo
    _check_plane(max(plane_in, plane_out), "maxpool2d_backward")
    head = xp.full((n, c, h, w), -1, dtype=np.int32)
    nxt = xp.empty((n, c, ho, wo), dtype=np.int32)
    gx = xp.empty((n, c, h, w), dtype=dtype)
    _launch("maxpool_link_kernel", dtype, idx.size,
            (idx, head, nxt) + _i(idx.size, plane_in, plane_out))
    _launch("maxpool_gather_kernel", dtype, gx.size,
            (gy, head, nxt, gx) + _i(gx.size, plane_in, plane_out))
    return gx


def maxunpool2d_forward(x, idx, ho, wo):
    """x, idx (N, C, h, w) -> y (N, C, ho, wo): y.flat[idx] = x per plane, zeros elsewhere."""
    x, dtype = _float_input(x, "maxunpool2d_forward")
    idx = _index_input(idx)
    xp = _xp()
    n, c, h, w = x.shape
    plane_in, plane_out = h * w, ho * wo
    _check_plane(max(plane_in, plane_out), "maxunpool2d_forward")
    winner = xp.full((n, c, ho, wo), -1, dtype=np.int32)
    y = xp.empty((n, c, ho, wo), dtype=dtype)
    _launch("maxunpool_claim_kernel", dtype, idx.size,
            (idx, winner) + _i(idx.size, plane_in, plane_out))
    _launch("maxunpool_fill_kernel", dtype, y.size,
            (x, winner, y) + _i(y.size, plane_in, plane_out))
    return y


def maxunpool2d_backward(gy, idx):
    """gy (N, C, ho, wo), idx (N, C, h, w) -> gx (N, C, h, w) = gy read back at idx."""
    gy, dtype = _float_input(gy, "maxunpool2d_backward")
    idx = _index_input(idx)
    n, c, ho, wo = gy.shape
    h, w = idx.shape[2], idx.shape[3]
    gx = _xp().empty((n, c, h, w), dtype=dtype)
    _launch("maxunpool_backward_kernel", dtype, gx.size,
            (gy, idx, gx) + _i(gx.size, h * w, ho * wo))
    return gx


# ---------------------------------------------------------------------- bilinear resize
def _bilinear_axis(n_in, n_out, align_corners):
    """Host tables for one axis: i0, i1 (int64), l0, l1 (float64) per output coordinate, and
    for each input coordinate the range [lo, hi) of outputs that read it (for the gather).

    PyTorch's rule: with align_corners, src = dst * (n_in - 1) / (n_out - 1); without,
    src = (dst + 0.5) * n_in / n_out - 0.5, clamped below at 0.
    """
    dst = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = np.clip(src - i0, 0.0, 1.0)
    # Input k is read by outputs with i0 in {k - 1, k}; i0 is sorted, so that is a range.
    k = np.arange(n_in, dtype=np.int64)
    lo = np.searchsorted(i0, k - 1, side="left").astype(np.int64)
    hi = np.searchsorted(i0, k, side="right").astype(np.int64)
    return i0, i1, 1.0 - l1, l1, lo, hi


@functools.lru_cache(maxsize=64)
def _bilinear_tables(n_in, n_out, align_corners, dtype, device_key):
    """The axis tables on the device (cached: a network resizes to the same few sizes)."""
    xp = _xp()
    i0, i1, l0, l1, lo, hi = _bilinear_axis(n_in, n_out, bool(align_corners))
    dtype = np.dtype(dtype)
    return (xp.asarray(i0), xp.asarray(i1), xp.asarray(l0.astype(dtype)),
            xp.asarray(l1.astype(dtype)), xp.asarray(lo), xp.asarray(hi))


def _device_key():
    # Device arrays belong to one GPU: key the table cache by the current device.
    xp = _xp()
    return xp.cuda.Device().id if hasattr(xp, "cuda") else -1


def bilinear_forward(x, ho, wo, align_corners):
    """x (N, C, h, w) -> y (N, C, ho, wo); see reference.bilinear_forward."""
    x, dtype = _float_input(x, "bilinear_forward")
    n, c, h, w = x.shape
    if n * c * h * w == 0 or ho * wo == 0:
        return _xp().zeros((n, c, ho, wo), dtype=dtype)
    key = _device_key()
    y0, y1, a0, a1, _, _ = _bilinear_tables(h, ho, bool(align_corners), dtype.str, key)
    x0, x1, b0, b1, _, _ = _bilinear_tables(w, wo, bool(align_corners), dtype.str, key)
    y = _xp().empty((n, c, ho, wo), dtype=dtype)
    _launch("bilinear_forward_kernel", dtype, y.size,
            (x, y) + _i(y.size, h, w, ho, wo) + (y0, y1, a0, a1, x0, x1, b0, b1))
    return y


def bilinear_backward(gy, h, w, align_corners):
    """gy (N, C, ho, wo) -> gx (N, C, h, w): the adjoint of bilinear_forward, as a gather
    (one thread per input pixel, no atomics, deterministic)."""
    gy, dtype = _float_input(gy, "bilinear_backward")
    n, c, ho, wo = gy.shape
    if n * c * ho * wo == 0 or h * w == 0:
        return _xp().zeros((n, c, h, w), dtype=dtype)
    key = _device_key()
    y0, y1, a0, a1, ylo, yhi = _bilinear_tables(h, ho, bool(align_corners), dtype.str, key)
    x0, x1, b0, b1, xlo, xhi = _bilinear_tables(w, wo, bool(align_corners), dtype.str, key)
    gx = _xp().empty((n, c, h, w), dtype=dtype)
    _launch("bilinear_backward_kernel", dtype, gx.size,
            (gy, gx) + _i(gx.size, h, w, ho, wo)
            + (y0, y1, a0, a1, x0, x1, b0, b1, ylo, yhi, xlo, xhi))
    return gx


# ---------------------------------------------------------------------- batch normalisation
# The statistics, normalising (+ ReLU) and its backward are the CUDA kernels above: one pass
# over x for the statistics (CuPy's mean and var read x three times and write two temporaries
# of its size), one launch forward, two (and a small sum) backward, instead of the ten or so
# element-wise passes of the reference.
from . import reference as _reference  # noqa: E402

_BN_LANES = 256       # partial sums per channel in the statistics' and backward's first step


def _batchnorm_lanes(x):
    """Statistics, step 1: x (N, C, S) -> (part_mean, part_m2, K): each channel's K lanes'
    (mean, M2), both (C, K)."""
    n, c, s = x.shape
    m = n * s
    lanes = max(1, min(_BN_LANES, m))
    part_mean = _xp().empty((c, lanes), dtype=x.dtype)
    part_m2 = _xp().empty((c, lanes), dtype=x.dtype)
    _launch("batchnorm_stats_kernel", x.dtype, c * lanes,
            (x, part_mean, part_m2) + _i(c * lanes, c, s, m, lanes))
    return part_mean, part_m2, lanes


def _batchnorm_merge(part_mean, part_m2, m, eps, running_mean=None, running_var=None,
                     momentum=0.0):
    """Statistics, step 2 (batchnorm_merge_kernel): -> (mean, var, inv_std), each (C,); the
    running statistics, when given, are updated in place."""
    xp, dtype = _xp(), np.dtype(part_mean.dtype)
    c, lanes = part_mean.shape
    mean, var, inv_std = (xp.empty(c, dtype=dtype) for _ in range(3))
    update = running_mean is not None
    if update:
        for name, r in (("running_mean", running_mean), ("running_var", running_var)):
            if r.dtype != dtype or not r.flags.c_contiguous or r.shape != (c,):
                raise TypeError(f"batchnorm_train_statistics updates {name} in place, so it "
                                f"must be a C-contiguous ({c},) {dtype} array like the input's "
                                f"statistics, got a {r.dtype} array of shape {r.shape}.")
    else:
        running_mean = running_var = mean          # unread
    t = dtype.type
    _launch("batchnorm_merge_kernel", dtype, c,
            (part_mean, part_m2, mean, var, inv_std, running_mean, running_var)
            + _i(c, m, lanes) + (t(eps), t(1 - momentum), t(momentum),
                                 t(momentum * m / max(m - 1, 1)), np.int32(update)))
    return mean, var, inv_std


def batchnorm_stats(x):
    """x (N, C, S) -> per-channel mean and biased variance, each (C,); see
    reference.batchnorm_stats."""
    x, dtype = _float_input(x, "batchnorm_stats")
    n, c, s = x.shape
    if n * s == 0 or c == 0:
        return _reference.batchnorm_stats(x)
    mean, var, _ = _batchnorm_merge(*_batchnorm_lanes(x)[:2], n * s, eps=1.0)  # inv_std unread
    return mean, var


def batchnorm_train_statistics(x, eps, running_mean=None, running_var=None, momentum=0.0):
    """x (N, C, S) with N*S > 1 -> (mean, inv_std), each (C,), in two launches; running_mean
    and running_var ((C,), x's dtype, or both None) are updated in place with `momentum`.
    See reference.batchnorm_train_statistics."""
    x, dtype = _float_input(x, "batchnorm_train_statistics")
    n, c, s = x.shape
    part_mean, part_m2, _ = _batchnorm_lanes(x)
    mean, _, inv_std = _batchnorm_merge(part_mean, part_m2, n * s, eps, running_mean,
                                        running_var, momentum)
    return mean, inv_std


def batchnorm_eval_statistics(running_mean, running_var, eps):
    """running_mean, running_var (C,) float32/float64 -> (mean, inv_std), each (C,), in one
    launch: mean is running_mean itself (read, never written); see
    reference.batchnorm_eval_statistics."""
    running_var, dtype = _float_input(running_var, "batchnorm_eval_statistics")
    inv_std = _xp().empty_like(running_var)
    _launch("batchnorm_inv_std_kernel", dtype, running_var.size,
            (running_var, inv_std) + _i(running_var.size) + (dtype.type(eps),))
    return running_mean, inv_std


def _per_channel(v, dtype):
    return _xp().ascontiguousarray(v, dtype=dtype)


def batchnorm_forward(x, mean, inv_std, scale, shift, relu=False):
    """x (N, C, S), per-channel (C,) vectors -> (y, xhat), both (N, C, S); see
    reference.batchnorm_forward."""
    x, dtype = _float_input(x, "batchnorm_forward")
    _, c, s = x.shape
    xp = _xp()
    y, xhat = xp.empty_like(x), xp.empty_like(x)
    _launch("batchnorm_forward_kernel", dtype, x.size,
            (x,) + tuple(_per_channel(v, dtype) for v in (mean, inv_std, scale, shift))
            + (y, xhat) + _i(x.size, c, s) + (np.int32(bool(relu)),))
    return y, xhat


def batchnorm_backward(gy, xhat, inv_std, scale, training, relu_shift=None):
    """gy, xhat (N, C, S); inv_std, scale (C,) -> (gx, gscale, gshift); see
    reference.batchnorm_backward (relu_shift: the forward's shift when it ran with relu)."""
    gy, dtype = _float_input(gy, "batchnorm_backward")
    xhat = _xp().ascontiguousarray(xhat, dtype=dtype)
    n, c, s = gy.shape
    xp = _xp()
    m = n * s
    relu = relu_shift is not None
    scale = _per_channel(scale, dtype)
    shift = _per_channel(relu_shift, dtype) if relu else scale     # unread unless relu
    lanes = max(1, min(_BN_LANES, m))
    part_g = xp.empty((c, lanes), dtype=dtype)
    part_gx = xp.empty((c, lanes), dtype=dtype)
    _launch("batchnorm_backward_reduce_kernel", dtype, c * lanes,
            (gy, xhat, scale, shift, part_g, part_gx) + _i(c * lanes, c, s, m, lanes)
            + (np.int32(relu),))
    gshift, gscale = xp.empty(c, dtype=dtype), xp.empty(c, dtype=dtype)
    _launch("batchnorm_sum_lanes_kernel", dtype, c,
            (part_g, part_gx, gshift, gscale) + _i(c, lanes))
    gx = xp.empty_like(gy)
    _launch("batchnorm_backward_apply_kernel", dtype, gy.size,
            (gy, xhat, scale, shift, _per_channel(inv_std, dtype), gshift, gscale, gx)
            + _i(gy.size, c, s) + (dtype.type(m), np.int32(bool(training)), np.int32(relu)))
    return gx, gscale, gshift


# ---------------------------------------------------------------------- optimizer updates
def _float_dtype(p, what):
    dtype = np.dtype(p.dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"the GPU kernel {what} supports float32 and float64 parameters, got "
                        f"{dtype}; keep parameters in float32 (autocast casts copies).")
    return dtype


def _in_place(a, what, dtype):
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise TypeError(f"the GPU kernel {what} updates C-contiguous {dtype} arrays in place, "
                        f"got a {'non-contiguous ' if not a.flags.c_contiguous else ''}"
                        f"{a.dtype} array; the optimizer's state must match its parameter.")
    return a


def adam_update(p, g, m, v, v_max, amsgrad, beta1, beta2, step_size, bias2_sqrt, eps,
                weight_decay, found_inf=None):
    """One Adam step in place on p, m, v (, v_max), one launch; see reference.adam_update
    (found_inf: the GradScaler's 0-d float32 flag; the kernel skips the step when it is set)."""
    dtype, (p, g, m, v, v_max) = _adam_arrays(p, g, m, v, v_max, amsgrad)
    t = dtype.type
    _launch("adam_update_kernel", dtype, p.size,
            (p, g, m, v, v_max) + _i(p.size)
            + (t(beta1), t(1 - beta1), t(beta2), t(1 - beta2), t(step_size), t(bias2_sqrt),
               t(eps), t(weight_decay), np.int32(bool(amsgrad)), _flag(found_inf)))


def adam_update_at_step(p, g, m, v, v_max, amsgrad, beta1, beta2, lr, step, eps,
                        weight_decay, found_inf=None):
    """adam_update with the bias corrections of the step count `step` (a 0-d float64 array
    on the device), computed by the kernel; see reference.adam_update_at_step."""
    dtype, (p, g, m, v, v_max) = _adam_arrays(p, g, m, v, v_max, amsgrad)
    t = dtype.type
    _launch("adam_update_at_step_kernel", dtype, p.size,
            (p, g, m, v, v_max) + _i(p.size)
            + (np.float64(beta1), np.float64(beta2), np.float64(lr),
               _scalar_array(step, np.float64, "step"), t(eps), t(weight_decay),
               np.int32(bool(amsgrad)), _flag(found_inf)))


def _adam_arrays(p, g, m, v, v_max, amsgrad):
    """p's dtype and the arrays as the Adam kernels take them (v stands in for an unused
    v_max)."""
    dtype = _float_dtype(p, "adam_update")
    p, m, v = (_in_place(a, "adam_update", dtype) for a in (p, m, v))
    v_max = _in_place(v_max, "adam_update", dtype) if amsgrad else v
    return dtype, (p, _xp().ascontiguousarray(g, dtype=dtype), m, v, v_max)


def sgd_update(p, g, buf, first, lr, momentum, dampening, weight_decay, nesterov,
               found_inf=None):
    """One SGD step in place on p (and buf when momentum), one launch; see
    reference.sgd_update (found_inf as in adam_update)."""
    dtype = _float_dtype(p, "sgd_update")
    p = _in_place(p, "sgd_update", dtype)
    buf = _in_place(buf, "sgd_update", dtype) if momentum != 0 else p
    g = _xp().ascontiguousarray(g, dtype=dtype)
    t = dtype.type
    _launch("sgd_update_kernel", dtype, p.size,
            (p, g, buf) + _i(p.size)
            + (t(lr), t(momentum), t(1 - dampening), t(weight_decay), np.int32(bool(first)),
               np.int32(bool(nesterov)), _flag(found_inf)))


def _flag(found_inf):
    """found_inf as the kernels take it: a 0-d float32 device array (a zero one for None)."""
    if found_inf is None:
        return _zero_flag(_device_key())
    if found_inf.dtype != np.float32 or found_inf.size != 1:
        raise TypeError(f"found_inf must be a float32 array of one element (the GradScaler's "
                        f"flag), got {found_inf.dtype} of shape {found_inf.shape}.")
    return found_inf


@functools.lru_cache(maxsize=16)
def _zero_flag(device_key):
    # Made once per device and kept: the update kernels read it when no GradScaler is used.
    return _xp().zeros((), np.float32)


# ---------------------------------------------------------------------- loss scaling
def unscale_and_check(g, out, scale, found_inf):
    """out = g / scale, found_inf set on an inf/NaN, one launch; see
    reference.unscale_and_check. Other dtypes than float32/float64 use the reference."""
    if np.dtype(g.dtype) not in _CTYPES:
        return _reference.unscale_and_check(g, out, scale, found_inf)
    g = _xp().ascontiguousarray(g)
    out = _in_place(out, "unscale_and_check", np.dtype(g.dtype))
    _launch("unscale_check_kernel", np.dtype(g.dtype), g.size,
            (g, out, _scalar_array(scale, np.float32, "scale"), _flag(found_inf)) + _i(g.size))


def update_scale(scale, growth_tracker, found_inf, growth_factor, backoff_factor,
                 growth_interval):
    """The scale's update in place on the device, one launch of one thread; see
    reference.update_scale."""
    _launch("update_scale_kernel", np.dtype(np.float32), 1,
            (_scalar_array(scale, np.float32, "scale"),
             _scalar_array(growth_tracker, np.int32, "growth_tracker"), _flag(found_inf))
            + _i(1) + (np.float32(growth_factor), np.float32(backoff_factor),
                       np.int32(growth_interval)))


def _scalar_array(a, dtype, what):
    if a.dtype != dtype or a.size != 1:
        raise TypeError(f"{what} must be a {np.dtype(dtype)} array of one element, got "
                        f"{a.dtype} of shape {a.shape}.")
    return a


# The dense CRF's lattice and row softmax (see the end of kernels/cpu.py): the lattice is built
# on the CPU, its filter runs as CUDA kernels.
from .permutohedral_gpu import PermutohedralLatticeGPU as PermutohedralLattice  # noqa: E402,F401
from .permutohedral_gpu import softmax_rows  # noqa: E402,F401


# ---------------------------------------------------------------------- fused epilogues
# Kernels that replace chains of CuPy array expressions, each a launch (counted by
# scripts/launch_census.py): softmax cross-entropy (about 15 launches forward and 5
# backward as expressions) and the bias + ReLU after a conv (3 forward: add, compare,
# maximum; 4 backward: mask, and the bias gradient's ones, product and sum).
EPILOGUE_SRC = r"""
// Softmax cross-entropy over the class axis of x (N, C, S), one thread per pixel (n, s),
// whose C logits lie S apart. Log-sum-exp: z = x - max_c x, so exp never overflows; a NaN
// logit makes the maximum, and so the pixel's loss and softmax, NaN (as the reference).
// loss[n, s] = (log(sum_c exp(z_c)) - z[target]) * weight[n, s], probs = exp(z) / sum.
extern "C" __global__ void cross_entropy_forward_kernel(
        const T* x, const long long* target, const T* weight, T* loss, T* probs,
        const I total, const I C, const I S, const int weighted) {
    GRID_STRIDE {
        const I n = t / S;
        const I first = n * C * S + (t - n * S);     // (n, class 0, s)
        T m = x[first];
        for (I c = 1; c < C; ++c) {
            const T v = x[first + c * S];
            if (v > m || v != v) m = v;
        }
        T sum = (T)0;
        for (I c = 0; c < C; ++c) {
            const T e = exp(x[first + c * S] - m);
            probs[first + c * S] = e;
            sum += e;
        }
        T l = log(sum) - (x[first + (I)target[t] * S] - m);
        if (weighted) l *= weight[t];
        loss[t] = l;
        for (I c = 0; c < C; ++c) probs[first + c * S] /= sum;
    }
}

// Its gradient, one thread per element (n, c, s): (probs - onehot(target)) * k with
// k = coef (one value, or one per pixel when per_pixel) times weight[n, s] when weighted.
extern "C" __global__ void cross_entropy_backward_kernel(
        const T* probs, const long long* target, const T* coef, const T* weight, T* gx,
        const I total, const I C, const I S, const int per_pixel, const int weighted) {
    GRID_STRIDE {
        const I s = t % S, n = t / (C * S), c = (t / S) % C;
        const I pixel = n * S + s;
        T k = coef[per_pixel ? pixel : 0];
        if (weighted) k = weight[pixel] * k;
        T g = probs[t] * k;
        if ((I)target[pixel] == c) g -= k;
        gx[t] = g;
    }
}

// A conv's epilogue on its output y (N, C, S), in place, one thread per element:
// y = max(y + bias[c], 0) (no bias: has_bias = 0); NaN stays NaN, as np.maximum.
extern "C" __global__ void bias_relu_kernel(
        T* y, const T* bias, const I total, const I C, const I S, const int has_bias) {
    GRID_STRIDE {
        T v = y[t];
        if (has_bias) v += bias[(t / S) % C];
        y[t] = v < (T)0 ? (T)0 : v;
    }
}

// Its backward from the output y: gx = gy where y > 0, else 0, and per channel c the partial
// sums of gx (the bias gradient) over values k, k + K, k + 2K, ... of the channel's M = N*S,
// as batchnorm_backward_reduce_kernel: thread (c, k) writes those K-strided gx values too,
// so one pass does both; the wrapper adds up the K partial sums. channel_major: gx is written
// (C, N, S) instead, the layout the conv's backward multiplies with (ConvPlan.backward).
extern "C" __global__ void relu_bias_backward_kernel(
        const T* gy, const T* y, T* gx, T* part, const I total, const I C, const I S,
        const I M, const I K, const int channel_major) {
    GRID_STRIDE {
        const I c = t / K;
        T sum = (T)0;
        for (I j = t % K; j < M; j += K) {
            const I a = ((j / S) * C + c) * S + j % S;
            const T g = y[a] > (T)0 ? gy[a] : (T)0;
            gx[channel_major ? c * M + j : a] = g;
            sum += g;
        }
        part[t] = sum;
    }
}
"""
SOURCES += (EPILOGUE_SRC,)
KERNEL_NAMES += ("cross_entropy_forward_kernel", "cross_entropy_backward_kernel",
                 "bias_relu_kernel", "relu_bias_backward_kernel")


def _same(a, dtype, xp):
    return xp.ascontiguousarray(a, dtype=dtype)


def cross_entropy_forward(x, target, weight):
    """x (N, C, S), target (N, S), weight (N, S) or None -> (loss (N, S), probs (N, C, S)),
    one launch; see reference.cross_entropy_forward."""
    x, dtype = _float_input(x, "cross_entropy_forward")
    xp = _xp()
    n, c, s = x.shape
    target = _index_input(target)
    loss = xp.empty((n, s), dtype=dtype)
    probs = xp.empty_like(x)
    w = loss if weight is None else _same(weight, dtype, xp)        # unread unless weighted
    _launch("cross_entropy_forward_kernel", dtype, n * s,
            (x, target, w, loss, probs) + _i(n * s, c, s) + (np.int32(weight is not None),))
    return loss, probs


def cross_entropy_backward(probs, target, coef, weight):
    """probs (N, C, S), target (N, S), coef (a 0-d array or (N, S)), weight (N, S) or None
    -> gx (N, C, S), one launch; see reference.cross_entropy_backward."""
    probs, dtype = _float_input(probs, "cross_entropy_backward")
    xp = _xp()
    n, c, s = probs.shape
    coef = _same(coef, dtype, xp)
    gx = xp.empty_like(probs)
    w = coef if weight is None else _same(weight, dtype, xp)        # unread unless weighted
    _launch("cross_entropy_backward_kernel", dtype, probs.size,
            (probs, _index_input(target), coef, w, gx) + _i(probs.size, c, s)
            + (np.int32(coef.size > 1), np.int32(weight is not None)))
    return gx


def bias_relu(y, bias):
    """y (N, C, S) -> max(y + bias, 0) in place on y (the conv's own output), one launch;
    see reference.bias_relu."""
    y, dtype = _float_input(y, "bias_relu")
    xp = _xp()
    _, c, s = y.shape
    b = y if bias is None else _same(bias, dtype, xp)               # unread without bias
    _launch("bias_relu_kernel", dtype, y.size,
            (y, b) + _i(y.size, c, s) + (np.int32(bias is not None),))
    return y


def relu_bias_backward(gy, y, bias_grad=True, channel_major=False):
    """gy, y (N, C, S) -> (gx (N, C, S), or (C, N, S) if channel_major; gbias (C,) or None):
    two launches (the masked gradient with per-channel partial sums, then their sum); see
    reference.relu_bias_backward."""
    gy, dtype = _float_input(gy, "relu_bias_backward")
    xp = _xp()
    n, c, s = gy.shape
    m = n * s
    lanes = max(1, min(_BN_LANES, m))
    gx = xp.empty((c, n, s) if channel_major else (n, c, s), dtype=dtype)
    part = xp.empty((c, lanes), dtype=dtype)
    _launch("relu_bias_backward_kernel", dtype, c * lanes,
            (gy, _same(y, dtype, xp), gx, part) + _i(c * lanes, c, s, m, lanes)
            + (np.int32(bool(channel_major)),))
    return gx, part.sum(axis=1) if bias_grad else None


# ---------------------------------------------------------------------- im2col, batch in the columns
def im2col_rows(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """x (N, C, H, W) -> cols (C*kh*kw, N*ho*wo): row (c, i, j), column (n, oy, ox), so that
    one GEMM gy (C_out, N*L) @ cols.T gives a conv's weight gradient summed over the samples
    too (instead of one GEMM and one add per sample). One launch of im2col_kernel with that
    layout's strides; see reference.im2col_rows."""
    x, dtype = _float_input(x, "im2col_rows")
    n, c, h, w = x.shape
    L = ho * wo
    cols = _xp().empty((c * kh * kw, n * L), dtype=dtype)
    total = n * c * L
    _launch("im2col_kernel", dtype, total,
            (x, cols) + _i(total, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, L, n * L))
    return cols


def col2im_rows(cols, n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """The adjoint of im2col_rows: cols (C*kh*kw, N*ho*wo) -> x (N, C, h, w), one launch of
    col2im_kernel with that layout's strides; see reference.col2im_rows."""
    cols, dtype = _float_input(cols, "col2im_rows")
    L = ho * wo
    x = _xp().empty((n, c, h, w), dtype=dtype)
    _launch("col2im_kernel", dtype, x.size,
            (cols, x) + _i(x.size, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, L, n * L))
    return x


# ---------------------------------------------------------------------- bfloat16 rounding
# Autocast rounds every input and output of a "lower" op to bfloat16 (minidl/amp.py): as
# CuPy array expressions that is 7 launches per cast (shift, and, two adds, and, isnan,
# where), the biggest item of a bf16 step in scripts/launch_census.py; here it is one.
ROUND_SRC = r"""
// out = a rounded to bfloat16, both float32 seen as 32-bit integers (see
// reference.round_bfloat16): add 0x7FFF plus the lowest kept bit, clear the low 16 bits.
// NaN (exponent all ones, mantissa not 0) is copied as it is.
extern "C" __global__ void round_bfloat16_kernel(const int* a, int* out, const I total) {
    GRID_STRIDE {
        const unsigned int u = (unsigned int)a[t];
        const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
        out[t] = (int)(nan ? u : ((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u));
    }
}
"""
SOURCES += (ROUND_SRC,)
KERNEL_NAMES += ("round_bfloat16_kernel",)


def round_bfloat16(a):
    """a (float32, any shape) -> a rounded to bfloat16's values, as float32; one launch;
    see reference.round_bfloat16."""
    xp = _xp()
    if np.dtype(a.dtype) != np.float32:
        raise TypeError(f"round_bfloat16 rounds float32 arrays, got {a.dtype}; cast with "
                        ".astype('float32') first.")
    a = xp.ascontiguousarray(a)
    out = xp.empty_like(a)
    _launch("round_bfloat16_kernel", np.dtype(np.float32), a.size,
            (a.view(np.int32), out.view(np.int32)) + _i(a.size))
    return out


# ---------------------------------------------------------------------- counter-based random numbers
# Dropout masks a CUDA graph can replay: Philox4x32-10 (see reference.philox4x32; Salmon et
# al., SC 2011) reads its key and counter from a (2,) int64 device array state = (seed,
# offset), and a second one-thread launch moves the offset past the blocks drawn. Nothing on
# the host changes from draw to draw, so each replay of a graph draws new numbers.
PHILOX_SRC = r"""
// The Philox4x32 bijection, 10 rounds, on c in place with key (k0, k1).
__device__ inline void philox4x32_10(unsigned int c[4], unsigned int k0, unsigned int k1) {
    for (int r = 0; r < 10; ++r) {
        if (r > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        const unsigned long long p0 = (unsigned long long)0xD2511F53u * c[0];
        const unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c[2];
        const unsigned int c1 = c[1], c3 = c[3];
        c[0] = (unsigned int)(p1 >> 32) ^ c1 ^ k0;
        c[1] = (unsigned int)p1;
        c[2] = (unsigned int)(p0 >> 32) ^ c3 ^ k1;
        c[3] = (unsigned int)p0;
    }
}

// Block b of the stream at state = (seed, offset): counter offset + b, key seed (64 bits each,
// low word first), as reference.philox_uint32.
__device__ inline void philox_block(const long long* state, const unsigned long long b,
                                    unsigned int w[4]) {
    const unsigned long long key = (unsigned long long)state[0];
    const unsigned long long ctr = (unsigned long long)state[1] + b;
    w[0] = (unsigned int)ctr; w[1] = (unsigned int)(ctr >> 32); w[2] = 0u; w[3] = 0u;
    philox4x32_10(w, (unsigned int)key, (unsigned int)(key >> 32));
}

// n words, one thread per block t of four (total = Q = ceil(n / 4)); word j is number t + j*Q.
extern "C" __global__ void philox_bits_kernel(const long long* state, int* out, const I total,
                                              const I n) {
    GRID_STRIDE {
        unsigned int w[4];
        philox_block(state, (unsigned long long)t, w);
        for (int j = 0; j < 4; ++j)
            if (t + j * total < n) out[t + j * total] = (int)w[j];
    }
}

// A dropout mask of n values, as philox_bits_kernel: scale where (word >> 8) >= threshold
// (reference.keep_threshold), else 0.
extern "C" __global__ void dropout_mask_kernel(const long long* state, T* mask, const I total,
                                               const I n, const int threshold, const T scale) {
    GRID_STRIDE {
        unsigned int w[4];
        philox_block(state, (unsigned long long)t, w);
        for (int j = 0; j < 4; ++j)
            if (t + j * total < n)
                mask[t + j * total] = (w[j] >> 8) >= (unsigned int)threshold ? scale : (T)0;
    }
}

// After a draw (stream order: the draw's kernel has read the offset): offset += blocks.
extern "C" __global__ void philox_advance_kernel(long long* state, const I total,
                                                 const long long blocks) {
    GRID_STRIDE { state[1] += blocks; }
}
"""
SOURCES += (PHILOX_SRC,)
KERNEL_NAMES += ("philox_bits_kernel", "dropout_mask_kernel", "philox_advance_kernel")


def _philox_state(state):
    if state.dtype != np.int64 or state.shape != (2,):
        raise TypeError(f"the Philox state must be a (2,) int64 device array (seed, offset), "
                        f"got {state.dtype} of shape {state.shape}; use minidl.random's.")
    return state


def _philox_advance(state, blocks):
    _launch("philox_advance_kernel", np.dtype(np.float32), 1,
            (state,) + _i(1) + (np.int64(blocks),))


def philox_uint32(state, n):
    """The next n uint32 words of the Philox stream at state (seed, offset), a (2,) int64
    device array whose offset is then advanced; two launches. See reference.philox_uint32."""
    state = _philox_state(state)
    q = _reference.philox_blocks(n)
    out = _xp().empty(int(n), dtype=np.uint32)
    _launch("philox_bits_kernel", np.dtype(np.float32), q,
            (state, out.view(np.int32)) + _i(q, n))
    _philox_advance(state, q)
    return out


def dropout_mask(state, shape, p, dtype):
    """A dropout mask of `shape` (values 0 or 1 / (1 - p), 0 <= p < 1) from the Philox stream
    at state, whose offset is then advanced: two launches, nothing read on the host. See
    reference.dropout_mask; dtypes other than float32/float64 are drawn as float32 and cast."""
    state = _philox_state(state)
    dtype = np.dtype(dtype)
    draw = dtype if dtype in _CTYPES else np.dtype(np.float32)
    mask = _xp().empty(tuple(shape), dtype=draw)
    n, q = mask.size, _reference.philox_blocks(mask.size)
    _launch("dropout_mask_kernel", draw, q,
            (state, mask) + _i(q, n)
            + (np.int32(_reference.keep_threshold(p)), draw.type(1.0 / (1.0 - p))))
    _philox_advance(state, q)
    return mask.astype(dtype, copy=False)


# ---------------------------------------------------------------------- class-id targets
# cross_entropy / nll_loss check their targets on the device (minidl/device_checks.py): as
# CuPy expressions that was about 16 launches per call (comparisons, where, stack, take,
# astype, the record's merge, the safe denominator); here it is two kernels around the one
# reduction of the "mean" denominator.
CLASS_TARGETS_SRC = r"""
// One thread per target element (see reference.class_targets): safe = the id, or 0 where it
// is ignore_index or outside [0, C); valid = 1 or 0 as T. The position of the first id
// outside [0, C) goes into first_bad by an integer atomicMin, so the result does not depend
// on the threads' order; class_targets_record_kernel reads it and resets it.
extern "C" __global__ void class_targets_kernel(
        const long long* target, long long* safe, T* valid, long long* first_bad,
        const I total, const long long C, const long long ignore_index) {
    GRID_STRIDE {
        const long long v = target[t];
        const bool ignored = v == ignore_index;
        const bool bad = !ignored && (v < 0 || v >= C);
        const bool keep = !ignored && !bad;
        safe[t] = keep ? v : 0;
        valid[t] = keep ? (T)1 : (T)0;
        if (bad) atomicMin(first_bad, (long long)t);
    }
}

// One thread (total = 1), after the denominator's sum: the check's record [failed, value of
// the first bad id] (the record not read yet, old, is kept if it had failed: has_old), the
// denominator made safe (1 unless > 0: every target ignored), and first_bad reset to
// LLONG_MAX (none) for the next launch, inside a CUDA graph too.
extern "C" __global__ void class_targets_record_kernel(
        const long long* target, long long* first_bad, const long long* old, long long* record,
        const T* den, T* safe_den, const I total, const int has_old) {
    GRID_STRIDE {
        const long long pos = *first_bad;
        *first_bad = 0x7FFFFFFFFFFFFFFFLL;
        if (has_old && old[0] != 0) {
            record[0] = old[0];
            record[1] = old[1];
        } else {
            record[0] = pos != 0x7FFFFFFFFFFFFFFFLL;
            record[1] = record[0] ? target[pos] : 0;
        }
        *safe_den = *den > (T)0 ? *den : (T)1;
    }
}
"""
SOURCES += (CLASS_TARGETS_SRC,)
KERNEL_NAMES += ("class_targets_kernel", "class_targets_record_kernel")
_NO_BAD_ID = np.int64(2 ** 63 - 1)


@functools.lru_cache(maxsize=16)
def _first_bad(device_key):
    # One per device, made once and kept; class_targets_record_kernel resets it after use.
    return _xp().full((), _NO_BAD_ID, dtype=np.int64)


def class_targets(target, c, ignore_index, dtype):
    """target (any shape) ints -> (safe int64, valid of dtype), same shape, one launch; see
    reference.class_targets. The first id outside [0, c) is left for class_targets_record."""
    dtype = np.dtype(dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"the GPU kernel class_targets writes float32 or float64 weights, got "
                        f"{dtype}; pass the logits' dtype after casting it to float32.")
    xp = _xp()
    t = _index_input(target)
    safe = xp.empty(t.shape, dtype=np.int64)
    valid = xp.empty(t.shape, dtype=dtype)
    _launch("class_targets_kernel", dtype, t.size,
            (t, safe, valid, _first_bad(_device_key())) + _i(t.size)
            + (np.int64(c), np.int64(ignore_index)))
    return safe, valid


def class_targets_record(target, c, ignore_index, denominator, old=None):
    """After class_targets and the sum of its weights: -> (record (2,) int64, safe
    denominator), one launch of one thread; see reference.class_targets_record."""
    xp = _xp()
    den, dtype = _float_input(denominator, "class_targets_record")
    record = xp.empty(2, dtype=np.int64)
    safe_den = xp.empty((), dtype=dtype)
    _launch("class_targets_record_kernel", dtype, 1,
            (_index_input(target), _first_bad(_device_key()),
             record if old is None else old, record, den.reshape(()), safe_den)
            + _i(1) + (np.int32(old is not None),))
    return record, safe_den

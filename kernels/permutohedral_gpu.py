"""Permutohedral lattice Gaussian filter on the GPU with CuPy.

Same filter as ``kernels/permutohedral_cpu.py`` (read its docstring for the algorithm, the
normalisation and the measured approximation error). The split of work:

* the lattice (hash table, barycentric weights, blur neighbour indices) is built **once per
  image on the CPU** with the Numba code - hashing is branchy and irregular, runs once, and
  building it there keeps CPU and GPU results identical in structure;
* the per-call work, done once per mean-field iteration and kernel, runs on the GPU with three
  tiny CUDA kernels: splat (scatter with ``atomicAdd``), blur (one gather pass per lattice
  direction over the precomputed neighbour indices), slice (gather-weighted sum).

A pure CuPy-array version (``cupy.add.at`` and fancy-index gathers) is kept as
``filter(values, use_raw_kernels=False)``: slower, but useful to cross-check the kernels.

CuPy is imported lazily (kernels/cuda.py), so this module imports fine on machines without
it; using it there raises the same RuntimeError, saying how to install CuPy, as every GPU path.
"""
from __future__ import annotations

import numpy as np

from .cuda import require_cupy
from .permutohedral_cpu import PermutohedralLattice

_MODULE = None  # compiled cupy.RawModule, built on first use

_CUDA_SRC = r"""
extern "C" {

// One thread per (pixel, vertex, label):
// lat[offsets[i,k], l] += weights[i,k] * scale[i] * values[i, l]   (scale = 1 if has_scale == 0).
__global__ void lattice_splat(const float* values, const int* offsets, const float* weights,
                              const float* scale, const int has_scale,
                              float* lat, const long long n, const int d1, const int L) {
    long long t = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (t >= n * d1 * L) return;
    int l = (int)(t % L);
    long long ik = t / L;            // flat (pixel, vertex) index
    long long i = ik / d1;
    float w = has_scale ? weights[ik] * scale[i] : weights[ik];
    atomicAdd(&lat[(long long)offsets[ik] * L + l], w * values[i * L + l]);
}

// One thread per (lattice point, label): out = in + (in[left] + in[right]) / 2 along one
// direction. nb is that direction's (M, 2) slice of the neighbour table; index M is a zero row.
__global__ void lattice_blur(const float* in, float* out, const int* nb, const int m, const int L) {
    long long t = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (t >= (long long)m * L) return;
    int l = (int)(t % L);
    long long p = t / L;
    long long a = nb[2 * p], b = nb[2 * p + 1];
    out[t] = in[t] + 0.5f * (in[a * L + l] + in[b * L + l]);
}

// One thread per (pixel, label):
// out[i, l] += c * scale[i] * sum_k weights[i,k] * lat[offsets[i,k], l], c = alpha * weight.
__global__ void lattice_slice(const float* lat, const int* offsets, const float* weights,
                              const float* scale, const int has_scale,
                              float* out, const long long n, const int d1, const int L,
                              const float c) {
    long long t = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (t >= n * L) return;
    int l = (int)(t % L);
    long long i = t / L;
    float s = 0.0f;
    for (int k = 0; k < d1; ++k) {
        s += weights[i * d1 + k] * lat[(long long)offsets[i * d1 + k] * L + l];
    }
    out[t] += (has_scale ? c * scale[i] : c) * s;
}

}
"""


def _kernels():
    global _MODULE
    if _MODULE is None:
        cp = require_cupy()
        _MODULE = cp.RawModule(code=_CUDA_SRC)
    return _MODULE


def _launch(fn, total, args):
    threads = 256
    blocks = (int(total) + threads - 1) // threads
    if blocks > 0:
        fn((blocks,), (threads,), args)


class PermutohedralLatticeGPU:
    """The permutohedral filter with its per-call work on the GPU.

    features: (N, d) float (NumPy or CuPy), divided by their thetas; or pass ``cpu_lattice``,
    an already built :class:`kernels.permutohedral_cpu.PermutohedralLattice`, to reuse it.

    Device attributes (CuPy arrays): ``offsets`` (N, d+1) int32, ``weights`` (N, d+1) float32,
    ``neighbours`` (d+1, M, 2) int32; plus ``n_lattice`` (M), ``d``, ``alpha``.
    """

    def __init__(self, features=None, cpu_lattice=None):
        cp = require_cupy()
        if cpu_lattice is None:
            if features is None:
                raise ValueError("give either features (N, d) or cpu_lattice.")
            if isinstance(features, cp.ndarray):
                features = cp.asnumpy(features)
            cpu_lattice = PermutohedralLattice(features)
        self.cpu = cpu_lattice
        self.n_points, self.d = cpu_lattice.n_points, cpu_lattice.d
        self.n_lattice, self.alpha = cpu_lattice.n_lattice, cpu_lattice.alpha
        self.offsets = cp.asarray(cpu_lattice.offsets)
        self.weights = cp.asarray(cpu_lattice.weights)
        self.neighbours = cp.asarray(cpu_lattice.neighbours)

    def _check_values(self, values):
        cp = require_cupy()
        v = cp.asarray(values, dtype=cp.float32)
        if v.ndim == 1:
            v = v[:, None]
        if v.ndim != 2 or v.shape[0] != self.n_points:
            raise ValueError(
                f"values must be (N, L) with N = {self.n_points} points; got shape {tuple(v.shape)}."
            )
        return cp.ascontiguousarray(v)

    def filter(self, values, use_raw_kernels=True):
        """values: (N, L) or (N,) CuPy (or NumPy, copied over) -> same shape, CuPy float32 K v."""
        cp = require_cupy()
        v = self._check_values(values)
        out = cp.zeros(v.shape, dtype=cp.float32)
        self.accumulate_filter(v, out, use_raw_kernels=use_raw_kernels)
        return out.reshape(values.shape)

    def accumulate_filter(self, values, out, scale=None, weight=1.0, use_raw_kernels=True):
        """out += weight * scale * K(scale * values), in place (CuPy arrays; out (N, L) float32)."""
        cp = require_cupy()
        v = self._check_values(values)
        if out.shape != v.shape or out.dtype != cp.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 CuPy array of shape {v.shape}.")
        s = None if scale is None else cp.ascontiguousarray(cp.asarray(scale, dtype=cp.float32).reshape(-1))
        if s is not None and s.size != self.n_points:
            raise ValueError(f"scale must have N = {self.n_points} entries; got {s.size}.")
        if use_raw_kernels:
            self._filter_raw(v, out, s, float(weight))
        else:
            self._filter_cupy(v, out, s, float(weight))
        return out

    def _filter_raw(self, v, out, s, weight):
        cp = require_cupy()
        mod = _kernels()
        n, n_labels = v.shape
        d1, m = self.d + 1, self.n_lattice
        has = np.int32(s is not None)
        sp = s if s is not None else self.weights  # any valid pointer; not read when has == 0
        lat = cp.zeros((m + 1, n_labels), dtype=cp.float32)  # row m: the absent neighbour
        tmp = cp.zeros((m + 1, n_labels), dtype=cp.float32)
        _launch(mod.get_function("lattice_splat"), n * d1 * n_labels,
                (v, self.offsets, self.weights, sp, has, lat, np.int64(n), np.int32(d1),
                 np.int32(n_labels)))
        blur = mod.get_function("lattice_blur")
        for j in range(d1):
            _launch(blur, m * n_labels,
                    (lat, tmp, self.neighbours[j], np.int32(m), np.int32(n_labels)))
            lat, tmp = tmp, lat
        _launch(mod.get_function("lattice_slice"), n * n_labels,
                (lat, self.offsets, self.weights, sp, has, out, np.int64(n), np.int32(d1),
                 np.int32(n_labels), np.float32(self.alpha * weight)))

    def _filter_cupy(self, v, out, s, weight):
        cp = require_cupy()
        n, n_labels = v.shape
        d1, m = self.d + 1, self.n_lattice
        if s is not None:
            v = v * s[:, None]
        lat = cp.zeros((m + 1, n_labels), dtype=cp.float32)
        # Splat: every (pixel, vertex) pair adds weight * value to its lattice point.
        contrib = (self.weights[:, :, None] * v[:, None, :]).reshape(n * d1, n_labels)
        cp.add.at(lat, self.offsets.reshape(-1), contrib)  # unbuffered: repeated indices add up
        for j in range(d1):
            nb = self.neighbours[j]
            new = cp.zeros_like(lat)
            new[:m] = lat[:m] + 0.5 * (lat[nb[:, 0]] + lat[nb[:, 1]])
            lat = new
        # Slice: gather the d+1 vertices of every pixel and weight them.
        res = (self.weights[:, :, None] * lat[self.offsets]).sum(axis=1) * np.float32(self.alpha * weight)
        if s is not None:
            res *= s[:, None]
        out += res.astype(cp.float32)


def softmax_rows(x, out):
    """out[i] = softmax(x[i]) for CuPy (N, L) float32 arrays (may alias), max subtracted first."""
    cp = require_cupy()
    mx = x.max(axis=1, keepdims=True)
    cp.subtract(x, mx, out=out)
    cp.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out

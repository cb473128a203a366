"""Permutohedral lattice Gaussian filter on the CPU, compiled with Numba.

What it computes: ``filter(values)`` approximates the Gaussian filter in feature space

    out_i  ~=  c * sum_j exp(-|f_i - f_j|^2 / 2) * v_j          (j = i included)

for all N pixels and all L label channels at once, in O(N * d * L) time instead of O(N^2 * L)
(Adams, Baek & Davis 2010; the variant used by the dense-CRF C++ code of Kraehenbuehl &
Koltun 2011). ``features`` ``(N, d)`` must already be divided by their thetas.

Algorithm. Features are lifted onto the hyperplane sum(x) = 0 of R^(d+1), which the
permutohedral lattice tiles with simplices (see ``kernels/permutohedral_reference.py`` for the
step-by-step oracle). Built once per image (``PermutohedralLattice(features)``):

* ``offsets`` (N, d+1) int32 and ``weights`` (N, d+1) float32: for each pixel, the lattice
  points of the d+1 vertices of its simplex and its barycentric weights there;
* a hash table (open addressing, linear probing, keys stored in a flat int32 array) that
  numbers the M lattice points touched;
* ``neighbours`` (d+1, M, 2) int32: the two neighbours of every lattice point along each of the
  d+1 lattice directions, M (a row kept at zero) when the neighbour does not exist.

Applied per call (once per mean-field iteration and kernel): splat (scatter pixel values to
the vertices), blur ([1/2, 1, 1/2] along each direction, as gathers over the precomputed
neighbour indices - no hashing in the loop), slice (gather back with the same weights), times
``alpha = 1 / (1 + 2^-d)``. ``lattice.filter(values)`` returns ``K v``;
``lattice.accumulate_filter(values, out, scale, weight)`` does ``out += weight * s * K(s * v)``,
the CRF's normalised message, without (N, L) temporaries.

Normalisation. ``alpha`` is the constant of the C++ implementation; it does *not* make the
result equal the exact sum: ``K_lattice 1 ~= c * K_exact 1``, with c depending on d and on how
densely the features fill the lattice (blur paths through lattice points that no pixel touched
are dropped). Measured: c ~= 0.88 for d = 2, 0.82 for d = 3 and 0.6-0.7 for d = 5 on dense
point clouds; 0.3-0.55 for sparse 5-D colour features of small images. The dense CRF never
depends on c: it uses the symmetric normalisation ``n * K(n * Q)`` with ``n = 1 / sqrt(K 1)``,
in which any constant factor cancels.

Approximation error, relative RMS against ``naive_gaussian_filter`` on seeded 24x24 images
(``tests/test_crf.py`` asserts each with margin):

    case                               K v / K 1   n K(n Q)   K 1 (after fitting c)
    Gaussian, sxy 3 (d = 2)            0.6 %       1.2 %      1.7 %
    gray bilateral 10 / 20 (d = 3)     0.6 %       1.8 %      3.1 %
    colour bilateral 10 / 20 (d = 5)   2.4 %       4.9 %      9.2 %

The worst pixel's absolute error of ``K v / K 1`` (v uniform in [0, 1]) is 0.012, 0.026 and
0.097 there; it reaches ~0.3 for 5-D features of pure-noise colour images, where 576 points are
very sparse in 5-D. On dense point clouds the RMS error of ``K v / K 1`` is below 0.5 %.

Everything here is ``@njit(cache=True)`` and also runs as plain Python with
``NUMBA_DISABLE_JIT=1`` (slowly: keep images small then).
"""
from __future__ import annotations

import numpy as np
from numba import njit

_HASH_MUL = 2531011  # odd multiplier for the key hash
_HASH_MASK = 0x7FFFFFFF  # keep the running hash in 31 bits: no int64 overflow, same in Python


@njit(cache=True)
def _hash_key(keys, base, d):
    """Hash of the d int32 coordinates keys[base:base+d] (non-negative, < 2^31)."""
    h = 0
    for c in range(d):
        h = (h * _HASH_MUL + int(keys[base + c])) & _HASH_MASK
    return h


@njit(cache=True)
def _find(table, keys, cand, d, mask):
    """Index of the lattice point whose key equals cand[:d], or -1 if absent."""
    slot = _hash_key(cand, 0, d) & mask
    while True:
        idx = table[slot]
        if idx < 0:
            return -1
        same = True
        base = idx * d
        for c in range(d):
            if keys[base + c] != cand[c]:
                same = False
                break
        if same:
            return idx
        slot = (slot + 1) & mask  # linear probing


@njit(cache=True)
def build_lattice(features):
    """Build the lattice for one image.

    features: (N, d) float64, divided by their thetas.
    returns: offsets (N, d+1) int32, weights (N, d+1) float32,
             neighbours (d+1, M, 2) int32, n_lattice M.
    """
    n, d = features.shape
    d1 = d + 1
    # Embedding: columns of an orthonormal basis of {sum x = 0}, scaled by sqrt(2/3)(d+1) so
    # the blurred lattice approximates a unit Gaussian (see the reference module).
    scale = np.empty(d, dtype=np.float64)
    for i in range(d):
        scale[i] = np.sqrt(2.0 / 3.0) * d1 / np.sqrt((i + 1.0) * (i + 2.0))

    # Start with room for about N points (typical: M is 0.01 N to 1.2 N) and double when full,
    # rather than reserving the worst case N * (d+1), which is large for big colour images.
    kcap = n + 1024
    cap = 1
    while cap < 2 * kcap:  # table load factor <= 1/2 keeps probe chains short
        cap *= 2
    mask = cap - 1
    table = np.full(cap, -1, dtype=np.int32)  # slot -> point index, -1 = empty
    keys = np.empty(kcap * d, dtype=np.int32)  # key of point p at keys[p*d:(p+1)*d]
    m = 0

    offsets = np.empty((n, d1), dtype=np.int32)
    weights = np.empty((n, d1), dtype=np.float32)
    elevated = np.empty(d1, dtype=np.float64)
    rem0 = np.empty(d1, dtype=np.float64)
    rank = np.empty(d1, dtype=np.int64)
    bary = np.empty(d1 + 1, dtype=np.float64)
    cand = np.empty(d, dtype=np.int32)

    for i in range(n):
        # Elevate: elevated = E f, written as a running sum (E is lower-triangular-ish).
        sm = 0.0
        for j in range(d, 0, -1):
            cf = features[i, j - 1] * scale[j - 1]
            elevated[j] = sm - j * cf
            sm += cf
        elevated[0] = sm
        # Nearest remainder-0 point and how far its coordinate sum is off the hyperplane.
        total = 0.0
        for j in range(d1):
            v = elevated[j] / d1
            up = np.ceil(v) * d1
            down = np.floor(v) * d1
            if up - elevated[j] < elevated[j] - down:
                rem0[j] = up
            else:
                rem0[j] = down
            total += rem0[j]
            rank[j] = 0
        excess = int(round(total / d1))
        # Rank residuals (0 = largest), then move rem0 onto the hyperplane.
        for a in range(d1):
            da = elevated[a] - rem0[a]
            for b in range(a + 1, d1):
                if da < elevated[b] - rem0[b]:
                    rank[a] += 1
                else:
                    rank[b] += 1
        if excess > 0:
            for j in range(d1):
                if rank[j] >= d1 - excess:
                    rank[j] += excess - d1
                    rem0[j] -= d1
                else:
                    rank[j] += excess
        elif excess < 0:
            for j in range(d1):
                if rank[j] < -excess:
                    rank[j] += d1 + excess
                    rem0[j] += d1
                else:
                    rank[j] += excess
        # Barycentric weights from the sorted residuals.
        for k in range(d1 + 1):
            bary[k] = 0.0
        for j in range(d1):
            v = (elevated[j] - rem0[j]) / d1
            bary[d - rank[j]] += v
            bary[d1 - rank[j]] -= v
        bary[0] += 1.0 + bary[d1]
        # The d+1 vertices: insert into the hash table (or find them).
        for k in range(d1):
            if m == kcap:  # full: double the key storage and the table, then rehash
                kcap *= 2
                grown = np.empty(kcap * d, dtype=np.int32)
                grown[: m * d] = keys[: m * d]
                keys = grown
                cap *= 2
                mask = cap - 1
                table = np.full(cap, -1, dtype=np.int32)
                for p in range(m):
                    slot = _hash_key(keys, p * d, d) & mask
                    while table[slot] >= 0:
                        slot = (slot + 1) & mask
                    table[slot] = p
            for c in range(d):
                if rank[c] >= d1 - k:
                    cand[c] = np.int32(rem0[c] + k - d1)
                else:
                    cand[c] = np.int32(rem0[c] + k)
            slot = _hash_key(cand, 0, d) & mask
            while True:
                idx = table[slot]
                if idx < 0:  # empty slot: a new lattice point
                    idx = m
                    table[slot] = idx
                    for c in range(d):
                        keys[idx * d + c] = cand[c]
                    m += 1
                    break
                same = True
                for c in range(d):
                    if keys[idx * d + c] != cand[c]:
                        same = False
                        break
                if same:
                    break
                slot = (slot + 1) & mask
            offsets[i, k] = idx
            weights[i, k] = bary[k]

    # Blur neighbours: point +- u_j with u_j = (d+1) e_j - (1, ..., 1); only d coordinates are
    # stored, where u_j reads -1 everywhere and +d at position j (j < d).
    neighbours = np.empty((d1, m, 2), dtype=np.int32)
    for p in range(m):
        for j in range(d1):
            for sgn in range(2):
                s = -1 if sgn == 0 else 1
                for c in range(d):
                    step = -1
                    if c == j:
                        step = d
                    cand[c] = keys[p * d + c] + s * step
                idx = _find(table, keys, cand, d, mask)
                neighbours[j, p, sgn] = idx if idx >= 0 else m
    return offsets, weights, neighbours, m


@njit(cache=True)
def lattice_filter(values, offsets, weights, neighbours, n_lattice, alpha, scale, out, weight):
    """Splat -> blur -> slice, accumulating: ``out += weight * s * K(s * values)``.

    values: (N, L) float32 (C-contiguous); offsets, weights: (N, d+1); neighbours: (d+1, M, 2);
    scale: (N,) float32 per-pixel factor ``s`` applied before the splat and after the slice
    (the CRF's normalisation 1/sqrt(K 1)), or an empty array for none; out: (N, L) float32,
    updated in place. Folding the scaling and the accumulation into the splat/slice loops saves
    the (N, L) temporaries that dominate the cost for few labels.
    """
    n, n_labels = values.shape
    d1 = offsets.shape[1]
    m = n_lattice
    half = np.float32(0.5)
    scaled = scale.shape[0] > 0
    # Row m is the "absent neighbour": it stays zero in both buffers.
    lat = np.zeros((m + 1, n_labels), dtype=np.float32)
    tmp = np.zeros((m + 1, n_labels), dtype=np.float32)
    # Splat. Pixels in raster order touch lattice points numbered in the same order, so the
    # writes stay mostly in cache.
    for i in range(n):
        s = scale[i] if scaled else np.float32(1.0)
        for k in range(d1):
            p = offsets[i, k]
            w = weights[i, k] * s
            for l in range(n_labels):
                lat[p, l] += w * values[i, l]
    # Blur along each direction: pure gathers over precomputed indices.
    for j in range(d1):
        for p in range(m):
            a = neighbours[j, p, 0]
            b = neighbours[j, p, 1]
            for l in range(n_labels):
                tmp[p, l] = lat[p, l] + half * (lat[a, l] + lat[b, l])
        lat, tmp = tmp, lat
    # Slice, scale and accumulate.
    c = np.float32(alpha * weight)
    for i in range(n):
        s = c * scale[i] if scaled else c
        for k in range(d1):
            p = offsets[i, k]
            w = weights[i, k] * s
            for l in range(n_labels):
                out[i, l] += w * lat[p, l]
    return out


@njit(cache=True)
def softmax_rows(x, out):
    """out[i] = softmax(x[i]) over the last axis, for x, out: (N, L) float32 (may alias).

    The row maximum is subtracted first (log-sum-exp trick), so large scores cannot overflow.
    """
    n, n_labels = x.shape
    for i in range(n):
        mx = x[i, 0]
        for l in range(1, n_labels):
            if x[i, l] > mx:
                mx = x[i, l]
        total = np.float32(0.0)
        for l in range(n_labels):
            e = np.exp(x[i, l] - mx)
            out[i, l] = e
            total += e
        inv = np.float32(1.0) / total
        for l in range(n_labels):
            out[i, l] *= inv
    return out


_NO_SCALE = np.empty(0, dtype=np.float32)


class PermutohedralLattice:
    """Permutohedral lattice built once for one set of features, reused for every filter call.

    features: (N, d) float, divided by their thetas (e.g. ``[x / sxy, y / sxy, r / srgb, ...]``).

    Attributes: ``offsets`` (N, d+1) int32, ``weights`` (N, d+1) float32, ``neighbours``
    (d+1, M, 2) int32, ``n_lattice`` (M), ``d``, ``alpha = 1 / (1 + 2^-d)``.
    """

    def __init__(self, features):
        f = np.ascontiguousarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
            raise ValueError(f"features must be a non-empty (N, d) array; got shape {f.shape}.")
        if not np.all(np.isfinite(f)):
            raise ValueError("features contain NaN or infinity; check the image and the thetas.")
        # Lattice coordinates are stored as int32: keep |elevated| well inside that range.
        if np.abs(f).max() * np.sqrt(2.0 / 3.0) * (f.shape[1] + 1) > 2**30:
            raise ValueError("features are too large for the lattice; divide them by larger thetas.")
        self.n_points, self.d = f.shape
        self.offsets, self.weights, self.neighbours, self.n_lattice = build_lattice(f)
        self.n_lattice = int(self.n_lattice)
        self.alpha = 1.0 / (1.0 + 2.0 ** (-self.d))

    def _check_values(self, values):
        v = np.asarray(values, dtype=np.float32)
        if v.ndim == 1:
            v = v[:, None]
        if v.ndim != 2 or v.shape[0] != self.n_points:
            raise ValueError(
                f"values must be (N, L) with N = {self.n_points} points; got shape {np.shape(values)}."
            )
        return np.ascontiguousarray(v)

    def filter(self, values):
        """values: (N, L) or (N,) -> same shape, float32: the approximate Gaussian filter K v."""
        v = self._check_values(values)
        out = np.zeros(v.shape, dtype=np.float32)
        lattice_filter(v, self.offsets, self.weights, self.neighbours, self.n_lattice,
                       self.alpha, _NO_SCALE, out, 1.0)
        return out.reshape(np.shape(values))

    def accumulate_filter(self, values, out, scale=None, weight=1.0):
        """out += weight * scale * K(scale * values), in place - one mean-field message.

        values, out: (N, L) float32 (out C-contiguous); scale: (N,) or (N, 1) or None.
        """
        v = self._check_values(values)
        if out.shape != v.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {v.shape}.")
        s = _NO_SCALE if scale is None else np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
        if s.size not in (0, self.n_points):
            raise ValueError(f"scale must have N = {self.n_points} entries; got {s.size}.")
        lattice_filter(v, self.offsets, self.weights, self.neighbours, self.n_lattice,
                       self.alpha, s, out, float(weight))
        return out

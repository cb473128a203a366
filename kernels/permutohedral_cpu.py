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


# ------------------------------------------------------------------ one pixel: its simplex
# The steps of `simplex_of` in kernels/permutohedral_reference.py, written into preallocated
# (d+1,) work arrays so that the loop over pixels allocates nothing.

@njit(cache=True)
def _embedding_scale(d):
    """(d,) factors of the embedding: column i of the orthonormal basis of {sum x = 0} is scaled
    by sqrt(2/3)(d+1) / sqrt((i+1)(i+2)), so the blurred lattice approximates a unit Gaussian
    (``embedding_matrix`` in the reference module says why)."""
    scale = np.empty(d, dtype=np.float64)
    for i in range(d):
        scale[i] = np.sqrt(2.0 / 3.0) * (d + 1) / np.sqrt((i + 1.0) * (i + 2.0))
    return scale


@njit(cache=True)
def _elevate(features, i, scale, elevated):
    """elevated (d+1,) = E f for pixel i's features f = features[i] (d,), as a running sum:
    E is zero above its first subdiagonal, so each coordinate needs only the later features."""
    d = features.shape[1]
    sm = 0.0
    for j in range(d, 0, -1):
        cf = features[i, j - 1] * scale[j - 1]
        elevated[j] = sm - j * cf
        sm += cf
    elevated[0] = sm


@njit(cache=True)
def _nearest_remainder0(elevated, rem0):
    """Step 1: rem0 = every coordinate rounded to a multiple of d+1 (ties down); returns how
    many steps of d+1 the coordinate sum of rem0 is off the hyperplane (the "excess")."""
    d1 = elevated.shape[0]
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
    return int(round(total / d1))


@njit(cache=True)
def _rank_residuals(elevated, rem0, rank):
    """Step 2: rank[j] = how many residuals elevated - rem0 are larger than coordinate j's
    (0 = largest; of two equal ones the lower index counts as larger)."""
    d1 = elevated.shape[0]
    rank[:] = 0
    for a in range(d1):
        da = elevated[a] - rem0[a]
        for b in range(a + 1, d1):
            if da < elevated[b] - rem0[b]:
                rank[a] += 1
            else:
                rank[b] += 1


@njit(cache=True)
def _onto_hyperplane(rem0, rank, excess):
    """Step 3: move rem0 onto the hyperplane: the `excess` coordinates rounded up the most
    go down by d+1 (or, for a negative excess, those rounded down the most go up), and the
    ranks rotate to match."""
    d1 = rem0.shape[0]
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


@njit(cache=True)
def _barycentric(elevated, rem0, rank, bary):
    """Step 4: bary[:d+1] = the barycentric weights, the gaps between the sorted residuals
    (bary has d+2 entries: the last one wraps around to the first)."""
    d1 = elevated.shape[0]
    d = d1 - 1
    bary[:] = 0.0
    for j in range(d1):
        v = (elevated[j] - rem0[j]) / d1
        bary[d - rank[j]] += v
        bary[d1 - rank[j]] -= v
    bary[0] += 1.0 + bary[d1]


@njit(cache=True)
def _vertex_key(rem0, rank, k, key):
    """Step 5: key (d,) = the first d coordinates of the simplex's vertex of remainder k (the
    last coordinate is minus their sum, so it is not stored)."""
    d1 = rem0.shape[0]
    for c in range(d1 - 1):
        if rank[c] >= d1 - k:
            key[c] = np.int32(rem0[c] + k - d1)
        else:
            key[c] = np.int32(rem0[c] + k)


# ----------------------------------------------------------- the hash table of lattice points
# Open addressing with linear probing. Point p's key is keys[p*d:(p+1)*d]; table[slot] is a
# point index, or -1 for an empty slot. The table size is a power of two at least twice the
# key capacity (load factor <= 1/2 keeps probe chains short).

@njit(cache=True)
def _hash_key(keys, base, d):
    """Hash of the d int32 coordinates keys[base:base+d] (non-negative, < 2^31)."""
    h = 0
    for c in range(d):
        h = (h * _HASH_MUL + int(keys[base + c])) & _HASH_MASK
    return h


@njit(cache=True)
def _slot(table, keys, key, d):
    """The slot holding the point whose key is key[:d], or the empty slot where it belongs."""
    mask = table.shape[0] - 1
    slot = _hash_key(key, 0, d) & mask
    while True:
        idx = table[slot]
        if idx < 0:
            return slot
        same = True
        for c in range(d):
            if keys[idx * d + c] != key[c]:
                same = False
                break
        if same:
            return slot
        slot = (slot + 1) & mask


@njit(cache=True)
def _table_of(keys, m, d):
    """A table for the first m points of keys, sized for the capacity of keys."""
    capacity = keys.shape[0] // d
    size = 1
    while size < 2 * capacity:
        size *= 2
    table = np.full(size, -1, dtype=np.int32)
    mask = size - 1
    for p in range(m):  # the keys are distinct: the first empty slot is the point's
        slot = _hash_key(keys, p * d, d) & mask
        while table[slot] >= 0:
            slot = (slot + 1) & mask
        table[slot] = p
    return table


@njit(cache=True)
def _grown(keys, m, d):
    """Twice the key storage (the first m keys copied) and its table, rehashed."""
    grown = np.empty(2 * keys.shape[0], dtype=np.int32)
    grown[: m * d] = keys[: m * d]
    return grown, _table_of(grown, m, d)


@njit(cache=True)
def _blur_neighbours(table, keys, m, d):
    """neighbours (d+1, M, 2) int32: for every point, the point one step back and one step
    forward along each lattice direction u_j = (d+1) e_j - (1, ..., 1); M where there is none.

    On the d stored coordinates u_j reads -1 everywhere and +d at position j (j < d)."""
    neighbours = np.empty((d + 1, m, 2), dtype=np.int32)
    key = np.empty(d, dtype=np.int32)
    for p in range(m):
        for j in range(d + 1):
            for sgn in range(2):
                s = -1 if sgn == 0 else 1
                for c in range(d):
                    step = d if c == j else -1
                    key[c] = keys[p * d + c] + s * step
                idx = table[_slot(table, keys, key, d)]
                neighbours[j, p, sgn] = idx if idx >= 0 else m
    return neighbours


# --------------------------------------------------------------------------- the lattice
@njit(cache=True)
def build_lattice(features):
    """Build the lattice for one image.

    features: (N, d) float64, divided by their thetas.
    returns: offsets (N, d+1) int32, weights (N, d+1) float32,
             neighbours (d+1, M, 2) int32, n_lattice M.

    Every pixel is elevated onto the hyperplane, the simplex holding it located, and the d+1
    vertices numbered in order of first appearance; then each point's blur neighbours are found.
    """
    n, d = features.shape
    scale = _embedding_scale(d)
    # Room for about N points at first (M is typically 0.01 N to 1.2 N), doubled when full,
    # rather than the worst case N * (d+1), which is large for big colour images.
    keys = np.empty((n + 1024) * d, dtype=np.int32)
    table = _table_of(keys, 0, d)
    m = 0
    offsets = np.empty((n, d + 1), dtype=np.int32)
    weights = np.empty((n, d + 1), dtype=np.float32)
    elevated = np.empty(d + 1, dtype=np.float64)  # one pixel's work arrays, reused
    rem0 = np.empty(d + 1, dtype=np.float64)
    rank = np.empty(d + 1, dtype=np.int64)
    bary = np.empty(d + 2, dtype=np.float64)
    key = np.empty(d, dtype=np.int32)
    for i in range(n):
        # Room for this pixel's d+1 vertices? (Checked per pixel: growing inside the loop over
        # vertices made Numba's code of the whole loop about 2x slower.)
        if (m + d + 1) * d > keys.shape[0]:
            keys, table = _grown(keys, m, d)
        _elevate(features, i, scale, elevated)
        excess = _nearest_remainder0(elevated, rem0)
        _rank_residuals(elevated, rem0, rank)
        _onto_hyperplane(rem0, rank, excess)
        _barycentric(elevated, rem0, rank, bary)
        for k in range(d + 1):
            _vertex_key(rem0, rank, k, key)
            slot = _slot(table, keys, key, d)
            if table[slot] < 0:  # a new lattice point
                table[slot] = m
                keys[m * d:(m + 1) * d] = key
                m += 1
            offsets[i, k] = table[slot]
            weights[i, k] = bary[k]
    return offsets, weights, _blur_neighbours(table, keys, m, d), m


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

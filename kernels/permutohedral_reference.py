"""Plain NumPy / pure-Python oracles for Gaussian filtering in feature space.

Two things live here, both written for clarity rather than speed; tests compare the fast
kernels (``kernels/permutohedral_cpu.py`` with Numba, ``kernels/permutohedral_gpu.py`` with
CuPy) against them:

* :func:`naive_gaussian_filter` - the exact O(N^2) sum the fully connected CRF needs,
  ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (pixel ``i`` itself included, ``j = i`` adds
  ``v_i``). Usable up to a few thousand pixels.
* :class:`ReferenceLattice` - the permutohedral lattice of Adams, Baek & Davis (2010), the
  approximation that the dense-CRF C++ code (Kraehenbuehl & Koltun 2011) uses, written with a
  Python dict as the hash table. It is the step-by-step description of the algorithm: splat every
  point onto the d+1 vertices of its enclosing simplex, blur [1/2, 1, 1/2] along each of the
  d+1 lattice directions, slice (interpolate) back. Cost is linear in N instead of quadratic.

Feature convention (everywhere in this project): ``features`` is ``(N, d)`` and already divided
by the Gaussian's standard deviations (thetas), so the kernel is a unit-variance Gaussian.
"""
from __future__ import annotations

import numpy as np


def naive_gaussian_filter(features, values):
    """Exact Gaussian filter by brute force.

    features: (N, d) float, already divided by their thetas.
    values:   (N, L) float (or (N,), treated as L = 1).
    returns:  (N, L) float64, ``out[i] = sum_j exp(-|f_i - f_j|^2 / 2) * values[j]``.

    O(N^2) time; processes the rows in blocks so memory stays O(block * N).
    """
    f = np.asarray(features, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if f.ndim != 2 or v.shape[0] != f.shape[0]:
        raise ValueError(
            f"features must be (N, d) and values (N, L) with the same N; got {f.shape} and {v.shape}."
        )
    n = f.shape[0]
    out = np.empty((n, v.shape[1]), dtype=np.float64)
    sq = np.sum(f * f, axis=1)
    block = max(1, 2_000_000 // max(n, 1))
    for start in range(0, n, block):
        stop = min(n, start + block)
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b ; clip tiny negatives from rounding.
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * f[start:stop] @ f.T
        np.maximum(d2, 0.0, out=d2)
        out[start:stop] = np.exp(-0.5 * d2) @ v
    return out


def embedding_matrix(d):
    """The (d+1, d) matrix that lifts d-dim features onto the hyperplane H_d = {x : sum(x) = 0}.

    Column i is (1, ..., 1, -(i+1), 0, ..., 0) with i+1 ones, divided by its length
    sqrt((i+1)(i+2)): the columns are an orthonormal basis of H_d. The whole matrix is then scaled
    by sqrt(2/3) * (d+1). Why that factor: the [1/4, 1/2, 1/4] blur along the d+1 lattice
    directions u_j = (d+1) e_j - 1 has covariance (d+1)^2 / 2 per unit direction in H_d, and the
    splat + slice interpolation adds about (d+1)^2 / 6; together (2/3)(d+1)^2, so features scaled
    by sqrt(2/3)(d+1) see a Gaussian of standard deviation about 1 (Adams et al. 2010).
    """
    e = np.zeros((d + 1, d), dtype=np.float64)
    for i in range(d):
        e[: i + 1, i] = 1.0
        e[i + 1, i] = -(i + 1.0)
        e[:, i] /= np.sqrt((i + 1.0) * (i + 2.0))
    return e * (np.sqrt(2.0 / 3.0) * (d + 1))


def simplex_of(elevated):
    """Locate the lattice simplex holding one elevated point.

    elevated: (d+1,) float, a point of H_d (coordinates sum to 0).
    returns: (keys, bary) with keys (d+1, d+1) int - the coordinates of the simplex's d+1
             vertices, vertex k having remainder k (all its coordinates are = k mod d+1) - and
             bary (d+1,) float, the barycentric weights (non-negative, summing to 1) with which
             the point is the weighted mean of those vertices.
    """
    d1 = elevated.shape[0]
    # 1. Nearest "remainder-0" point: round every coordinate to a multiple of d+1.
    rem0 = np.round(elevated / d1) * d1
    # Ties (x exactly halfway) follow the C++ rule "up only if strictly closer"; np.round's
    # half-to-even may differ there, so redo those by hand for a bit-exact oracle.
    for i in range(d1):
        up = np.ceil(elevated[i] / d1) * d1
        down = np.floor(elevated[i] / d1) * d1
        rem0[i] = up if (up - elevated[i]) < (elevated[i] - down) else down
    excess = int(round(rem0.sum() / d1))  # how far rem0 is from the hyperplane, in steps
    delta = elevated - rem0
    # 2. rank[i] = how many coordinates have a larger residual (0 = largest). Ties: lower index
    #    counts as larger, the same rule as the Numba code.
    rank = np.zeros(d1, dtype=np.int64)
    for i in range(d1):
        for j in range(i + 1, d1):
            if delta[i] < delta[j]:
                rank[i] += 1
            else:
                rank[j] += 1
    # 3. Walk rem0 back onto H_d: if the sum is too high, the `excess` coordinates that were
    #    rounded up the most (smallest residual, highest rank) move down by d+1, and become the
    #    largest residuals; symmetrically when the sum is too low.
    if excess > 0:
        for i in range(d1):
            if rank[i] >= d1 - excess:
                rank[i] += excess - d1
                rem0[i] -= d1
            else:
                rank[i] += excess
    elif excess < 0:
        for i in range(d1):
            if rank[i] < -excess:
                rank[i] += d1 + excess
                rem0[i] += d1
            else:
                rank[i] += excess
    delta = (elevated - rem0) / d1
    # 4. Barycentric weights: consecutive gaps between the sorted residuals.
    bary = np.zeros(d1 + 1, dtype=np.float64)
    for i in range(d1):
        bary[d1 - 1 - rank[i]] += delta[i]
        bary[d1 - rank[i]] -= delta[i]
    bary[0] += 1.0 + bary[d1]  # wrap-around of the last gap
    # 5. Vertex with remainder k: coordinates ranked among the d+1-k largest residuals get +k,
    #    the others k - (d+1).
    keys = np.empty((d1, d1), dtype=np.int64)
    for k in range(d1):
        keys[k] = rem0 + k - d1 * (rank >= d1 - k)
    return keys, bary[:d1]


class ReferenceLattice:
    """Readable permutohedral lattice (Python dict hash table). Slow: use for tests only.

    features: (N, d) float, divided by their thetas.

    Attributes (same layout as :class:`kernels.permutohedral_cpu.PermutohedralLattice`, and
    the same numbering - lattice points are numbered in order of first appearance while pixels
    are visited in order and vertices k = 0..d - so the two can be compared entry for entry):
      offsets:   (N, d+1) int32, lattice-point index of each pixel's simplex vertices
      weights:   (N, d+1) float32, the barycentric weights
      neighbours:(d+1, M, 2) int32, index of the lattice point one step - and + along each
                 direction u_j; M (one past the last point) where that point does not exist
      n_lattice: M, the number of lattice points that received a splat
    """

    def __init__(self, features):
        f = np.asarray(features, dtype=np.float64)
        n, d = f.shape
        d1 = d + 1
        self.d = d
        elevated = f @ embedding_matrix(d).T  # (N, d+1)
        table = {}  # key (first d coordinates; the last is minus their sum) -> index
        self.offsets = np.empty((n, d1), dtype=np.int32)
        self.weights = np.empty((n, d1), dtype=np.float32)
        for i in range(n):
            keys, bary = simplex_of(elevated[i])
            for k in range(d1):
                key = tuple(int(c) for c in keys[k, :d])
                if key not in table:
                    table[key] = len(table)
                self.offsets[i, k] = table[key]
                self.weights[i, k] = bary[k]
        m = len(table)
        self.n_lattice = m
        self.neighbours = np.full((d1, m, 2), m, dtype=np.int32)
        for key, idx in table.items():
            key = np.array(key, dtype=np.int64)
            for j in range(d1):
                # u_j restricted to the first d coordinates: -1 everywhere, +d at j (if j < d).
                step = -np.ones(d, dtype=np.int64)
                if j < d:
                    step[j] += d1
                self.neighbours[j, idx, 0] = table.get(tuple(int(c) for c in key - step), m)
                self.neighbours[j, idx, 1] = table.get(tuple(int(c) for c in key + step), m)
        # Scale used by the dense-CRF C++ code; see kernels/permutohedral_cpu.py for the
        # measured ratio to the exact Gaussian sum.
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))

    def filter(self, values):
        """values: (N, L) -> (N, L) float64, the lattice approximation of the Gaussian filter."""
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1:
            v = v[:, None]
        m = self.n_lattice
        lat = np.zeros((m + 1, v.shape[1]))  # row m stays 0: the "missing neighbour"
        # Splat: each pixel hands its value to its simplex vertices, weighted barycentrically.
        for i in range(v.shape[0]):
            for k in range(self.d + 1):
                lat[self.offsets[i, k]] += float(self.weights[i, k]) * v[i]
        # Blur: [1/2, 1, 1/2] along each lattice direction in turn.
        for j in range(self.d + 1):
            new = lat.copy()
            for p in range(m):
                a, b = self.neighbours[j, p]
                new[p] = lat[p] + 0.5 * (lat[a] + lat[b])
            lat = new
        # Slice: read back with the same barycentric weights.
        out = np.zeros_like(v)
        for i in range(v.shape[0]):
            for k in range(self.d + 1):
                out[i] += float(self.weights[i, k]) * lat[self.offsets[i, k]]
        return self.alpha * out

"""Tests for the permutohedral lattice (kernels/permutohedral_*.py) and the dense CRF (seg/crf)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import ndimage as ndi

from kernels.permutohedral_cpu import PermutohedralLattice
from kernels.permutohedral_reference import (
    ReferenceLattice,
    embedding_matrix,
    naive_gaussian_filter,
    simplex_of,
)
from seg.crf import PRESETS, DenseCRF, dense_crf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers
def _positions(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)  # (N, 2): x = col, y = row


def _smooth_image(h, w, channels, seed):
    """Smooth random image in 0-255 (neighbouring pixels similar, like a photograph)."""
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.uniform(0, 255, size=(h, w, channels)), (2, 2, 0))
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img


def _ellipse_case(h=40, w=48, seed=0):
    """Known mask, a matching noisy grayscale image, and a blurred noisy 2-label prediction."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((xx - w / 2) ** 2 / (w / 4) ** 2 + (yy - h / 2) ** 2 / (h / 4) ** 2) < 1
    image = np.clip(60 + 120 * mask + rng.normal(0, 15, size=mask.shape), 0, 255).astype(np.uint8)
    fg = ndi.gaussian_filter(mask.astype(float), 3) * 0.8 + 0.1
    fg = np.clip(fg + rng.normal(0, 0.15, size=fg.shape), 0.01, 0.99)
    return mask, image, np.stack([1 - fg, fg]).astype(np.float32)


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _softmax0(x):
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _naive_mean_field(unary, kernels, iterations):
    """The mean-field update written straight from the spec with the exact O(N^2) filter.

    unary: (L, N); kernels: list of (features (N, d), potts weight w). returns Q (L, N).
    """
    q = _softmax0(-unary)
    norms = [1.0 / np.sqrt(naive_gaussian_filter(f, np.ones(len(f)))[:, 0] + 1e-20) for f, _ in kernels]
    for _ in range(iterations):
        acc = -unary.copy()
        for (f, w), n in zip(kernels, norms):
            acc += w * (n[:, None] * naive_gaussian_filter(f, (q * n).T)).T
        q = _softmax0(acc)
    return q


# ------------------------------------------------------------------ lattice geometry
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_simplex_barycentric_reconstructs_point(d):
    rng = np.random.default_rng(d)
    e = embedding_matrix(d)
    assert np.allclose(e.sum(axis=0), 0)  # lands on the hyperplane sum(x) = 0
    for _ in range(200):
        x = e @ (rng.normal(size=d) * 4)
        keys, bary = simplex_of(x)
        assert np.all(bary >= -1e-12) and np.isclose(bary.sum(), 1.0)
        assert np.allclose(bary @ keys, x)  # the point is the weighted mean of the vertices
        assert np.all(keys.sum(axis=1) == 0)
        assert all(np.all(np.mod(keys[k], d + 1) == k) for k in range(d + 1))  # remainder k


@pytest.mark.parametrize("d, spread", [(1, 2.5), (2, 2.5), (3, 2.5), (5, 2.5), (5, 50.0)])
def test_numba_lattice_equals_reference_lattice(d, spread):
    # spread 50: almost every vertex is a new lattice point, which makes the hash table grow.
    rng = np.random.default_rng(10 + d)
    f = rng.normal(size=(300, d)) * spread
    ref, fast = ReferenceLattice(f), PermutohedralLattice(f)
    assert fast.n_lattice == ref.n_lattice
    np.testing.assert_array_equal(fast.offsets, ref.offsets)
    np.testing.assert_allclose(fast.weights, ref.weights, atol=1e-6)
    np.testing.assert_array_equal(fast.neighbours, ref.neighbours)
    v = rng.uniform(size=(300, 3))
    expect = ref.filter(v)
    np.testing.assert_allclose(fast.filter(v), expect, rtol=1e-4, atol=1e-5 * np.abs(expect).max())


def test_numba_kernels_run_without_jit():
    """NUMBA_DISABLE_JIT=1 runs the same code as plain Python and must give the same result."""
    script = textwrap.dedent("""
        import numpy as np
        from kernels.permutohedral_cpu import PermutohedralLattice
        from kernels.permutohedral_reference import ReferenceLattice
        f = np.random.default_rng(0).normal(size=(60, 3)) * 2
        v = np.random.default_rng(1).uniform(size=(60, 2))
        a, b = PermutohedralLattice(f), ReferenceLattice(f)
        assert np.array_equal(a.offsets, b.offsets)
        assert np.allclose(a.filter(v), b.filter(v), rtol=1e-4, atol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ------------------------------------------------------- lattice vs the exact filter
# Relative RMS errors measured on these 24x24 images (seeded), asserted with margin:
#   case                       K v / K 1    n K(n Q) (CRF message)   K 1 up to one scale
#   Gaussian, sxy 3 (d=2)       0.006        0.012                    0.017
#   gray bilateral 10/20 (d=3)  0.006        0.018                    0.031
#   colour bilateral 10/20(d=5) 0.024        0.049                    0.092
LATTICE_CASES = {
    "gaussian_d2": (lambda: _positions(24, 24) / 3.0, (0.02, 0.03, 0.04)),
    "gray_bilateral_d3": (
        lambda: np.concatenate([_positions(24, 24) / 10.0, _smooth_image(24, 24, 3, 1)[..., :1].reshape(-1, 1) / 20.0], 1),
        (0.02, 0.04, 0.06)),
    "colour_bilateral_d5": (
        lambda: np.concatenate([_positions(24, 24) / 10.0, _smooth_image(24, 24, 3, 1).reshape(-1, 3) / 20.0], 1),
        (0.06, 0.10, 0.15)),
}


@pytest.mark.parametrize("case", sorted(LATTICE_CASES))
def test_lattice_approximates_naive_gaussian(case):
    make, (tol_norm, tol_msg, tol_k1) = LATTICE_CASES[case]
    f = make()
    n = len(f)
    rng = np.random.default_rng(0)
    lat = PermutohedralLattice(f)
    k1 = lat.filter(np.ones(n)).astype(np.float64)
    k1_exact = naive_gaussian_filter(f, np.ones(n))[:, 0]
    # K 1 equals the exact sum up to one global scale (the lattice's normalisation constant).
    c = (k1 @ k1_exact) / (k1 @ k1)
    assert 0.3 < 1.0 / c < 1.2
    assert np.linalg.norm(c * k1 - k1_exact) / np.linalg.norm(k1_exact) < tol_k1
    # Normalised filtering K v / K 1: the scale cancels.
    v = rng.uniform(size=(n, 3))
    a = lat.filter(v) / k1[:, None]
    b = naive_gaussian_filter(f, v) / k1_exact[:, None]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol_norm
    # The CRF message n K(n Q) with n = 1/sqrt(K 1).
    q = rng.dirichlet(np.ones(3), size=n)
    na, nb = 1 / np.sqrt(k1), 1 / np.sqrt(k1_exact)
    ma = na[:, None] * lat.filter(q * na[:, None])
    mb = nb[:, None] * naive_gaussian_filter(f, q * nb[:, None])
    assert np.linalg.norm(ma - mb) / np.linalg.norm(mb) < tol_msg


def test_naive_filter_matches_definition():
    rng = np.random.default_rng(3)
    f, v = rng.normal(size=(7, 2)), rng.normal(size=(7, 2))
    expect = np.array([[sum(np.exp(-0.5 * np.sum((f[i] - f[j]) ** 2)) * v[j, l] for j in range(7))
                        for l in range(2)] for i in range(7)])
    np.testing.assert_allclose(naive_gaussian_filter(f, v), expect, rtol=1e-12)


# ------------------------------------------------------------------- mean field
def test_mean_field_matches_exact_filter_mean_field():
    """DenseCRF with the lattice against the spec's update computed with the exact filter."""
    rng = np.random.default_rng(5)
    h, w, n_labels = 18, 22, 3
    img = _smooth_image(h, w, 1, 2)[..., 0]
    probs = rng.dirichlet(np.ones(n_labels), size=(h, w)).transpose(2, 0, 1).astype(np.float32)
    crf = DenseCRF(w, h, n_labels)
    crf.set_unary_from_probs(probs)
    crf.add_pairwise_gaussian(sxy=3, compat=3)
    crf.add_pairwise_bilateral(sxy=8, srgb=20, image=img, compat=5)
    # Two iterations: with such noisy unaries, later iterations amplify the lattice's few-%
    # error at undecided pixels (measured: mean |dQ| 0.007, max 0.043; a flipped sign: 0.063).
    q = crf.inference(2).reshape(n_labels, -1)
    unary = -np.log(np.clip(probs, 1e-5, 1)).reshape(n_labels, -1)
    pos = _positions(h, w)
    q_exact = _naive_mean_field(unary, [(pos / 3, 3.0), (np.concatenate([pos / 8, img.reshape(-1, 1) / 20], 1), 5.0)], 2)
    assert np.abs(q - q_exact).mean() < 0.015
    assert np.abs(q - q_exact).max() < 0.08
    assert np.mean(q.argmax(0) == q_exact.argmax(0)) > 0.97


def test_zero_pairwise_weight_returns_unary_probs():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), size=(12, 15)).transpose(2, 0, 1)
    probs = np.clip(probs, 1e-3, None)
    probs /= probs.sum(0)
    img = rng.uniform(0, 255, size=(12, 15, 3))
    out = dense_crf(probs, img, gaussian=(3, 0), bilateral=(50, 10, 0), iterations=5)
    np.testing.assert_allclose(out, probs, atol=1e-5)  # softmax(-U) = softmax(log p) = p
    crf = DenseCRF(15, 12, 4)
    crf.set_unary_from_probs(probs)
    crf.add_pairwise_gaussian(3, 3)
    np.testing.assert_allclose(crf.inference(0), probs, atol=1e-5)  # 0 iterations: softmax(-U)


def test_output_is_probability_distribution():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(5), size=(20, 17)).transpose(2, 0, 1)
    img = rng.integers(0, 256, size=(20, 17, 3), dtype=np.uint8)
    out = dense_crf(probs, img, preset="default")
    assert out.shape == (5, 20, 17) and out.dtype == np.float32
    assert np.all(out >= 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)


def test_crf_improves_dice_on_blurred_prediction():
    mask, image, probs = _ellipse_case()
    before = _dice(probs.argmax(0) == 1, mask)
    out = dense_crf(probs, image, preset="default")
    after = _dice(out.argmax(0) == 1, mask)
    assert before < 0.93
    assert after > before + 0.04 and after > 0.97


def test_potts_message_pulls_towards_neighbours_label():
    """Sign convention: an undecided pixel among confident label-1 pixels of the same colour
    becomes label 1, and the uncertain label-0 probability of its neighbours drops."""
    h, w = 9, 9
    probs = np.zeros((2, h, w), dtype=np.float32)
    probs[1] = 0.7
    probs[0] = 0.3
    probs[:, 4, 4] = 0.5
    img = np.full((h, w), 100, dtype=np.uint8)
    out = dense_crf(probs, img, gaussian=(3, 3), bilateral=(10, 10, 5), iterations=5)
    assert out[1, 4, 4] > 0.9
    assert np.all(out[1] > probs[1])


def test_potts_number_equals_matrix_form():
    mask, image, probs = _ellipse_case(h=20, w=24, seed=3)
    eye = np.eye(2, dtype=np.float32)
    a = dense_crf(probs, image, gaussian=(3, 3), bilateral=(20, 13, 6), iterations=3)
    b = dense_crf(probs, image, gaussian=(3, 3 * (1 - eye)), bilateral=(20, 13, 6 * (1 - eye)), iterations=3)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_presets_exist_and_run():
    assert set(PRESETS) == {"default", "deeplab_v1_largefov", "deeplab_v2"}
    assert PRESETS["deeplab_v2"] == {"gaussian": (1.0, 3.0), "bilateral": (67.0, 3.0, 4.0), "iterations": 10}
    assert PRESETS["deeplab_v1_largefov"]["bilateral"] == (49.0, 5.0, 4.0)
    assert PRESETS["default"]["bilateral"] == (80.0, 13.0, 10.0)
    mask, image, probs = _ellipse_case(h=24, w=30, seed=1)
    for name in PRESETS:
        out = dense_crf(probs, image, preset=name)
        assert out.shape == probs.shape
        np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    explicit = dense_crf(probs, image, gaussian=(1, 3), bilateral=(67, 3, 4), iterations=10)
    np.testing.assert_allclose(dense_crf(probs, image, preset="deeplab_v2"), explicit, atol=1e-6)


def test_layouts_and_dtypes_are_converted():
    mask, image, probs = _ellipse_case(h=20, w=26, seed=2)
    ref = dense_crf(probs, image, iterations=3)
    # (H, W, L) is detected from the image size; output is always (L, H, W).
    np.testing.assert_allclose(dense_crf(probs.transpose(1, 2, 0), image, iterations=3), ref, atol=1e-6)
    # grayscale as (H, W, 1) or float; probabilities as unnormalised float64.
    np.testing.assert_allclose(dense_crf(probs, image[..., None], iterations=3), ref, atol=1e-6)
    np.testing.assert_allclose(dense_crf(probs, image.astype(np.float64), iterations=3), ref, atol=1e-6)
    np.testing.assert_allclose(dense_crf(probs.astype(np.float64) * 7, image, iterations=3), ref, atol=1e-5)


# ----------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(2), size=(10, 12)).transpose(2, 0, 1)
    img = np.zeros((10, 12), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"match neither \(L, 10, 12\) nor \(10, 12, L\)"):
        dense_crf(probs[:, :, :11], img)
    with pytest.raises(ValueError, match="image is 10x13 .* but the CRF is 10x12"):
        crf = DenseCRF(12, 10, 2)
        crf.add_pairwise_bilateral(80, 13, np.zeros((10, 13)), 10)
    with pytest.raises(ValueError, match="could be \\(L, H, W\\) or \\(H, W, L\\); pass labels_axis"):
        dense_crf(np.full((4, 4, 4), 0.25), np.zeros((4, 4)))
    square = dense_crf(np.full((4, 4, 4), 0.25), np.zeros((4, 4)), labels_axis=0, iterations=1)
    assert square.shape == (4, 4, 4)
    bad = probs.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"probabilities contain 1 NaN value\(s\)"):
        dense_crf(bad, img)
    with pytest.raises(ValueError, match="must be non-negative, found minimum -1; pass softmax probabilities, not logits"):
        dense_crf(np.where(probs > 0.5, probs, -1.0), img)
    with pytest.raises(ValueError, match="sum to zero over the labels at 120 pixels"):
        dense_crf(np.zeros_like(probs), img)
    with pytest.raises(ValueError, match="probabilities must be 3-D"):
        dense_crf(probs[1], img)
    with pytest.raises(TypeError, match="image must hold real numbers"):
        dense_crf(probs, img.astype(np.complex64))
    with pytest.raises(ValueError, match="image contains NaN"):
        dense_crf(probs, np.full((10, 12), np.nan))
    with pytest.raises(ValueError, match=r"compat must be a number \(Potts weight\) or an \(2, 2\)"):
        dense_crf(probs, img, gaussian=(3, np.ones((3, 3))))
    with pytest.raises(ValueError, match="sxy must be a positive number"):
        dense_crf(probs, img, gaussian=(0, 3))
    with pytest.raises(ValueError, match=r"sxy must be one number or a pair \(sx, sy\)"):
        dense_crf(probs, img, gaussian=((1, 2, 3), 3))
    with pytest.raises(ValueError, match=r"bilateral must be a triple \(sxy, srgb, compat\)"):
        dense_crf(probs, img, bilateral=(80, 13))
    with pytest.raises(ValueError, match="unknown preset 'deeplab'"):
        dense_crf(probs, img, preset="deeplab")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu'"):
        dense_crf(probs, img, device="cuda")
    with pytest.raises(ValueError, match=r"unary energy must be \(L, N\) = \(2, 120\)"):
        DenseCRF(12, 10, 2).set_unary_energy(np.zeros((2, 119)))
    with pytest.raises(ValueError, match="call set_unary_energy or set_unary_from_probs before inference"):
        DenseCRF(12, 10, 2).inference(5)
    with pytest.raises(ValueError, match="probabilities have 2 labels but the CRF was made for 3"):
        DenseCRF(12, 10, 3).set_unary_from_probs(probs)
    with pytest.warns(UserWarning, match=r"image lies in \[0, 1\] but srgb=13"):
        dense_crf(probs, rng.uniform(size=(10, 12)), iterations=1)


# -------------------------------------------------------------------------- GPU
def test_devices_agree_with_cpu(device):
    # `device` is the fixture of tests/conftest.py: "cpu", and "gpu" (skipped with the reason
    # when CuPy or a CUDA device is missing).
    mask, image, probs = _ellipse_case(h=30, w=36, seed=4)
    colour = np.stack([image, 255 - image, image // 2], axis=-1)
    cpu = dense_crf(probs, colour, preset="default")
    out = dense_crf(probs, colour, preset="default", device=device)
    assert isinstance(out, np.ndarray) and out.shape == cpu.shape
    np.testing.assert_allclose(out, cpu, atol=1e-4)
    if device == "gpu":  # the lattice filter itself, raw CUDA kernels and plain-CuPy path
        import cupy

        from kernels.permutohedral_gpu import PermutohedralLatticeGPU

        f = np.concatenate([_positions(30, 36) / 5, colour.reshape(-1, 3) / 13.0], 1)
        v = np.random.default_rng(0).uniform(size=(len(f), 21)).astype(np.float32)
        expect = PermutohedralLattice(f).filter(v)
        gpu = PermutohedralLatticeGPU(f)
        scale = np.random.default_rng(1).uniform(0.5, 2, size=len(f)).astype(np.float32)
        start = np.random.default_rng(2).uniform(size=v.shape).astype(np.float32)
        acc = start.copy()
        PermutohedralLattice(f).accumulate_filter(v, acc, scale=scale, weight=-2.5)
        for raw in (True, False):
            got = cupy.asnumpy(gpu.filter(cupy.asarray(v), use_raw_kernels=raw))
            np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
            acc_gpu = cupy.asarray(start)
            gpu.accumulate_filter(cupy.asarray(v), acc_gpu, scale=cupy.asarray(scale), weight=-2.5,
                                  use_raw_kernels=raw)
            np.testing.assert_allclose(cupy.asnumpy(acc_gpu), acc, rtol=1e-4, atol=1e-4 * np.abs(acc).max())

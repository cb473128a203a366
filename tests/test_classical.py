"""seg.classical: fixed filters against hand-computed responses, blob detection, region growing."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from seg import classical as C


# ----------------------------------------------------------------------------- filters
def test_vertical_edge_example_from_the_talk():
    # 6x6 image, left half 10, right half 0, * the 3x3 vertical-edge kernel = 4x4 with 30s.
    image = np.zeros((6, 6), dtype=np.float32)
    image[:, :3] = 10
    out = C.filter2d(image, C.VERTICAL_EDGE, padding="valid")
    np.testing.assert_array_equal(out, np.tile([0, 30, 30, 0], (4, 1)))


def test_sobel_on_a_ramp_and_a_step():
    ramp = np.tile(np.arange(3.0), (3, 1))                 # I[y, x] = x
    # -1*0 + 1*2 on each row, weighted 1, 2, 1 -> 8; nothing changes along y -> 0.
    assert C.filter2d(ramp, C.SOBEL_X, padding="valid")[0, 0] == 8
    assert C.filter2d(ramp, C.SOBEL_Y, padding="valid")[0, 0] == 0

    step = np.zeros((5, 5))
    step[:, 2:] = 1
    magnitude, gx, gy = C.sobel(step, return_components=True)
    # Columns 1 and 2 see the step (1 - 0) with weights 1 + 2 + 1; reflect padding adds none.
    np.testing.assert_array_equal(gx, np.tile([0, 4, 4, 0, 0], (5, 1)))
    np.testing.assert_array_equal(gy, 0)
    np.testing.assert_array_equal(magnitude, np.abs(gx))


def test_laplacians_4_and_8_neighbours():
    # On f = x^2 + y^2 the 4-neighbour stencil gives -(f'' along x + along y) = -4; the
    # 8-neighbour one adds the four diagonals, each 2 above the centre: -(4*1 + 4*2) = -12.
    y, x = np.mgrid[:6, :7].astype(np.float64)
    f = x**2 + y**2
    np.testing.assert_array_equal(C.laplacian(f, padding="valid"), -4)
    np.testing.assert_array_equal(C.laplacian(f, diagonals=True, padding="valid"), -12)
    # An impulse returns the (symmetric) kernel itself around it.
    impulse = np.zeros((5, 5))
    impulse[2, 2] = 1
    np.testing.assert_array_equal(C.laplacian(impulse, padding="zeros")[1:4, 1:4], C.LAPLACIAN_4)
    np.testing.assert_array_equal(C.laplacian(impulse, True, padding="zeros")[1:4, 1:4], C.LAPLACIAN_8)


def test_filter_bank_and_batch_shapes_and_padding_modes():
    rng = np.random.default_rng(0)
    images = rng.random((2, 9, 11)).astype(np.float32)
    bank = np.stack([C.SOBEL_X, C.SOBEL_Y, C.LAPLACIAN_4])
    out = C.filter2d(images, bank)
    assert out.shape == (2, 3, 9, 11) and out.dtype == np.float32
    np.testing.assert_allclose(out[1, 2], C.laplacian(images[1]), rtol=1e-6, atol=1e-6)
    assert C.filter2d(images[0], bank, padding="valid").shape == (3, 7, 9)
    # A constant image has no edges, unless zero padding invents one all around the border.
    flat = np.full((6, 6), 5.0)
    for mode in ("reflect", "edge"):
        np.testing.assert_array_equal(C.sobel(flat, padding=mode), 0)
    border = C.sobel(flat, padding="zeros")
    assert border[0].min() > 0 and np.all(border[2:-2, 2:-2] == 0)


def test_filter_errors_are_clear():
    with pytest.raises(ValueError, match="padding must be one of"):
        C.filter2d(np.zeros((5, 5)), C.SOBEL_X, padding="same")
    with pytest.raises(ValueError, match="smaller than the kernel"):
        C.filter2d(np.zeros((2, 5)), C.SOBEL_X, padding="valid")
    with pytest.raises(ValueError, match=r"image must have shape \(H, W\)"):
        C.sobel(np.zeros(5))
    with pytest.raises(ValueError, match="sigma must be positive"):
        C.log_kernel(0)


def test_log_and_dog_kernels():
    k = C.log_kernel(2.0)
    assert k.shape == (17, 17)
    assert abs(k.sum()) < 1e-12                      # flat regions give no response
    assert k[8, 8] == k.min() < 0                    # negative centre: the inverted Mexican hat
    np.testing.assert_allclose(k, k.T)               # isotropic -> symmetric
    # Near the centre, sigma^2 LoG(0, 0) = -1 / (pi sigma^2) (continuous formula).
    np.testing.assert_allclose(k[8, 8], -1 / (np.pi * 4), rtol=0.02)
    # The separable pass is the 2-D kernel; DoG has the LoG's shape.
    rng = np.random.default_rng(1)
    image = rng.random((20, 24))
    np.testing.assert_allclose(C.log_filter(image, 2.0), C.filter2d(image, k), atol=1e-12)
    np.testing.assert_allclose(C.dog_filter(image, 1.5), C.filter2d(image, C.dog_kernel(1.5)), atol=1e-12)
    # DoG(sigma, k) has the shape of the LoG at the geometric-mean scale sigma * sqrt(k), and
    # normalized, its centre value too (compared on the same grid).
    for ratio in (1.6, 1.2):
        d = C.dog_kernel(2.0, k=ratio)
        r = d.shape[0] // 2
        s = 2.0 * np.sqrt(ratio)
        log = C.log_kernel(s, truncate=r / s)
        assert log.shape == d.shape
        cosine = (d * log).sum() / np.linalg.norm(d) / np.linalg.norm(log)
        assert cosine > 0.998
        assert d[r, r] == pytest.approx(log[r, r], rel=0.03)


def test_zero_crossings_mark_the_step():
    step = np.zeros((8, 10))
    step[:, 5:] = 1
    edges = C.zero_crossings(C.log_filter(step, 1.0), threshold=1e-3)
    cols = np.nonzero(edges.any(axis=0))[0]
    np.testing.assert_array_equal(cols, [4])         # the sign flips between columns 4 and 5


# ----------------------------------------------------------------------------- blobs
def _gaussian_blob(shape, centre, sigma, amplitude=1.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return amplitude * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def test_blob_log_finds_centre_and_scale_of_a_planted_blob():
    image = _gaussian_blob((48, 56), (20, 27), 3.0)
    blobs = C.blob_log(image, sigmas=np.arange(1, 6.01, 0.5))
    y, x, sigma, response = blobs[0]
    assert (y, x, sigma) == (20, 27, 3.0)
    # Scale-normalised response of a Gaussian blob at its own sigma: amplitude / 2.
    assert response == pytest.approx(0.5, rel=0.01)
    # A dark blob needs bright=False; two blobs of different sizes keep their own scales.
    dark = 1 - image
    assert tuple(C.blob_log(dark, np.arange(1, 6.01, 0.5), bright=False)[0, :3]) == (20, 27, 3.0)
    two = _gaussian_blob((60, 80), (15, 20), 2.0) + _gaussian_blob((60, 80), (40, 55), 5.0)
    found = {tuple(b[:3]) for b in C.blob_log(two, np.arange(1, 7.01, 0.5), threshold=0.2)}
    assert found == {(15, 20, 2.0), (40, 55, 5.0)}


def test_blob_of_a_disc_has_scale_radius_over_sqrt2_and_paints_back():
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 30) ** 2 + (xx - 33) ** 2 <= 8**2).astype(np.float64)
    y, x, sigma, _ = C.blob_log(disc, np.arange(2, 10, 0.25), max_blobs=1)[0]
    assert (y, x) == (30, 33) and abs(sigma - 8 / np.sqrt(2)) <= 0.25
    painted = C.blobs_to_mask([[y, x, 8.001 / np.sqrt(2)]], disc.shape)  # radius 8 (+ rounding slack)
    np.testing.assert_array_equal(painted, disc > 0)
    assert not C.blobs_to_mask(np.zeros((0, 4)), (4, 4)).any()


def test_local_maxima_2d():
    v = np.zeros((4, 5))
    v[1, 1], v[2, 4] = 3, 2
    np.testing.assert_array_equal(np.argwhere(C.local_maxima(v, 0.5)), [[1, 1], [2, 4]])


# ----------------------------------------------------------------------------- region growing
def _known_region_image():
    """Noisy background 0.2 with an L-shaped object 0.8 and a separate 0.8 square."""
    rng = np.random.default_rng(3)
    image = 0.2 + rng.uniform(-0.05, 0.05, (20, 24))
    region = np.zeros((20, 24), dtype=bool)
    region[3:15, 4:8] = True
    region[11:15, 8:16] = True                   # the foot of the L
    other = np.zeros_like(region)
    other[2:6, 18:22] = True                      # same brightness, not connected
    image[region | other] = 0.8 + rng.uniform(-0.05, 0.05, (region | other).sum())
    return image, region, other


def test_region_growing_recovers_a_known_region_exactly():
    image, region, other = _known_region_image()
    for reference in ("seed", "mean"):
        grown = C.region_grow(image, (5, 5), tolerance=0.15, reference=reference)
        np.testing.assert_array_equal(grown, region)
    both = C.region_grow(image, [(5, 5), (3, 19)], tolerance=0.15)
    np.testing.assert_array_equal(both, region | other)


def test_region_growing_connectivity_4_vs_8():
    image = np.zeros((5, 5))
    image[1, 1] = image[2, 2] = image[3, 3] = 1      # a diagonal line
    assert C.region_grow(image, (1, 1), 0.1).sum() == 1
    np.testing.assert_array_equal(C.region_grow(image, (1, 1), 0.1, connectivity=8), image == 1)


def test_region_growing_errors():
    with pytest.raises(ValueError, match="outside the 5x5 image"):
        C.region_grow(np.zeros((5, 5)), (5, 0), 0.1)
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        C.region_grow(np.zeros((5, 5)), (0, 0), 0.1, connectivity=6)


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 0.6))
def test_region_growing_properties(seed, tolerance):
    rng = np.random.default_rng(seed)
    image = rng.random((7, 8))
    seeds = [(int(rng.integers(7)), int(rng.integers(8))) for _ in range(3)]
    grown = C.region_grow(image, seeds, tolerance)
    # Independent of the seed order; every seed is inside; with reference "seed", each
    # grown pixel is within tolerance of some seed's value.
    np.testing.assert_array_equal(grown, C.region_grow(image, seeds[::-1], tolerance))
    assert all(grown[s] for s in seeds)
    values = np.array([image[s] for s in seeds])
    close = (np.abs(image[..., None] - values) <= tolerance).any(axis=-1)
    assert np.all(close[grown])
    # The region is closed: no pixel outside it is a 4-neighbour of the region and within
    # tolerance of the seed that grew it (checked with one seed).
    one = C.region_grow(image, seeds[0], tolerance)
    near = np.zeros_like(one)
    near[1:] |= one[:-1]
    near[:-1] |= one[1:]
    near[:, 1:] |= one[:, :-1]
    near[:, :-1] |= one[:, 1:]
    assert not np.any(near & ~one & (np.abs(image - image[seeds[0]]) <= tolerance))

"""Tests for seg.data: Kaggle-layout reader, folder reader, synthetic data, augmentation, loader."""

import filecmp
import os
import re
import threading
import time

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from seg.data import (
    Augment,
    DataLoader,
    Dataset,
    ImageMaskFolder,
    KaggleUltrasound,
    Resize,
    SampleLoadError,
    affine,
    collate,
    elastic_deform,
    elastic_displacement,
    find_kaggle_samples,
    find_kaggle_test_samples,
    hflip,
    intensity_jitter,
    load_sample,
    random_affine,
    resize,
    split_by_subject,
    synthetic_image,
    vflip,
    write_synthetic_dataset,
)
from seg.metrics import dice_score

SMALL = (60, 80)  # (H, W): a small frame keeps the tests fast
SYNTH = dict(n_subjects=4, images_per_subject=3, seed=0, size=SMALL, n_test=2)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), **SYNTH)


def esc(path):
    """A regex that matches the file's path literally inside an error message."""
    return re.escape(str(path))


def write_tif(path, array):
    tifffile.imwrite(path, np.asarray(array))


def blobs(shape, seed=0, sigma=4.0):
    """Smooth random image in [0, 1] with blobs, for alignment checks (threshold -> mask)."""
    x = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


# ----------------------------------------------------------------------------- Kaggle layout


def test_synthetic_set_is_read_by_kaggle_reader(synth_root):
    data = KaggleUltrasound(synth_root, verify=True)
    assert len(data) == 4 * 3
    assert data.subjects == [1, 2, 3, 4]
    for s in data.samples:
        assert os.path.basename(s.image_path) == f"{s.subject}_{s.n}.tif"
        assert os.path.basename(s.mask_path) == f"{s.subject}_{s.n}_mask.tif"
        assert os.path.dirname(s.image_path) == os.path.dirname(s.mask_path)
    assert [(s.subject, s.n) for s in data.samples] == sorted((s, n) for s in range(1, 5) for n in range(1, 4))
    assert [os.path.basename(s.image_path) for s in data.test_samples] == ["1.tif", "2.tif"]
    assert all(s.mask_path is None for s in data.test_samples)


def test_reader_accepts_the_train_folder_itself(synth_root):
    assert find_kaggle_samples(synth_root / "train") == find_kaggle_samples(synth_root)
    assert find_kaggle_test_samples(synth_root / "train") == find_kaggle_test_samples(synth_root)


def test_loaded_dtypes_and_ranges(synth_root):
    data = KaggleUltrasound(synth_root)
    nonempty = 0
    for s in data.samples:
        raw_mask = tifffile.imread(s.mask_path)
        assert raw_mask.dtype == np.uint8 and set(np.unique(raw_mask)) <= {0, 255}
        assert tifffile.imread(s.image_path).dtype == np.uint8
        image, mask = load_sample(s)
        assert image.shape == SMALL and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.2
        assert mask.shape == SMALL and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask, raw_mask // 255)
        nonempty += bool(mask.any())
    assert 0 < nonempty < len(data)  # some frames have a nerve, some do not
    image, mask = data.load(data.test_samples[0])
    assert mask is None and image.shape == SMALL


def test_split_by_subject(synth_root):
    samples = find_kaggle_samples(synth_root)
    train, val = split_by_subject(samples, val_fraction=0.5, seed=3)
    train_subjects, val_subjects = {s.subject for s in train}, {s.subject for s in val}
    assert not train_subjects & val_subjects
    assert len(val_subjects) == 2 and len(train_subjects) == 2
    assert sorted(train + val) == sorted(samples)
    # deterministic, independent of the input order
    assert split_by_subject(samples[::-1], 0.5, seed=3)[1] == val[::-1]
    assert split_by_subject(samples, 0.5, seed=3) == (train, val)
    # different seeds pick different subjects (at least for some seed)
    picks = {frozenset(s.subject for s in split_by_subject(samples, 0.5, seed=k)[1]) for k in range(10)}
    assert len(picks) > 1
    # small fractions still give one validation subject; zero gives none
    assert len({s.subject for s in split_by_subject(samples, 0.01)[1]}) == 1
    assert split_by_subject(samples, 0.0)[1] == []
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        split_by_subject(samples, 1.0)


def make_kaggle(tmp_path, names, shape=(8, 10)):
    """Hand-made train/ folder: image files hold a ramp, masks a 0/255 square."""
    train = tmp_path / "train"
    train.mkdir()
    for name in names:
        if name.endswith("_mask.tif"):
            m = np.zeros(shape, np.uint8)
            m[2:5, 2:5] = 255
            write_tif(train / name, m)
        else:
            write_tif(train / name, np.arange(np.prod(shape), dtype=np.uint8).reshape(shape))
    return train


def test_hand_made_kaggle_folder(tmp_path):
    train = make_kaggle(tmp_path, ["2_10.tif", "2_10_mask.tif", "2_9.tif", "2_9_mask.tif",
                                   "10_1.tif", "10_1_mask.tif"])
    (train / "train_masks.csv").write_text("not an image\n")  # ignored
    samples = find_kaggle_samples(tmp_path)
    assert [(s.subject, s.n) for s in samples] == [(2, 9), (2, 10), (10, 1)]  # numeric order
    image, mask = load_sample(samples[0])
    assert image[0, 1] == pytest.approx(1 / 255)
    assert mask.sum() == 9


def test_mask_without_image(tmp_path):
    train = make_kaggle(tmp_path, ["1_1.tif", "1_1_mask.tif", "1_2_mask.tif"])
    with pytest.raises(ValueError, match=esc(train / "1_2_mask.tif") + " has no image"):
        find_kaggle_samples(tmp_path)


def test_image_without_mask(tmp_path):
    train = make_kaggle(tmp_path, ["1_1.tif", "1_1_mask.tif", "3_7.tif"])
    with pytest.raises(ValueError, match=esc(train / "3_7.tif") + " has no mask"):
        find_kaggle_samples(tmp_path)


def test_size_mismatch(tmp_path):
    train = make_kaggle(tmp_path, ["1_1.tif"])
    write_tif(train / "1_1_mask.tif", np.zeros((8, 9), np.uint8))
    samples = find_kaggle_samples(tmp_path)  # headers not checked by default
    with pytest.raises(ValueError, match=esc(train / "1_1.tif") + ".*" + esc(train / "1_1_mask.tif")):
        load_sample(samples[0])
    with pytest.raises(ValueError, match="must have the same size"):
        find_kaggle_samples(tmp_path, verify=True)


def test_unreadable_tiff(tmp_path):
    train = make_kaggle(tmp_path, ["1_1_mask.tif"])
    (train / "1_1.tif").write_bytes(b"this is not a TIFF file at all")
    samples = find_kaggle_samples(tmp_path)
    with pytest.raises(ValueError, match="Could not read TIFF file " + esc(train / "1_1.tif")):
        load_sample(samples[0])
    with pytest.raises(ValueError, match="Could not read TIFF file " + esc(train / "1_1.tif")):
        find_kaggle_samples(tmp_path, verify=True)


def test_mask_with_other_values(tmp_path):
    train = make_kaggle(tmp_path, ["1_1.tif"])
    write_tif(train / "1_1_mask.tif", np.array([[0, 128], [255, 0]] * 4, np.uint8).repeat(5, axis=1))
    with pytest.raises(ValueError, match=esc(train / "1_1_mask.tif") + r" holds values \{0, 128, 255\}"):
        load_sample(find_kaggle_samples(tmp_path)[0])


def test_zero_one_masks_accepted(tmp_path):
    train = make_kaggle(tmp_path, ["1_1.tif"])
    write_tif(train / "1_1_mask.tif", np.eye(8, 10, dtype=np.uint8))
    _, mask = load_sample(find_kaggle_samples(tmp_path)[0])
    np.testing.assert_array_equal(mask, np.eye(8, 10))


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=esc(tmp_path / "nope") + " does not exist"):
        find_kaggle_samples(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=esc(tmp_path / "empty") + " has no train/ folder"):
        find_kaggle_samples(tmp_path / "empty")
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=esc(tmp_path / "data" / "train") + " holds no .tif images"):
        KaggleUltrasound(tmp_path / "data")


def test_badly_named_file(tmp_path):
    train = make_kaggle(tmp_path, ["1_1.tif", "1_1_mask.tif", "scan.tif"])
    with pytest.raises(ValueError, match=esc(train / "scan.tif") + " does not follow the Kaggle naming"):
        find_kaggle_samples(tmp_path)


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_idempotent(synth_root, tmp_path):
    again = write_synthetic_dataset(tmp_path / "again", **SYNTH)
    for sub in ("train", "test"):
        names = sorted(os.listdir(synth_root / sub))
        assert names == sorted(os.listdir(again / sub))
        match, mismatch, errors = filecmp.cmpfiles(synth_root / sub, again / sub, names, shallow=False)
        assert mismatch == [] and errors == [] and len(match) == len(names)
    # a second call with the same arguments leaves every file alone
    before = {p: p.stat().st_mtime_ns for p in (again / "train").iterdir()}
    write_synthetic_dataset(again, **SYNTH)
    assert {p: p.stat().st_mtime_ns for p in (again / "train").iterdir()} == before
    # an interrupted run is completed: delete a file and call again
    os.remove(again / "train" / "2_2.tif")
    write_synthetic_dataset(again, **SYNTH)
    assert filecmp.cmp(again / "train" / "2_2.tif", synth_root / "train" / "2_2.tif", shallow=False)
    # a set drawn by an older generator version is redrawn in full
    marker = again / "synthetic.json"
    marker.write_text(marker.read_text().replace('"version": 1', '"version": 0'))
    write_tif(again / "train" / "1_1.tif", np.zeros(SMALL, np.uint8))  # stands for an old drawing
    write_synthetic_dataset(again, **SYNTH)
    assert filecmp.cmp(again / "train" / "1_1.tif", synth_root / "train" / "1_1.tif", shallow=False)
    # other arguments on the same folder are refused rather than mixed in
    with pytest.raises(ValueError, match="other arguments"):
        write_synthetic_dataset(again, **{**SYNTH, "seed": 1})
    # another seed gives other pixels
    a, _ = synthetic_image(seed=0, subject=1, n=1, size=SMALL)
    b, _ = synthetic_image(seed=1, subject=1, n=1, size=SMALL)
    assert not np.array_equal(a, b)


def test_synthetic_refuses_folder_with_other_data(tmp_path):
    make_kaggle(tmp_path, ["99_1.tif", "99_1_mask.tif"])
    with pytest.raises(ValueError, match="already holds other files"):
        write_synthetic_dataset(tmp_path, **SYNTH)


def test_synthetic_full_size_frame():
    frames = [synthetic_image(seed=0, subject=1, n=n) for n in range(1, 5)]
    image, mask = frames[0]
    assert image.shape == mask.shape == (420, 580)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert image.std() > 10  # speckle and layers, not a flat image


def test_synthetic_nerve_presence():
    masks = [synthetic_image(seed=0, subject=s, n=n, size=SMALL)[1] for s in range(1, 9) for n in range(1, 6)]
    present = np.mean([m.any() for m in masks])
    assert 0.3 < present < 0.7  # "about half", as in the Kaggle data
    assert synthetic_image(seed=0, subject=1, n=1, size=SMALL, nerve=True)[1].any()
    assert not synthetic_image(seed=0, subject=1, n=1, size=SMALL, nerve=False)[1].any()


def test_synthetic_nerve_is_not_a_threshold():
    """The nerve should be visible (rim and texture) but no brightness threshold should find it."""
    size = (105, 145)
    pairs = [synthetic_image(seed=0, subject=s, n=1, size=size, nerve=True) for s in range(1, 9)]
    images = np.stack([p[0] for p in pairs]).astype(np.float32) / 255
    masks = np.stack([p[1] > 0 for p in pairs])
    smooth = np.stack([ndimage.gaussian_filter(im, 1.5) for im in images])
    best = max(dice_score((smooth > t).astype(np.uint8), masks.astype(np.uint8)).mean()
               for t in np.linspace(0.05, 0.95, 37))
    assert best < 0.5
    # ... yet the nerve's rim makes its border stand out: brighter than the ring just outside.
    for im, m in zip(smooth, masks):
        ring_in = m & ~ndimage.binary_erosion(m, iterations=2)
        ring_out = ndimage.binary_dilation(m, iterations=4) & ~ndimage.binary_dilation(m, iterations=2)
        assert im[ring_in].mean() > im[ring_out].mean()


# ----------------------------------------------------------------------------- folder reader


def test_folder_reader_png_and_tiff(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    ids = np.zeros((6, 7), np.uint8)
    ids[1:3, 2:6] = 2
    ids[4:, :2] = 1
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> gray 0.299
    Image.fromarray(rgb).save(tmp_path / "images" / "a.png")
    Image.fromarray(ids).save(tmp_path / "masks" / "a.png")
    write_tif(tmp_path / "images" / "b.tif", np.full((6, 7), 51, np.uint8))
    write_tif(tmp_path / "masks" / "b.tif", ids)
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    data = ImageMaskFolder(tmp_path, num_classes=3)
    assert [s.subject for s in data.samples] == ["a", "b"]
    image, mask = data.load(data.samples[0])
    assert image.dtype == np.float32 and image.shape == (6, 7)
    np.testing.assert_allclose(image, 0.299, atol=1e-6)
    np.testing.assert_array_equal(mask, ids)
    image, mask = data.load(data.samples[1])
    np.testing.assert_allclose(image, 0.2, atol=1e-6)
    np.testing.assert_array_equal(mask, ids)
    train, val = data.split(0.5, seed=0)
    assert len(train) == len(val) == 1
    # binary 0/255 masks
    write_tif(tmp_path / "masks" / "b.tif", (ids > 0).astype(np.uint8) * 255)
    binary = ImageMaskFolder(tmp_path, binary=True)
    np.testing.assert_array_equal(binary.load(binary.samples[1])[1], ids > 0)


def test_folder_reader_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    ids = np.array([[0, 1], [2, 3]], np.uint8)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(ids).save(tmp_path / "masks" / "a.png")
    data = ImageMaskFolder(tmp_path, num_classes=3)
    with pytest.raises(ValueError, match=esc(tmp_path / "masks" / "a.png") + " holds class id 3"):
        data.load(data.samples[0])
    Image.fromarray(np.zeros((2, 3), np.uint8)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match=esc(tmp_path / "images" / "a.png") + ".*same size"):
        data.load(data.samples[0])
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "images" / "b.png")
    with pytest.raises(ValueError, match=esc(tmp_path / "images" / "b.png") + " has no mask"):
        ImageMaskFolder(tmp_path)
    os.remove(tmp_path / "images" / "b.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "masks" / "c.png")
    with pytest.raises(ValueError, match=esc(tmp_path / "masks" / "c.png") + " has no image"):
        ImageMaskFolder(tmp_path)
    os.remove(tmp_path / "masks" / "c.png")
    (tmp_path / "images" / "a.tif").write_bytes(b"broken")
    with pytest.raises(ValueError, match="share the stem 'a'"):
        ImageMaskFolder(tmp_path)
    os.remove(tmp_path / "images" / "a.png")
    with pytest.raises(ValueError, match="Could not read TIFF file " + esc(tmp_path / "images" / "a.tif")):
        ImageMaskFolder(tmp_path).load(ImageMaskFolder(tmp_path).samples[0])
    (tmp_path / "images" / "a.tif").write_bytes(b"")
    (tmp_path / "images" / "z.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "masks" / "z.png")
    data = ImageMaskFolder(tmp_path)
    with pytest.raises(ValueError, match="Could not read PNG file " + esc(tmp_path / "images" / "z.png")):
        data.load(data.samples[-1])
    with pytest.raises(FileNotFoundError, match="has no 'images' folder"):
        ImageMaskFolder(tmp_path / "masks")


# ----------------------------------------------------------------------------- augmentation


def aligned_fraction(image, mask):
    """Share of pixels where the mask still equals the image thresholded at 0.5."""
    return np.mean((image > 0.5) == (mask == 1))


def test_flips_are_exact():
    image = blobs((20, 30))
    mask = (image > 0.5).astype(np.uint8)
    for flip in (hflip, vflip):
        im2, m2 = flip(image, mask)
        np.testing.assert_array_equal(m2, (im2 > 0.5).astype(np.uint8))
        np.testing.assert_array_equal(flip(*flip(image, mask))[0], image)
    np.testing.assert_array_equal(hflip(image, mask)[0], image[:, ::-1])


def test_affine_rotation_direction():
    a = np.arange(49, dtype=np.float32).reshape(7, 7)
    m = (np.arange(49) % 3).reshape(7, 7).astype(np.uint8)
    im, mm = affine(a, m, angle=90)
    np.testing.assert_allclose(im, np.rot90(a), atol=1e-4)
    np.testing.assert_array_equal(mm, np.rot90(m))
    im, mm = affine(a, m, shift=(2, 0))  # whole-pixel shift: exact
    np.testing.assert_allclose(im[2:], a[:-2], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geometric_augmentation_keeps_alignment(seed):
    image = blobs((64, 80), seed)
    mask = (image > 0.5).astype(np.uint8)
    rng = np.random.default_rng(seed)
    for name, fn in [
        ("affine", lambda i, m: random_affine(i, m, rng, max_angle=20, max_shift=0.1, max_scale=0.1)),
        ("elastic", lambda i, m: elastic_deform(i, m, rng, sigma=5.0)),
        ("augment", lambda i, m: Augment(hflip=0.5, vflip=0.5, p_affine=1, p_elastic=1,
                                         elastic_sigma=5, p_intensity=0)(i, m, rng)),
    ]:
        im2, m2 = fn(image, mask)
        assert im2.shape == image.shape and im2.dtype == np.float32
        assert m2.dtype == mask.dtype and set(np.unique(m2)) <= {0, 1}
        assert not np.array_equal(m2, mask), name  # something moved
        assert aligned_fraction(im2, m2) > 0.97, name  # only border pixels may disagree


def test_multiclass_mask_values_stay_in_class_set():
    rng = np.random.default_rng(0)
    image = blobs((40, 50))
    mask = np.digitize(image, [0.3, 0.6]).astype(np.uint8) * 2  # classes {0, 2, 4}: no averaging allowed
    im2, m2 = Augment(size=(30, 37), p_affine=1, p_elastic=1, elastic_sigma=4)(image, mask, rng)
    assert im2.shape == m2.shape == (30, 37)
    assert set(np.unique(m2)) <= {0, 2, 4}


def test_elastic_displacement_follows_the_grid():
    dy, dx = elastic_displacement((50, 70), np.random.default_rng(5), grid=3, sigma=10.0)
    coarse = np.random.default_rng(5).normal(0.0, 10.0, size=(2, 3, 3))
    # the cubic-spline upsampling passes through the lattice values (corners, edge midpoints, centre)
    for gy, y in zip(range(3), (0, 24.5, 49)):
        for gx, x in zip(range(3), (0, 34.5, 69)):
            if float(y).is_integer() and float(x).is_integer():
                assert dy[int(y), int(x)] == pytest.approx(coarse[0, gy, gx], abs=1e-3)
                assert dx[int(y), int(x)] == pytest.approx(coarse[1, gy, gx], abs=1e-3)
    assert np.abs(np.diff(dy, axis=0)).max() < 2.0  # smooth: no tearing between neighbours
    im, m = elastic_deform(blobs((20, 20)), np.ones((20, 20), np.uint8), np.random.default_rng(0), sigma=0.0)
    np.testing.assert_allclose(im, blobs((20, 20)), atol=1e-5)


def test_intensity_jitter_only_touches_the_image():
    image = blobs((20, 30))
    out = intensity_jitter(image, np.random.default_rng(0), 0.3, 0.3, 0.3)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, image)
    mask = (image > 0.5).astype(np.uint8)
    _, m2 = Augment(hflip=0, p_affine=0, p_elastic=0, p_intensity=1)(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(m2, mask)


def test_augment_is_deterministic_given_rng():
    image = blobs((32, 40))
    mask = (image > 0.5).astype(np.uint8)
    aug = Augment(p_affine=1, p_elastic=1, elastic_sigma=3)
    a = aug(image, mask, np.random.default_rng(7))
    b = aug(image, mask, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_resize():
    image = blobs((84, 116))
    mask = (image > 0.5).astype(np.uint8)
    im2, m2 = resize(image, mask, (42, 58))
    assert im2.shape == m2.shape == (42, 58) and im2.dtype == np.float32 and m2.dtype == np.uint8
    assert aligned_fraction(im2, m2) > 0.95
    const, _ = resize(np.full((30, 40), 0.25, np.float32), None, (7, 9))
    np.testing.assert_allclose(const, 0.25, atol=1e-6)  # interpolation must not shift levels
    same = resize(image, mask, image.shape)
    assert same[0] is image and same[1] is mask
    big, bigm = Resize((168, 232))(image, mask)
    np.testing.assert_array_equal(bigm[::2, ::2], mask)  # nearest x2 repeats every pixel
    with pytest.raises(ValueError, match="does not match image size"):
        resize(image, mask[:-1], (10, 10))


# ----------------------------------------------------------------------------- Dataset / DataLoader


def make_loader_dataset(root, **kw):
    samples = find_kaggle_samples(root)
    return Dataset(samples, load_sample, preprocess=Resize((24, 32)), **kw)


def test_loader_shapes_and_lengths(synth_root):
    ds = make_loader_dataset(synth_root)
    loader = DataLoader(ds, batch_size=5, shuffle=True, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert [b[0].shape[0] for b in batches] == [5, 5, 2]
    images, masks = batches[0]
    assert images.shape == (5, 1, 24, 32) and images.dtype == np.float32
    assert masks.shape == (5, 24, 32) and masks.dtype == np.int64
    assert set(np.unique(masks)) <= {0, 1}
    assert len(DataLoader(ds, batch_size=5, drop_last=True)) == 2
    assert [b[0].shape[0] for b in DataLoader(ds, batch_size=5, drop_last=True)] == [5, 5]
    # without shuffling the batches follow the sample order
    first = next(iter(DataLoader(ds, batch_size=3)))
    np.testing.assert_array_equal(first[0][1, 0], ds.get(1)[0])


def test_loader_deterministic_and_prefetch_independent(synth_root):
    ds = make_loader_dataset(synth_root, transform=Augment(p_affine=1, p_elastic=1, elastic_sigma=2),
                             cache=True)
    runs = []
    for prefetch in (True, False):
        loader = DataLoader(ds, batch_size=4, shuffle=True, seed=11, prefetch=prefetch)
        runs.append([list(loader), list(loader)])  # epochs 0 and 1 by iteration count
    for (a_im, a_m), (b_im, b_m) in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        np.testing.assert_array_equal(a_im, b_im)
        np.testing.assert_array_equal(a_m, b_m)
    # epochs differ from each other ...
    assert not np.array_equal(runs[0][0][0][0], runs[0][1][0][0])
    # ... and set_epoch replays one
    loader = DataLoader(ds, batch_size=4, shuffle=True, seed=11)
    loader.set_epoch(1)
    np.testing.assert_array_equal(next(iter(loader))[0], runs[0][1][0][0])
    # every sample appears exactly once per epoch
    order = np.concatenate(loader.batch_indices(3))
    np.testing.assert_array_equal(np.sort(order), np.arange(len(ds)))


def test_loader_cache_loads_each_sample_once(synth_root):
    calls = []

    def counting_load(sample):
        calls.append(sample)
        return load_sample(sample)

    ds = Dataset(find_kaggle_samples(synth_root), counting_load, preprocess=Resize((24, 32)), cache=True)
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    list(loader)
    list(loader)
    assert len(calls) == len(ds)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "seg-data-prefetch" and t.is_alive()]


def test_loader_thread_stops_on_early_exit(synth_root):
    ds = make_loader_dataset(synth_root)
    loader = DataLoader(ds, batch_size=1, prefetch=True, prefetch_batches=1)
    it = iter(loader)
    next(it)
    time.sleep(0.05)  # let the worker fill the queue and block on put
    assert prefetch_threads()
    it.close()  # what a `break` out of a for-loop does when the iterator is dropped
    deadline = time.time() + 5
    while prefetch_threads() and time.time() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()
    for _ in DataLoader(ds, batch_size=2):
        break
    time.sleep(0.3)
    assert not prefetch_threads()


def test_loader_propagates_errors(synth_root):
    samples = find_kaggle_samples(synth_root)

    def failing_load(sample):
        if sample.n == 2:
            raise ValueError(f"cannot load {sample.image_path}")
        return load_sample(sample)

    loader = DataLoader(Dataset(samples, failing_load), batch_size=2)
    # The loader wraps the error in one SampleLoadError naming the sample.
    with pytest.raises(SampleLoadError, match="cannot load .*_2.tif"):
        list(loader)
    assert not prefetch_threads()


def test_collate_errors_and_test_batches():
    with pytest.raises(ValueError, match="different sizes"):
        collate([(np.zeros((4, 5)), np.zeros((4, 5))), (np.zeros((4, 6)), np.zeros((4, 6)))])
    with pytest.raises(ValueError, match="mixes samples with and without masks"):
        collate([(np.zeros((4, 5)), np.zeros((4, 5))), (np.zeros((4, 5)), None)])
    images, masks = collate([(np.zeros((4, 5, 3)), None)] * 2)
    assert images.shape == (2, 3, 4, 5) and masks is None

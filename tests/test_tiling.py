"""Overlap-tile prediction equals one pass over the whole mirror-padded image."""
import numpy as np
import pytest

import minidl
from seg.models.unet import UNet
from seg.tiling import forward_full, input_geometry, mirror_pad, predict_tiled, tile_plan


def _model(**options):
    minidl.manual_seed(0)
    model = UNet(3, 1, **options)
    model.eval()
    return model


def _direct(model, image, pad):
    """Logits (K, H', W') of one pass over the image mirror-padded by pad=(t, b, l, r)."""
    x = mirror_pad(image[None, None], pad)
    with minidl.no_grad():
        return model(minidl.tensor(x)).numpy()[0]


@pytest.mark.parametrize("depth, tile, size", [
    (3, 60, (40, 44)),     # output tiles of 20 (a multiple of 4): tiles abut exactly
    (3, 52, (37, 45)),     # sizes that are not multiples of the tile
    (4, 100, (30, 26)),    # output 12 is not a multiple of 8: step 8, tiles overlap by 4
])
def test_overlap_tile_equals_whole_image_valid_unet(depth, tile, size):
    model = _model(depth=depth, features_root=2, padding="valid", batch_norm=True)
    image = np.random.default_rng(1).uniform(size=size).astype(np.float32)
    m = (tile - model.output_size(tile, tile)[0]) // 2          # context per side
    H, W = size
    # The whole image + mirrored context, enlarged at the bottom/right to a valid size.
    full = model.valid_input_size(H + 2 * m, W + 2 * m)
    direct = _direct(model, image, (m, full[0] - H - m, m, full[1] - W - m))[:, :H, :W]
    tiled = predict_tiled(model, image, tile_size=tile, output="logits", batch_size=3)
    assert tiled.shape == (3, H, W)
    np.testing.assert_allclose(tiled, direct, rtol=1e-4, atol=1e-5)
    probs = predict_tiled(model, image[None], tile_size=tile)
    np.testing.assert_allclose(probs.sum(axis=0), 1, rtol=1e-5)
    np.testing.assert_allclose(np.log(probs[1] / probs[0]), direct[1] - direct[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("padding, depth, tile, context, size", [
    ("valid", 4, 100, None, (30, 26)),   # output 12, step 8: tiles overlap by 4
    ("valid", 3, None, None, (37, 45)),  # default tile: the whole image in one tile
    ("same", 2, 32, 12, (30, 36)),       # step 32 - 2 * 12 = 8
    ("same", 3, None, None, (21, 17)),   # default context max(8, 2 * 4)
])
def test_tile_plan_covers_the_image_once(padding, depth, tile, context, size):
    # The plan alone, without running the model: cut the mirror-padded image into the planned
    # tiles, "predict" each by keeping the pixels under its output (an identity network), keep
    # the planned window and paste it back; the image itself must come out.
    model = _model(depth=depth, features_root=2, padding=padding)
    H, W = size
    image = np.arange(H * W, dtype=np.float32).reshape(H, W)
    plan = tile_plan(model, H, W, tile_size=tile, context=context)
    padded = mirror_pad(image, plan.pad)
    assert padded.shape == tuple((n - 1) * s + t for n, s, t in zip(plan.counts, plan.step, plan.tile))
    assert len(plan.origins) == plan.counts[0] * plan.counts[1]
    for n, s, length in zip(plan.counts, plan.step, size):
        assert (n - 1) * s < length <= n * s              # enough tiles, none wasted
        assert n == 1 or s % model.total_stride == 0     # pooling grids stay aligned
    margin = [(t - o) // 2 for t, o in zip(plan.tile, plan.out_tile)]
    out = np.full((plan.counts[0] * plan.step[0], plan.counts[1] * plan.step[1]), np.nan, np.float32)
    for y, x in plan.origins:
        window = padded[y:y + plan.tile[0], x:x + plan.tile[1]]
        output = window[margin[0]:margin[0] + plan.out_tile[0], margin[1]:margin[1] + plan.out_tile[1]]
        c = plan.context
        assert np.isnan(out[y:y + plan.step[0], x:x + plan.step[1]]).all()   # no pixel twice
        out[y:y + plan.step[0], x:x + plan.step[1]] = output[c[0]:c[0] + plan.step[0], c[1]:c[1] + plan.step[1]]
    np.testing.assert_array_equal(out[:H, :W], image)


def test_tile_plan_rejects_context_that_leaves_nothing():
    model = _model(depth=2, features_root=2, padding="same")
    with pytest.raises(ValueError, match="leaves nothing to keep with context"):
        tile_plan(model, 20, 20, tile_size=16, context=8)


def test_same_padding_tiles_with_context_match_whole_image():
    model = _model(depth=2, features_root=3, padding="same")
    image = np.random.default_rng(2).uniform(size=(30, 36)).astype(np.float32)
    # Context 12 exceeds the receptive-field radius (~10 px), so kept pixels never see a
    # tile's zero padding; steps of 32 - 24 = 8 keep the pooling grid aligned.
    tiled = predict_tiled(model, image, tile_size=32, context=12, output="logits")
    direct = _direct(model, image, (12, 12, 12, 12))[:, 12:42, 12:48]
    np.testing.assert_allclose(tiled, direct, rtol=1e-4, atol=1e-5)


def test_forward_full_gives_output_of_input_size():
    model = _model(depth=3, features_root=2, padding="valid")
    x = np.random.default_rng(3).uniform(size=(2, 1, 23, 30)).astype(np.float32)
    (H, W), pad = input_geometry(model, 23, 30)
    assert model.is_valid_input_size(H, W) and H >= 23 + 40 and W >= 30 + 40
    with minidl.no_grad():
        out = forward_full(model, minidl.tensor(x)).numpy()
    assert out.shape == (2, 3, 23, 30)
    np.testing.assert_allclose(out[1], predict_tiled(model, x[1], tile_size=(60, 64), output="logits"),
                               rtol=1e-4, atol=1e-5)
    same = _model(depth=3, features_root=2, padding="same")
    with minidl.no_grad():
        assert forward_full(same, minidl.tensor(x)).shape == (2, 3, 23, 30)


def test_bad_inputs():
    model = _model(depth=3, features_root=2, padding="valid")
    with pytest.raises(ValueError, match="image has 2 channel"):
        predict_tiled(model, np.zeros((2, 20, 20), np.float32))
    with pytest.raises(ValueError, match="nearest valid: 44 or 48"):
        predict_tiled(model, np.zeros((20, 20), np.float32), tile_size=46)

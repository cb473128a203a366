"""U-Net: parameter counts, size arithmetic, the invalid-size error, forward and backward."""
import numpy as np
import pytest

import minidl
from minidl import nn
import seg.models
from seg.models.unet import UNet


def paper_valid(s, depth):
    """Valid input sizes derived by hand: s = 2**(d-1) * b + 2**(d+2) - 4, b = bottom map size
    after its two convs; the expanding path needs b >= 4 (b >= 3 for depth 2)."""
    if depth == 1:
        return s >= 5
    k = 2 ** (depth - 1)
    b, r = divmod(s - (2 ** (depth + 2) - 4), k)
    return r == 0 and b >= (3 if depth == 2 else 4)


# ----------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("in_channels, options, expected", [
    (1, dict(depth=5, features_root=64, padding="valid"), 31_030_658),
    (3, dict(depth=5, features_root=64, padding="same", batch_norm=True), 31_043_586),
    (1, dict(depth=3, features_root=16), 116_770),
    (1, dict(depth=3, features_root=16, padding="same"), 116_770),      # padding: same count
])
def test_parameter_counts_match_reference(in_channels, options, expected):
    model = seg.models.build("unet", num_classes=2, in_channels=in_channels, **options)
    assert model.num_parameters() == expected
    # 23 conv layers in the paper's net: 18 3x3, 4 up-convs, one 1x1.
    if options["depth"] == 5:
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        assert len(convs) == 23


def test_registered_and_paper_init_scale():
    assert "unet" in seg.models.available()
    minidl.manual_seed(0)
    model = seg.models.build("unet", num_classes=2, in_channels=1, depth=4, features_root=32)
    conv = model.down[3].conv1                       # 3x3, 128 -> 256 channels
    n = 3 * 3 * conv.weight.shape[1]
    assert abs(conv.weight.numpy().std() / np.sqrt(2.0 / n) - 1) < 0.03
    up = model.upconvs[0]                           # 2x2 stride 2: N = C_in inputs per output
    assert abs(up.weight.numpy().std() / np.sqrt(2.0 / up.weight.shape[0]) - 1) < 0.03
    assert np.all(conv.bias.numpy() == 0)


# ----------------------------------------------------------------------------- sizes

def test_paper_sizes():
    model = UNet(2, 1, depth=5, features_root=1)
    assert model.output_size(572, 572) == (388, 388)
    assert model.valid_input_size(570, 571) == (572, 572)
    assert model.valid_input_size(572, 188) == (572, 188)
    assert model.is_valid_input_size(572, 188) and not model.is_valid_input_size(572, 172)
    for s in range(100, 700):
        # architectures.md: s = 12 (mod 16), s >= 188, output = input - 184.
        ok = s % 16 == 12 and s >= 188
        assert model.is_valid_input_size(s, s) == ok, s
        if ok:
            assert model.output_size(s, s) == (s - 184, s - 184)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_valid_sizes_follow_derived_rule(depth):
    model = UNet(2, 1, depth=depth, features_root=1)
    margin = 2 ** (depth + 2) + 2 ** (depth + 1) - 8 if depth > 1 else 4
    for s in range(1, 200):
        assert model.is_valid_input_size(s, 64 if depth < 4 else 92) == paper_valid(s, depth), (depth, s)
        if paper_valid(s, depth):
            assert model.output_size(s, s)[0] == s - margin


def test_same_padding_sizes():
    model = UNet(2, 1, depth=4, features_root=1, padding="same")
    assert model.output_size(96, 128) == (96, 128)
    assert model.valid_input_size(97, 121) == (104, 128)
    with pytest.raises(ValueError, match=r"height 100 \(nearest valid: 96 or 104\)"):
        model.output_size(100, 128)


def test_invalid_size_error_names_nearest_valid_sizes():
    model = UNet(2, 1, depth=5, features_root=1)
    with pytest.raises(ValueError, match=r"height 570 \(nearest valid: 556 or 572\).*width 100 "
                                         r"\(nearest valid: 188\)"):
        model.output_size(570, 100)
    x = minidl.zeros(1, 1, 570, 572)
    with pytest.raises(ValueError, match="nearest valid: 556 or 572"):
        model(x)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="padding must be 'valid' or 'same'"):
        UNet(2, 1, padding="full")
    with pytest.raises(ValueError, match="dropout is a drop probability"):
        UNet(2, 1, dropout=1.5)
    with pytest.raises(ValueError, match="expects input of shape"):
        UNet(2, 3, depth=2, features_root=2, padding="same")(minidl.zeros(1, 1, 8, 8))


# ----------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("options, size, out", [
    (dict(padding="valid"), 20, 4),
    (dict(padding="same", batch_norm=True), 12, 12),
    (dict(padding="valid", dropout=0.3, dropout_mode="every_conv", batch_norm=True), 22, 6),
])
def test_forward_backward_tiny(options, size, out):
    minidl.manual_seed(1)
    model = UNet(3, 2, depth=2, features_root=4, **options)
    x = minidl.tensor(np.random.default_rng(0).normal(size=(2, 2, size, size)).astype(np.float32))
    y = model(x)
    assert y.shape == (2, 3, out, out) and y.dtype == np.float32
    assert model.output_size(size, size) == (out, out)
    (y * y).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert np.all(np.isfinite(p.grad)), name
    # The classifier's gradient is non-zero: the whole path is connected.
    assert np.abs(model.classifier.weight.grad).sum() > 0


def test_eval_mode_is_deterministic_with_dropout():
    minidl.manual_seed(2)
    model = UNet(2, 1, depth=2, features_root=2, padding="same", dropout=0.5)
    x = minidl.tensor(np.random.default_rng(1).normal(size=(1, 1, 8, 8)).astype(np.float32))
    model.eval()
    with minidl.no_grad():
        a, b = model(x).numpy(), model(x).numpy()
    np.testing.assert_array_equal(a, b)

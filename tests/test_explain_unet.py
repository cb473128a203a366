"""`python -m seg models --explain unet` (issue 20, item 8): the pooling rows are listed, so
the receptive field is the true one, measured from gradients by minidl.receptive_field."""
import warnings

import pytest

import minidl
from seg import cli, models
from seg.models import summary


def _fields(depth, padding, size):
    model = models.build("unet", 2, in_channels=1, depth=depth, features_root=2, padding=padding)
    if padding == "valid":
        size = model.valid_input_size(size, size)
    else:
        size = (size, size)
    events, _ = summary.trace(model, size, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # the probe must contain the whole field
        measured = minidl.receptive_field(model, 1, size=size, trials=1)
    return events, measured


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_unet_receptive_field_matches_the_measured_one(padding):
    events, measured = _fields(3, padding, 96)
    assert sum(e["kind"] == "maxpool" for e in events) == 2
    assert events[-1]["rf"] == measured[0] == measured[1]


def test_deeper_unet_field_within_the_deepest_jump():
    # Past two pools the centre pixel's own alignment in the pooling grid moves its field by
    # up to the bottleneck's jump (8 px at depth 4); the listed value is the typical field.
    events, measured = _fields(4, "same", 160)
    assert abs(events[-1]["rf"] - measured[0]) <= 8


def test_explain_takes_depth_and_features_without_warnings(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["models", "--explain", "unet", "--depth", "3", "--features-root", "16",
                         "--input-size", "92"]) == 0
    out = capsys.readouterr().out
    assert "max_pool2d 2x2 s2" in out and "= 116,770" in out
    assert cli.main(["models", "--explain", "segnet", "--depth", "3"]) == 2
    assert "describe the U-Net only" in capsys.readouterr().err

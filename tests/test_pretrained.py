"""Pretrained weights from .safetensors / .npz files laid out as torchvision, timm and Caffe
write them (issue #19): the mappings, the layout inferred from the names, either hyphen order.

The files are built from random arrays with the key names and shapes of those libraries'
state dicts, for networks at 1/16 width (the shapes' formulas are checked at full width
against the libraries' published parameter counts, without allocating anything).
"""
import numpy as np
import pytest
from safetensors.numpy import save_file

import minidl
from seg import models
from seg.models.backbones import VGG_STAGES, scaled
from seg.models.pretrained import (MAPPINGS, infer_mapping, load_pretrained, resolve_mapping,
                                   vgg_mapping)

TINY = 1 / 16


# ----------------------------------------------------------------------------- the layouts
def _bn(prefix, c):
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def torchvision_vgg(depth, batch_norm=False, width=1.0, style="torchvision"):
    """[(key, shape)] of torchvision's vgg{depth}[_bn]().state_dict(), or timm's vgg."""
    keys, index, cin = [], 0, 3
    for stage, n in enumerate(VGG_STAGES[depth]):
        cout = scaled(64 * 2 ** min(stage, 3), width)
        for _ in range(n):
            keys += [(f"features.{index}.weight", (cout, cin, 3, 3)), (f"features.{index}.bias", (cout,))]
            index += 1
            if batch_norm:
                keys += _bn(f"features.{index}", cout)
                index += 1
            index += 1                                    # ReLU
            cin = cout
        index += 1                                        # MaxPool
    fc = scaled(4096, width)
    if style == "torchvision":   # Linear layers; the flattened 7x7 pool5 feeds classifier.0
        keys += [("classifier.0.weight", (fc, cin * 49)), ("classifier.0.bias", (fc,)),
                 ("classifier.3.weight", (fc, fc)), ("classifier.3.bias", (fc,)),
                 ("classifier.6.weight", (1000, fc)), ("classifier.6.bias", (1000,))]
    else:                        # timm: ConvMlp pre_logits (fc1 7x7 conv, fc2 1x1) + head.fc
        keys += [("pre_logits.fc1.weight", (fc, cin, 7, 7)), ("pre_logits.fc1.bias", (fc,)),
                 ("pre_logits.fc2.weight", (fc, fc, 1, 1)), ("pre_logits.fc2.bias", (fc,)),
                 ("head.fc.weight", (1000, fc)), ("head.fc.bias", (1000,))]
    return keys


def torchvision_resnet(layers=(3, 4, 23, 3), width=1.0):
    """[(key, shape)] of torchvision's (and timm's) resnet101().state_dict()."""
    stem = scaled(64, width)
    keys = [("conv1.weight", (stem, 3, 7, 7))] + _bn("bn1", stem)
    cin = stem
    for stage, blocks in enumerate(layers, start=1):
        mid = scaled(64 * 2 ** (stage - 1), width)
        out = scaled(256 * 2 ** (stage - 1), width)
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            keys += [(f"{p}.conv1.weight", (mid, cin, 1, 1))] + _bn(f"{p}.bn1", mid)
            keys += [(f"{p}.conv2.weight", (mid, mid, 3, 3))] + _bn(f"{p}.bn2", mid)
            keys += [(f"{p}.conv3.weight", (out, mid, 1, 1))] + _bn(f"{p}.bn3", out)
            if b == 0:
                keys += [(f"{p}.downsample.0.weight", (out, cin, 1, 1))] + _bn(f"{p}.downsample.1", out)
            cin = out
    return keys + [("fc.weight", (1000, cin)), ("fc.bias", (1000,))]


def _count(keys):
    return sum(int(np.prod(s)) for k, s in keys if not k.endswith(("running_mean", "running_var",
                                                                   "num_batches_tracked")))


def test_layouts_have_the_libraries_parameter_counts():
    # torchvision's documented parameter counts (its models table).
    assert _count(torchvision_vgg(16)) == 138_357_544
    assert _count(torchvision_vgg(19)) == 143_667_240
    assert _count(torchvision_vgg(16, batch_norm=True)) == 138_365_992
    assert _count(torchvision_resnet()) == 44_549_160
    # timm's VGG holds the same numbers, fc6 / fc7 stored as convolutions.
    assert _count(torchvision_vgg(16, style="timm")) == 138_357_544
    assert dict(torchvision_vgg(16))["features.28.weight"] == (512, 512, 3, 3)
    assert dict(torchvision_vgg(16, batch_norm=True))["features.41.running_var"] == (512,)


def _write(keys, path, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {k: (np.array(rng.integers(100), np.int64) if k.endswith("num_batches_tracked")
                  else rng.standard_normal(s).astype(np.float32)) for k, s in keys}
    if str(path).endswith(".safetensors"):
        save_file(arrays, str(path))
    else:
        np.savez(path, **arrays)
    return arrays


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("style,suffix", [("torchvision", ".safetensors"), ("timm", ".safetensors"),
                                          ("torchvision", ".npz")])
def test_fcn8s_from_a_vgg16_file(style, suffix, tmp_path, capsys):
    path = tmp_path / ("vgg16" + suffix)
    arrays = _write(torchvision_vgg(16, width=TINY, style=style), path)
    model = models.build("fcn8s", 2, width=TINY)
    report = load_pretrained(model, path)                 # layout inferred from the names
    assert report["mapping"] == f"vgg16-{style}"
    assert f"with mapping 'vgg16-{style}'" in capsys.readouterr().out
    assert report["mismatched"] == [] and len(report["loaded"]) == 30
    assert set(report["skipped"]) == ({"classifier.6.weight", "classifier.6.bias"}
                                      if style == "torchvision" else {"head.fc.weight", "head.fc.bias"})
    fc6 = arrays["classifier.0.weight" if style == "torchvision" else "pre_logits.fc1.weight"]
    np.testing.assert_array_equal(model.fc6.weight.data, fc6.reshape(model.fc6.weight.shape))
    np.testing.assert_array_equal(model.backbone.conv5_3.weight.data, arrays["features.28.weight"])
    assert "score_fr.weight" in report["missing"]


def test_segnet_from_torchvision_vgg16_bn_with_either_hyphen_order(tmp_path):
    path = tmp_path / "vgg16_bn.safetensors"
    arrays = _write(torchvision_vgg(16, batch_norm=True, width=TINY), path)
    for name in ("vgg16_bn-torchvision", "torchvision-vgg16_bn"):
        model = models.build("segnet", 2, width=TINY)
        report = load_pretrained(model, path, mapping=name, verbose=False)
        assert report["mapping"] == "vgg16_bn-torchvision" and report["mismatched"] == []
        assert len(report["loaded"]) == 13 * 2 + 13 * 5        # conv w, b; BN's five entries
        np.testing.assert_array_equal(model.encoder.bn5_3.running_var.data, arrays["features.41.running_var"])
        assert int(model.encoder.bn1_1.num_batches_tracked) == int(arrays["features.1.num_batches_tracked"])
    assert infer_mapping(arrays) == "vgg16_bn-torchvision"


def test_deeplab_resnet101_from_torchvision_and_timm_names(tmp_path):
    path = tmp_path / "resnet101.safetensors"
    arrays = _write(torchvision_resnet(width=TINY), path)
    model = models.build("deeplabv2", 2, width=TINY, backbone="resnet101")
    report = load_pretrained(model, path, mapping="timm-resnet101", verbose=False)
    assert report["mismatched"] == [] and set(report["skipped"]) == {"fc.weight", "fc.bias"}
    assert len(report["loaded"]) == len(arrays) - 2
    np.testing.assert_array_equal(model.state_dict()["backbone.layer3.22.conv3.weight"],
                                  arrays["layer3.22.conv3.weight"])
    assert infer_mapping(arrays) == "resnet101-torchvision"


def test_inferring_the_layout_from_the_names():
    assert infer_mapping(dict(torchvision_vgg(19))) == "vgg19-torchvision"
    assert infer_mapping(dict(torchvision_vgg(19, batch_norm=True, style="timm"))) == "vgg19_bn-timm"
    assert infer_mapping(vgg_mapping(19, "caffe")) == "vgg19-caffe"
    assert infer_mapping({"conv1_1/W": 0, "fc6/b": 0}) == "vgg16-caffe"
    assert infer_mapping({"backbone.conv1_1.weight": 0}) is None
    assert set(MAPPINGS) >= {f"{n}-{s}" for n in ("vgg16", "vgg19", "vgg16_bn", "vgg19_bn")
                             for s in ("torchvision", "timm")} | {"resnet101-timm", "vgg16-caffe"}


def test_mapping_names_and_errors(tmp_path):
    assert resolve_mapping("Torchvision-VGG16") == "vgg16-torchvision"
    assert resolve_mapping("vgg19_bn-timm") == "vgg19_bn-timm"
    with pytest.raises(ValueError, match="unknown mapping 'timm-alexnet'.*either hyphen order"):
        resolve_mapping("timm-alexnet")
    model = models.build("fcn32s", 2, width=TINY)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="damaged or not a .safetensors file"):
        load_pretrained(model, bad)
    with pytest.raises(FileNotFoundError, match=r"\.safetensors or \.npz"):
        load_pretrained(model, tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="mapping must be None, 'auto'"):
        load_pretrained(model, bad, mapping=3)


def test_minidl_checkpoint_round_trips_through_safetensors_into_load_pretrained(tmp_path):
    src = models.build("fcn8s", 2, width=TINY)
    path = tmp_path / "fcn8s.safetensors"
    minidl.save(src.state_dict(), path)
    dst = models.build("fcn8s", 2, width=TINY)
    report = load_pretrained(dst, path, verbose=False)
    assert report["mapping"] is None and report["skipped"] == [] and report["missing"] == []
    for key, value in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[key], value)

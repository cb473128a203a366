"""The architectures of issue #6: parameter counts to the unit, shapes, gradients, inits,
receptive fields, training steps, pretrained loading and the summaries.

Full-size models are built only to count parameters (with summary.fast_init, which skips the
random draws); everything that runs uses width-reduced copies (width=1/16: 64..512 channels
become 4..32) on small inputs, which exercise exactly the same layers and sizes.
"""
import inspect

import numpy as np
import pytest

import minidl
from minidl import functional as F
from minidl import nn, optim
from seg import models
from seg.models import summary
from seg.models.backbones import ResNet, VGG, pool_output_size
from seg.models.deeplab import PooledBatchNorm2d
from seg.models.dilated import ContextModule, identity_init_
from seg.models.fcdensenet import FCDenseNet
from seg.models.pretrained import load_pretrained, vgg_mapping

TINY = 1 / 16

# (name, build options, an odd-sized input) for every architecture of this issue.
CASES = [
    ("fcn32s", {}, (19, 23)),
    ("fcn16s", {}, (19, 23)),
    ("fcn8s", {}, (19, 23)),
    ("fcn8s", {"fusion": "tensorflow"}, (37, 50)),
    ("segnet", {}, (37, 50)),
    ("deconvnet", {"fc_kernel": 1}, (37, 50)),
    ("fcdensenet56", {}, (37, 50)),
    ("fcdensenet67", {}, (33, 35)),
    ("fcdensenet103", {}, (32, 37)),
    ("dilation8", {"context": "basic"}, (37, 50)),
    ("deeplab_largefov", {}, (37, 50)),
    ("deeplabv2", {}, (37, 50)),
    ("deeplabv2", {"backbone": "resnet101"}, (37, 50)),
    ("deeplabv3", {}, (37, 50)),
    ("deeplabv3", {"output_stride": 8}, (33, 35)),
    ("refinenet", {}, (37, 50)),
]
CASE_IDS = [n + "".join(f"-{v}" for v in o.values()) for n, o, _ in CASES]


def _options_of(name):
    """The keyword options the builder of `name` accepts."""
    assert name in models.available()     # (also imports the architecture modules)
    return inspect.signature(models._BUILDERS[name]).parameters


def _input(n, c, size, seed=0):
    return minidl.tensor(np.random.default_rng(seed).random((n, c) + tuple(size), dtype=np.float32))


# ----------------------------------------------------------------------------- parameter counts
# Every row of the reference table; the 250M-parameter DeconvNet is marked slow (not skipped).
REFERENCE_ROWS = [pytest.param(n, o, c, id=f"{n}-{'-'.join(str(v) for v in o.values())}",
                               marks=[pytest.mark.slow] if c > 200_000_000 else [])
                  for n, o, c in summary.REFERENCE if c is not None]


@pytest.mark.parametrize("name,options,count", REFERENCE_ROWS)
def test_reference_parameter_counts(name, options, count):
    assert summary.describe(name, **options)["params"] == count


def test_context_module_counts_and_resnet_trunk():
    assert summary.count_parameters(ContextModule(21, "basic")) == 28_392
    with summary.fast_init():
        assert summary.count_parameters(ContextModule(21, "large")) == 6_803_139
        # torchvision's resnet101 has 44,549,160 parameters, 2,049,000 of them in its fc layer.
        assert summary.count_parameters(ResNet()) == 44_549_160 - 2_049_000


@pytest.mark.slow
def test_fast_init_builds_the_same_model_as_default_init():
    """The counting shortcut must not change the architecture (two full-size builds)."""
    with summary.fast_init():
        fast = models.build("segnet", 11)
    real = models.build("segnet", 11)
    assert [(k, p.shape) for k, p in fast.named_parameters()] == \
           [(k, p.shape) for k, p in real.named_parameters()]
    assert float(np.abs(real.encoder.conv5_3.weight.data).sum()) > 0   # really drawn
    assert summary.count_parameters(real) == 29_449_355


def test_fcdensenet103_channel_stack():
    with summary.fast_init():
        net = models.build("fcdensenet103", 11)
    assert [b.out_channels for b in net.down_blocks] == [112, 192, 304, 464, 656]
    assert net.bottleneck.out_channels == 896 and net.bottleneck.new_channels == 240
    ups = [net.transitions_up[i].weight.shape[0] + net.down_blocks[4 - i].out_channels
           for i in range(5)]
    assert ups == [240 + 656, 192 + 464, 160 + 304, 112 + 192, 80 + 112]
    assert [b.out_channels for b in net.up_blocks][:4] == [1088, 816, 576, 384]
    assert net.final_channels == 256


def test_every_model_has_output_stride_and_is_registered():
    names = {n for n, _, _ in CASES}
    assert names <= set(models.available())
    expected = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8, "segnet": 1, "deconvnet": 1,
                "fcdensenet56": 1, "dilation8": 8, "deeplab_largefov": 8, "deeplabv2": 8,
                "deeplabv3": 16, "refinenet": 4}
    for name, stride in expected.items():
        assert models.build(name, 2, width=TINY).output_stride == stride
    assert models.build("deeplabv3", 2, width=TINY, output_stride=8).output_stride == 8


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name,options,size", CASES, ids=CASE_IDS)
def test_output_shapes_for_several_sizes(name, options, size):
    model = models.build(name, 3, in_channels=2, width=TINY, **options).eval()
    sizes = [size, (size[0] + 8, size[1] + 3)]
    with minidl.no_grad():
        for s in sizes:
            y = model(_input(1, 2, s))
            assert y.shape == (1, 3) + tuple(s)
            assert model.output_size(*s) == tuple(s)
    if "upsample" in _options_of(name):
        coarse = models.build(name, 3, in_channels=2, width=TINY, upsample=False, **options).eval()
        with minidl.no_grad():
            y = coarse(_input(1, 2, size))
        assert y.shape[2:] == coarse.output_size(*size)
        # about H / output_stride (Caffe-style rounding may add one or two pixels)
        assert abs(y.shape[2] - size[0] / coarse.output_stride) < 2


def test_fcn_output_matches_any_input_size():
    """pad 100 + Caffe rounding + the reference offsets fit every size, down to 1 pixel."""
    for stride in (32, 16, 8):
        model = models.build(f"fcn{stride}s", 2, width=TINY / 4).eval()
        with minidl.no_grad():
            for size in [(1, 1), (2, 63), (64, 33)]:
                assert model(_input(1, 3, size)).shape == (1, 2) + size


def test_deconvnet_paper_input_trains_with_batch_one_and_too_small_input():
    """At 224x224 fc6 / fc7 are 1x1 maps: a batch of one must still train."""
    model = models.build("deconvnet", 2, width=TINY)
    y = model(_input(1, 3, (224, 224)))
    assert y.shape == (1, 2, 224, 224)
    F.cross_entropy(y, np.zeros((1, 224, 224), dtype=np.int64)).backward()
    assert np.abs(model.fc6.weight.grad).sum() > 0
    with pytest.raises(ValueError, match="at least 7x7"):
        model(_input(1, 3, (64, 64)))


def test_segnet_round_trips_camvid_size():
    model = models.build("segnet", 11, width=TINY).eval()
    x = _input(1, 3, (360, 480))
    with minidl.no_grad():
        feats = model.encoder(x)
    assert [feats[f"size{s}"] for s in range(1, 6)] == [(360, 480), (180, 240), (90, 120),
                                                       (45, 60), (23, 30)]
    assert feats["pool5"].shape[2:] == (12, 15)
    with minidl.no_grad():
        assert model(x).shape == (1, 11, 360, 480)


def test_unpooling_uses_the_encoder_switches():
    """SegNet's first unpool puts pool5's values back exactly where the maxima were."""
    model = models.build("segnet", 2, width=TINY).eval()
    feats = model.encoder(_input(1, 3, (45, 61)))
    up = F.max_unpool2d(feats["pool5"], feats["indices5"], 2, 2, output_size=feats["size5"])
    conv5 = feats["conv5"].data
    kept = up.data != 0
    np.testing.assert_array_equal(up.data[kept], conv5[kept])
    # each value lands on the maximum of its window
    assert np.isclose(up.data.max(), conv5.max())


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("name,options,size", CASES, ids=CASE_IDS)
def test_forward_backward_and_loss_falls(name, options, size):
    """One step checks every parameter gets a finite gradient; a few more must lower the loss
    on a fixed tiny batch."""
    minidl.manual_seed(0)
    # FCN's pad-100 input makes every map ~200 px larger: a narrower copy keeps it quick.
    width = TINY / 2 if name.startswith("fcn") else TINY
    # Dropout off (where the model has it): a fixed batch must then give a falling loss.
    if "dropout" in _options_of(name):
        options = {**options, "dropout": 0.0}
    model = models.build(name, 2, in_channels=1, width=width, **options)
    batch = 1 if name.startswith("fcn") and options.get("fusion") != "tensorflow" else 2
    x = _input(batch, 1, size, seed=1)
    yy, xx = np.mgrid[:size[0], :size[1]]
    target = np.broadcast_to((xx > size[1] // 2).astype(np.int64), (batch,) + tuple(size)).copy()
    opt = optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(3 if name.startswith("fcn") else 4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        if step == 0:
            for k, p in model.named_parameters():
                assert p.grad is not None, k
                assert np.isfinite(p.grad).all(), k
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_pooled_batchnorm_with_one_value_per_channel():
    bn = PooledBatchNorm2d(4).train()
    bn.running_mean[...] = 0.5
    x = minidl.tensor(np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1), requires_grad=True)
    y = bn(x)
    np.testing.assert_allclose(y.data.ravel(), (np.arange(4) - 0.5) / np.sqrt(1 + 1e-5), rtol=1e-5)
    np.testing.assert_array_equal(bn.running_mean, 0.5)          # statistics untouched
    y.sum().backward()
    assert np.abs(x.grad).sum() > 0                               # gradient does not vanish
    bn(minidl.tensor(np.ones((2, 4, 1, 1), dtype=np.float32)))    # batch 2: ordinary BN
    assert not np.allclose(bn.running_mean, 0.5)


def test_deeplabv3_trains_with_batch_one():
    model = models.build("deeplabv3", 2, width=TINY)
    y = model(_input(1, 3, (33, 33)))
    F.cross_entropy(y, np.zeros((1, 33, 33), dtype=np.int64)).backward()
    assert model.aspp.pool_conv[0].weight.grad is not None
    assert np.abs(model.aspp.pool_conv[0].weight.grad).sum() > 0


# ----------------------------------------------------------------------------- initialisation
def test_fcn_upsampling_is_bilinear_without_bias():
    model = models.build("fcn8s", 3, width=TINY)
    w = model.upscore2.weight.data
    assert model.upscore2.bias is None and model.upscore8.bias is None
    tent = np.array([0.25, 0.75, 0.75, 0.25])
    for c in range(3):
        np.testing.assert_allclose(w[c, c], np.outer(tent, tent))
    off = w.copy()
    off[np.arange(3), np.arange(3)] = 0
    assert not off.any()                                         # channel diagonal only
    np.testing.assert_allclose(model.upscore8.weight.data[1, 1].sum(), 8 ** 2, rtol=1e-5)
    up32 = models.build("fcn32s", 3, width=TINY).upscore.weight.data
    np.testing.assert_allclose(up32[2, 2].sum(), 32 ** 2, rtol=1e-5)
    assert up32[0, 0, 31, 31] == up32.max()                      # the centre of an even kernel
    assert not model.score_fr.weight.data.any()                  # the reference zero-fills scores


@pytest.mark.parametrize("kind", ["basic", "large"])
def test_identity_initialised_context_module_reproduces_its_input(kind):
    ctx = ContextModule(5, kind)
    x = _input(2, 5, (17, 19))                                   # non-negative: ReLUs pass it
    with minidl.no_grad():
        np.testing.assert_allclose(ctx(x).data, x.data, rtol=1e-5, atol=1e-6)


def test_identity_init_spreads_and_gathers_unequal_widths():
    w = nn.Conv2d(3, 6, 3).weight
    identity_init_(w, 3)
    centre = w.data[:, :, 1, 1]
    np.testing.assert_allclose(centre.sum(axis=0), 1.0)          # each input spread over 2 outputs
    assert (centre > 0).sum() == 6 and w.data[:, :, 0, 0].max() == 0


def test_context_module_receptive_fields():
    expected = [3, 5, 9, 17, 33, 65, 67, 67]
    ctx = ContextModule(2, "basic")
    assert ctx.receptive_fields() == expected
    for n, rf in enumerate(expected, start=1):
        assert minidl.receptive_field(ctx.truncated(n), 2, size=71) == (rf, rf)


# ----------------------------------------------------------------------------- backbones
def test_backbone_feature_sizes_and_strides():
    for os_, (s3, s4) in {32: (3, 2), 16: (3, 3), 8: (5, 5)}.items():
        net = ResNet(width=TINY, output_stride=os_, layers=(1, 1, 1, 1)).eval()
        with minidl.no_grad():
            f = net(_input(1, 3, (33, 33)))
        assert f["layer3"].shape[2] == s3 and f["layer4"].shape[2] == s4
        sizes = net.feature_sizes(33, 33)
        assert all(tuple(f[k].shape[2:]) == sizes[k] for k in sizes)
    vgg = VGG(19, width=TINY, pools=[(2, 2, 0)] * 3 + [None, None], dilation=(1, 1, 1, 1, 2))
    assert vgg.output_size(37, 50) == (4, 6)
    assert pool_output_size(45, 2, 2, 0, ceil_mode=True) == 23
    assert pool_output_size(321, 3, 2, 1, ceil_mode=True) == 161


def test_bad_options_raise_one_clear_sentence():
    with pytest.raises(ValueError, match="backbone must be 'vgg16' or 'vgg19'"):
        models.build("fcn8s", 21, backbone="vgg11")
    with pytest.raises(ValueError, match="positive channel multiplier"):
        models.build("segnet", 11, width=0)
    with pytest.raises(ValueError, match="context must be None"):
        models.build("dilation8", 21, context="huge")
    with pytest.raises(ValueError, match="output_stride must be 16 or 8"):
        models.build("deeplabv3", 21, output_stride=32)
    with pytest.raises(ValueError, match="expects input of shape"):
        models.build("refinenet", 2, width=TINY)(_input(1, 1, (32, 32)))
    with pytest.raises(ValueError, match="length must be odd"):
        FCDenseNet(2, layers=(4, 4))
    with pytest.raises(ValueError, match="needs inputs of at least 32x32"):
        models.build("fcdensenet56", 2, width=TINY)(_input(1, 3, (31, 64)))


# ----------------------------------------------------------------------------- pretrained
def _caffe_export(model, tmp_path, tf_layout=False):
    """Arrays named as a Caffe VGG-16 export, from `model`'s own weights (+ fc8 and junk)."""
    arrays = {}
    for k, p in model.named_parameters():
        layer, kind = k.split(".")[-2:]
        if layer.startswith("conv") or layer in ("fc6", "fc7"):
            w = p.data + 1.0                                     # distinguishable values
            if kind == "weight" and layer in ("fc6", "fc7"):
                w = w.reshape(w.shape[0], -1)                    # fully connected form
                if tf_layout:
                    w = w.reshape(p.shape).transpose(2, 3, 1, 0).reshape(-1, p.shape[0])
            elif kind == "weight" and tf_layout:
                w = w.transpose(2, 3, 1, 0)
            arrays[f"{layer}/{'W' if kind == 'weight' else 'b'}"] = w
    arrays["fc8/W"] = np.zeros((1000, 7), np.float32)
    arrays["conv1_1/W_wrong"] = np.zeros(3, np.float32)
    path = tmp_path / "vgg.npz"
    np.savez(path, **arrays)
    return path, arrays


@pytest.mark.parametrize("tf_layout", [False, True])
def test_load_pretrained_caffe_names_and_fc_reshape(tmp_path, tf_layout, capsys):
    src = models.build("fcn8s", 2, width=TINY)
    path, arrays = _caffe_export(src, tmp_path, tf_layout)
    dst = models.build("fcn8s", 2, width=TINY)
    report = load_pretrained(dst, str(path), mapping="vgg16-caffe",
                             layout="hwio" if tf_layout else "auto")
    assert "loaded 30 arrays" in capsys.readouterr().out
    assert "backbone.conv1_1.weight" in report["loaded"] and "fc6.weight" in report["loaded"]
    assert set(report["skipped"]) == {"fc8/W", "conv1_1/W_wrong"}
    np.testing.assert_allclose(dst.fc6.weight.data, src.fc6.weight.data + 1, rtol=1e-6)
    np.testing.assert_allclose(dst.fc7.weight.data, src.fc7.weight.data + 1, rtol=1e-6)
    np.testing.assert_allclose(dst.backbone.conv3_2.weight.data, src.backbone.conv3_2.weight.data + 1)
    assert "score_fr.weight" in report["missing"]
    with pytest.raises(ValueError, match="strict=True"):
        load_pretrained(dst, str(path), mapping="vgg16-caffe", strict=True, verbose=False)


def test_load_pretrained_reports_shape_mismatch_and_missing_file(tmp_path):
    model = models.build("deeplab_largefov", 2, width=TINY)
    path = tmp_path / "w.npz"
    np.savez(path, **{"fc6/W": np.ones((256, 32 * 49), np.float32), "conv1_1/b": np.ones(4, np.float32)})
    report = load_pretrained(model, str(path), mapping="vgg16-caffe", verbose=False)
    assert report["loaded"] == ["backbone.conv1_1.bias"]
    assert report["mismatched"][0][0] == "fc6/W" and report["mismatched"][0][2] == "head.fc6.weight"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(model, str(tmp_path / "nope.npz"))
    with pytest.raises(ValueError, match="unknown mapping"):
        load_pretrained(model, str(path), mapping="alexnet")


def test_torchvision_vgg_mapping_indices():
    m = vgg_mapping(16, "torchvision")
    assert m["features.0.weight"] == "conv1_1.weight" and m["features.28.bias"] == "conv5_3.bias"
    assert m["classifier.3.weight"] == "fc7.weight"
    mb = vgg_mapping(16, "torchvision", batch_norm=True)
    assert mb["features.40.weight"] == "conv5_3.weight"
    assert mb["features.41.running_var"] == "bn5_3.running_var"


# ----------------------------------------------------------------------------- summaries
def test_describe_and_explain():
    d = summary.describe("dilation8", context="large")
    assert d["params"] == d["reference"] == 134_346_581 + 6_803_139 and d["output_stride"] == 8
    convs = {l["name"]: l for l in d["layers"]}
    assert convs["fc6"]["params"] == 512 * 7 * 7 * 4096 + 4096
    text = summary.explain("deeplab_largefov", input_size=(49, 49))
    assert "512 x 3 x 3 x 1024 + 1024 = 4,719,616" in text
    assert "= 20,505,429" in text.splitlines()[-1]
    rf = {line.split()[0]: int(line.split()[-2]) for line in text.splitlines()
          if line.startswith("backbone.conv")}
    assert rf["backbone.conv1_1"] == 3 and rf["backbone.conv1_2"] == 5


def test_models_table_rows_match_references():
    rows = summary.models_table(names=["segnet", "fcdensenet103", "refinenet"])
    assert [r["name"] for r in rows] == ["segnet", "fcdensenet103", "refinenet"]
    assert rows[0]["params"] == rows[0]["reference"] == 29_449_355
    assert rows[2]["reference"] is None and rows[2]["output_stride"] == 4
    assert "29,449,355" in summary.format_table(rows)


def test_seg_package_exposes_its_submodules_on_first_use():
    import seg
    assert "unet" in seg.models.available()
    assert callable(seg.crf.dense_crf) and callable(seg.metrics.mean_dice)
    with pytest.raises(AttributeError, match="no attribute"):
        seg.not_a_module

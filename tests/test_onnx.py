"""minidl.onnx.export (issue #19): every model of the zoo, written as ONNX and run in ONNX
Runtime, gives minidl's logits; SegNet's pooling switches reach the unpooling; the index
conversion between ONNX (over the whole tensor) and minidl (per plane); clear errors.

Models are width-reduced copies on small inputs (as in test_models.py), calibrated first
(_calibrate) so that every path carries a signal of order one.
"""
import subprocess
import sys

import numpy as np
import pytest

import minidl
from minidl import function, nn
from minidl import functional as F
from seg import models

onnx = pytest.importorskip("onnx", reason="the test extra installs onnx")
ort = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
import minidl.onnx  # noqa: E402

TINY = 1 / 16
# Build options and an odd-sized input for the models that need them.
OPTIONS = {"deconvnet": {"fc_kernel": 1}, "unet": {"depth": 2, "features_root": 4,
                                                   "padding": "same", "batch_norm": True}}
SIZES = {"fcn32s": (19, 23), "fcn16s": (19, 23), "unet": (20, 28), "fcdensenet103": (32, 37),
         "deeplabv3": (33, 35), "fcdensenet67": (33, 35)}


def _build(name):
    options = dict(OPTIONS.get(name, {}))
    if name != "unet":
        options["width"] = TINY
    return models.build(name, 3, in_channels=2, **options)


def _calibrate(model, x):
    """Make every path of an untrained model carry a signal of order one, as in a trained one.

    Untrained models start with some layers at zero or near it (FCN's score layers, DeepLab's
    and Dilation's small classifiers, the last BN gamma or conv of every residual branch of
    ResNet / RefineNet): such a path would compare zeros with zeros. So zero conv weights are
    drawn anew and zero BN gammas set to 1; then, in one pass on batch x, each conv's weights
    are divided by the spread of its output, so that the reawakened residual sums do not grow
    to where float32 cannot be compared to 1e-4. BatchNorm keeps its initial statistics
    (mean 0, variance 1), so it does not amplify rounding differences. Returns the model
    in eval mode.
    """
    rng = np.random.default_rng(3)

    def rescaling(conv):
        def forward(x):
            y = type(conv).forward(conv, x)
            spread = float(y.data.std()) or 1.0
            conv.weight.data /= spread
            if conv.bias is not None:
                conv.bias.data /= spread
            return y / spread
        return forward

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        if not conv.weight.data.any():
            conv.weight.data[...] = rng.standard_normal(conv.weight.shape)
        conv.forward = rescaling(conv)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d) and not bn.weight.data.any():
            bn.weight.data[...] = 1.0
    with minidl.no_grad():
        model.eval()(x)
    for conv in convs:
        del conv.forward
    return model


def _input(shape, seed=0):
    return minidl.tensor(np.random.default_rng(seed).random(shape, dtype=np.float32))


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: minidl.backend.to_numpy(v) for k, v in feeds.items()})


@pytest.mark.parametrize("name", models.available())
def test_every_model_matches_onnx_runtime(name, tmp_path):
    size = SIZES.get(name, (37, 50))
    model = _calibrate(_build(name), _input((2, 2) + size, seed=1))
    x = _input((1, 2) + size)
    path = tmp_path / f"{name}.onnx"
    minidl.onnx.export(model, x, path, input_names=["image"], output_names=["logits"])
    with minidl.no_grad():
        expected = model(x).numpy()
    (got,) = _run(path, {"image": x.data})
    assert got.shape == expected.shape == (1, 3) + size
    assert np.abs(expected).max() > 1e-3          # a real signal, not all zeros
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert function.recorder is None              # the hook is off again


def test_segnet_pool_indices_feed_the_unpooling(tmp_path):
    model = _calibrate(_build("segnet"), _input((2, 2, 37, 50), seed=1))
    proto = minidl.onnx.export(model, _input((1, 2, 37, 50)), tmp_path / "segnet.onnx")
    producer = {out: node for node in proto.graph.node for out in node.output}
    unpools = [n for n in proto.graph.node if n.op_type == "MaxUnpool"]
    assert len(unpools) == 5
    pools = []
    for unpool in unpools:
        # Same-size unpooling: ONNX's whole-tensor indices go straight in, as MaxPool's
        # second output.
        pool = producer[unpool.input[1]]
        assert pool.op_type == "MaxPool" and list(pool.output).index(unpool.input[1]) == 1
        pools.append(pool.name)
    assert len(set(pools)) == 5                   # each stage its own switches


class _PoolUnpool(nn.Module):
    """Pools (N, C, 4, 6), returns the per-plane indices and an unpooling to 5 x 7, a larger
    plane than the pooled one (which needs the index conversion both ways)."""

    def forward(self, x):
        y, idx = F.max_pool2d(x, 2, 2, return_indices=True)
        return F.max_unpool2d(y, idx, 2, 2, output_size=(5, 7)) * 2.0, idx


def test_index_conversion_between_whole_tensor_and_per_plane(tmp_path):
    x = _input((2, 3, 4, 6))
    path = tmp_path / "pool.onnx"
    minidl.onnx.export(_PoolUnpool(), x, path, output_names=["unpooled", "indices"])
    expected_y, expected_idx = _PoolUnpool()(x)
    got_y, got_idx = _run(path, {"input": x.data})
    np.testing.assert_array_equal(got_idx, expected_idx.numpy())
    assert got_idx.max() < 4 * 6                  # per plane, as minidl numbers them
    np.testing.assert_array_equal(got_y, expected_y.numpy())
    assert got_y.shape == (2, 3, 5, 7)


class _PaddedPool(nn.Module):
    def forward(self, x):
        return F.max_pool2d(-x, 3, 2, 1, ceil_mode=True, return_indices=True)


def test_padded_ceil_mode_pool_and_its_indices(tmp_path):
    # -x puts maxima on the border, next to the padding; ceil_mode adds a last window.
    x = _input((2, 3, 7, 8))
    minidl.onnx.export(_PaddedPool(), x, tmp_path / "pool.onnx")
    expected_y, expected_idx = _PaddedPool()(x)
    got_y, got_idx = _run(tmp_path / "pool.onnx", {"input": x.data})
    assert got_y.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(got_y, expected_y.numpy())
    np.testing.assert_array_equal(got_idx, expected_idx.numpy())


class _SmallOps(nn.Module):
    """Ops the zoo uses little or not at all: pads, crops, nearest resize, softmax, ..."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding="same", bias=False)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        y = F.pad(x, (1, 2, 2, 1), mode="reflect")
        y = F.pad(self.conv(y), (1, 0, 0, 1), mode="replicate")
        y = F.pad(y, (-1, 1, 1, -1), value=0.5)[:, :, 1:-1, ::2]
        y = F.interpolate(y, scale_factor=1.5) - F.avg_pool2d(
            F.interpolate(y, scale_factor=1.5), 3, 1, 1, count_include_pad=False)
        y = self.up(F.leaky_relu(y, 0.1)) / 3.0
        y = F.interpolate(y, size=(9, 11), mode="bilinear", align_corners=True)
        pooled = F.adaptive_avg_pool2d(y, 1) + y.mean(axis=(2, 3), keepdims=True)
        return minidl.cat([F.softmax(y, dim=1), F.sigmoid(pooled) * y], axis=1)


@pytest.mark.parametrize("opset", [17, 18])
def test_small_ops_match_onnx_runtime(device, opset, tmp_path):
    model = _SmallOps().to(device)
    x = _input((2, 2, 8, 9)).to(device)
    path = tmp_path / "ops.onnx"
    minidl.onnx.export(model, x, path, opset_version=opset)
    with minidl.no_grad():
        expected = model(x).numpy()
    (got,) = _run(path, {"input": x.data})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_dynamic_batch_axis(tmp_path):
    model = _calibrate(_build("unet"), _input((2, 2, 20, 28), seed=1))
    path = tmp_path / "unet.onnx"
    minidl.onnx.export(model, _input((1, 2, 20, 28)), path,
                       dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    x3 = _input((3, 2, 20, 28), seed=5)
    with minidl.no_grad():
        expected = model(x3).numpy()
    (got,) = _run(path, {"input": x3.data})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


class _Twice(minidl.Function):
    def forward(self, x):
        return 2 * x

    def backward(self, gy):
        return 2 * gy


class _UsesCustomOp(nn.Module):
    def forward(self, x):
        return _Twice.apply(F.relu(x))


def test_unmapped_op_is_named_and_recording_stops(tmp_path):
    with pytest.raises(minidl.onnx.UnsupportedOpError, match="uses the op _Twice"):
        minidl.onnx.export(_UsesCustomOp(), _input((1, 1, 4, 4)), tmp_path / "x.onnx")
    assert function.recorder is None
    assert not (tmp_path / "x.onnx").exists()


def test_a_registered_mapping_exports_a_custom_op(tmp_path, monkeypatch):
    monkeypatch.setattr(minidl.onnx.ops, "MAPPINGS", dict(minidl.onnx.ops.MAPPINGS))

    @minidl.onnx.register(_Twice)
    def _twice(g, op, names, xs, y):
        return g.node("Add", [names[0], names[0]])
    x = _input((1, 1, 4, 4)) - 0.5
    minidl.onnx.export(_UsesCustomOp(), x, tmp_path / "twice.onnx")
    (got,) = _run(tmp_path / "twice.onnx", {"input": x.data})
    np.testing.assert_array_equal(got, 2 * np.maximum(x.numpy(), 0))


def test_minidl_imports_without_loading_onnx():
    code = "import sys, minidl, minidl.onnx; assert 'onnx' not in sys.modules, 'onnx loaded'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_bad_arguments_and_missing_onnx(tmp_path, monkeypatch):
    model, x = _UsesCustomOp(), _input((1, 1, 4, 4))
    with pytest.raises(ValueError, match="opset_version must be between"):
        minidl.onnx.export(model, x, tmp_path / "x.onnx", opset_version=9)
    with pytest.raises(ValueError, match="input_names must list 1 distinct"):
        minidl.onnx.export(model, x, tmp_path / "x.onnx", input_names=["a", "b"])
    with pytest.raises(TypeError, match="example_input must be a Tensor"):
        minidl.onnx.export(model, [[1.0]], tmp_path / "x.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="the `export` extra"):
        minidl.onnx.export(model, x, tmp_path / "x.onnx")

"""GPU against CPU: every op, forward and backward, a training step, optimizers, seeding, saving.

Each check runs the same computation on the same inputs on "cpu" (NumPy + Numba kernels)
and on "gpu" (CuPy + kernels/gpu.py) and compares the outputs and every input gradient
within float32 tolerance. A failure names the op, the output or gradient, the largest
difference and where it is.

Without CuPy and a CUDA device the whole module is skipped (reason printed by pytest -rs).
To check this file and the GPU code paths on a machine without a GPU, run it under the fake
CuPy of tests/fake_cupy.py (host arrays with CuPy's rules, the CUDA kernels compiled for
the host):

    PYTHONPATH=tests python3 -m pytest -p fake_cupy tests/test_gpu.py tests/test_kernels.py
"""
import numpy as np
import pytest

import minidl
from minidl import backend
from minidl import functional as F
from minidl import nn, optim

from conftest import GPU_PRESENT, GPU_SKIP_REASON

GPU = "gpu"
pytestmark = pytest.mark.skipif(not GPU_PRESENT, reason=GPU_SKIP_REASON)


# ---------------------------------------------------------------------------- helpers
def rng(seed=0):
    return np.random.default_rng(seed)


def randn(*shape, seed=0, dtype=np.float32):
    return rng(seed).standard_normal(shape).astype(dtype)


def _host(a):
    return backend.to_numpy(a.data if isinstance(a, minidl.Tensor) else a)


def assert_on_gpu(what, a):
    """`a` (Tensor or array) lives on the GPU: a CuPy array, not a silent host fallback."""
    data = a.data if isinstance(a, minidl.Tensor) else a
    assert backend.is_gpu_array(data), (f"{what}: expected a CuPy array on the GPU, got "
                                        f"{type(data).__module__}.{type(data).__name__}")


def assert_close(what, gpu_value, cpu_value, rtol=1e-4, atol=1e-5):
    """allclose with the tolerance scaled by the values' magnitude, and a message that says
    which quantity differs, by how much and where."""
    g, c = _host(gpu_value), _host(cpu_value)
    assert g.shape == c.shape, f"{what}: GPU shape {g.shape} != CPU shape {c.shape}"
    assert g.dtype == c.dtype, f"{what}: GPU dtype {g.dtype} != CPU dtype {c.dtype}"
    if g.dtype.kind in "biu":
        mismatch = np.argwhere(g != c)
        assert mismatch.size == 0, (f"{what}: {len(mismatch)} of {g.size} integer values differ, "
                                    f"first at {tuple(mismatch[0])}: GPU {g[tuple(mismatch[0])]} "
                                    f"CPU {c[tuple(mismatch[0])]}")
        return
    scale = float(np.max(np.abs(c[np.isfinite(c)]), initial=1.0))
    np.testing.assert_allclose(g, c, rtol=rtol, atol=atol * max(scale, 1.0),
                               err_msg=f"{what} (GPU vs CPU; |CPU| max {scale:.3g})")


def compare(name, fn, *inputs, grad=True, rtol=1e-4, atol=1e-5, seed=1):
    """Run fn(*tensors) on both devices from the same host inputs; compare results and grads.

    inputs: numpy arrays become tensors (floating ones require grad when `grad`); anything
    else (ints, tuples, None) is passed through unchanged. fn may return one Tensor or a
    tuple; the first floating output that requires grad is back-propagated with the same
    random output gradient on both devices.
    """
    results = {}
    for device in ("cpu", GPU):
        tensors = []
        for a in inputs:
            if isinstance(a, np.ndarray):
                needs = grad and a.dtype.kind == "f"
                tensors.append(minidl.tensor(a, requires_grad=needs, device=device))
            else:
                tensors.append(a)
        out = fn(*tensors)
        outs = out if isinstance(out, tuple) else (out,)
        diff = [o for o in outs if isinstance(o, minidl.Tensor) and o.requires_grad]
        if grad and diff:
            gy = randn(*diff[0].shape, seed=seed).astype(diff[0].dtype)
            diff[0].backward(minidl.tensor(gy, device=device))
        grads = [t.grad if isinstance(t, minidl.Tensor) else None for t in tensors]
        results[device] = (outs, grads, tensors)
    (outs_c, grads_c, _), (outs_g, grads_g, _) = results["cpu"], results[GPU]
    assert len(outs_c) == len(outs_g), f"{name}: {len(outs_g)} outputs on GPU, {len(outs_c)} on CPU"
    for k, (c, g) in enumerate(zip(outs_c, outs_g)):
        if isinstance(c, minidl.Tensor):
            assert_on_gpu(f"{name} output {k}", g)
            assert_close(f"{name} output {k}", g, c, rtol, atol)
    for k, (c, g) in enumerate(zip(grads_c, grads_g)):
        assert (c is None) == (g is None), (f"{name}: input {k} got a gradient on one device only "
                                            f"(CPU {c is not None}, GPU {g is not None})")
        if c is not None:
            assert_on_gpu(f"{name} grad of input {k}", g)
            assert_close(f"{name} grad of input {k}", g, c, rtol, atol)
    return results


# ---------------------------------------------------------------------------- kernels direct
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_bundle_matches_reference_on_a_u_net_sized_layer(dtype):
    """The GPU bundle on a realistic shape (not just tiny hypothesis cases) against reference."""
    import kernels.reference as R
    K = __import__("kernels").for_array(backend.to_device(np.zeros(1), GPU))
    xp = backend.array_module(GPU)
    x = randn(2, 8, 40, 36, dtype=dtype)
    for args in [(3, 3, 1, 1, 1, 1, 1, 1, 40, 36), (3, 3, 2, 2, 0, 0, 2, 2, 18, 16),
                 (2, 2, 2, 2, 0, 0, 1, 1, 20, 18)]:
        cols = K.im2col(xp.asarray(x), *args)
        assert_close(f"im2col{args}", cols, R.im2col(x, *args))
        c = randn(*cols.shape, seed=2, dtype=dtype)
        assert_close(f"col2im{args}", K.col2im(xp.asarray(c), 8, 40, 36, *args),
                     R.col2im(c, 8, 40, 36, *args))
        y, idx = K.maxpool2d_forward(xp.asarray(x), *args)
        y_r, idx_r = R.maxpool2d_forward(x, *args)
        assert_close(f"maxpool y{args}", y, y_r)
        assert_close(f"maxpool idx{args}", idx, idx_r)
        gy = randn(*y_r.shape, seed=3, dtype=dtype)
        assert_close(f"maxpool backward{args}", K.maxpool2d_backward(xp.asarray(gy), idx, 40, 36),
                     R.maxpool2d_backward(gy, idx_r, 40, 36))
    for ho, wo, ac in [(80, 72, False), (17, 50, True), (20, 18, False)]:
        assert_close(f"bilinear forward {ho}x{wo} ac={ac}", K.bilinear_forward(xp.asarray(x), ho, wo, ac),
                     R.bilinear_forward(x, ho, wo, ac))
        g = randn(2, 8, ho, wo, seed=4, dtype=dtype)
        assert_close(f"bilinear backward {ho}x{wo} ac={ac}",
                     K.bilinear_backward(xp.asarray(g), 40, 36, ac), R.bilinear_backward(g, 40, 36, ac))


def test_kernels_are_deterministic_on_gpu():
    """Backward kernels are gathers: two runs give bit-identical results."""
    import kernels
    xp = backend.array_module(GPU)
    K = kernels.for_array(xp.zeros(1))
    x = xp.asarray(rng(5).integers(0, 3, (4, 8, 33, 31)).astype(np.float32))   # many ties
    gy = xp.asarray(randn(4, 8, 33, 31, seed=6) * 1e3)
    _, idx = K.maxpool2d_forward(x, 3, 3, 1, 1, 1, 1, 1, 1, 33, 31)
    a = _host(K.maxpool2d_backward(gy, idx, 33, 31))
    b = _host(K.maxpool2d_backward(gy, idx, 33, 31))
    np.testing.assert_array_equal(a, b, err_msg="maxpool2d_backward differs between two runs")
    g = xp.asarray(randn(4, 8, 100, 93, seed=7))
    a = _host(K.bilinear_backward(g, 33, 31, False))
    b = _host(K.bilinear_backward(g, 33, 31, False))
    np.testing.assert_array_equal(a, b, err_msg="bilinear_backward differs between two runs")


# ---------------------------------------------------------------------------- convolution
CONV_CASES = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=1),
    dict(stride=1, padding=2, dilation=2, groups=1),
    dict(stride=1, padding=1, dilation=1, groups=2),
    dict(stride=1, padding=1, dilation=1, groups=6),          # depthwise
    dict(stride=1, padding="same", dilation=1, groups=1),
    dict(stride=1, padding="same", dilation=2, groups=3),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv2d(case):
    g = case["groups"]
    x, w, b = randn(2, 6, 11, 10), randn(12, 6 // g, 3, 3, seed=2), randn(12, seed=3)
    compare(f"conv2d {case}", lambda x, w, b: F.conv2d(x, w, b, **case), x, w, b)


def test_conv2d_1x1_and_large_kernel():
    compare("conv2d 1x1", lambda x, w: F.conv2d(x, w), randn(2, 5, 7, 9), randn(4, 5, 1, 1, seed=2))
    compare("conv2d 7x5 stride 3", lambda x, w: F.conv2d(x, w, stride=3, padding=(3, 2)),
            randn(1, 3, 23, 19), randn(4, 3, 7, 5, seed=2))


def test_conv2d_non_contiguous_inputs():
    # A transposed view and a strided slice as inputs: kernels must not assume contiguity.
    compare("conv2d(x.transpose)", lambda x, w: F.conv2d(x.transpose(2, 3), w, padding=1),
            randn(2, 4, 9, 12), randn(5, 4, 3, 3, seed=2))
    compare("conv2d(x[..., ::2])", lambda x, w: F.conv2d(x[:, :, ::2, 1::2], w, stride=1),
            randn(2, 4, 18, 16), randn(5, 4, 3, 3, seed=2))


def test_conv2d_big_enough_to_be_chunked():
    """A column buffer above the settings' bound (conv_plan.settings) is built in bands of rows."""
    from minidl.ops import conv_plan
    with conv_plan.override(column_buffer_bytes=64 * 1024, gpu_column_buffer_bytes=64 * 1024):
        compare("conv2d (banded im2col)", lambda x, w, b: F.conv2d(x, w, b, padding=1),
                randn(3, 8, 30, 28), randn(16, 8, 3, 3, seed=2), randn(16, seed=3))


CONVT_CASES = [
    dict(stride=2, padding=0, output_padding=0, groups=1, dilation=1),
    dict(stride=2, padding=1, output_padding=1, groups=1, dilation=1),
    dict(stride=3, padding=1, output_padding=2, groups=2, dilation=1),
    dict(stride=1, padding=2, output_padding=0, groups=1, dilation=2),
]


@pytest.mark.parametrize("case", CONVT_CASES, ids=[str(c) for c in CONVT_CASES])
def test_conv_transpose2d(case):
    g = case["groups"]
    x, w, b = randn(2, 4, 7, 6), randn(4, 6 // g, 4, 3, seed=2), randn(6, seed=3)
    compare(f"conv_transpose2d {case}", lambda x, w, b: F.conv_transpose2d(x, w, b, **case), x, w, b)


# ---------------------------------------------------------------------------- pooling, resize
POOL_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1, padding=1),                 # overlapping windows
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(2, 1), dilation=(2, 1)),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[str(c) for c in POOL_CASES])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pool2d(case, ties):
    x = rng(3).integers(-2, 3, (2, 3, 11, 12)).astype(np.float32) if ties else randn(2, 3, 11, 12)
    res = compare(f"max_pool2d {case} ties={ties}",
                  lambda x: F.max_pool2d(x, return_indices=True, **case), x)
    idx = res[GPU][0][1]
    assert idx.dtype == np.int64, f"max_pool2d indices dtype {idx.dtype}, expected int64"


def test_max_unpool2d_after_pool():
    def fn(x):
        y, idx = F.max_pool2d(x, 2, return_indices=True)
        return F.max_unpool2d(y * 2.0, idx, 2, output_size=x.shape[2:])
    compare("max_pool2d -> max_unpool2d (odd size)", fn, randn(2, 3, 9, 11))


def test_avg_and_adaptive_pool():
    x = randn(2, 3, 11, 10)
    compare("avg_pool2d 2", lambda x: F.avg_pool2d(x, 2), x)
    compare("avg_pool2d 3/2/1 ceil", lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True,
                                                            count_include_pad=False), x)
    compare("adaptive_avg_pool2d (3, 4)", lambda x: F.adaptive_avg_pool2d(x, (3, 4)), x)


INTERP_CASES = [
    dict(scale_factor=2, mode="nearest"),
    dict(size=(7, 23), mode="nearest"),
    dict(scale_factor=2, mode="bilinear", align_corners=False),
    dict(scale_factor=2, mode="bilinear", align_corners=True),
    dict(size=(5, 17), mode="bilinear", align_corners=False),
    dict(size=(31, 4), mode="bilinear", align_corners=True),
]


@pytest.mark.parametrize("case", INTERP_CASES, ids=[str(c) for c in INTERP_CASES])
def test_interpolate(case):
    compare(f"interpolate {case}", lambda x: F.interpolate(x, **case), randn(2, 3, 9, 8))


def test_pad_and_crop():
    x = randn(2, 3, 8, 9)
    compare("pad constant", lambda x: F.pad(x, (1, 2, 3, 0), value=0.5), x)
    compare("pad reflect", lambda x: F.pad(x, (3, 2, 1, 4), mode="reflect"), x)
    compare("pad replicate", lambda x: F.pad(x, (2, 2, 2, 2), mode="replicate"), x)
    compare("center_crop", lambda x: F.center_crop(x, (5, 4)), x)


# ---------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_and_running_stats_in_place(training):
    x, w, b = randn(4, 5, 6, 7) * 3 + 1, randn(5, seed=2), randn(5, seed=3)
    stats = {}
    for device in ("cpu", GPU):
        rm = backend.to_device(randn(5, seed=4), device)
        rv = backend.to_device(np.abs(randn(5, seed=5)) + 0.5, device)
        stats[device] = (rm, rv)

    def fn_for(device):
        rm, rv = stats[device]
        return lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2)
    res = {}
    for device in ("cpu", GPU):
        tensors = [minidl.tensor(a, requires_grad=True, device=device) for a in (x, w, b)]
        rm_before = stats[device][0]
        y = fn_for(device)(*tensors)
        y.backward(minidl.tensor(randn(*y.shape, seed=9), device=device))
        assert stats[device][0] is rm_before, "running_mean must be updated in place"
        res[device] = (y, [t.grad for t in tensors])
    assert_on_gpu("batch_norm output", res[GPU][0])
    assert_close(f"batch_norm(training={training}) output", res[GPU][0], res["cpu"][0])
    for k in range(3):
        assert_on_gpu(f"batch_norm grad {k}", res[GPU][1][k])
        assert_close(f"batch_norm(training={training}) grad of input {k}", res[GPU][1][k],
                     res["cpu"][1][k])
    assert_on_gpu("running_mean", stats[GPU][0])
    assert_close("running_mean after batch_norm", stats[GPU][0], stats["cpu"][0])
    assert_close("running_var after batch_norm", stats[GPU][1], stats["cpu"][1])


def test_batchnorm2d_module_buffers_stay_on_gpu():
    m = nn.BatchNorm2d(4).to(GPU)
    m.train()
    x = minidl.tensor(randn(3, 4, 5, 5), device=GPU)
    m(x)
    for name, buf in m.named_buffers() if hasattr(m, "named_buffers") else []:
        if buf is not None:
            assert_on_gpu(f"BatchNorm2d buffer {name}", buf)
    assert_on_gpu("BatchNorm2d running_mean", m.running_mean)


# ---------------------------------------------------------------------------- activations, losses
def test_activations_and_softmax():
    x = randn(3, 5, 4, 6) * 4
    for name, fn in [("relu", F.relu), ("leaky_relu", lambda x: F.leaky_relu(x, 0.1)),
                     ("sigmoid", F.sigmoid), ("tanh", F.tanh), ("softplus", F.softplus),
                     ("softmax dim=1", lambda x: F.softmax(x, dim=1)),
                     ("softmax dim=-1", lambda x: F.softmax(x, dim=-1)),
                     ("log_softmax dim=1", lambda x: F.log_softmax(x, dim=1))]:
        compare(name, fn, x)
    compare("log_softmax of huge logits", lambda x: F.log_softmax(x, dim=1), randn(2, 4) * 1e4)


def test_cross_entropy_variants():
    logits = randn(2, 4, 6, 5) * 3
    target = rng(2).integers(0, 4, (2, 6, 5)).astype(np.int64)
    target_ignored = target.copy()
    target_ignored[0, :2] = -100
    weight = np.abs(randn(4, seed=3)).astype(np.float32) + 0.1
    pixel_weight = np.abs(randn(2, 6, 5, seed=4)).astype(np.float32)
    compare("cross_entropy mean", lambda x, t: F.cross_entropy(x, t), logits, target)
    compare("cross_entropy ignore_index", lambda x, t: F.cross_entropy(x, t), logits, target_ignored)
    compare("cross_entropy class weight", lambda x, t, w: F.cross_entropy(x, t, weight=w),
            logits, target_ignored, weight, grad=True)
    compare("cross_entropy pixel_weight sum",
            lambda x, t: F.cross_entropy(x, t, pixel_weight=minidl.tensor(pixel_weight, device=x.device),
                                         reduction="sum"), logits, target)
    compare("cross_entropy none", lambda x, t: F.cross_entropy(x, t, reduction="none"), logits, target)
    compare("cross_entropy (N, C)", lambda x, t: F.cross_entropy(x, t), randn(7, 3),
            rng(5).integers(0, 3, 7).astype(np.int64))
    compare("nll_loss", lambda x, t: F.nll_loss(F.log_softmax(x, dim=1), t), logits, target)


def test_other_losses():
    x, y = randn(3, 4, 5), randn(3, 4, 5, seed=2)
    p = 1 / (1 + np.exp(-y))
    compare("binary_cross_entropy_with_logits", lambda x, t: F.binary_cross_entropy_with_logits(x, t),
            x, p.astype(np.float32))
    compare("mse_loss", lambda x, t: F.mse_loss(x, t), x, y)
    logp = np.log(np.exp(y) / np.exp(y).sum(axis=-1, keepdims=True)).astype(np.float32)
    compare("kl_div batchmean", lambda a, b: F.kl_div(a, b, reduction="batchmean"),
            x, np.exp(logp).astype(np.float32))


def test_dropout_off_is_identity_and_on_keeps_scale():
    x = minidl.tensor(np.ones((64, 64), np.float32), device=GPU)
    assert F.dropout(x, 0.5, training=False) is x
    y = F.dropout(x, 0.25, training=True)
    assert_on_gpu("dropout output", y)
    kept = _host(y)
    assert set(np.unique(kept)) <= {0.0, np.float32(1 / 0.75)}, "dropout values must be 0 or 1/(1-p)"
    assert abs((kept == 0).mean() - 0.25) < 0.05, f"dropped fraction {(kept == 0).mean():.3f}, expected 0.25"
    y2 = F.dropout2d(minidl.tensor(np.ones((8, 16, 3, 3), np.float32), device=GPU), 0.5)
    planes = _host(y2).reshape(8 * 16, 9)
    assert all(len(set(p)) == 1 for p in planes), "dropout2d must drop whole channels"


# ---------------------------------------------------------------------------- elementwise, reductions
def test_elementwise_ops_and_broadcasting():
    a, b = randn(3, 4, 5), randn(4, 1, seed=2)
    pos = np.abs(randn(3, 4, 5, seed=3)) + 0.5
    cases = [
        ("add", lambda a, b: a + b, a, b), ("sub", lambda a, b: a - b, a, b),
        ("mul", lambda a, b: a * b, a, b), ("div", lambda a, b: a / (b * b + 1), a, b),
        ("neg", lambda a: -a, a), ("radd scalar", lambda a: 2.5 + a, a),
        ("rsub scalar", lambda a: 1.0 - a, a), ("rdiv scalar", lambda a: 1.0 / (a * a + 1), a),
        ("pow scalar", lambda p: p ** 1.5, pos), ("pow tensor", lambda p, q: p ** q, pos, pos * 0.5),
        ("exp", F.exp, a), ("log", F.log, pos), ("sqrt", F.sqrt, pos), ("abs", F.abs, a),
        ("clip", lambda a: F.clip(a, -0.5, 0.7), a),
        ("maximum", F.maximum, a, b), ("minimum", F.minimum, a, b),
        ("where", lambda a, b: F.where(a.data > 0, a, b), a, b),
        ("matmul 2d", lambda x, y: x @ y, randn(5, 7), randn(7, 3, seed=2)),
        ("matmul batched", lambda x, y: x @ y, randn(2, 5, 7), randn(7, 3, seed=2)),
        ("matmul vector", lambda x, y: x @ y, randn(5, 7), randn(7, seed=2)),
        ("linear", lambda x, w, b: F.linear(x, w, b), randn(4, 6), randn(3, 6, seed=2), randn(3, seed=3)),
    ]
    for name, fn, *inputs in cases:
        compare(name, fn, *inputs)


def test_float32_stays_float32_on_gpu():
    """Python scalars must not upcast float32 GPU arrays to float64 (costly on GPUs)."""
    x = minidl.tensor(randn(4, 4), device=GPU, requires_grad=True)
    outs = {"x * 2.0": x * 2.0, "x + 1": x + 1, "x / 3.0": x / 3.0, "x ** 2.0": x ** 2.0,
            "1.0 - x": 1.0 - x, "sigmoid": F.sigmoid(x), "softplus": F.softplus(x),
            "leaky_relu": F.leaky_relu(x, 0.2), "clip": F.clip(x, -1.0, 1.0),
            "mean": x.mean(), "dropout": F.dropout(x, 0.3)}
    for name, y in outs.items():
        assert y.dtype == np.float32, f"{name} gave {y.dtype} on the GPU"
    (x * 2.0).sum().backward()
    assert x.grad.dtype == np.float32


@pytest.mark.parametrize("axis", [None, 0, 1, (0, 2), -1])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(axis, keepdims):
    x = randn(3, 4, 5)
    ties = rng(2).integers(0, 3, (3, 4, 5)).astype(np.float32)
    compare(f"sum axis={axis}", lambda x: x.sum(axis=axis, keepdims=keepdims), x)
    compare(f"mean axis={axis}", lambda x: x.mean(axis=axis, keepdims=keepdims), x)
    compare(f"max axis={axis} (ties)", lambda x: x.max(axis=axis, keepdims=keepdims), ties)
    compare(f"min axis={axis} (ties)", lambda x: x.min(axis=axis, keepdims=keepdims), ties)


def test_shape_ops_and_indexing():
    x = randn(3, 4, 5)
    compare("reshape", lambda x: x.reshape(6, 10), x)
    compare("permute", lambda x: x.permute(2, 0, 1), x)
    compare("transpose", lambda x: x.transpose(0, 2), x)
    compare("flatten", lambda x: F.flatten(x, 1), x)
    compare("basic indexing", lambda x: x[1:, ::2, -1], x)
    rows = np.array([0, 2, 2, 1, 0])          # repeated rows: gradients must add up
    compare("integer-array indexing with repeats",
            lambda x: x[backend.to_device(rows, x.device)], x)
    compare("cat", lambda a, b: minidl.cat([a, b], axis=1), x, randn(3, 2, 5, seed=2))
    compare("stack", lambda a, b: minidl.stack([a, b], axis=-1), x, randn(3, 4, 5, seed=2))


def test_to_device_is_differentiable():
    x = minidl.tensor(randn(3, 4), requires_grad=True)
    y = (x.to(GPU) * 3.0).to("cpu").sum()
    y.backward()
    assert isinstance(x.grad, np.ndarray), "the gradient of a CPU leaf must come back to the CPU"
    np.testing.assert_allclose(x.grad, np.full((3, 4), 3.0, np.float32))


# ---------------------------------------------------------------------------- models and training
def _small_net():
    """Conv/BN/ReLU/pool encoder and transposed-conv decoder: most layer types in one net.

    The conv before BatchNorm has no bias: BN cancels it, so its gradient is rounding noise,
    which Adam/RMSprop (dividing by sqrt(v)) would blow up into device-dependent steps."""
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, dilation=1), nn.ReLU(),
        nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(),
        nn.Conv2d(8, 3, 1))


def _train(model, device, steps=3, opt_name="adam", seed=0):
    model.to(device)
    model.train()
    opt = {"adam": lambda p: optim.Adam(p, lr=1e-2), "sgd": lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
           "adamw": lambda p: optim.AdamW(p, lr=1e-2), "rmsprop": lambda p: optim.RMSprop(p, lr=1e-3)}[
        opt_name](model.parameters())
    x = minidl.tensor(randn(4, 2, 16, 16, seed=seed), device=device)
    t = minidl.tensor(rng(seed + 1).integers(0, 3, (4, 16, 16)).astype(np.int64), device=device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def _twin_models(build):
    minidl.manual_seed(0)
    a = build()
    minidl.manual_seed(0)
    b = build()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(_host(pa), _host(pb), err_msg=f"twin init differs at {na}")
    return a, b


@pytest.mark.parametrize("opt_name", ["adam", "sgd", "adamw", "rmsprop"])
def test_training_steps_match_between_devices(opt_name):
    cpu_model, gpu_model = _twin_models(_small_net)
    loss_c, _ = _train(cpu_model, "cpu", opt_name=opt_name)
    loss_g, opt = _train(gpu_model, GPU, opt_name=opt_name)
    np.testing.assert_allclose(loss_g, loss_c, rtol=2e-4, atol=1e-5,
                               err_msg=f"{opt_name}: losses per step, GPU vs CPU")
    for (name, pc), (_, pg) in zip(cpu_model.named_parameters(), gpu_model.named_parameters()):
        assert_on_gpu(f"parameter {name} after {opt_name} steps", pg)
        assert_close(f"{opt_name}: parameter {name} after 3 steps", pg, pc, rtol=2e-3, atol=2e-4)
    for p, state in opt.state.items():
        for key, value in state.items():
            if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
                assert_on_gpu(f"{opt_name} state {key}", value)


def test_optimizer_updates_parameters_in_place_on_the_gpu():
    for name, make in [("SGD", lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3)),
                       ("Adam", lambda p: optim.Adam(p, lr=1e-2, weight_decay=1e-3)),
                       ("AdamW", lambda p: optim.AdamW(p, lr=1e-2)),
                       ("RMSprop", lambda p: optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True))]:
        results = {}
        for device in ("cpu", GPU):
            p = nn.Parameter(randn(5, 4), device=device)
            opt = make([p])
            array_before = p.data
            for step in range(3):
                p.grad = backend.to_device(randn(5, 4, seed=10 + step), device)
                opt.step()
            assert p.data is array_before, f"{name}.step() replaced the parameter's array instead of updating it"
            results[device] = p
        assert_on_gpu(f"{name} parameter", results[GPU])
        assert_close(f"{name}: parameter after 3 steps", results[GPU], results["cpu"], rtol=1e-5, atol=1e-6)


def test_unet_training_step_matches_between_devices():
    seg = pytest.importorskip("seg.models")
    build = lambda: seg.build("unet", 3, 1, depth=3, features_root=4, padding="same", batch_norm=True)
    cpu_model, gpu_model = _twin_models(build)
    results = {}
    for device, model in (("cpu", cpu_model), (GPU, gpu_model)):
        model.to(device).train()
        opt = optim.Adam(model.parameters(), lr=1e-3)
        x = minidl.tensor(randn(2, 1, 32, 32, seed=3), device=device)
        t = minidl.tensor(rng(4).integers(0, 3, (2, 32, 32)).astype(np.int64), device=device)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[device] = (losses, out)
    assert_on_gpu("U-Net output", results[GPU][1])
    np.testing.assert_allclose(results[GPU][0], results["cpu"][0], rtol=2e-4,
                               err_msg="U-Net training losses, GPU vs CPU")


def test_manual_seed_reproduces_a_gpu_run():
    def run():
        minidl.manual_seed(1234)
        noise = minidl.randn(3, 4, device=GPU)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.5),
                              nn.Conv2d(4, 3, 3, padding=1), nn.Dropout(0.3)).to(GPU)
        losses, _ = _train(model, GPU, steps=2, opt_name="adam")
        return _host(noise), losses, [_host(p) for p in model.parameters()]
    n1, l1, p1 = run()
    n2, l2, p2 = run()
    np.testing.assert_array_equal(n1, n2, err_msg="randn(device='gpu') after the same manual_seed")
    assert l1 == l2, f"losses of two seeded GPU runs differ: {l1} vs {l2}"
    for k, (a, b) in enumerate(zip(p1, p2)):
        np.testing.assert_array_equal(a, b, err_msg=f"parameter {k} after two seeded GPU runs")
    minidl.manual_seed(1235)
    assert not np.array_equal(_host(minidl.randn(3, 4, device=GPU)), n1), "another seed, same numbers"


def test_save_and_load_a_gpu_model(tmp_path):
    minidl.manual_seed(0)
    model = _small_net().to(GPU)
    _train(model, GPU, steps=1)
    model.eval()
    path = tmp_path / "gpu_model.npz"
    minidl.save({"model": model.state_dict(), "epoch": 1}, path)
    ckpt = minidl.load(path)
    assert ckpt["epoch"] == 1
    for key, value in ckpt["model"].items():
        assert isinstance(value, np.ndarray), f"load() must give host arrays, {key} is {type(value)}"
        np.testing.assert_array_equal(value, _host(model.state_dict()[key]), err_msg=key)
    cpu_model = _small_net()
    cpu_model.load_state_dict(ckpt["model"])
    cpu_model.eval()
    x = randn(2, 2, 16, 16, seed=8)
    with minidl.no_grad():
        y_gpu = model(minidl.tensor(x, device=GPU))
        y_cpu = cpu_model(minidl.tensor(x))
    assert_close("outputs of the GPU model and its reloaded CPU copy", y_gpu, y_cpu)
    # Loading host arrays into a GPU model keeps its parameters on the GPU.
    model.load_state_dict(ckpt["model"])
    for name, p in model.named_parameters():
        assert_on_gpu(f"parameter {name} after load_state_dict", p)
    on_gpu = minidl.load(path, map_location=GPU)
    for key, value in on_gpu["model"].items():
        assert_on_gpu(f"load(map_location='gpu') {key}", value)

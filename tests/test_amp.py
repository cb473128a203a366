"""Mixed precision: autocast's dtype rules, its gradients against float32, and GradScaler."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidl
from minidl import amp, functional as F, nn, optim
from conftest import to_numpy


def bf16_reference(x):
    """Nearest bfloat16 value of each float32 (ties to even), by comparing the two candidates
    in float64: the value with the low 16 bits cut off, and the next one up in magnitude."""
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    low = (u & 0xFFFF0000).astype(np.uint32).view(np.float32).astype(np.float64)
    high = ((u & 0xFFFF0000) + 0x10000).astype(np.uint32).view(np.float32).astype(np.float64)
    d_low, d_high = np.abs(x - low), np.abs(high - x)
    even_low = ((u >> 16) & 1) == 0
    pick_low = (d_low < d_high) | ((d_low == d_high) & even_low)
    return np.where(pick_low, low, high).astype(np.float32)


@given(st.lists(st.floats(-2.0 ** 127, 2.0 ** 127, width=32), min_size=1, max_size=20))
def test_round_to_bfloat16_is_nearest_even(values):
    x = np.array(values, np.float32)
    got = amp.round_to(x, "bfloat16")
    np.testing.assert_array_equal(got, bf16_reference(x))
    assert np.all(got.view(np.uint32) & 0xFFFF == 0)


def test_round_to_keeps_nan_and_ties_to_even():
    # 1 + 2^-8 lies halfway between the bfloat16 values 1 and 1 + 2^-7: the even one (1) wins.
    x = np.array([np.nan, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, np.inf], np.float32)
    got = amp.round_to(x, "bfloat16")
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [1.0, 1 + 2.0 ** -6, np.inf])
    np.testing.assert_array_equal(amp.round_to(x[1:], "float16"),
                                  x[1:].astype(np.float16).astype(np.float32))


def small_net(activation=nn.ReLU):
    minidl.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), activation(),
                         nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(4, 3, 1))


def batch(device, seed=0):
    rng = np.random.default_rng(seed)
    x = minidl.tensor(rng.normal(size=(2, 3, 6, 6)).astype(np.float32), device=device)
    y = minidl.tensor(rng.integers(0, 3, size=(2, 12, 12)), device=device)
    return x, y


def test_autocast_float16_dtype_rules(device):
    net = small_net().to(device)
    x, y = batch(device)
    with amp.autocast(device, dtype="float16"):
        h = net[0](x)                                   # conv: lower
        assert h.dtype == np.float16
        assert net[1](h).dtype == np.float32            # batch norm: float32
        assert F.relu(h).dtype == np.float16            # unlisted: the input's dtype
        assert (h + h).dtype == np.float16              # promote: all float16
        assert (h * net[0].bias.reshape(1, 8, 1, 1)).dtype == np.float32  # fp16 with fp32
        assert minidl.cat([h, h.float()], axis=1).dtype == np.float32
        assert h.sum().dtype == np.float32              # reductions: float32
        assert F.softmax(h, dim=1).dtype == np.float32
        w = minidl.randn(36, 5, device=device)
        assert minidl.matmul(x.reshape(6, 36), w).dtype == np.float16
        out = net(x)
        assert out.dtype == np.float16
        loss = F.cross_entropy(out, y)
        assert loss.dtype == np.float32
    loss.backward()
    for p in net.parameters():
        assert p.dtype == np.float32 and p.grad.dtype == np.float32


def test_autocast_bfloat16_rounds_lower_ops_only(device):
    net = small_net().to(device)
    x, _ = batch(device)
    with amp.autocast(device, dtype="bfloat16"):
        h = net[0](x)
        bn = net[1](h)
    # bfloat16 values are float32 arrays with the low 16 bits zero.
    assert h.dtype == np.float32 and np.all(to_numpy(h.data).view(np.uint32) & 0xFFFF == 0)
    assert np.any(to_numpy(bn.data).view(np.uint32) & 0xFFFF != 0)
    # The conv's output equals float32 conv of the rounded inputs, then rounded. (On the GPU
    # the conv ran on the bf16 implicit-GEMM kernels, whose sums go in another order than
    # cuBLAS's: equal up to one bfloat16 step, 2^-7 relative at most.)
    w, b = net[0].weight.data, net[0].bias.data
    want = F.conv2d(minidl.tensor(amp.round_to(x.data, "bfloat16")),
                    minidl.tensor(amp.round_to(w, "bfloat16")),
                    minidl.tensor(amp.round_to(b, "bfloat16")), padding=1)
    want = to_numpy(amp.round_to(want.data, "bfloat16"))
    if device == "cpu":
        np.testing.assert_array_equal(to_numpy(h.data), want)
    else:
        np.testing.assert_allclose(to_numpy(h.data), want, rtol=2.0 ** -7,
                                   atol=1e-5 * np.abs(want).max())


def test_autocast_leaves_float64_other_devices_and_disabled_alone(device):
    net = small_net().to(device)
    x, _ = batch(device)
    with amp.autocast(device, dtype="float16", enabled=False):
        assert net[0](x).dtype == np.float32
    other = "cpu" if device == "gpu" else "gpu"
    with amp.autocast(other, dtype="float16"):
        assert net[0](x).dtype == np.float32
    with amp.autocast(device, dtype="float16"):
        x64 = x.to(dtype="float64")
        w64 = net[0].weight.to(dtype="float64")
        assert F.conv2d(x64, w64, padding=1).dtype == np.float64
        with amp.autocast(device, enabled=False):       # nesting: inner wins, outer returns
            assert net[0](x).dtype == np.float32
        assert net[0](x).dtype == np.float16
    assert not amp.is_autocast_enabled()


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 4 * 2.0 ** -8), ("float16", 4 * 2.0 ** -11)])
def test_autocast_gradients_match_float32(device, dtype, tol):
    """Error of an autocast step's gradients against float32, relative to the largest float32
    gradient: within 4 epsilons of the low precision (bf16 2^-8, fp16 2^-11); measured 0.4 and
    0.5 epsilons.
    Tanh, not ReLU: on a batch this small one ReLU that flips sign because its input was
    rounded moves a gradient by 18% (measured, with the rounded inputs in plain float32 too)."""
    x, y = batch(device)
    grads = {}
    for mode in ("float32", dtype):
        net = small_net(nn.Tanh).to(device)
        with amp.autocast(device, dtype=dtype, enabled=mode != "float32"):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        grads[mode] = [to_numpy(p.grad) for p in net.parameters()]
    scale = max(np.abs(g).max() for g in grads["float32"])
    for g32, glow in zip(grads["float32"], grads[dtype]):
        assert np.abs(glow - g32).max() <= tol * scale


def test_round_op_backward_returns_input_dtype(device):
    x = minidl.tensor(np.array([1.0, 2.0, 3.0], np.float32), requires_grad=True, device=device)
    w = minidl.tensor(np.array([1 + 2.0 ** -9, 0.1, -7.0], np.float32), device=device)
    with amp.autocast(device, dtype="float16"):
        y = minidl.matmul(x.reshape(1, 3), w.reshape(3, 1))
    y.sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(x.grad), amp.round_to(to_numpy(w.data), "float16"))


@pytest.mark.parametrize("bad", ["int8", "float32", "nonsense", object()])
def test_autocast_rejects_unknown_dtype(bad):
    with pytest.raises(ValueError, match="dtype must be 'bfloat16' or 'float16'"):
        with amp.autocast("cpu", dtype=bad):
            pass
    with amp.autocast("cpu", dtype=np.float16):        # numpy's float16 and "fp16" are fine
        with amp.autocast("cpu", dtype="bf16"):
            assert amp.is_autocast_enabled()


# ---------------------------------------------------------------------- GradScaler
def param_with_grad(values, device):
    p = minidl.tensor(np.zeros(len(values), np.float32), requires_grad=True, device=device)
    p.grad = minidl.tensor(np.array(values, np.float32), device=device).data
    return p


def test_gradscaler_scales_unscales_and_steps(device):
    p = param_with_grad([2.0 ** 16, -2.0 ** 17], device)
    opt = optim.SGD([p], lr=1.0)
    scaler = amp.GradScaler(init_scale=2.0 ** 16)
    loss = minidl.tensor(np.float32(3.0), device=device)
    assert float(to_numpy(scaler.scale(loss).data)) == 3.0 * 2 ** 16
    scaler.step(opt)
    np.testing.assert_array_equal(to_numpy(p.data), [-1.0, 2.0])
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 16


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_gradscaler_skips_step_and_backs_off_on_inf(device, bad):
    p = param_with_grad([1.0, bad], device)
    opt = optim.SGD([p], lr=1.0)
    scaler = amp.GradScaler(init_scale=8.0, backoff_factor=0.25)
    assert scaler.step(opt) is None
    np.testing.assert_array_equal(to_numpy(p.data), [0.0, 0.0])
    scaler.update()
    assert scaler.get_scale() == 2.0


def test_gradscaler_grows_after_interval(device):
    scaler = amp.GradScaler(init_scale=4.0, growth_factor=3.0, growth_interval=3)
    scales = []
    for step in range(7):
        p = param_with_grad([1.0, np.inf if step == 4 else 2.0], device)
        scaler.step(optim.SGD([p], lr=0.1))
        scaler.update()
        scales.append(scaler.get_scale())
    # clean, clean, clean (grow), clean, inf (back off, tracker reset), clean, clean
    assert scales == [4.0, 4.0, 12.0, 12.0, 6.0, 6.0, 6.0]


def test_gradscaler_state_round_trip(tmp_path, device):
    scaler = amp.GradScaler(init_scale=32.0, growth_interval=5)
    for _ in range(2):
        scaler.step(optim.SGD([param_with_grad([1.0], device)], lr=0.1))
        scaler.update()
    minidl.save({"scaler": scaler.state_dict()}, tmp_path / "ckpt.npz")
    restored = amp.GradScaler()
    restored.load_state_dict(minidl.load(tmp_path / "ckpt.npz")["scaler"])
    assert restored.state_dict() == scaler.state_dict()
    assert restored.state_dict()["_growth_tracker"] == 2


def test_gradscaler_unscale_once_and_disabled_passthrough(device):
    p = param_with_grad([4.0], device)
    opt = optim.SGD([p], lr=1.0)
    scaler = amp.GradScaler(init_scale=4.0)
    scaler.unscale_(opt)
    np.testing.assert_array_equal(to_numpy(p.grad), [1.0])
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(opt)
    off = amp.GradScaler(enabled=False)
    loss = minidl.tensor(np.float32(2.0), device=device)
    assert off.scale(loss) is loss and off.get_scale() == 1.0 and off.state_dict() == {}
    off.step(opt)
    np.testing.assert_array_equal(to_numpy(p.data), [-1.0])


def test_gradscaler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="growth_factor > 1"):
        amp.GradScaler(growth_factor=0.5)
    with pytest.raises(TypeError, match="expects a Tensor"):
        amp.GradScaler().scale(3.0)

"""Modules: registration, state_dict round trips and their errors, train/eval, layers, init."""
import math

import numpy as np
import pytest

import minidl
from minidl import nn
from minidl.nn import init
from conftest import assert_close, to_numpy


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.act = nn.ReLU()
        self.scale = nn.Parameter(np.ones(3, np.float32))
        self.register_buffer("count", np.zeros(1, np.float32))
        self.note = "plain attribute"

    def forward(self, x):
        return self.act(self.fc(x)) * self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))

    def forward(self, x):
        return self.head(self.block(x))


def test_registration_and_names():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["block.scale", "block.fc.weight", "block.fc.bias", "head.0.weight", "head.0.bias"]
    assert [n for n, _ in net.named_buffers()] == ["block.count"]
    assert net.block.note == "plain attribute"
    assert net.num_parameters() == 3 + 12 + 3 + 6 + 2
    assert set(net.state_dict()) == set(names) | {"block.count"}


def test_shared_parameter_listed_once():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[1].weight = net[0].weight
    assert len(list(net.parameters())) == 3


def test_state_dict_round_trip_gives_identical_outputs():
    minidl.manual_seed(0)
    a, b = Net().eval(), Net().eval()
    x = minidl.randn(5, 4)
    assert not np.allclose(a(x).data, b(x).data)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a(x).data, b(x).data)
    # loaded arrays are copies: changing a afterwards leaves b alone
    a.block.fc.weight.data += 1
    assert not np.array_equal(a(x).data, b(x).data)


def test_load_state_dict_strict_errors_list_the_keys():
    net = Net()
    state = dict(net.state_dict())
    del state["head.0.bias"]
    state["head.1.weight"] = np.zeros(2)
    with pytest.raises(KeyError, match=r"missing \['head.0.bias'\], unexpected \['head.1.weight'\]"):
        net.load_state_dict(state)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == ["head.0.bias"] and unexpected == ["head.1.weight"]


def test_load_state_dict_shape_mismatch_names_the_key():
    net = Net()
    state = dict(net.state_dict())
    state["block.fc.weight"] = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"block.fc.weight: checkpoint \(5, 4\) vs model \(3, 4\)"):
        net.load_state_dict(state)


def test_train_eval_switches_every_submodule_and_dropout():
    net = Net()
    assert all(m.training for m in net.modules())
    net.eval()
    assert not any(m.training for m in net.modules())
    x = minidl.randn(50, 4)
    assert np.array_equal(net(x).data, net(x).data)          # dropout off: deterministic
    net.train()
    minidl.manual_seed(1)
    y1 = net(x).data
    assert not np.array_equal(y1, net(x).data)                # dropout on: masks differ


def test_zero_grad_and_backward_through_modules():
    net = Net().eval()
    net(minidl.randn(3, 4)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_module_to_device_moves_parameters_and_buffers(device):
    net = Net().to(device)
    assert net.device == device
    assert all(minidl.backend.device_of(b) == device for b in net.buffers())
    out = net.eval()(minidl.randn(2, 4, device=device))
    assert out.device == device


def test_double_casts_parameters():
    net = Net().double()
    assert all(p.dtype == np.float64 for p in net.parameters())


# ---------------------------------------------------------------------- layers
def test_activation_and_flatten_modules():
    x = minidl.tensor(np.linspace(-2, 2, 24).reshape(2, 3, 4).astype(np.float32))
    a = x.data
    assert_close(nn.ReLU()(x).data, np.maximum(a, 0))
    assert_close(nn.LeakyReLU(0.1)(x).data, np.where(a > 0, a, 0.1 * a))
    assert_close(nn.Sigmoid()(x).data, 1 / (1 + np.exp(-a)), rtol=1e-6)
    assert_close(nn.Tanh()(x).data, np.tanh(a), rtol=1e-6)
    assert_close(nn.Softmax(dim=1)(x).data.sum(axis=1), np.ones((2, 4)), rtol=1e-6)
    assert_close(np.exp(nn.LogSoftmax(dim=-1)(x).data).sum(axis=-1), np.ones((2, 3)), rtol=1e-6)
    assert nn.Identity(7, key="ignored")(x) is x
    assert nn.Flatten()(x).shape == (2, 12)
    assert nn.Flatten(0, 1)(x).shape == (6, 4)


def test_linear_layer_shapes_and_torch_init_bound():
    minidl.manual_seed(0)
    layer = nn.Linear(400, 300)
    w, b = layer.weight.data, layer.bias.data
    bound = 1 / math.sqrt(400)
    assert w.shape == (300, 400) and b.shape == (300,) and w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound      # the variance of U(-b, b)
    assert nn.Linear(5, 2, bias=False).bias is None
    assert layer(minidl.randn(7, 400)).shape == (7, 300)


# ---------------------------------------------------------------------- init
def test_fan_in_and_fan_out():
    assert init.calculate_fan_in_and_fan_out(minidl.empty(64, 32, 3, 3)) == (32 * 9, 64 * 9)
    assert init.calculate_fan_in_and_fan_out(minidl.empty(10, 20)) == (20, 10)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.calculate_fan_in_and_fan_out(minidl.empty(5))


def test_kaiming_normal_is_the_unet_init(device):
    # U-Net: std sqrt(2 / N), N = k * k * C_in (incoming connections of a neuron).
    minidl.manual_seed(0)
    w = minidl.empty(128, 64, 3, 3, device=device)
    out = init.kaiming_normal_(w)
    assert out is w and w.device == device
    values = to_numpy(w.data)
    target = math.sqrt(2 / (3 * 3 * 64))
    assert abs(values.std() - target) < 0.01 * target
    assert abs(values.mean()) < 0.01 * target
    fan_out = to_numpy(init.kaiming_normal_(w, mode="fan_out").data)
    assert abs(fan_out.std() - math.sqrt(2 / (3 * 3 * 128))) < 0.01 * math.sqrt(2 / (3 * 3 * 128))


@pytest.mark.parametrize("name, expected_std", [
    ("kaiming_uniform_", math.sqrt(2 / 500)),
    ("xavier_uniform_", math.sqrt(2 / (500 + 200))),
    ("xavier_normal_", math.sqrt(2 / (500 + 200))),
])
def test_variance_preserving_inits(name, expected_std):
    minidl.manual_seed(0)
    w = getattr(init, name)(minidl.empty(200, 500))
    assert abs(w.data.std() - expected_std) < 0.02 * expected_std


def test_simple_fills_and_seeding():
    minidl.manual_seed(0)
    w = minidl.empty(100, 100)
    init.uniform_(w, -2, 3)
    assert w.data.min() >= -2 and w.data.max() < 3 and abs(w.data.mean() - 0.5) < 0.05
    init.normal_(w, 1.0, 0.5)
    assert abs(w.data.mean() - 1.0) < 0.02 and abs(w.data.std() - 0.5) < 0.02
    assert np.all(init.zeros_(w).data == 0) and np.all(init.ones_(w).data == 1)
    assert np.all(init.constant_(w, 0.25).data == 0.25)
    minidl.manual_seed(5)
    first = init.normal_(minidl.empty(3, 3)).data.copy()
    minidl.manual_seed(5)
    assert np.array_equal(first, init.normal_(minidl.empty(3, 3)).data)
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))
    with pytest.raises(ValueError, match="does not know"):
        init.calculate_gain("swish")


def test_factories():
    assert minidl.zeros(2, 3).shape == (2, 3) and minidl.zeros((2, 3)).dtype == np.float32
    assert np.all(minidl.ones(4).data == 1)
    assert minidl.full((2,), 7).dtype == np.int64 and minidl.full((2,), 0.5).dtype == np.float32
    assert minidl.arange(5).dtype == np.int64 and minidl.arange(0, 1, 0.25).shape == (4,)
    t = minidl.randn(3, 4, dtype="float64", requires_grad=True)
    assert t.requires_grad and t.dtype == np.float64
    assert minidl.zeros_like(t).dtype == np.float64 and minidl.ones_like(t).shape == (3, 4)
    r = minidl.rand(1000)
    assert r.data.min() >= 0 and r.data.max() < 1
    k = minidl.randint(2, 5, size=(100,))
    assert k.data.min() >= 2 and k.data.max() < 5
    with pytest.raises(ValueError, match="non-negative integers"):
        minidl.zeros(2, -1)

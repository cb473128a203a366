"""Multi-tensor optimizers (minidl/optim/flat.py): the same steps as the per-parameter ones."""
import numpy as np
import pytest

import minidl
from minidl import functional as F, nn, optim
from conftest import to_numpy

PAIRS = {
    "sgd": (optim.SGD, optim.FlatSGD, dict(lr=0.1)),
    "sgd_momentum": (optim.SGD, optim.FlatSGD,
                     dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    "sgd_nesterov": (optim.SGD, optim.FlatSGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (optim.Adam, optim.FlatAdam, dict(lr=0.01, weight_decay=1e-3)),
    "adam_amsgrad": (optim.Adam, optim.FlatAdam, dict(lr=0.01, amsgrad=True)),
    "adamw": (optim.AdamW, optim.FlatAdamW, dict(lr=0.01)),
    # step counts on the device (minidl.optim.flat's _step_view)
    "adam_capturable": (optim.Adam, optim.FlatAdam, dict(lr=0.01, weight_decay=1e-3,
                                                         capturable=True)),
    "adamw_capturable_amsgrad": (optim.AdamW, optim.FlatAdamW, dict(lr=0.01, amsgrad=True,
                                                                    capturable=True)),
}


def model(device):
    minidl.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 3, 1)).to(device)


def data(device, seed):
    rng = np.random.default_rng(seed)
    return (minidl.tensor(rng.normal(size=(2, 2, 5, 5)).astype(np.float32), device=device),
            minidl.tensor(rng.integers(0, 3, size=(2, 5, 5)), device=device))


def groups(net):
    """Two groups with different learning rates: the flat update runs once per group."""
    params = list(net.parameters())
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}]


def run(net, opt, device, steps, drop=None):
    for step in range(steps):
        x, y = data(device, step)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        if drop is not None and step == 1:
            list(net.parameters())[drop].grad = None     # a parameter without a gradient
        opt.step()


def assert_same(a, b, device):
    for p, q in zip(a.parameters(), b.parameters()):
        if device == "cpu":     # the same arithmetic element by element: bit for bit
            np.testing.assert_array_equal(to_numpy(p.data), to_numpy(q.data))
        else:                   # the GPU's kernels may contract a * b + c into an FMA
            np.testing.assert_allclose(to_numpy(p.data), to_numpy(q.data), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_flat_optimizer_equals_per_parameter(device, name):
    per_cls, flat_cls, kwargs = PAIRS[name]
    a, b = model(device), model(device)
    run(a, per_cls(groups(a), **kwargs), device, steps=4, drop=1)
    run(b, flat_cls(groups(b), **kwargs), device, steps=4, drop=1)
    assert_same(a, b, device)


def test_parameters_and_gradients_are_views_of_one_buffer(device):
    net = model(device)
    opt = optim.FlatAdam(net.parameters(), lr=0.01)
    run(net, opt, device, steps=1)
    buf = opt.buffer
    assert buf.data.shape == (sum(p.data.size for p in net.parameters()),)
    # What an all-reduce would do: change the flat gradient in one call; every .grad sees it.
    buf.grad *= 2
    for i, p in enumerate(net.parameters()):
        np.testing.assert_array_equal(to_numpy(p.grad), to_numpy(buf.view(buf.grad, i)))
        np.testing.assert_array_equal(to_numpy(p.data), to_numpy(buf.view(buf.data, i)))
    p0 = next(iter(net.parameters()))
    p0.data[...] = 7
    assert float(to_numpy(buf.data[0])) == 7


@pytest.mark.parametrize("name", ["sgd_momentum", "adam_amsgrad", "adam_capturable"])
def test_state_dict_moves_between_flat_and_per_parameter(tmp_path, device, name):
    per_cls, flat_cls, kwargs = PAIRS[name]
    a, b = model(device), model(device)
    opt_a = per_cls(a.parameters(), **kwargs)
    run(a, opt_a, device, steps=2)
    # b continues from a's checkpoint with the flat optimizer, a without one.
    minidl.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "c.npz")
    ckpt = minidl.load(tmp_path / "c.npz")
    opt_b = flat_cls(b.parameters(), **kwargs)
    b.load_state_dict(ckpt["model"])       # replaces p.data: the flat optimizer re-adopts it
    opt_b.load_state_dict(ckpt["opt"])
    run(a, opt_a, device, steps=2)
    run(b, opt_b, device, steps=2)
    assert_same(a, b, device)
    # and back: the flat optimizer's state loads into a per-parameter one
    c = model(device)
    c.load_state_dict(b.state_dict())
    opt_c = per_cls(c.parameters(), **kwargs)
    opt_c.load_state_dict(opt_b.state_dict())
    run(b, opt_b, device, steps=1)
    run(c, opt_c, device, steps=1)
    assert_same(b, c, device)


def test_flat_optimizer_rejects_mixed_dtypes_and_late_groups():
    w = minidl.tensor(np.zeros(3, np.float32), requires_grad=True)
    v = minidl.tensor(np.zeros(3, np.float64), requires_grad=True)
    with pytest.raises(ValueError, match="one dtype and device"):
        optim.FlatSGD([w, v], lr=0.1)
    opt = optim.FlatSGD([w], lr=0.1)
    with pytest.raises(ValueError, match="pass every parameter group to the constructor"):
        opt.add_param_group({"params": [v]})
    w.data = np.zeros(4, np.float32)
    w.grad = np.ones(4, np.float32)
    with pytest.raises(RuntimeError, match="changed shape, dtype or device"):
        opt.step()

"""Optimizers: update formulas, a tiny fit with each, exact resume from state_dict, schedules."""
import math

import numpy as np
import pytest

import minidl
from minidl import functional as F, nn, optim
from minidl.optim import lr_scheduler
from conftest import assert_close, to_numpy


def two_blobs(seed=0, n=200):
    """Linearly separable 2-D points: class 1 around (+1.5, +1.5), class 0 around (-1.5, -1.5)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    x = rng.normal(size=(n, 2)) * 0.7 + np.where(y[:, None] == 1, 1.5, -1.5)
    return x.astype(np.float32), y


OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "sgd_nesterov": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: optim.Adam(p, lr=0.05),
    "adam_amsgrad": lambda p: optim.Adam(p, lr=0.05, amsgrad=True, weight_decay=1e-4),
    "adamw": lambda p: optim.AdamW(p, lr=0.05),
    "rmsprop": lambda p: optim.RMSprop(p, lr=0.01),
    "rmsprop_centered_momentum": lambda p: optim.RMSprop(p, lr=0.005, momentum=0.5, centered=True),
}


def mlp():
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))


def train(model, opt, x, y, steps, device="cpu", scheduler=None):
    xs, losses = minidl.tensor(x, device=device), []
    for _ in range(steps):
        loss = F.cross_entropy(model(xs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_fits_a_small_mlp(name, device):
    minidl.manual_seed(0)
    x, y = two_blobs()
    model = mlp().to(device)
    losses = train(model, OPTIMIZERS[name](model.parameters()), x, y, steps=60, device=device)
    # chance level is log 2 = 0.69; a separable problem must get well below it
    assert losses[-1] < 0.1, f"{name}: loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
    assert losses[-1] < losses[0]


def test_sgd_step_matches_torch_formula():
    p = minidl.tensor(np.array([1.0, -2.0]), requires_grad=True)
    opt = optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)
    w, buf = p.numpy(), None
    for g in (np.array([0.5, 1.0]), np.array([-1.0, 2.0]), np.array([0.25, 0.0])):
        p.grad = g.copy()
        opt.step()
        d = g + 0.01 * w
        buf = d.copy() if buf is None else 0.9 * buf + 0.8 * d
        w = w - 0.1 * buf
        assert_close(p.data, w, rtol=1e-12)


def test_nesterov_step_matches_formula_and_validation():
    p = minidl.tensor(np.array([1.0]), requires_grad=True)
    opt = optim.SGD([p], lr=0.5, momentum=0.9, nesterov=True)
    p.grad = np.array([2.0])
    opt.step()                       # buf = 2; step = g + 0.9 buf = 3.8
    p.grad = np.array([1.0])
    opt.step()                       # buf = 0.9 * 2 + 1 = 2.8; step = 1 + 2.52 = 3.52
    assert_close(p.data, [1.0 - 0.5 * 3.8 - 0.5 * 3.52], rtol=1e-12)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD([p], lr=0.1, nesterov=True)


@pytest.mark.parametrize("cls, decoupled", [(optim.Adam, False), (optim.AdamW, True)])
def test_adam_step_matches_formula(cls, decoupled):
    p = minidl.tensor(np.array([1.0, -1.0]), requires_grad=True)
    lr, b1, b2, eps, wd = 0.1, 0.8, 0.9, 1e-8, 0.05
    opt = cls([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    w, m, v = p.numpy(), 0.0, 0.0
    for t, g in enumerate((np.array([0.3, -0.6]), np.array([1.0, 0.2])), start=1):
        p.grad = g.copy()
        opt.step()
        if decoupled:
            w = w * (1 - lr * wd)
        else:
            g = g + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        assert_close(p.data, w, rtol=1e-12)


def test_rmsprop_step_matches_formula():
    p = minidl.tensor(np.array([0.5]), requires_grad=True)
    opt = optim.RMSprop([p], lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5, centered=True)
    w, s, c, buf = 0.5, 0.0, 0.0, 0.0
    for g in (2.0, -1.0, 0.5):
        p.grad = np.array([g])
        opt.step()
        s = 0.9 * s + 0.1 * g * g
        c = 0.9 * c + 0.1 * g
        buf = 0.5 * buf + g / (math.sqrt(s - c * c) + 1e-8)
        w = w - 0.01 * buf
        assert_close(p.data, [w], rtol=1e-10)


@pytest.mark.parametrize("name", ["sgd_momentum", "adam_amsgrad", "rmsprop_centered_momentum"])
def test_resume_from_state_dict_equals_uninterrupted(name, tmp_path):
    x, y = two_blobs(1)
    minidl.manual_seed(3)
    reference = mlp()
    start = {k: v.copy() for k, v in reference.state_dict().items()}
    opt = OPTIMIZERS[name](reference.parameters())
    sched = lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    train(reference, opt, x, y, steps=10, scheduler=sched)

    # The same run, stopped after 6 steps, saved to disk, and resumed in fresh objects.
    first = mlp()
    first.load_state_dict(start)
    opt1 = OPTIMIZERS[name](first.parameters())
    sched1 = lr_scheduler.StepLR(opt1, step_size=3, gamma=0.5)
    train(first, opt1, x, y, steps=6, scheduler=sched1)
    path = tmp_path / "ckpt.npz"
    minidl.save({"model": first.state_dict(), "optimizer": opt1.state_dict(),
                 "scheduler": sched1.state_dict(), "step": 6}, path)

    ckpt = minidl.load(path)
    resumed = mlp()
    resumed.load_state_dict(ckpt["model"])
    opt2 = OPTIMIZERS[name](resumed.parameters())
    opt2.load_state_dict(ckpt["optimizer"])
    sched2 = lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    sched2.load_state_dict(ckpt["scheduler"])
    assert ckpt["step"] == 6 and sched2.get_last_lr() == sched1.get_last_lr()
    train(resumed, opt2, x, y, steps=4, scheduler=sched2)

    for key, value in reference.state_dict().items():
        assert np.array_equal(value, resumed.state_dict()[key]), key


def test_optimizer_errors_and_param_groups():
    a = minidl.tensor(np.ones(2), requires_grad=True)
    b = minidl.tensor(np.ones(2), requires_grad=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        optim.SGD([{"params": [a]}, {"params": [a, b]}], lr=0.1)
    with pytest.raises(ValueError, match="does not require grad"):
        optim.SGD([minidl.tensor(np.ones(2))], lr=0.1)
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1)
    a.grad, b.grad = np.ones(2), np.ones(2)
    opt.step()
    assert_close(a.data, [0.9, 0.9])
    assert_close(b.data, [0.0, 0.0])
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    other = optim.SGD([a], lr=0.1)
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(opt.state_dict())


def test_step_updates_in_place_on_the_parameters_array(device):
    p = minidl.tensor(np.ones(3, np.float32), requires_grad=True, device=device)
    array = p.data
    opt = optim.Adam([p], lr=0.1)
    (p * p).sum().backward()
    opt.step()
    assert p.data is array and p.dtype == np.float32
    assert np.all(to_numpy(p.data) < 1)


# ---------------------------------------------------------------------- schedules
def schedule(make, steps=12, lr=0.1):
    p = minidl.tensor(np.ones(1), requires_grad=True)
    opt = optim.SGD([p], lr=lr)
    sched = make(opt)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr() == [lrs[-1]]
    return lrs


def test_step_lr():
    lrs = schedule(lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.5))
    assert lrs == pytest.approx([0.1 * 0.5 ** (e // 4) for e in range(13)])


def test_exponential_lr():
    lrs = schedule(lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9))
    assert lrs == pytest.approx([0.1 * 0.9 ** e for e in range(13)])


def test_poly_lr_is_deeplab_poly():
    lrs = schedule(lambda o: lr_scheduler.PolyLR(o, total_iters=10, power=0.9))
    assert lrs == pytest.approx([0.1 * (1 - min(e, 10) / 10) ** 0.9 for e in range(13)])
    assert lrs[10] == 0 and lrs[12] == 0


def test_scheduler_state_dict_round_trip():
    p = minidl.tensor(np.ones(1), requires_grad=True)
    opt = optim.SGD([p], lr=0.2)
    sched = lr_scheduler.PolyLR(opt, total_iters=20)
    for _ in range(5):
        sched.step()
    opt2 = optim.SGD([p], lr=0.2)
    sched2 = lr_scheduler.PolyLR(opt2, total_iters=20)
    sched2.load_state_dict(sched.state_dict())
    sched.step()
    sched2.step()
    assert sched2.last_epoch == 6 and sched2.get_last_lr() == sched.get_last_lr()

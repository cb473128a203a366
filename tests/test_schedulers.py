"""The schedules added for PyTorch users (CosineAnnealingLR, LinearLR, LambdaLR, OneCycleLR,
SequentialLR, ReduceLROnPlateau) against their documented formulas, step by step."""
import math

import numpy as np
import pytest

import minidl
from minidl import optim
from minidl.optim import lr_scheduler


def sgd(lr=0.1, momentum=0.0):
    p = minidl.tensor(np.ones(1), requires_grad=True)
    return optim.SGD([p], lr=lr, momentum=momentum)


def run(opt, sched, steps):
    """The rate before the first step and after each scheduler.step()."""
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr() == [lrs[-1]]
    return lrs


def test_cosine_annealing():
    opt = sgd(0.1)
    lrs = run(opt, lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=0.01), 8)
    assert lrs == pytest.approx([0.01 + 0.09 * (1 + math.cos(math.pi * e / 8)) / 2 for e in range(9)])
    assert lrs[-1] == pytest.approx(0.01)


def test_linear_lr():
    opt = sgd(0.1)
    lrs = run(opt, lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=4), 6)
    assert lrs == pytest.approx([0.1 * (0.25 + 0.75 * min(e, 4) / 4) for e in range(7)])


def test_lambda_lr_per_group():
    a, b = minidl.tensor(np.ones(1), requires_grad=True), minidl.tensor(np.ones(1), requires_grad=True)
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.1)
    sched = lr_scheduler.LambdaLR(opt, [lambda e: 0.5 ** e, lambda e: 1 / (e + 1)])
    for e in range(1, 4):
        sched.step()
        assert sched.get_last_lr() == pytest.approx([0.1 * 0.5 ** e, 1 / (e + 1)])
    assert "lr_lambdas" not in sched.state_dict()
    with pytest.raises(ValueError, match="one per group"):
        lr_scheduler.LambdaLR(opt, [lambda e: 1.0])


def np_one_cycle(step, total, max_lr, pct, div, final_div, three_phase, strategy="cos"):
    """torch.optim.lr_scheduler.OneCycleLR's documented phases for one step."""
    def anneal(start, end, f):
        if strategy == "cos":
            return end + (start - end) / 2 * (math.cos(math.pi * f) + 1)
        return (end - start) * f + start
    initial, minimum = max_lr / div, max_lr / div / final_div
    if three_phase:
        phases = [(pct * total - 1, initial, max_lr), (2 * pct * total - 2, max_lr, initial),
                  (total - 1, initial, minimum)]
    else:
        phases = [(pct * total - 1, initial, max_lr), (total - 1, max_lr, minimum)]
    start = 0
    for i, (end, a, b) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            return anneal(a, b, (step - start) / (end - start))
        start = end


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_one_cycle(three_phase, strategy):
    opt = sgd(0.5, momentum=0.9)
    total = 20
    sched = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=0.3,
                                    anneal_strategy=strategy, three_phase=three_phase)
    lrs = run(opt, sched, total - 1)
    expected = [np_one_cycle(s, total, 1.0, 0.3, 25.0, 1e4, three_phase, strategy) for s in range(total)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(1.0 / 25) and max(lrs) == pytest.approx(1.0, rel=1e-2)
    with pytest.raises(ValueError, match="beyond total_steps=20"):
        sched.step()


def test_one_cycle_moves_momentum_against_the_rate():
    opt = sgd(0.5, momentum=0.9)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=1.0, epochs=2, steps_per_epoch=5, pct_start=0.4)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.95)
    for _ in range(3):                     # step 3 = the peak (0.4 * 10 - 1)
        sched.step()
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.85)
    for _ in range(6):
        sched.step()
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="epochs and steps_per_epoch"):
        lr_scheduler.OneCycleLR(opt, max_lr=1.0)


def test_sequential_warm_up_then_cosine():
    opt = sgd(0.1)
    warm = lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
    cos = lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    sched = lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])
    lrs = run(opt, sched, 9)
    expected = [0.1 * (0.1 + 0.9 * e / 3) for e in range(3)]
    expected += [0.1 * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(7)]
    assert lrs == pytest.approx(expected)

    # Resuming from its state_dict continues the same schedule.
    opt2 = sgd(0.1)
    warm2 = lr_scheduler.LinearLR(opt2, start_factor=0.1, total_iters=3)
    cos2 = lr_scheduler.CosineAnnealingLR(opt2, T_max=6)
    sched2 = lr_scheduler.SequentialLR(opt2, [warm2, cos2], milestones=[3])
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[-1])
    with pytest.raises(ValueError, match="one milestone fewer"):
        lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3, 5])


def test_sequential_keeps_each_group_its_own_lambda():
    # Two groups with the same initial rate but different functions stay apart.
    a, b = minidl.tensor(np.ones(1), requires_grad=True), minidl.tensor(np.ones(1), requires_grad=True)
    opt = optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    first = lr_scheduler.LambdaLR(opt, [lambda e: 1.0, lambda e: 0.5])
    then = lr_scheduler.ExponentialLR(opt, gamma=0.5)
    sched = lr_scheduler.SequentialLR(opt, [first, then], milestones=[2])
    got = [sched.get_last_lr()]
    for _ in range(3):
        sched.step()
        got.append(sched.get_last_lr())
    np.testing.assert_allclose(got, [[0.1, 0.05], [0.1, 0.05], [0.1, 0.1], [0.05, 0.05]])


def test_reduce_on_plateau():
    opt = sgd(1.0)
    sched = lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1, cooldown=1,
                                           min_lr=0.2)
    # improvement, then bad, bad (> patience -> halve), cooldown step, bad, bad -> halve ...
    metrics = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    lrs = []
    for m in metrics:
        sched.step(m)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2]
    maxed = lr_scheduler.ReduceLROnPlateau(sgd(1.0), mode="max", patience=0)
    maxed.step(0.5)
    maxed.step(0.5 + 1e-9)                  # within the relative threshold: no improvement
    assert maxed.get_last_lr() == pytest.approx([0.1])
    with pytest.raises(ValueError, match="factor < 1"):
        lr_scheduler.ReduceLROnPlateau(opt, factor=2.0)

"""The GradScaler on the device (minidl/amp.py): its kernels against kernels/reference.py,
steps skipped on the device by the optimizers that can (parameters, moments and step counts
unchanged), the host-read fallback for the others, the same numbers on both paths, backoff
and growth, the state's format, and no host read inside scale/unscale_/step/update."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import kernels
import kernels.gpu as gpu
import kernels.reference as ref
import minidl
from minidl import amp, backend, cuda, nn, optim
from seg import acceleration
from conftest import to_numpy
from test_gpu_source import emu, host_lib  # noqa: F401  (the host emulation of kernels/gpu.py)

BAD = [np.inf, -np.inf, np.nan]


# ---------------------------------------------------------------------- the kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
@given(seed=st.integers(0, 2 ** 32 - 1), scale=st.sampled_from([2.0 ** 16, 3.0, 0.25]),
       bad=st.sampled_from([None] + BAD), flag=st.sampled_from([0.0, 1.0]))
def test_unscale_and_check_matches_reference(device, xp, dtype, in_place, seed, scale, bad,
                                             flag):
    """out = g * float32(1 / scale); the flag turns 1 on an inf/NaN and keeps an earlier 1."""
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(int(rng.integers(1, 40))) * 1e4).astype(dtype)
    if bad is not None:
        g[rng.integers(g.size)] = bad
    want, want_flag = np.empty_like(g), np.array(flag, np.float32)
    ref.unscale_and_check(g, want, np.array(scale, np.float32), want_flag)
    g_dev = xp.asarray(g.copy())
    out = g_dev if in_place else xp.empty_like(g_dev)
    got_flag = xp.asarray(np.array(flag, np.float32))
    kernels.for_array(g_dev).unscale_and_check(g_dev, out, xp.asarray(np.float32(scale)),
                                               got_flag)
    np.testing.assert_array_equal(to_numpy(out), want)
    assert float(to_numpy(got_flag)) == float(want_flag) == float(flag or bad is not None)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(want, g * np.float32(1 / np.float32(scale)).astype(dtype))


def _python_rule(scale, tracker, found, growth, backoff, interval):
    """The update rule written out in Python numbers (float32 like the arrays)."""
    if found:
        return np.float32(scale) * np.float32(backoff), 0
    if tracker + 1 >= interval:
        grown = np.float32(scale) * np.float32(growth)
        return (grown if np.isfinite(grown) else np.float32(scale)), 0
    return np.float32(scale), tracker + 1


@pytest.mark.parametrize("start", [4.0, 2.0 ** 127])      # 2^127 * 2 would be inf: kept
def test_update_scale_backs_off_and_grows_as_pytorch(device, xp, start):
    founds = [0, 0, 1, 0, 0, 0, 2, 0]          # 2: two optimizers' flags added
    scale, tracker = xp.asarray(np.float32(start)), xp.asarray(np.int32(0))
    r_scale, r_tracker = np.array(start, np.float32), np.array(0, np.int32)
    p_scale, p_tracker = start, 0
    for found in founds:
        flag = xp.asarray(np.float32(found))
        kernels.for_array(scale).update_scale(scale, tracker, flag, 2.0, 0.5, 3)
        ref.update_scale(r_scale, r_tracker, np.float32(found), 2.0, 0.5, 3)
        p_scale, p_tracker = _python_rule(p_scale, p_tracker, found, 2.0, 0.5, 3)
        assert float(to_numpy(scale)) == float(r_scale) == float(p_scale)
        assert int(to_numpy(tracker)) == int(r_tracker) == p_tracker
    assert to_numpy(scale).dtype == np.float32 and to_numpy(tracker).dtype == np.int32


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("bad", BAD)
def test_update_kernels_skip_on_the_flag_and_step_without_it(device, xp, amsgrad, bad):
    """Adam's and SGD's update kernels: with the flag set nothing changes (even with NaN in
    the gradient); with it clear they take the reference's step."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(23).astype(np.float32)
    g = rng.standard_normal(23).astype(np.float32)
    g_bad = g.copy()
    g_bad[5] = bad
    adam = (amsgrad, 0.9, 0.999, 1e-2 / (1 - 0.9 ** 2), np.sqrt(1 - 0.999 ** 2), 1e-8, 0.01)
    sgd = (False, 0.1, 0.9, 0.0, 1e-3, True)
    for found, grad in ((1.0, g_bad), (0.0, g)):
        flag = xp.asarray(np.float32(found))
        state = [p0.copy(), np.abs(p0), np.abs(p0) + 1, np.abs(p0) + 2]    # p, m, v, v_max
        mine = [xp.asarray(a) for a in state]
        bundle = kernels.for_array(mine[0])
        bundle.adam_update(mine[0], xp.asarray(grad), *mine[1:], *adam, found_inf=flag)
        if not found:
            ref.adam_update(state[0], grad, *state[1:], *adam)
        for a, b in zip(mine, state):
            np.testing.assert_allclose(to_numpy(a), b, rtol=1e-6, atol=1e-7)
        sgd_state = [p0.copy(), np.abs(p0)]
        sgd_mine = [xp.asarray(a) for a in sgd_state]
        bundle.sgd_update(sgd_mine[0], xp.asarray(grad), sgd_mine[1], *sgd, found_inf=flag)
        if not found:
            ref.sgd_update(sgd_state[0], grad, sgd_state[1], *sgd)
        for a, b in zip(sgd_mine, sgd_state):
            np.testing.assert_allclose(to_numpy(a), b, rtol=1e-6, atol=1e-7)


def test_reference_skips_without_reading_the_flag():
    """The reference (which capturable Adam runs on the GPU) decides by array operations: a
    flag that refuses to become a Python bool still works."""
    class NoBool(np.ndarray):
        def __bool__(self):
            raise AssertionError("the flag was read as a Python bool")

    bad, clean = np.array([1, 2, np.inf, 4], np.float32), np.ones(4, np.float32)
    for found, g, expected in ((1.0, bad, 1.0), (0.0, clean, 0.5)):
        p = np.ones(4, np.float32)
        ref.sgd_update(p, g, None, True, 0.5, 0.0, 0.0, 0.0, False,
                       found_inf=np.array(found, np.float32).view(NoBool))
        np.testing.assert_array_equal(p, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_scaling_kernels_emulated_match_reference(emu, dtype):  # noqa: F811
    """The CUDA source itself (host-compiled, threads in shuffled order): unscale/check and
    the scale update against the reference, and one launch each."""
    g = np.array([1.5, -3e4, 7.0, np.inf, 2.0], dtype)
    for bad in (False, True):
        x = g if bad else np.nan_to_num(g, posinf=1.0)
        out, flag = np.empty_like(x), np.zeros((), np.float32)
        want, want_flag = np.empty_like(x), np.zeros((), np.float32)
        gpu.unscale_and_check(x, out, np.array(3.0, np.float32), flag)
        ref.unscale_and_check(x, want, np.array(3.0, np.float32), want_flag)
        np.testing.assert_array_equal(out, want)
        assert float(flag) == float(want_flag) == float(bad)
    scale, tracker = np.array(8.0, np.float32), np.array(1, np.int32)
    gpu.update_scale(scale, tracker, np.array(0, np.float32), 2.0, 0.5, 2)
    assert (float(scale), int(tracker)) == (16.0, 0)
    gpu.update_scale(scale, tracker, np.array(1, np.float32), 2.0, 0.5, 2)
    assert (float(scale), int(tracker)) == (8.0, 0)
    assert [n for n, _ in emu.launches] == (["unscale_check_kernel"] * 2
                                            + ["update_scale_kernel"] * 2)
    with pytest.raises(TypeError, match="growth_tracker must be a int32 array"):
        gpu.update_scale(scale, np.array(1, np.int64), np.array(0, np.float32), 2.0, 0.5, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_kernel_at_a_device_step_count_emulated(emu, dtype):  # noqa: F811
    """capturable Adam's kernel computes the bias corrections from the step count in device
    memory: the numbers of the kernel that takes them as arguments, and of the reference."""
    rng = np.random.default_rng(3)
    p0, g = rng.standard_normal(29).astype(dtype), rng.standard_normal(29).astype(dtype)
    hyper = (True, 0.9, 0.999)
    results = []
    for call, coef in ((gpu.adam_update, (1e-2 / (1 - 0.9 ** 3), np.sqrt(1 - 0.999 ** 3))),
                       (gpu.adam_update_at_step, (1e-2, np.array(3.0))),
                       (ref.adam_update_at_step, (1e-2, np.array(3.0)))):
        state = [p0.copy()] + [np.abs(p0) for _ in range(3)]
        call(state[0], g, *state[1:], *hyper, *coef, 1e-8, 0.01, found_inf=np.zeros((), np.float32))
        results.append(state)
    for kernel, at_step, reference in zip(*results):
        np.testing.assert_allclose(at_step, kernel, rtol=1e-7 if dtype == np.float32 else 1e-15)
        np.testing.assert_allclose(at_step, reference, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert [n for n, _ in emu.launches] == ["adam_update_kernel", "adam_update_at_step_kernel"]


# ---------------------------------------------------------------------- the optimizers
# name -> (factory, skips on the device, has a step count)
OPTIMIZERS = {
    "SGD": (lambda ps: optim.SGD(ps, lr=0.1), True, False),
    "SGD momentum": (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
                     True, False),
    "FlatSGD nesterov": (lambda ps: optim.FlatSGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                         True, True),
    "Adam capturable": (lambda ps: optim.Adam(ps, lr=0.01, capturable=True), True, True),
    "AdamW capturable amsgrad": (lambda ps: optim.AdamW(ps, lr=0.01, amsgrad=True, capturable=True),
                                 True, True),
    "FlatAdam capturable": (lambda ps: optim.FlatAdam(ps, lr=0.01, weight_decay=0.01,
                                                      capturable=True), True, True),
    "FlatAdamW capturable amsgrad": (lambda ps: optim.FlatAdamW(ps, lr=0.01, amsgrad=True,
                                                                capturable=True), True, True),
    # The fallback: one host read per step decides.
    "Adam": (lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.01), False, True),
    "SGD dampening": (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.5), False, False),
    "FlatAdam": (lambda ps: optim.FlatAdam(ps, lr=0.01), False, True),
    "FlatAdamW": (lambda ps: optim.FlatAdamW(ps, lr=0.01), False, True),
}


def _net(device):
    minidl.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).to(device)


def _train(device, name, bad_steps, steps=6, host_path=False, monkeypatch=None):
    """`steps` steps of a scaled loss with injected inf/NaN gradients at bad_steps; returns
    (net, optimizer, scaler, per-step snapshots of parameters and optimizer state)."""
    net = _net(device)
    opt = OPTIMIZERS[name][0](list(net.parameters()))
    if host_path:
        monkeypatch.setattr(type(opt), "supports_found_inf", property(lambda self: False))
    scaler = amp.GradScaler(init_scale=2.0 ** 8, growth_interval=2)
    rng = np.random.default_rng(0)
    x = minidl.tensor(rng.standard_normal((2, 2, 4, 4)).astype(np.float32), device=device)
    snapshots = []
    for step in range(steps):
        opt.zero_grad()
        loss = (net(x) ** 2).mean()
        scaler.scale(loss).backward()
        if step in bad_steps:
            p = next(net.parameters())
            with np.errstate(invalid="ignore"):        # 0 * inf
                p.grad = p.grad * backend.get_array_module(p.grad).asarray(
                    np.float32(BAD[step % len(BAD)]))
        scaler.step(opt)
        scaler.update()
        snapshots.append(_snapshot(net, opt))
    return net, opt, scaler, snapshots


def _snapshot(net, opt):
    params = [to_numpy(p.data).copy() for p in net.parameters()]
    state = [{k: to_numpy(v).copy() if hasattr(v, "shape") else v for k, v in s.items()}
             for s in opt.state.values()]
    return params, state


def _assert_same(a, b, exact=True, ignore=()):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in set(x) - set(ignore):
            if exact or k == "step":
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            else:
                np.testing.assert_allclose(x[k], y[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_skipped_step_changes_nothing(device, name):
    """Steps 2 and 3 get an inf and a NaN gradient: parameters, moments and step counts stay
    as after step 1; the clean steps around them train."""
    _, opt, scaler, snaps = _train(device, name, bad_steps={2, 3})
    assert opt.supports_found_inf == OPTIMIZERS[name][1]
    # FlatSGD's count only tells its first step apart and counts the steps tried.
    ignore = ("step",) if "FlatSGD" in name else ()
    _assert_same(snaps[1], snaps[2], ignore=ignore)
    _assert_same(snaps[1], snaps[3], ignore=ignore)
    assert not np.array_equal(snaps[3][0][0], snaps[4][0][0])
    if OPTIMIZERS[name][2] and "FlatSGD" not in name:
        # 6 steps tried, 2 skipped (FlatSGD counts the steps tried: SGD's state has none).
        assert all(int(s["step"]) == 4 for s in snaps[-1][1])
    # 2^8, clean (tracker 1), grow to 2^9, inf: 2^8, NaN: 2^7, clean, grow to 2^8
    assert scaler.get_scale() == 2.0 ** 8
    assert opt.found_inf is None            # set only while scaler.step runs the step


@pytest.mark.parametrize("name", [n for n, (_, device_skip, _) in OPTIMIZERS.items()
                                  if device_skip])
def test_device_and_host_paths_take_the_same_steps(device, name, monkeypatch):
    _, _, on_device, device_snaps = _train(device, name, bad_steps={1, 4})
    _, _, on_host, host_snaps = _train(device, name, bad_steps={1, 4}, host_path=True,
                                       monkeypatch=monkeypatch)
    # SGD's device path is the fused kernel, its host path array operations: on a GPU the
    # kernel may contract a multiply-add (one rounding less); on the CPU they are the same.
    exact = device == "cpu" or not name.startswith("SGD")
    ignore = ("step",) if "FlatSGD" in name else ()       # it counts the steps tried
    for a, b in zip(device_snaps, host_snaps):
        _assert_same(a, b, exact=exact, ignore=ignore)
    assert on_device.state_dict() == on_host.state_dict()


def test_adam_state_loads_across_capturable_and_skips_after(device):
    """A plain Adam's state (step as a number) continues under capturable Adam and a
    GradScaler: a skipped step leaves the (now device) step count as loaded."""
    net = _net(device)
    plain = optim.Adam(net.parameters(), lr=0.01)
    for p in net.parameters():
        p.grad = p.data * 0 + 1
    plain.step()
    opt = optim.Adam(net.parameters(), lr=0.01, capturable=True)
    opt.load_state_dict(plain.state_dict())
    scaler = amp.GradScaler()
    for p in net.parameters():
        p.grad = p.data * 0 + np.float32(np.nan)
    before = _snapshot(net, opt)
    scaler.step(opt)
    scaler.update()
    opt.step()     # without the scaler the NaN gradient is stepped: the step count moves on
    assert all(int(to_numpy(s["step"])) == 2 for s in opt.state.values())
    assert all(int(s["step"]) == 1 for s in before[1])


# ---------------------------------------------------------------------- state and host reads
OLD_STATE = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.25,
             "growth_interval": 3, "_growth_tracker": 2}      # what the host-side scaler saved


@pytest.mark.parametrize("initialised", [False, True])
def test_old_state_dict_loads_and_round_trips(device, initialised, tmp_path):
    scaler = amp.GradScaler(init_scale=8.0)
    p = minidl.tensor(np.zeros(2, np.float32), requires_grad=True, device=device)
    opt = optim.SGD([p], lr=0.1)
    if initialised:
        scaler.scale(minidl.tensor(np.float32(1), device=device))
        arrays = scaler._scale, scaler._growth_tracker
    scaler.load_state_dict(OLD_STATE)
    assert scaler.state_dict() == OLD_STATE and scaler.get_scale() == 1024.0
    if initialised:      # loaded in place: a captured CUDA graph keeps seeing these arrays
        assert scaler._scale is arrays[0] and scaler._growth_tracker is arrays[1]
    p.grad = minidl.tensor(np.ones(2, np.float32), device=device).data
    scaler.step(opt)
    scaler.update()      # the third clean step in a row: grows
    assert scaler.get_scale() == 2048.0 and scaler.state_dict()["_growth_tracker"] == 0
    minidl.save({"scaler": scaler.state_dict()}, tmp_path / "ckpt.npz")
    back = amp.GradScaler()
    back.load_state_dict(minidl.load(tmp_path / "ckpt.npz")["scaler"])
    assert back.state_dict() == scaler.state_dict()
    assert all(type(v) in (int, float) for v in back.state_dict().values())


class _HostReads:
    """Counts the GradScaler's host reads (amp._to_host) and, with the fake CuPy of the
    GPU emulation, every read of a device array's values."""

    METHODS = ("get", "item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch, xp):
        self.count = 0            # the scaler's reads (amp._to_host)
        self.array_reads = 0      # reads of fake device arrays' values
        original = amp._to_host

        def counted(a):
            self.count += 1
            return original(a)
        monkeypatch.setattr(amp, "_to_host", counted)
        if str(getattr(xp, "__version__", "")).startswith("fake"):
            cls = xp.ndarray
            for name in self.METHODS:
                monkeypatch.setattr(cls, name, self._counting(getattr(cls, name)))

    def _counting(self, method):
        def call(*args, **kwargs):
            self.array_reads += 1
            return method(*args, **kwargs)
        return call


@pytest.mark.parametrize("name,reads", [("Adam capturable", 0), ("FlatSGD nesterov", 0),
                                        ("SGD momentum", 0), ("FlatAdamW capturable amsgrad", 0),
                                        ("FlatAdam", 1)])
def test_no_host_read_inside_scale_unscale_step_update(device, xp, monkeypatch, name, reads):
    net = _net(device)
    opt = OPTIMIZERS[name][0](list(net.parameters()))
    scaler = amp.GradScaler(growth_interval=1)
    x = minidl.tensor(np.ones((1, 2, 4, 4), np.float32), device=device)
    fake = str(getattr(xp, "__version__", "")).startswith("fake")
    for step in range(3):
        opt.zero_grad()
        loss = (net(x) ** 2).mean()
        counter = _HostReads(monkeypatch, xp)
        scaled = scaler.scale(loss)
        monkeypatch.undo()
        assert counter.count == counter.array_reads == 0
        scaled.backward()
        if step == 1:
            p = next(net.parameters())
            with np.errstate(invalid="ignore"):        # 0 * inf
                p.grad = p.grad * xp.asarray(np.float32(np.inf))
        counter = _HostReads(monkeypatch, xp)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        monkeypatch.undo()
        # The fallback's one read is the flag's .get() (on the GPU; on the CPU no copy).
        assert counter.count == reads, f"step {step}: {counter.count} host reads"
        assert counter.array_reads == (reads if fake else 0)
    assert scaler.get_scale() == 2.0 ** 16 * 2 * 0.5 * 2      # grow, back off, grow


@pytest.mark.parametrize("cls", [optim.Adam, optim.FlatAdam])
def test_a_scaled_step_keeps_no_changing_python_number(device, cls):
    """make_graphed_step's eager check (minidl.cuda.host_state_changes) accepts a step with
    a GradScaler and capturable Adam: nothing the replay would freeze lives in Python."""
    net = _net(device)
    opt = cls(net.parameters(), lr=0.01, capturable=True)
    scaler = amp.GradScaler(growth_interval=1)
    x = minidl.tensor(np.ones((1, 2, 4, 4), np.float32), device=device)

    def step(x):
        opt.zero_grad()
        scaler.scale((net(x) ** 2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    step(x)
    _, reasons = cuda.host_state_changes(step, (x,), opt)
    assert reasons == []
    assert scaler.get_scale() == 2.0 ** 18      # grew on the device at each clean step


# ---------------------------------------------------------------------- --amp fp16 --cuda-graph
def test_graphed_steps_take_fp16_with_an_optimizer_that_skips_on_the_device(device):
    net = _net(device)
    lines = []
    ok = acceleration.GraphedSteps(net, None, optim.Adam(net.parameters(), capturable=True),
                                   "gpu", scaler=amp.GradScaler(), log=lines.append)
    assert ok.reason is None and lines == []
    refused = acceleration.GraphedSteps(net, None, optim.FlatAdam(net.parameters()), "gpu",
                                        scaler=amp.GradScaler(), log=lines.append)
    assert "FlatAdam" in refused.reason and "--amp bf16" in lines[0]


def test_graphed_steps_eager_fallback_uses_the_scaler(device):
    """Where no graph is used the eager step still goes through the GradScaler (it did not:
    an fp16 run with --cuda-graph trained without loss scaling)."""
    net = _net(device)
    scaler = amp.GradScaler(init_scale=4.0, growth_interval=1)
    steps = acceleration.GraphedSteps(net, lambda out, y: (out ** 2).mean(),
                                      optim.SGD(net.parameters(), lr=0.1), "cpu", scaler=scaler,
                                      log=lambda line: None)
    x = minidl.tensor(np.ones((1, 2, 4, 4), np.float32), device=device)
    steps(x, None)
    assert steps.reason is not None and scaler.get_scale() == 8.0


def test_flat_adam_capturable_is_one_choice_for_all_groups(device):
    net = _net(device)
    params = list(net.parameters())
    with pytest.raises(ValueError, match="capturable applies to all parameters"):
        optim.FlatAdam([{"params": params[:2]}, {"params": params[2:], "capturable": True}])
    # A plain FlatAdam's state (numbers for step counts) loads; the counts move to the device.
    plain = optim.FlatAdam(params, lr=0.01)
    for p in params:
        p.grad = p.data * 0 + 1
    plain.step()
    opt = optim.FlatAdam(params, lr=0.01, capturable=True)
    opt.load_state_dict(plain.state_dict())
    assert opt.supports_found_inf and opt.param_groups[0]["capturable"] is True
    assert backend.device_of(opt.device_steps) == device
    np.testing.assert_array_equal(to_numpy(opt.device_steps), np.ones(len(params)))
    plain.load_state_dict(opt.state_dict())             # and back: numbers again
    assert all(type(s["step"]) is int for s in plain.state.values())
    assert plain.param_groups[0]["capturable"] is False and not plain.supports_found_inf

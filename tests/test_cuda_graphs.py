"""CUDA graphs (minidl/cuda.py): the host-side checks everywhere; capture and replay on a GPU
or its host emulation (-p fake_cupy: a host read refused while capturing, replays that train
as eager steps do); replay bit for bit equal to eager only on a real GPU."""
import numpy as np
import pytest

import minidl
from minidl import backend, cuda, functional as F, nn, optim
from conftest import GPU_PRESENT, to_numpy


def net(dropout=False):
    minidl.manual_seed(5)
    layers = [nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers, nn.Conv2d(4, 3, 1))


def batches(device, n):
    rng = np.random.default_rng(0)
    return [(minidl.tensor(rng.normal(size=(2, 2, 6, 6)).astype(np.float32), device=device),
             minidl.tensor(rng.integers(0, 3, size=(2, 6, 6)), device=device))
            for _ in range(n)]


def make_step(model, opt):
    def step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def test_check_batch_names_the_changed_shape():
    spec = [((4, 3), np.dtype(np.float32))]
    cuda.check_batch(spec, (np.zeros((4, 3), np.float32),))
    with pytest.raises(ValueError, match=r"input 0 has shape \(3, 3\).*captured for \(4, 3\)"):
        cuda.check_batch(spec, (np.zeros((3, 3), np.float32),))
    with pytest.raises(ValueError, match="captured for 1 inputs, got 2"):
        cuda.check_batch(spec, (np.zeros((4, 3)), np.zeros(1)))


def test_host_state_checks(device):
    (x, y), = batches(device, 1)
    model = net().to(device)
    sgd = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, reasons = cuda.host_state_changes(make_step(model, sgd), (x, y), sgd)
    assert reasons == []
    adam = optim.Adam(model.parameters(), lr=0.1)
    step = make_step(model, adam)
    step(x, y)      # Adam's step count changes on every step, from the first on
    _, reasons = cuda.host_state_changes(step, (x, y), adam)
    assert len(reasons) == 1 and "'step'" in reasons[0] and "bias correction" in reasons[0]
    # Dropout's masks are graph-safe (a device-side Philox offset on the GPU; marked on the
    # CPU), so a step with dropout passes; noise drawn from the host generator does not.
    dropped = net(dropout=True).to(device)
    opt = optim.SGD(dropped.parameters(), lr=0.1)
    _, reasons = cuda.host_state_changes(make_step(dropped, opt), (x, y), opt)
    assert reasons == []

    def noisy(x, y):
        return make_step(dropped, opt)(x + minidl.randn(*x.shape, device=device), y)
    _, reasons = cuda.host_state_changes(noisy, (x, y), opt)
    assert len(reasons) == 1 and "random numbers" in reasons[0] and "host-side" in reasons[0]


def test_cpu_inputs_are_refused_or_run_eagerly():
    (x, y), = batches("cpu", 1)
    model = net()
    opt = optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(cuda.CaptureError, match="every input on the GPU"):
        cuda.make_graphed_step(make_step(model, opt), (x, y))
    with pytest.warns(RuntimeWarning, match="CUDA graph not used"):
        step = cuda.make_graphed_step(make_step(model, opt), (x, y), fallback=True)
    assert not step.graphed and "on the GPU" in step.reason
    before = to_numpy(model[0].weight.data).copy()
    loss = step(x, y)
    assert np.isfinite(float(to_numpy(loss.data)))
    assert not np.array_equal(before, to_numpy(model[0].weight.data))


def graphed_and_eager(n_batches):
    """Two copies of net() trained with SGD on the same batches: one through a graphed step
    (two eager warm-up steps on the first batch, the capture, then one replay per later
    batch), one eagerly on the same sequence. Returns ((graphed model, its losses), (eager
    model, its losses after the warm-up), the graphed step)."""
    data = batches("gpu", n_batches)
    graphed, eager = net().to("gpu"), net().to("gpu")
    opt_g = optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt_e = optim.SGD(eager.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    step_g = cuda.make_graphed_step(make_step(graphed, opt_g), data[0], optimizer=opt_g,
                                    warmup=2)
    assert step_g.graphed
    losses_g = [float(to_numpy(step_g(*b).data)) for b in data[1:]]
    step_e = make_step(eager, opt_e)
    losses_e = [float(to_numpy(step_e(*b).data)) for b in [data[0], data[0]] + data[1:]]
    return (graphed, losses_g), (eager, losses_e[2:]), step_g


def _real_cupy():
    return GPU_PRESENT and not str(backend.require_cupy().__version__).startswith("fake")


@pytest.mark.skipif(not _real_cupy(), reason="needs CuPy and a CUDA device (the host "
                    "emulation of CuPy cannot capture graphs)")
def test_replay_equals_eager_bit_for_bit():
    (graphed, losses_g), (eager, losses_e), step_g = graphed_and_eager(6)
    assert losses_g == losses_e
    for p, q in zip(graphed.parameters(), eager.parameters()):
        np.testing.assert_array_equal(to_numpy(p.data), to_numpy(q.data))
    with pytest.raises(ValueError, match="static shapes"):
        step_g(*(a[:1] for a in step_g.static))


@pytest.mark.skipif(not GPU_PRESENT, reason="needs CuPy and a CUDA device, or the host "
                    "emulation of CuPy (-p fake_cupy)")
def test_host_read_inside_the_step_is_refused():
    (x, y), = batches("gpu", 1)
    model = net().to("gpu")
    opt = optim.SGD(model.parameters(), lr=0.1)
    step = make_step(model, opt)

    def reading(x, y):
        return float(to_numpy(step(x, y).data))      # a host read: waits for the GPU
    with pytest.raises(cuda.CaptureError, match="host read"):
        cuda.make_graphed_step(reading, (x, y), optimizer=opt)
    with pytest.warns(RuntimeWarning, match="CUDA graph not used: the step failed while "
                      "being captured"):
        eager = cuda.make_graphed_step(reading, (x, y), optimizer=opt, fallback=True)
    assert not eager.graphed and "host read" in eager.reason and "\n" not in eager.reason
    assert np.isfinite(eager(x, y))
    # The failed capture was ended: the stream is usable, and a clean step captures after it.
    assert cuda.make_graphed_step(step, (x, y), optimizer=opt).graphed


@pytest.mark.skipif(not GPU_PRESENT, reason="needs CuPy and a CUDA device, or the host "
                    "emulation of CuPy (-p fake_cupy)")
def test_replay_trains_as_eager_and_refuses_other_shapes():
    (graphed, losses_g), (eager, losses_e), step_g = graphed_and_eager(5)
    assert step_g.reason is None
    np.testing.assert_allclose(losses_g, losses_e, rtol=1e-5)
    for p, q in zip(graphed.parameters(), eager.parameters()):
        np.testing.assert_allclose(to_numpy(p.data), to_numpy(q.data), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="static shapes"):
        step_g(*(a[:1] for a in step_g.static))

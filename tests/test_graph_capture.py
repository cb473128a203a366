"""Training steps a CUDA graph can capture: no device-to-host read inside them.

On a GPU (CuPy and a device, or the host emulation: `pytest -p fake_cupy`) the steps are
captured and replayed through minidl.cuda / seg's --cuda-graph. The emulation also counts
the reads (tests/fake_cupy.py: count_host_reads, assert_no_host_reads) and imitates CUDA's
refusal of a read while a stream captures; the tests marked FAKE_ONLY need it. On the CPU
the deferred device checks keep their immediate NumPy form, tested here too.
"""
import sys

import numpy as np
import pytest

import minidl
from minidl import amp, backend, cuda, device_checks, optim
from minidl import functional as F
from conftest import GPU_PRESENT, to_numpy
from seg import losses
from seg.acceleration import GraphedSteps
from seg.models.unet import UNet
from seg.train import Trainer
from test_train import loaders

FAKE = "fake_cupy" in sys.modules
FAKE_ONLY = pytest.mark.skipif(not FAKE, reason="counts host reads with the host emulation of "
                               "CuPy (PYTHONPATH=tests pytest -p fake_cupy)")
GPU_ONLY = pytest.mark.skipif(not GPU_PRESENT, reason="captures CUDA graphs: needs CuPy and a "
                              "device, or the host emulation (-p fake_cupy)")


def unet(batch_norm=True):
    minidl.manual_seed(0)
    return UNet(2, 1, depth=2, features_root=4, padding="same", batch_norm=batch_norm).to("gpu")


def batch(seed=0, labels=2):
    rng = np.random.default_rng(seed)
    x = minidl.tensor(rng.normal(size=(2, 1, 16, 16)).astype(np.float32), device="gpu")
    y = rng.integers(0, labels, size=(2, 16, 16))
    return x, backend.to_device(y, "gpu"), y


def assert_graphed_trains_as_eager(trainer):
    """trainer(out, cuda_graph) -> a seg Trainer: two epochs with --cuda-graph really graph and
    give the eager run's history."""
    eager = trainer("eager", False).fit(2)
    graph = trainer("graph", True)
    graphed = graph.fit(2)
    assert graph.graph.reason is None and graph.graph.graphed.graphed
    for key in ("train_loss", "val_loss", "val_dice"):
        np.testing.assert_allclose([r[key] for r in graphed.history],
                                   [r[key] for r in eager.history], rtol=1e-5, err_msg=key)


OPTIMIZERS = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: optim.Adam(ps, lr=1e-2, capturable=True),
    "adamw": lambda ps: optim.AdamW(ps, lr=1e-2, capturable=True),
}


# ------------------------------------------------------------------- the emulation itself
@FAKE_ONLY
def test_emulated_capture_refuses_every_kind_of_host_read():
    import fake_cupy
    cp = backend.require_cupy()
    a = cp.arange(6, dtype=cp.float32).reshape(2, 3)
    i = cp.arange(3)
    reads = {"get": lambda: a.get(), "item": lambda: a[0, 1].item(), "tolist": a.tolist,
             "int": lambda: int(a[0, 0]), "float": lambda: float(a.sum()),
             "bool": lambda: bool((a > 3).any()), "index": lambda: list(range(10))[i[1]],
             "numpy.asarray": lambda: np.asarray(a), "numpy.array": lambda: np.array(a),
             "cupy.asnumpy": lambda: cp.asnumpy(a), "print": lambda: str(a),
             "repr": lambda: repr(a), "format": lambda: f"{a[0, 0]:.3f}"}
    for name, read in reads.items():
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            a += 1                                   # recorded, not run: undone at the end
            with pytest.raises(fake_cupy.CUDARuntimeError,
                               match="cudaErrorStreamCaptureUnsupported: operation not "
                                     "permitted when stream is capturing"):
                read()
            with pytest.raises(RuntimeError, match="invalidated"):
                stream.is_capturing()
            with pytest.raises(fake_cupy.CUDARuntimeError,
                               match="cudaErrorStreamCaptureInvalidated"):
                stream.end_capture()
        assert not stream.is_capturing(), name
        np.testing.assert_array_equal(a.get(), np.arange(6).reshape(2, 3), err_msg=name)
    with fake_cupy.count_host_reads() as counted:
        for read in reads.values():
            read()
    assert len(counted) == len(reads)
    assert all("test_graph_capture.py" in where for where in counted.where)


@FAKE_ONLY
def test_emulated_replay_reruns_the_step_and_rewrites_the_outputs():
    cp = backend.require_cupy()
    x = cp.ones(3, dtype=cp.float32)
    total = cp.zeros(3, dtype=cp.float32)

    def step(x):
        total[...] += x
        return total * 2
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        out = step(x)
        graph = stream.end_capture()
    assert total.get().tolist() == [0, 0, 0]         # a capture runs nothing
    graph.set_python_replay(step, (x,), out)
    graph.launch(stream)
    graph.launch(stream)
    assert total.get().tolist() == [2, 2, 2] and out.get().tolist() == [4, 4, 4]


# ------------------------------------------------------------ steps with no host read
STEPS = [("ce", True, "sgd", None), ("ce", False, "sgd", None), ("weighted_ce", True, "sgd", None),
         ("dice", True, "adam", None), ("ce_dice", True, "adam", None),
         ("ce_dice", False, "adamw", None), ("ce", True, "adam", "bfloat16")]


@FAKE_ONLY
@pytest.mark.parametrize("loss,batch_norm,opt,autocast", STEPS)
def test_training_steps_make_no_host_reads(loss, batch_norm, opt, autocast):
    import fake_cupy
    model = unet(batch_norm)
    optimizer = OPTIMIZERS[opt](model.parameters())
    context = (lambda: amp.autocast("gpu", autocast)) if autocast else None
    steps = GraphedSteps(model, losses.get_loss(loss), optimizer, "gpu", step_context=context)
    x, y, host = batch()
    extra = steps._batch_inputs(y, host)
    # The first step (a graph's warm-up) makes the optimizer's state: Adam's step counts
    # are copied in then, but nothing is read.
    with fake_cupy.count_host_reads() as reads:
        steps.eager_step(x, y, *extra)
    assert not reads.where
    # The step a graph records: no read, no copy in.
    loss_value = fake_cupy.assert_no_host_reads(steps.eager_step, x, y, *extra)
    assert np.isfinite(loss_value.item())


@GPU_ONLY
@pytest.mark.parametrize("loss,autocast", [("ce", None), ("ce_dice", None),
                                           ("weighted_ce", None), ("ce_dice", "bfloat16")])
def test_graphed_steps_capture_and_train_as_eager(loss, autocast):
    def run(graph):
        model = unet()
        optimizer = optim.Adam(model.parameters(), lr=1e-2, capturable=True)
        notes = []
        context = (lambda: amp.autocast("gpu", autocast)) if autocast else None
        steps = GraphedSteps(model, losses.get_loss(loss), optimizer, "gpu",
                             step_context=context, log=notes.append)
        values = []
        for seed in range(4):
            x, y, host = batch(seed)
            out = steps(x, y, host) if graph else steps.eager_step(
                x, y, *steps._batch_inputs(y, host))
            values.append(out.item())
        return values, model, steps, notes
    eager, eager_model, _, _ = run(False)
    graphed, graphed_model, steps, notes = run(True)
    assert steps.graphed is not None and steps.graphed.graphed and steps.reason is None
    assert notes == []
    np.testing.assert_allclose(graphed, eager, rtol=1e-5)
    for p, q in zip(graphed_model.parameters(), eager_model.parameters()):
        np.testing.assert_allclose(to_numpy(p.data), to_numpy(q.data), rtol=1e-4, atol=1e-6)


@GPU_ONLY
@pytest.mark.parametrize("loss", ["ce", "ce_dice"])
def test_seg_trainer_with_cuda_graph_graphs_and_trains_as_eager(loss, tmp_path):
    def trainer(out, cuda_graph):
        model = unet()
        train_loader, val_loader = loaders(augment=False)
        return Trainer(model, train_loader, val_loader, losses.get_loss(loss),
                       optim.Adam(model.parameters(), lr=1e-2, capturable=True),
                       out_dir=tmp_path / out, device="gpu", progress=False, plot=False,
                       log=None, cuda_graph=cuda_graph)
    assert_graphed_trains_as_eager(trainer)


@GPU_ONLY
def test_a_step_with_a_host_read_falls_back_with_one_line():
    model = unet()
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    notes = []

    def reading_loss(logits, target):
        loss = F.cross_entropy(logits, target)
        print(f"loss {loss.item():.3f}")               # a host read inside the step
        return loss
    steps = GraphedSteps(model, reading_loss, optimizer, "gpu", log=notes.append)
    x, y, _ = batch()
    assert np.isfinite(steps(x, y).item()) and np.isfinite(steps(x, y).item())
    assert steps.reason is not None and "host read" in steps.reason
    assert len(notes) == 1 and notes[0].startswith("--cuda-graph: not used (the step failed "
                                                   "while being captured")
    assert notes[0].endswith("; training eagerly.") and "\n" not in notes[0]


# ------------------------------------------------- checks of device data, read later
def test_bad_class_id_is_reported_with_its_sentence(device):
    logits = minidl.tensor(np.zeros((2, 3, 4, 4), np.float32), device=device)
    bad = np.zeros((2, 4, 4), np.int64)
    bad[1, 2, 3] = 7
    match = "class id 7, outside \\[0, 3\\) for logits with 3 classes"
    with pytest.raises(ValueError, match=match):     # host labels: checked at once
        F.cross_entropy(logits, bad)
    # Labels on the device: no read inside the op; the error comes with the next host read,
    # and meanwhile the bad element counts for nothing (the loss of the others is returned).
    with pytest.raises(ValueError, match=match):
        loss = F.cross_entropy(logits, backend.to_device(bad, device))
        loss.item()
    assert device_checks.pending() == []
    fine = F.cross_entropy(logits, backend.to_device(np.zeros_like(bad), device))
    assert fine.item() == pytest.approx(np.log(3))


@GPU_ONLY
def test_device_checks_wait_for_a_host_read_and_keep_the_first_failure():
    logits = minidl.tensor(np.zeros((1, 3, 2, 2), np.float32), device="gpu")
    ids = [np.array([[[0, 1], [2, 0]]]), np.array([[[0, 5], [2, 0]]]),
           np.array([[[-4, 1], [2, 0]]])]
    losses_ = [F.cross_entropy(logits, backend.to_device(t, "gpu")) for t in ids]
    assert len(device_checks.pending()) == 1        # merged on the device, nothing read
    with pytest.raises(ValueError, match="class id 5"):   # the first failure, not -4
        to_numpy(losses_[2].data)
    # Read once, then forgotten; the bad batch's loss is that of its valid ids (ln 3 each).
    assert losses_[1].item() == pytest.approx(np.log(3))
    assert losses_[0].item() == pytest.approx(np.log(3))


@GPU_ONLY
def test_a_graphs_checks_are_rearmed_after_every_replay():
    model = unet()
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    steps = GraphedSteps(model, losses.get_loss("ce"), optimizer, "gpu")
    x, y, _ = batch()
    steps(x, y).item()
    steps(x, y).item()
    assert steps.graphed.graphed and len(steps.graphed.checks) == 1
    bad = backend.to_numpy(y).copy()
    bad[0, 3, 4] = 9
    loss = steps(x, backend.to_device(bad, "gpu"))        # a replay: nothing read inside
    with pytest.raises(ValueError, match="class id 9, outside \\[0, 2\\)"):
        loss.item()
    assert np.isfinite(steps(x, y).item())                # a good batch reads clean again
    # Replays not read in between: the first failure is kept until the read.
    steps(x, backend.to_device(bad, "gpu"))
    loss = steps(x, y)
    with pytest.raises(ValueError, match="class id 9"):
        loss.item()


# p = 1.5 gives log(1 - p) = NaN until the check is read; NumPy warns of it, CuPy does not.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_unpool_embedding_and_bce_check_device_data_at_the_next_read(device):
    x = minidl.tensor(np.ones((1, 1, 2, 2), np.float32), device=device)
    idx = backend.to_device(np.array([[[[0, 3], [8, 99]]]]), device)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\).*range \[0, 99\]"):
        F.max_unpool2d(x, idx, 2).sum().item()
    table = minidl.tensor(np.eye(3, dtype=np.float32), device=device)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 3\) for a table of 3 rows"):
        F.embedding(backend.to_device(np.array([0, 3]), device), table).numpy()
    p = minidl.tensor(np.array([0.5, 1.5], np.float32), device=device)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        F.binary_cross_entropy(p, minidl.tensor(np.ones(2, np.float32), device=device)).item()
    assert device_checks.pending() == []


def test_weight_map_from_host_labels_equals_the_one_made_in_the_step(device):
    loss_fn = losses.get_loss("weighted_ce")
    rng = np.random.default_rng(0)
    logits = minidl.tensor(rng.normal(size=(2, 2, 12, 12)).astype(np.float32), device=device)
    host = (rng.random((2, 12, 12)) > 0.6).astype(np.int64)
    target = backend.to_device(host, device)
    extra = losses.batch_inputs(loss_fn, host)
    assert len(extra) == 1 and isinstance(extra[0], np.ndarray) and extra[0].shape == (2, 12, 12)
    assert losses.batch_inputs(losses.get_loss("ce_dice"), host) == ()
    np.testing.assert_allclose(loss_fn(logits, target, *extra).item(),
                               loss_fn(logits, target).item(), rtol=1e-6)
    assert cuda.check_batch([((2, 12, 12), np.dtype(np.float32))], extra) is None


@GPU_ONLY
def test_a_python_step_count_made_by_the_warm_up_is_refused_at_the_capture():
    # Plain Adam makes its step count (a Python int) in the first step, so the warm-up has
    # nothing to compare; the capture runs the step's Python once more, and is refused.
    def run(graph):
        model = unet()
        optimizer = optim.Adam(model.parameters(), lr=1e-2)
        steps = GraphedSteps(model, losses.get_loss("ce"), optimizer, "gpu", log=lambda line: None)
        values = [(steps(x, y) if graph else steps.eager_step(x, y)).item()
                  for x, y, _ in (batch(0), batch(1), batch(2))]
        return values, steps, optimizer
    eager, _, _ = run(False)
    graphed, steps, optimizer = run(True)
    assert "'step'" in steps.reason and "freeze" in steps.reason
    assert all(state["step"] == 3 for state in optimizer.state.values())
    np.testing.assert_allclose(graphed, eager, rtol=1e-6)


# ------------------------------------------------------- every zoo model, dropout included
# Dropout's GPU masks come from a Philox stream whose offset lives on the device
# (minidl.random.philox_state), so the zoo models with dropout capture too. Tiny widths;
# FCN's 100-pixel padding makes 16x16 inputs big enough (and FC-DenseNet needs 32x32).
ZOO = {"unet": {"depth": 2, "features_root": 4, "padding": "same", "dropout": 0.5},
       "deconvnet": {"fc_kernel": 1, "width": 1 / 16}}
WITHOUT_DROPOUT = {"segnet", "deconvnet"}


def zoo_model(name):
    from seg import models
    minidl.manual_seed(0)
    return models.build(name, 2, in_channels=3, **ZOO.get(name, {"width": 1 / 16})).to("gpu")


def zoo_names():
    from seg import models
    return models.available()


def philox_offset():
    return int(to_numpy(minidl.random.philox_state(backend.require_cupy()))[1])


@GPU_ONLY
@pytest.mark.parametrize("name", zoo_names())
def test_every_zoo_models_training_step_captures_with_its_dropout(name):
    model = zoo_model(name)
    assert model.training
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    notes = []
    steps = GraphedSteps(model, losses.get_loss("ce"), optimizer, "gpu", log=notes.append)
    size = 16 if name.startswith("fcn") else 32
    rng = np.random.default_rng(0)
    x = minidl.tensor(rng.normal(size=(2, 3, size, size)).astype(np.float32), device="gpu")
    y = backend.to_device(rng.integers(0, 2, size=(2, size, size)), "gpu")
    assert np.isfinite(steps(x, y).item())          # the warm-up step, then the capture
    assert notes == [] and steps.reason is None and steps.graphed.graphed
    before = philox_offset()
    assert np.isfinite(steps(x, y).item())          # a replay: new masks drawn on the device
    assert (philox_offset() > before) == (name not in WITHOUT_DROPOUT)


@GPU_ONLY
def test_seg_trainer_with_cuda_graph_graphs_a_deeplab_with_dropout_and_trains_as_eager(tmp_path):
    from seg import models

    def trainer(out, cuda_graph):
        minidl.manual_seed(0)
        model = models.build("deeplab_largefov", 2, in_channels=1, width=1 / 16).to("gpu")
        train_loader, val_loader = loaders(augment=False)
        return Trainer(model, train_loader, val_loader, losses.get_loss("ce"),
                       optim.SGD(model.parameters(), lr=1e-2, momentum=0.9),
                       out_dir=tmp_path / out, device="gpu", progress=False, plot=False,
                       log=None, cuda_graph=cuda_graph)
    # The replays draw the dropout masks the eager steps draw: the same history.
    assert_graphed_trains_as_eager(trainer)

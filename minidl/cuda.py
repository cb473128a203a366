"""CUDA graphs: record a whole training step once, then replay it with one launch.

A small model's training step on a GPU is hundreds of short kernels with Python between
them; the GPU waits for Python. CUDA graph capture records every kernel a step launches on
a stream (CuPy: `stream.begin_capture()` ... `graph = stream.end_capture()`), and
`graph.launch()` replays them all from one call, with the same arguments and the same
memory addresses.

    step = minidl.cuda.make_graphed_step(train_step, (x0, y0), optimizer=opt)
    for x, y in loader:
        loss = step(x, y)          # x, y copied into the static inputs, then one launch

where `train_step(x, y)` does forward, loss, backward and `opt.step()` on GPU arrays and
returns what the caller wants to read (e.g. the loss tensor; its array is rewritten by each
replay, read it when needed).

What a step must satisfy, because a replay repeats the recorded kernels and nothing else:

* the same shapes every call (a new batch size needs a new graph): checked on each call;
* no host read inside (`.item()`, `float(loss)`, `if (t < 0).any():`, printing, a NumPy
  array made from device data): a capture cannot wait for the GPU. Read the returned arrays
  after the call instead. minidl's own ops read nothing during a step on the GPU: they defer
  their checks of device data (class ids, indices) to the next host read
  (minidl.device_checks); the checks a captured step makes are re-armed after every replay,
  so each replayed batch is checked at the caller's next read;
* no Python-side state that changes from step to step and feeds a kernel: random numbers
  drawn from minidl's host-side generators (`minidl.rand`, random augmentation), or an
  optimizer whose update uses a step count kept in Python (Adam's bias correction): replays
  would reuse the captured value.
  Both are checked during the eager warm-up steps and refused with the reason. A learning
  rate changed by a schedule after the capture is not seen either (not detectable here).
  Dropout is fine: its GPU masks come from a Philox stream whose offset the kernels advance
  on the device (minidl.random.dropout_mask), so every replay draws new masks.

`fallback=True` returns a step that runs eagerly instead of raising, with the one-line reason
in `.reason` (also warned once).

Memory: the arrays the step allocates come from a private CuPy memory pool that lives as
long as the graph, so replays write to the same addresses and nothing else reuses them.
"""
import warnings

import numpy

from . import backend, device_checks
from . import random as _random
from .tensor import Tensor


class CaptureError(RuntimeError):
    """A step that cannot be recorded as a CUDA graph; the message says why and what to do."""


def _as_tuple(batch):
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _array(x):
    return x.data if isinstance(x, Tensor) else x


def _spec(batch):
    return [(tuple(_array(x).shape), numpy.dtype(_array(x).dtype)) for x in batch]


def check_batch(spec, batch):
    """Raise ValueError unless `batch` matches `spec` [(shape, dtype), ...] of the capture."""
    if len(batch) != len(spec):
        raise ValueError(f"the graphed step was captured for {len(spec)} inputs, got "
                         f"{len(batch)}; call it with the same arguments as the example batch.")
    for i, ((shape, dtype), x) in enumerate(zip(spec, batch)):
        a = _array(x)
        if tuple(a.shape) != shape or numpy.dtype(a.dtype) != dtype:
            raise ValueError(f"input {i} has shape {tuple(a.shape)} and dtype {a.dtype}, the "
                             f"graph was captured for {shape} {dtype}; a CUDA graph needs static "
                             "shapes (drop the last incomplete batch, or capture one graph per "
                             "shape).")


def _host_number_slots(optimizer):
    """{where: (mapping, key)} of the numbers an optimizer keeps in Python (not in arrays)."""
    found = {}
    if optimizer is None:
        return found
    for i, group in enumerate(optimizer.param_groups):
        for k, v in group.items():
            if k != "params" and isinstance(v, (int, float)):
                found[f"param_groups[{i}][{k!r}]"] = (group, k)
    for j, state in enumerate(optimizer.state.values()):
        for k, v in state.items():
            if isinstance(v, (int, float)):
                found[f"state of parameter {j}, {k!r}"] = (state, k)
    return found


def _host_numbers(optimizer):
    """{where: value} of the numbers an optimizer keeps in Python (not in arrays)."""
    return {where: mapping[key] for where, (mapping, key) in _host_number_slots(optimizer).items()}


def _frozen_numbers_reason(changed):
    return (f"the optimizer keeps numbers in Python that change every step "
            f"({changed[0]}{' and more' if len(changed) > 1 else ''}; e.g. Adam's "
            "bias correction), which a replay would freeze; use SGD, or a "
            "constant-coefficient update")


def host_state_changes(step_fn, batch, optimizer=None):
    """Run step_fn(*batch) once eagerly and list why a graph of it would replay wrongly:
    draws from minidl's host-side random generators, and optimizer numbers kept in Python
    that changed. Dropout masks are not such draws: on the GPU they come from the graph-safe
    Philox stream, which never asks for a generator, and on the CPU their NumPy draws are
    marked (minidl.random.drawing_graph_safe). Works on any device (a CPU run shows whether
    the step will capture). Returns (output, reasons)."""
    draws = []
    original = _random.generator

    def counting(*args, **kwargs):
        if not _random.drawing_graph_safe():
            draws.append(1)
        return original(*args, **kwargs)

    before = _host_numbers(optimizer)
    _random.generator = counting
    try:
        out = step_fn(*batch)
    finally:
        _random.generator = original
    reasons = []
    if draws:
        reasons.append("the step draws random numbers from minidl's host-side generator "
                       "(minidl.rand/randn, random augmentation), which a replay would "
                       "repeat; draw them outside the step and pass them in as inputs")
    after = _host_numbers(optimizer)
    changed = [k for k in after if k in before and after[k] != before[k]]
    if changed:
        reasons.append(_frozen_numbers_reason(changed))
    return out, reasons


class EagerStep:
    """The fallback: runs the step as it is. reason: why it was not graphed."""
    graphed = False

    def __init__(self, step_fn, reason):
        self.step_fn, self.reason = step_fn, reason

    def __call__(self, *batch):
        return self.step_fn(*batch)


class GraphedStep:
    """A captured step: call it with a batch shaped like the example; returns the captured
    outputs (whose arrays each replay rewrites)."""
    graphed = True
    reason = None

    def __init__(self, graph, stream, static, outputs, pool, spec, checks=()):
        self.graph, self.stream, self.static = graph, stream, static
        self.outputs, self.pool, self.spec = outputs, pool, spec
        self.checks = list(checks)      # the device checks the step makes (device_checks)

    def __call__(self, *batch):
        check_batch(self.spec, batch)
        cp = backend.require_cupy()
        # The capture stream is non-blocking: order it after the caller's stream (which made
        # the batch), and the caller's after the replay (which makes the outputs).
        caller = cp.cuda.get_current_stream()
        self.stream.wait_event(caller.record())
        with self.stream:
            for dst, src in zip(self.static, batch):
                src = _array(src)
                dst[...] = src if backend.is_gpu_array(src) else cp.asarray(src)
            self.graph.launch(stream=self.stream)
        caller.wait_event(self.stream.record())
        device_checks.rearm(self.checks)      # this replay rewrote their records
        return self.outputs


def make_graphed_step(step_fn, example_batch, *, optimizer=None, warmup=2, fallback=False):
    """Capture step_fn(*batch) as a CUDA graph (see the module docstring).

    example_batch: a tuple of GPU Tensors/arrays (or one); their shapes and dtypes are fixed
    from now on. optimizer: the optimizer step_fn steps, checked for Python-side state.
    warmup: eager steps before the capture (they train too: lazily made state such as
    momentum buffers must exist before capturing). Returns a GraphedStep, or with
    fallback=True an EagerStep when the step cannot be captured (else CaptureError).
    """
    batch = _as_tuple(example_batch)
    try:
        return _make(step_fn, batch, optimizer, max(1, int(warmup)))
    except CaptureError as exc:
        if not fallback:
            raise
        warnings.warn(f"CUDA graph not used: {exc}", RuntimeWarning, stacklevel=2)
        return EagerStep(step_fn, str(exc))


def _make(step_fn, batch, optimizer, warmup):
    if not all(backend.is_gpu_array(_array(x)) for x in batch):
        raise CaptureError("CUDA graphs need every input on the GPU (CuPy arrays); move the "
                           "batch with .to('gpu'), or run the step eagerly on the CPU.")
    cp = backend.require_cupy()
    if not hasattr(getattr(cp.cuda, "Stream", None), "begin_capture"):
        raise CaptureError("this CuPy cannot capture CUDA graphs (no Stream.begin_capture); "
                           "use CuPy 12 or newer on a real GPU.")
    spec = _spec(batch)

    def recorded(*inputs):
        """The step, and the device checks it made (taken: they belong to the graph). Checks
        made before are set aside: none at the capture (read just before it), but a replay
        that runs the Python again (the emulation's) may find some not read yet."""
        earlier = device_checks.take()
        try:
            return step_fn(*inputs), device_checks.take()
        finally:
            device_checks.rearm(earlier)

    static = [cp.array(_array(x), copy=True) for x in batch]
    inputs = [Tensor(s) if isinstance(x, Tensor) else s for s, x in zip(static, batch)]
    stream = cp.cuda.Stream(non_blocking=True)
    pool = cp.cuda.MemoryPool()
    cp.cuda.get_current_stream().synchronize()     # the example batch and model are ready
    with stream:
        for _ in range(warmup):
            _, reasons = host_state_changes(step_fn, inputs, optimizer)
            if reasons:
                raise CaptureError(reasons[0] + ".")
        stream.synchronize()
        device_checks.check()        # the warm-up's checks, read before the capture
        # The capture runs the step's Python but none of its kernels: a Python number it
        # changes (a step count made by the first warm-up step, so not compared there) has
        # changed once too often, and a replay would freeze it. Put back and refused below.
        slots = _host_number_slots(optimizer)
        before = {where: mapping[key] for where, (mapping, key) in slots.items()}
        # Everything the step allocates from here comes from `pool`, kept with the graph.
        with cp.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            try:
                outputs, checks = recorded(*inputs)
            except Exception as exc:
                _abandon(stream)
                _put_back(slots, before)
                device_checks.take()     # made by a capture that ran no kernel: no values
                raise CaptureError(
                    f"the step failed while being captured ({type(exc).__name__}: {exc}); a "
                    "host read inside it (.item(), float(loss), printing, a NumPy array "
                    "mixed in) cannot be captured: return the arrays and read them after the "
                    "call.") from exc
            graph = stream.end_capture()
    changed = _put_back(slots, before)
    if changed:
        raise CaptureError(_frozen_numbers_reason(changed) + ".")
    if hasattr(graph, "set_python_replay"):
        # The host emulation of CuPy (tests/fake_cupy.py) records no kernels; its replay
        # runs the step again and writes the results into the captured outputs.
        graph.set_python_replay(recorded, inputs, (outputs, checks))
    stream.synchronize()
    return GraphedStep(graph, stream, static, outputs, pool, spec, checks)


def _put_back(slots, before):
    """Restore the Python numbers a capture changed; returns where they were."""
    changed = [where for where, (mapping, key) in slots.items()
               if mapping.get(key) != before[where]]
    for where in changed:
        mapping, key = slots[where]
        mapping[key] = before[where]
    return changed


def _abandon(stream):
    """End a failed capture so the stream is usable again (its graph is discarded). Ended
    even when the capture was invalidated (is_capturing() then raises): a capture left open
    would keep refusing work."""
    try:
        stream.end_capture()
    except Exception:   # an invalidated capture reports its own error when ended
        pass

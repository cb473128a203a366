"""What --amp, --cuda-graph and --matmul-precision turn into for the training loop.

    --amp bf16|fp16        the forward pass and the loss under minidl.amp.autocast(device, dtype);
                           fp16 adds a GradScaler (loss scaling; its state goes into the
                           checkpoints), bf16 uses none, as PyTorch does (float32's exponent range)
    --cuda-graph           the whole training step recorded once per epoch as a CUDA graph and
                           replayed (minidl.cuda.make_graphed_step); where it cannot be captured,
                           one line says why and training goes on eagerly (seg.setup builds
                           Adam with capturable=True for it on the GPU)
    --matmul-precision     minidl.set_float32_matmul_precision("highest" | "high")

seg.setup.trainer_options passes `step_context`, `scaler` and `cuda_graph` to seg.train.Trainer,
which calls `backward_and_step` and `GraphedSteps` from here; everything else about the loop
is unchanged. See docs/AMP.md.
"""
import contextlib
import functools
import warnings

import minidl
from minidl import amp, backend, cuda

from . import losses
from .tiling import forward_full

__all__ = ["AMP_DTYPES", "MATMUL_PRECISIONS", "trainer_options", "apply_matmul_precision",
           "backward_and_step", "GraphedSteps"]

#: --amp value -> minidl.amp dtype.
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
#: --matmul-precision values (PyTorch's names; "medium" is not offered).
MATMUL_PRECISIONS = ("highest", "high")


def trainer_options(args):
    """The Trainer keywords of --amp and --cuda-graph: step_context, scaler, cuda_graph."""
    options = {"cuda_graph": bool(getattr(args, "cuda_graph", False))}
    dtype = AMP_DTYPES.get(getattr(args, "amp", None))
    if dtype is not None:
        options["step_context"] = functools.partial(amp.autocast, args.device, dtype)
        # float16 gradients underflow without loss scaling; bfloat16's do not (PyTorch's advice).
        options["scaler"] = amp.GradScaler() if dtype == "float16" else None
    return options


def apply_matmul_precision(args):
    """--matmul-precision: set minidl's float32 matmul precision for the run ("high": TF32
    tensor cores on the GPU; no effect on the CPU). Without the option nothing changes."""
    precision = getattr(args, "matmul_precision", None)
    if precision is not None:
        minidl.set_float32_matmul_precision(precision)


def backward_and_step(loss, optimizer, scaler=None):
    """loss.backward() and optimizer.step(), through the GradScaler when there is one
    (scaled backward; the step is skipped when a gradient is inf/NaN; the scale updated)."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


class GraphedSteps:
    """--cuda-graph: the training step (zero_grad, forward, loss, backward, update) replayed
    as a CUDA graph.

    The graph is captured at the first batch of every epoch, because a learning-rate schedule
    changes the rate between epochs and a graph would replay the rate it recorded. The
    capture's one warm-up step is that batch's training step, so every batch trains once, as
    without the option. A batch of another shape (the last, smaller one) runs eagerly.
    What the loss makes on the host from the labels (seg.losses.batch_inputs: the U-Net
    weight map) is made before the step and copied in as a graph input, like x and y.

    With --amp fp16 the GradScaler goes into the graph too when the optimizer skips an inf/NaN
    step on the GPU itself (`supports_found_inf`: SGD, and Adam with capturable=True, which
    seg.setup builds for --cuda-graph on the GPU); then no step reads the host.

    reason: why no graph is used (then every step runs eagerly), or None.
    """

    def __init__(self, model, loss_fn, optimizer, device, step_context=None, scaler=None,
                 log=print):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.scaler = scaler
        self.step_context = step_context or contextlib.nullcontext
        self.log = log
        self.graphed = None
        self.reason = None
        if device != "gpu":
            self._fall_back("CUDA graphs need --device gpu")
        elif scaler is not None and not getattr(optimizer, "supports_found_inf", False):
            # With one that does (SGD, capturable Adam: seg.setup's choice for --cuda-graph)
            # the GradScaler keeps its inf/NaN check on the GPU and the step is captured.
            self._fall_back(f"fp16's GradScaler reads the gradients' inf/NaN check back to the "
                            f"host every step with {type(optimizer).__name__}, which cannot "
                            f"skip a step on the GPU, and a graph cannot read the host; use "
                            f"SGD or Adam(capturable=True), or --amp bf16")

    def _fall_back(self, reason):
        self.reason = reason
        self.log(f"--cuda-graph: not used ({reason.rstrip('.')}); training eagerly.")

    def eager_step(self, x, y, *extra):
        """One training step as written; returns the loss Tensor. extra: the loss's batch
        inputs (seg.losses.batch_inputs), after the target."""
        self.optimizer.zero_grad()
        with self.step_context():
            loss = self.loss_fn(forward_full(self.model, x), y, *extra)
        backward_and_step(loss, self.optimizer, self.scaler)
        return loss

    def new_epoch(self):
        self.graphed = None

    def __call__(self, x, y, host_target=None):
        """Train on one batch (x: (N, C, H, W) Tensor, y: (N, H, W) array); returns the loss
        Tensor (read it after the call). host_target: y's labels still in host memory (the
        loader's), from which the loss's batch inputs (the U-Net weight map) are made before
        the step; without it they are read back from y, outside the step."""
        extra = self._batch_inputs(y, host_target)
        if self.reason is not None:
            return self.eager_step(x, y, *extra)
        if self.graphed is None:
            return self._capture(x, y, *extra)
        try:
            cuda.check_batch(self.graphed.spec, (x, y) + extra)
        except ValueError:
            return self.eager_step(x, y, *extra)
        return self.graphed(x, y, *extra)

    def _batch_inputs(self, y, host_target):
        """seg.losses.batch_inputs on the host labels, moved to y's device: inputs of the
        graph like x and y (copied into its static buffers at every replay)."""
        if not hasattr(self.loss_fn, "batch_inputs"):
            return ()
        host = backend.to_numpy(y) if host_target is None else host_target
        return tuple(backend.to_device(a, backend.device_of(y))
                     for a in losses.batch_inputs(self.loss_fn, host))

    def _capture(self, x, y, *extra):
        warm = []
        recording = [True]

        def step(x, y, *extra):
            loss = self.eager_step(x, y, *extra)
            if recording[0]:
                warm.append(loss)
            return loss

        with warnings.catch_warnings():       # the reason is logged below, once
            warnings.simplefilter("ignore", RuntimeWarning)
            graphed = cuda.make_graphed_step(step, (x, y) + extra, optimizer=self.optimizer,
                                             warmup=1, fallback=True)
        recording[0] = False
        if not graphed.graphed:
            self._fall_back(graphed.reason)
        else:
            self.graphed = graphed
        if warm:            # the warm-up step trained on this batch already
            return warm[0]
        return self.eager_step(x, y, *extra)

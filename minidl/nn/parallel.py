"""DistributedDataParallel: one model replica per process, gradients averaged over processes.

    dist.init_process_group()
    model = DistributedDataParallel(model)      # same weights everywhere: rank 0's
    loss = loss_fn(model(x_of_this_rank), y_of_this_rank)
    loss.backward()                             # .grad is now the average over the ranks
    optimizer.step()                            # identical step on every rank

Buckets: one all-reduce per gradient would pay MPI's or NCCL's fixed cost (microseconds to
tens of microseconds) hundreds of times per step, so gradients are packed into flat buckets of
about `bucket_cap_mb` megabytes, in reverse parameter order (roughly the order in which
backward produces them: the last layer first), and each bucket is one all-reduce.

Overlap: a bucket's all-reduce starts as soon as backward has produced every gradient in it,
while backward goes on with earlier layers (non-blocking MPI Iallreduce, nudged on at every
arriving gradient; NCCL on its own CUDA stream). To know when a parameter's gradient is
complete, forward counts how often each parameter appears in the graph of the output, and a
hook on the parameter (Tensor.register_post_accumulate_grad_hook) counts the gradients arriving.
Buckets are launched strictly in order, so every rank issues the same sequence of collectives.
"""
from contextlib import contextmanager

from .. import backend, distributed
from ..grad_mode import is_grad_enabled
from ..tensor import Tensor
from .module import Module


class _Bucket:
    """Parameters whose gradients travel together in one flat array."""

    def __init__(self, params):
        self.params = params
        self.sizes = [p.data.size for p in params]
        self.size = sum(self.sizes)
        self.ready = 0          # parameters with a complete gradient in this backward
        self.flat = None        # the flat array being all-reduced
        self.work = None        # its all-reduce handle
        # Kept from step to step: a fresh 25 MiB array each step costs more than the copy into
        # it (the pages are faulted in and zeroed anew). After the all-reduce the parameters'
        # .grad are views of it (as PyTorch's gradient_as_bucket_view), until the next backward.
        self.buffer = None


class DistributedDataParallel(Module):
    """Wrap `module` for data-parallel training (torch.nn.parallel.DistributedDataParallel).

    module: the model (already on this rank's device). bucket_cap_mb: bucket size in MiB.
    Needs minidl.distributed.init_process_group() first. `.module` is the wrapped model;
    state_dict() and load_state_dict() use the model's own keys (no "module." prefix), so a
    checkpoint loads into the plain model.
    """

    def __init__(self, module, bucket_cap_mb=25):
        super().__init__()
        if not distributed.is_initialized():
            raise RuntimeError("DistributedDataParallel needs a process group; call "
                               "minidl.distributed.init_process_group() first (on every rank).")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}.")
        self.module = module
        self.bucket_cap_mb = bucket_cap_mb
        self._check_same_shapes()
        with_grad = []
        for _, p in module.named_parameters():
            distributed.broadcast(p.data, src=0)
            if p.requires_grad:
                with_grad.append(p)
        for _, b in module.named_buffers():
            distributed.broadcast(b, src=0)
        self._buckets = self._make_buckets(with_grad[::-1], int(bucket_cap_mb * 2 ** 20))
        self._bucket_of = {id(p): b for b in self._buckets for p in b.params}
        for p in with_grad:
            p.register_post_accumulate_grad_hook(self._on_gradient)
        self._sync = True
        self._armed = False       # a forward has prepared a gradient sync
        self._uses_left = {}      # id(param) -> gradients still to come in this backward
        self._gradients_seen = 0  # hook calls in this backward
        self._next_bucket = 0     # the next bucket to launch (launched in order)

    # ------------------------------------------------------------------ set-up
    def _check_same_shapes(self):
        mine = [(name, tuple(p.shape)) for name, p in self.module.named_parameters()]
        everyone = distributed.all_gather_object(mine)
        for rank, theirs in enumerate(everyone):
            if len(theirs) != len(mine):
                raise ValueError(f"DistributedDataParallel: rank {rank} has {len(theirs)} "
                                 f"parameters and rank {distributed.get_rank()} {len(mine)}; "
                                 "build the same model on every rank.")
            for (name, shape), (their_name, their_shape) in zip(mine, theirs):
                if (name, shape) != (their_name, their_shape):
                    raise ValueError(f"DistributedDataParallel: parameter {name!r} has shape "
                                     f"{shape} on rank {distributed.get_rank()} but rank {rank} "
                                     f"has {their_name!r} of shape {their_shape}; build the "
                                     "same model on every rank.")

    @staticmethod
    def _make_buckets(params, cap_bytes):
        buckets, current, nbytes = [], [], 0
        for p in params:
            starts_new = current and (nbytes + p.data.nbytes > cap_bytes
                                      or p.data.dtype != current[0].data.dtype)
            if starts_new:
                buckets.append(_Bucket(current))
                current, nbytes = [], 0
            current.append(p)
            nbytes += p.data.nbytes
        if current:
            buckets.append(_Bucket(current))
        return buckets

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        if self._armed and self._gradients_seen:
            raise RuntimeError(
                "DistributedDataParallel: the previous backward did not give every parameter "
                "that forward used a gradient, so the gradient all-reduce never finished; make "
                "the loss depend on all of the model's outputs.")
        out = self.module(*args, **kwargs)
        self._armed = False
        if self._sync and is_grad_enabled():
            self._prepare_for_backward(out)
        return out

    def _prepare_for_backward(self, out):
        """Count each parameter's uses in out's graph; arm the hooks for one backward."""
        uses = {id(p): 0 for b in self._buckets for p in b.params}
        stack, seen = [t._node for t in _tensors(out) if t._node is not None], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for parent in getattr(node, "parents", ()):
                if isinstance(parent, Tensor):
                    if id(parent) in uses:
                        uses[id(parent)] += 1
                elif parent is not None:
                    stack.append(parent)
        self._uses_left = uses
        self._gradients_seen = 0
        self._next_bucket = 0
        for b in self._buckets:
            b.ready, b.flat, b.work = 0, None, None
        self._armed = True
        for b in self._buckets:   # parameters this forward did not use are ready already
            b.ready = sum(1 for p in b.params if uses[id(p)] == 0)
        self._launch_ready_buckets()

    # ------------------------------------------------------------------ backward
    def _on_gradient(self, p):
        if not self._armed:
            return                      # under no_sync(), or outside training
        self._gradients_seen += 1
        for b in self._buckets[:self._next_bucket]:   # let running all-reduces move on
            b.work.poll()
        left = self._uses_left[id(p)] - 1
        self._uses_left[id(p)] = left
        if left == 0:
            self._bucket_of[id(p)].ready += 1
            self._launch_ready_buckets()

    def _launch_ready_buckets(self):
        world = distributed.get_world_size()
        while self._next_bucket < len(self._buckets):
            b = self._buckets[self._next_bucket]
            if b.ready < len(b.params):
                break                   # later buckets wait for this one: launched in order
            ref = b.params[0].data
            xp = backend.get_array_module(ref)
            if (b.buffer is None or backend.get_array_module(b.buffer) is not xp
                    or b.buffer.dtype != ref.dtype):
                b.buffer = xp.empty(b.size, dtype=ref.dtype)
            offset = 0
            for p, n in zip(b.params, b.sizes):
                piece = b.buffer[offset:offset + n]
                if p.grad is None:
                    piece.fill(0)
                else:                   # sum of (grad / world) = the average; copied on the way
                    xp.multiply(p.grad.reshape(-1), 1.0 / world, out=piece)
                offset += n
            b.flat = b.buffer
            b.work = distributed.all_reduce_async(b.flat)
            self._next_bucket += 1
        if self._next_bucket == len(self._buckets) and self._armed:
            self._finish()

    def _finish(self):
        """Wait for every bucket and hand each parameter its slice as .grad (a view)."""
        for b in self._buckets:
            b.work.wait()
            offset = 0
            for p, n in zip(b.params, b.sizes):
                p.grad = b.flat[offset:offset + n].reshape(p.data.shape)
                offset += n
            b.flat = b.work = None
        self._armed = False

    @contextmanager
    def no_sync(self):
        """Gradients of the backward passes inside accumulate locally without communication;
        the first synchronised backward afterwards averages the accumulated sum."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # ------------------------------------------------------------------ the model's keys
    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state_dict, strict=True):
        return self.module.load_state_dict(state_dict, strict=strict)

    def extra_repr(self):
        return f"world_size={distributed.get_world_size()}, buckets={len(self._buckets)}"


def _tensors(out):
    """The Tensors in a forward's output (a Tensor, or tuples/lists/dicts of them)."""
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _tensors(o)

"""Embedding lookup: rows of a weight table picked by integer ids (torch.nn.functional.embedding)."""
import numpy

from .. import backend, device_checks
from ..function import Function
from ..tensor import Tensor
from .shape import scatter_add


class Embedding(Function):
    """out = weight[ids]; backward adds each output row's gradient into the row it came from
    (ids may repeat), except padding_idx, whose row gets no gradient."""
    def forward(self, weight):
        self.shape = weight.shape
        return weight[self.ids]

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        gw = xp.zeros(self.shape, dtype=gy.dtype)
        scatter_add(gw, self.ids.reshape(-1), gy.reshape(-1, self.shape[1]))
        if self.padding_idx is not None:
            gw[self.padding_idx] = 0
        return gw


def embedding(input, weight, padding_idx=None):
    """input: integer ids of any shape (*); weight: (num_embeddings, dim) -> (*, dim)."""
    ids = input.data if isinstance(input, Tensor) else input
    w = weight.data if isinstance(weight, Tensor) else weight
    xp = backend.get_array_module(w)
    ids = xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding() needs integer ids, got dtype {ids.dtype}; use .long().")
    if w.ndim != 2:
        raise ValueError(f"embedding() needs a (num_embeddings, dim) weight, got shape {tuple(w.shape)}.")
    n = w.shape[0]
    def error(*_):
        return ValueError(f"embedding() ids must be in [0, {n}) for a table of {n} rows.")
    if ids.size and xp is numpy:
        if int(ids.min()) < 0 or int(ids.max()) >= n:
            raise error()
    elif ids.size:
        # No device-to-host read (see minidl.device_checks): checked at the next host read,
        # and meanwhile clipped so that no lookup reads outside the table.
        failed = (ids.min() < 0) | (ids.max() >= n)
        device_checks.defer(("embedding", n), failed.reshape(1).astype(numpy.int64), error)
        ids = xp.clip(ids, 0, n - 1)
    if padding_idx is not None:
        padding_idx = padding_idx % n
    return Embedding.apply(weight, ids=ids, padding_idx=padding_idx)

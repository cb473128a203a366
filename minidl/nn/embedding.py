"""Embedding: a learnable table of vectors looked up by integer id."""
from ..ops.embedding import embedding
from .. import random as _random
from .. import backend
from .module import Module, Parameter


class Embedding(Module):
    """ids (*) ints -> (*, embedding_dim). weight (num_embeddings, embedding_dim) ~ N(0, 1), as
    torch; the row padding_idx starts at zero and gets no gradient."""
    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        xp = backend.array_module(device)
        w = _random.normal(xp, (num_embeddings, embedding_dim), dtype="float32" if dtype is None else dtype)
        if self.padding_idx is not None:
            w[self.padding_idx] = 0
        self.weight = Parameter(w)

    def forward(self, ids):
        return embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"

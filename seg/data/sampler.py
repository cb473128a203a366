"""DistributedSampler: each rank's share of a data set's indices, a new shuffle every epoch.

In data-parallel training every rank must see a different part of the data in each epoch,
and all parts together must be the whole data set. The sampler draws one permutation of
0 .. n-1 from (seed, epoch), identical on every rank, pads it to a multiple of the number of
ranks (by repeating its start) or cuts it down (drop_last), and gives rank r the positions
r, r + R, r + 2R, ...:

    sampler = DistributedSampler(train_set)          # rank and world size from minidl.distributed
    loader = DataLoader(train_set, batch_size=8, sampler=sampler)   # batch size per rank
    for epoch in range(epochs):
        loader.set_epoch(epoch)                      # also sets the sampler's epoch
        ...
"""
import numpy as np

from minidl import distributed

__all__ = ["DistributedSampler"]


class DistributedSampler:
    """Iterates this rank's indices of `dataset` (anything with len()) for the current epoch.

    num_replicas, rank: the number of ranks and this one (default: from minidl.distributed,
    which gives 1 and 0 without a process group). shuffle: a permutation drawn from
    (seed, epoch), else 0, 1, 2, ... drop_last: drop the tail that does not divide evenly
    instead of repeating indices to fill it. Every rank gets len(sampler) indices.
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0,
                 drop_last=False):
        num_replicas = distributed.get_world_size() if num_replicas is None else int(num_replicas)
        rank = distributed.get_rank() if rank is None else int(rank)
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0 .. {num_replicas - 1} for {num_replicas} "
                             f"replicas, got {rank}.")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.epoch = 0
        n = len(dataset)
        self.num_samples = n // num_replicas if drop_last else -(-n // num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch):
        """Use `epoch`'s permutation next (call it before each epoch, the same on every rank)."""
        self.epoch = int(epoch)

    def indices(self):
        """This rank's indices for the current epoch: int64 array of length len(self)."""
        n = len(self.dataset)
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        if self.total_size > n:        # pad by repeating the start (as often as needed)
            order = np.resize(order, self.total_size)
        order = order[:self.total_size]
        return order[self.rank::self.num_replicas]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self):
        return self.num_samples

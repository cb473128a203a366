"""Data-parallel training from the command line: the rank-aware pieces of `--distributed`.

    mpiexec -n 4 python -m seg train --distributed [--sync-bn] [--device gpu]
    mpiexec -n 4 python examples/train_unet.py --distributed

Every rank (process) runs the same program with the same options; seg.setup and seg.train call
the functions here where a rank must behave differently from a lone process:

- start(args): joins the MPI job (minidl.distributed), picks this rank's GPU from its rank
  within the machine, and sends the stdout of ranks other than 0 to /dev/null, so that every
  message is printed once (errors, on stderr, still show on every rank).
- distribute_data(data, args): training batches from a DistributedSampler, the same permutation
  of (seed, epoch) on every rank and a different part of it for each; `--batch-size` is per
  rank, as in PyTorch. Validation: rank r scores images r, r + R, r + 2R, ... (no padding,
  so every image counts exactly once).
- wrap_model(model, args): `--sync-bn` converts batch norm to SyncBatchNorm, then
  DistributedDataParallel copies rank 0's weights to every rank and averages the gradients.
- DistributedTrainer: seg.train.Trainer where rank 0 alone shows the progress bar and writes
  metrics.csv, the plots and the checkpoints (a barrier ends each epoch, so no rank runs ahead
  of a checkpoint), and the validation counts (loss sum, Dice sum, images, confusion matrix) are
  summed over the ranks before the metrics are computed: the figures are those of one process
  scoring the whole validation set, not an average of per-rank averages.
- finish(code): a rank ending with an error code ends every rank (MPI Abort), instead of
  leaving the others waiting in their next all-reduce.

Random streams: every rank seeds with --seed, so the model starts the same everywhere (DDP
copies rank 0's weights anyway) and the samplers agree on the order. Augmentation and dropout
must differ between ranks: rank r > 0 draws augmentation from seeds derived from (seed, r) and
dropout from (seed, r, epoch); rank 0 from the streams a one-process run uses. docs/DISTRIBUTED.md has the launch lines.
"""
import os
import sys

import numpy as np

import minidl
from minidl import backend
from minidl import distributed as dist
from minidl import nn
from minidl.nn.parallel import DistributedDataParallel

from . import data as sdata
from . import metrics as seg_metrics
from .errors import UsageError
from .train import Trainer

__all__ = ["start", "on_rank_zero_first", "distribute_data", "wrap_model", "rank_seed",
           "reseed_rank_streams", "reduce_validation", "DistributedTrainer", "finish"]


def rank_seed(seed, rank):
    """The seed of rank `rank`'s own random streams: `seed` itself on rank 0 (as in one
    process), a different one derived from (seed, rank) on every other rank."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])


def reseed_rank_streams(seed, rank, epoch):
    """Seed minidl's streams (dropout) and NumPy's global one for `epoch` of rank `rank` > 0.

    They depend on (seed, rank, epoch) only, so a resumed run continues them exactly without
    storing them (the checkpoint holds rank 0's streams, restored as in one process)."""
    own = int(np.random.SeedSequence([int(seed), int(rank), int(epoch)]).generate_state(1)[0])
    minidl.manual_seed(own)
    np.random.seed(own)


def start(args):
    """Join the MPI job for `--distributed` (every rank calls it first); returns the rank.

    CPU: the "mpi" backend. GPU: each rank uses the GPU given by its rank within the machine,
    and the "nccl" backend when every rank of the machine has a GPU of its own (NCCL refuses
    two ranks on one GPU; then gradients go through the host over MPI).
    """
    if getattr(args, "sync_bn", False) and not getattr(args, "distributed", False):
        raise UsageError("--sync-bn synchronises batch norm across the ranks of a "
                         "--distributed run; add --distributed (and launch with mpiexec).")
    if not dist.is_initialized():
        try:
            dist.init_process_group("mpi")
        except RuntimeError as exc:        # no MPI: the sentence naming the `dist` extra
            raise UsageError(str(exc)) from None
        if args.device == "gpu":
            cp = backend.require_cupy()
            n_gpus = cp.cuda.runtime.getDeviceCount()
            cp.cuda.Device(dist.get_local_rank() % n_gpus).use()
            if dist.get_local_world_size() <= n_gpus:
                dist.destroy_process_group()
                dist.init_process_group("nccl")
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")   # one copy of every message: rank 0's
    return rank


def on_rank_zero_first(fn, *args):
    """Run fn(*args) on rank 0 while the other ranks wait (e.g. writing a shared file)."""
    if dist.get_rank() == 0:
        fn(*args)
    dist.barrier()


def distribute_data(data, args):
    """Replace data's loaders (seg.setup.Data) with this rank's share; returns data.

    Training: a DistributedSampler (seed --seed: the permutation a one-process run shuffles
    with) and augmentation seeded by rank_seed. Validation: every R-th image from this rank's
    number on, in order.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    train_set = data.train_loader.dataset
    sampler = sdata.DistributedSampler(train_set, shuffle=True, seed=args.seed)
    data.train_loader = sdata.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                         seed=rank_seed(args.seed, rank))
    if data.val_loader is not None:
        val_set = data.val_loader.dataset
        data.val_loader = sdata.DataLoader(val_set, batch_size=args.batch_size,
                                           sampler=range(rank, len(val_set), world))
    return data


def wrap_model(model, args):
    """--sync-bn, then DistributedDataParallel on this rank's device (rank 0's weights)."""
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model.to(backend.normalize_device(args.device)))


def reduce_validation(scores, loss_sum, n_images):
    """Sum one rank's validation counts over all ranks.

    scores: this rank's seg.metrics.RunningScores; loss_sum: the sum over its images of the
    loss; n_images: their number. Returns (summary dict as RunningScores.summary gives, the
    total loss sum, the total number of images). The Dice is the sum of every image's Dice
    over the number of images, IoU and accuracy come from the summed confusion matrix.
    """
    totals = np.array([loss_sum, n_images, np.sum(scores.dice), len(scores.dice)],
                      dtype=np.float64)
    dist.all_reduce(totals)
    merged = seg_metrics.RunningScores(scores.num_classes)
    merged.confusion = dist.all_reduce(scores.confusion.copy())
    summary = merged.summary()              # IoU and accuracy of all ranks' pixels
    loss_sum, n_images, dice_sum, n_dice = totals
    summary["images"] = int(n_dice)
    summary["dice"] = float(dice_sum / n_dice) if n_dice else float("nan")
    return summary, float(loss_sum), int(n_images)


class DistributedTrainer(Trainer):
    """seg.train.Trainer for one rank of a data-parallel run (see the module docstring).

    model: the DistributedDataParallel-wrapped model; the checkpoints hold its .module's state
    (the model's own keys) and the number of ranks, which --resume checks.
    """

    def __init__(self, model, *args, num_classes=None, progress=True, **options):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        num_classes = num_classes or getattr(model.module, "num_classes", None)
        super().__init__(model, *args, num_classes=num_classes,
                         progress=progress and self.rank == 0, **options)
        self._reduce = True       # False while rank 0 scores its own share for a picture

    # ---------------------------------------------------------------- rank 0 writes
    def save(self, name, **extra):
        # No collective here: a Ctrl-C save must not wait for the other ranks.
        if self.rank != 0:
            return self.path(name)
        return super().save(name, world_size=self.world_size, **extra)

    def _write_metrics_csv(self):
        if self.rank == 0:
            super()._write_metrics_csv()

    def _append_metrics_csv(self, row):
        if self.rank == 0:
            super()._append_metrics_csv(row)

    def _plot_epoch(self, epoch, samples):
        if self.rank == 0:
            super()._plot_epoch(epoch, samples)

    def _plot_samples(self):
        # Only rank 0 draws, so it scores its own share of the images, without all-reduce.
        if self.rank == 0:
            self._reduce = False
            try:
                super()._plot_samples()
            finally:
                self._reduce = True

    def _run_epoch(self, epoch, epochs):
        super()._run_epoch(epoch, epochs)
        dist.barrier()            # the epoch's checkpoint is complete before any rank goes on

    def resume(self, path):
        meta = super().resume(path)
        ranks = int(meta.get("world_size", 1))
        if ranks != self.world_size:
            raise UsageError(
                f"checkpoint {path} was written by a run of {ranks} rank(s) and this run has "
                f"{self.world_size}; resume it with `mpiexec -n {ranks}` (another number of "
                "ranks changes the global batch and the order of the data).")
        return meta

    # ---------------------------------------------------------------- summed figures
    def train_epoch(self, epoch, epochs):
        if self.rank != 0:
            reseed_rank_streams(self.config.get("seed", 0), self.rank, epoch)
        loss, images_per_s = super().train_epoch(epoch, epochs)
        # Every rank trains on the same number of images (the sampler pads), so the mean of
        # the ranks' mean losses is the mean over all images; throughputs add up.
        figures = dist.all_reduce(np.array([loss, images_per_s], dtype=np.float64))
        return float(figures[0] / self.world_size), float(figures[1])

    def _totals(self, scores, loss_sum, n_images):
        if not self._reduce:
            return super()._totals(scores, loss_sum, n_images)
        return reduce_validation(scores, loss_sum, n_images)


def finish(code):
    """End a distributed run: exit code 0 leaves the process group; any other code ends every
    rank of the job (MPI Abort), since the other ranks would wait for this one forever.
    Returns code (a no-op without a process group)."""
    if dist.is_initialized():
        if code and dist.get_world_size() > 1:
            dist.abort_job(code)
        dist.destroy_process_group()
    return code

"""The programs that tests/test_distributed.py runs under `mpiexec -n 2`, and what they share
with the one-process references there.

    mpiexec -n 2 python tests/distributed_job.py train OUT_DIR [cpu|gpu]   # DDP + SyncBatchNorm, Adam
    mpiexec -n 2 python tests/distributed_job.py checks OUT_DIR   # collectives, buckets, sampler
    mpiexec -n 2 python tests/distributed_job.py crash OUT_DIR    # rank 1 raises

Each rank writes what it computed to OUT_DIR/<job>-rank<r>.npz; the test compares. With
JOB_FAKE_CUPY=1 in the environment the ranks use tests/fake_cupy.py as CuPy (the test sets it
when pytest itself runs with -p fake_cupy). The backend is "mpi" throughout: on a GPU the two
ranks share one device, which NCCL refuses, and the gradients go through the host.
"""
import os
import sys

import numpy as np

import minidl
from minidl import distributed as dist, functional as F, nn

BATCH = 8          # the global batch; each of R ranks takes BATCH / R consecutive samples
STEPS = 4
SIZE = 6           # images (BATCH, 1, SIZE, SIZE)


def build_model(seed):
    """A small float64 conv net with both kinds of batch norm."""
    minidl.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNormReLU2d(4),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 1))
    return model.double()


def batches():
    """STEPS global batches: (images float64 (BATCH, 1, SIZE, SIZE), classes (BATCH, SIZE, SIZE))."""
    rng = np.random.default_rng(7)
    return [(rng.normal(size=(BATCH, 1, SIZE, SIZE)), rng.integers(0, 3, size=(BATCH, SIZE, SIZE)))
            for _ in range(STEPS)]


def train(model, parts, device="cpu"):
    """Adam steps on `parts` (one (x, y) per step); returns the model's state as NumPy arrays."""
    optimizer = minidl.optim.Adam(model.parameters(), lr=0.05)
    for x, y in parts:
        x, y = minidl.tensor(x, device=device), minidl.tensor(y, device=device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: minidl.backend.to_numpy(v) for k, v in model.state_dict().items()}


def _save(out_dir, job, arrays):
    path = os.path.join(out_dir, f"{job}-rank{dist.get_rank()}.npz")
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def job_train(out_dir, device="cpu"):
    rank, world = dist.get_rank(), dist.get_world_size()
    # A different initialisation on each rank: DDP must replace it with rank 0's.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model(seed=rank).to(device))
    # A tiny bucket cap gives several buckets (the net has 1.7 KB of float64 parameters).
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0005)
    share = BATCH // world
    parts = [(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
             for x, y in batches()]
    state = train(ddp, parts, device)
    state["n_buckets"] = np.array(len(ddp._buckets))
    _save(out_dir, "train", state)


def job_checks(out_dir):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    # Collectives on NumPy arrays.
    a = np.arange(5, dtype=np.float64) * (rank + 1)
    out["all_reduce_sum"] = dist.all_reduce(a.copy())
    out["all_reduce_max"] = dist.all_reduce(a.copy(), op="max")
    out["broadcast"] = dist.broadcast(a.copy(), src=1)
    gathered = dist.all_gather([np.empty(5) for _ in range(world)], a)
    out["all_gather"] = np.stack(gathered)
    # Bucketed gradients against one all-reduce per tensor of the same local gradients.
    model = build_model(seed=0)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0005)
    x, y = batches()[0]
    x, y = minidl.tensor(x[rank::world]), minidl.tensor(y[rank::world])
    with ddp.no_sync():
        F.cross_entropy(ddp(x), y).backward()
    per_tensor = [dist.all_reduce(p.grad / world) for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(ddp(x), y).backward()
    out["bucketed"] = np.concatenate([p.grad.ravel() for p in model.parameters()])
    out["per_tensor"] = np.concatenate([g.ravel() for g in per_tensor])
    # no_sync accumulation: two local backward passes, the second one synchronised.
    model.zero_grad()
    with ddp.no_sync():
        F.cross_entropy(ddp(x), y).backward()
    F.cross_entropy(ddp(x * 2), y).backward()
    out["accumulated"] = np.concatenate([p.grad.ravel() for p in model.parameters()])
    # The sampler: this rank's indices for a few epochs, data sets that do and do not divide.
    for n in (10, 11):
        for drop_last in (False, True):
            sampler = seg_data().DistributedSampler(range(n), drop_last=drop_last, seed=3)
            for epoch in range(3):
                sampler.set_epoch(epoch)
                out[f"sampler_{n}_{int(drop_last)}_{epoch}"] = np.array(list(sampler))
    # Different shapes on the ranks: DistributedDataParallel refuses on every rank.
    other = nn.Sequential(nn.Linear(3, 2 + rank))
    try:
        nn.parallel.DistributedDataParallel(other)
        out["mismatch_error"] = np.array("")
    except ValueError as exc:
        out["mismatch_error"] = np.array(str(exc))
    out["local_rank"] = np.array(dist.get_local_rank())
    _save(out_dir, "checks", out)


def seg_data():
    import seg.data
    return seg.data


def job_crash(out_dir):
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    dist.barrier()   # rank 0 would wait here forever without MPI Abort
    _save(out_dir, "crash", {"finished": np.array(True)})


if __name__ == "__main__":
    if os.environ.get("JOB_FAKE_CUPY"):
        import fake_cupy
        fake_cupy.install()
    job, out_dir, *device = sys.argv[1:]
    dist.init_process_group("mpi")
    {"train": job_train, "checks": job_checks, "crash": job_crash}[job](out_dir, *device)
    dist.destroy_process_group()

"""Benchmark: data-parallel communication and scaling (minidl.distributed, DistributedDataParallel).

Sections (printed as tables, and written to --json, default runs/benchmark_distributed.json):

1. all-reduce  time and bus bandwidth of one in-place all-reduce of a float32 array against its
               size, on 2 ranks with the "mpi" backend, and with "nccl" on every GPU of the
               machine where CuPy sees one (bus bandwidth = 2 (R - 1) / R * bytes / time, the
               traffic each rank's link carries in a ring all-reduce, so figures for different
               numbers of ranks compare).
2. buckets     the gradients of the paper's U-Net (31 M parameters; --quick: depth 4, 32
               features) averaged by DistributedDataParallel in 25 MiB buckets, against one
               all-reduce of a flat buffer of the same size (the lower bound).
3. scaling     weak scaling of a training step (forward, loss, backward with the bucketed
               all-reduce, Adam) of the example U-Net (depth 4, 8 features, batch norm) at a
               fixed per-rank batch of 4 x 1 x 64 x 88, for 1, 2, 4 and 8 ranks, one thread per
               rank: throughput (images/s over all ranks) and efficiency = throughput(R) /
               (R * throughput(1)). More ranks than cores oversubscribes the machine: that
               checks the protocol, not the speed.

Run it as a plain Python program; it launches `mpiexec -n R` itself (the mpiexec beside the
Python interpreter, which the `dist` extra installs) with this same script in its hidden
--worker mode, one job per measurement:

    python examples/benchmark_distributed.py [--quick] [--ranks 1 2 4 8] [--json PATH]

Timings: the median of the rounds, each round's time being the slowest rank's; the ranks start
every round together (a barrier). On a loaded machine the figures mean little.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import minidl  # noqa: E402
from minidl import distributed as dist  # noqa: E402

SIZES = [2 ** k for k in range(12, 27, 2)]          # bytes: 4 KiB ... 64 MiB
QUICK_SIZES = [2 ** k for k in range(12, 23, 2)]    # ... 4 MiB
BIG_UNET = dict(depth=5, features_root=64, padding="same", batch_norm=False)
QUICK_UNET = dict(depth=4, features_root=32, padding="same", batch_norm=False)
STEP_UNET = dict(depth=4, features_root=8, padding="same", batch_norm=True)
STEP_SHAPE = (4, 1, 64, 88)


# ---------------------------------------------------------------------------- worker side
def timed(fn, rounds):
    """Median over rounds of the slowest rank's time for fn() (seconds)."""
    fn()                                             # warm-up
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        fn()
        mine = np.array([time.perf_counter() - start])
        times.append(float(dist.all_reduce(mine, op="max")[0]))
    return float(np.median(times))


def worker_allreduce(args):
    xp = minidl.backend.array_module("gpu" if args.backend == "nccl" else "cpu")
    world, rows = dist.get_world_size(), []
    for nbytes in (QUICK_SIZES if args.quick else SIZES):
        a = xp.ones(nbytes // 4, dtype=np.float32)

        def reduce():
            dist.all_reduce(a)
            if args.backend == "nccl":
                xp.cuda.get_current_stream().synchronize()
        t = timed(reduce, args.rounds)
        rows.append(dict(bytes=nbytes, seconds=t,
                         bus_gbps=2 * (world - 1) / world * nbytes / t / 1e9))
    return rows


def worker_buckets(args):
    import seg.models
    from minidl.nn.parallel import DistributedDataParallel
    device = "gpu" if args.backend == "nccl" else "cpu"
    model = seg.models.build("unet", num_classes=2, in_channels=1,
                              **(QUICK_UNET if args.quick else BIG_UNET))
    model = model.to(device)
    ddp = DistributedDataParallel(model, bucket_cap_mb=25)
    xp = minidl.backend.array_module(device)
    for p in model.parameters():
        p.grad = xp.ones_like(p.data)
    flat = xp.ones(sum(p.data.size for p in model.parameters()), dtype=np.float32)
    no_graph = minidl.tensor(xp.zeros(1, dtype=np.float32))

    def bucketed():
        # An output without a graph: every gradient counts as ready, so this runs exactly the
        # bucket packing, all-reduces and unpacking of a real backward's end.
        ddp._prepare_for_backward(no_graph)

    def one_flat():
        dist.all_reduce(flat)
    t_buckets, t_flat = timed(bucketed, args.rounds), timed(one_flat, args.rounds)
    return dict(parameters=int(flat.size), buckets=len(ddp._buckets), bucketed_s=t_buckets,
                flat_s=t_flat, ratio=t_buckets / t_flat)


def worker_step(args):
    import seg.models
    from minidl import functional as F
    from minidl.nn.parallel import DistributedDataParallel
    minidl.manual_seed(0)
    model = seg.models.build("unet", num_classes=2, in_channels=1, **STEP_UNET)
    ddp = DistributedDataParallel(model)
    rng = np.random.default_rng(dist.get_rank())
    x = minidl.tensor(rng.standard_normal(STEP_SHAPE, dtype=np.float32))
    y = minidl.tensor(rng.integers(0, 2, (STEP_SHAPE[0],) + STEP_SHAPE[2:]))
    opt = minidl.optim.Adam(ddp.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    t = timed(step, args.rounds)
    return dict(ranks=dist.get_world_size(), step_s=t,
                images_per_s=dist.get_world_size() * STEP_SHAPE[0] / t)


def worker(args):
    dist.init_process_group(args.backend)
    result = {"allreduce": worker_allreduce, "buckets": worker_buckets,
              "step": worker_step}[args.worker](args)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- driver side
def launch(section, ranks, backend, args):
    """Run this script's worker `section` on `ranks` processes; returns rank 0's result."""
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("benchmark_distributed.py needs mpiexec: pip install -e \".[dist]\".")
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(__file__), "--worker",
           section, "--backend", backend, "--rounds", str(args.rounds)] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, quick 3)")
    parser.add_argument("--json", default=os.path.join(ROOT, "runs", "benchmark_distributed.json"))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mpiexec job")
    parser.add_argument("--worker", choices=["allreduce", "buckets", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="mpi", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 10)
    if args.worker:
        return worker(args)

    out = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "quick": args.quick}
    backends = [("mpi", 2)]
    if minidl.gpu_available():
        import cupy
        backends.append(("nccl", cupy.cuda.runtime.getDeviceCount()))
    print(f"load average {out['load_average'][0]:.1f} on {out['cpus']} CPUs "
          "(figures on a loaded machine mean little)")
    for backend, ranks in backends:
        rows = launch("allreduce", ranks, backend, args)
        out[f"allreduce_{backend}"] = dict(ranks=ranks, rows=rows)
        print(f"\n1. all-reduce, {backend}, {ranks} ranks\n{'bytes':>10} {'time (us)':>10} {'bus GB/s':>9}")
        for r in rows:
            print(f"{r['bytes']:>10} {r['seconds'] * 1e6:>10.1f} {r['bus_gbps']:>9.2f}")
        b = launch("buckets", ranks, backend, args)
        out[f"buckets_{backend}"] = b
        print(f"\n2. U-Net gradients ({b['parameters']:,} parameters, {b['buckets']} buckets of "
              f"25 MiB), {backend}: bucketed {b['bucketed_s'] * 1e3:.1f} ms, one flat buffer "
              f"{b['flat_s'] * 1e3:.1f} ms, ratio {b['ratio']:.2f}x")
    print(f"\n3. weak scaling, U-Net step at per-rank batch {STEP_SHAPE}, mpi, one thread per rank"
          f"\n{'ranks':>5} {'step (ms)':>10} {'images/s':>9} {'efficiency':>10}")
    rows = []
    for ranks in args.ranks:
        r = launch("step", ranks, "mpi", args)
        base = rows[0]["images_per_s"] / rows[0]["ranks"] if rows else r["images_per_s"] / ranks
        r["efficiency"] = r["images_per_s"] / (ranks * base)
        rows.append(r)
        print(f"{ranks:>5} {r['step_s'] * 1e3:>10.1f} {r['images_per_s']:>9.1f} {r['efficiency']:>10.2f}")
    out["scaling"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.json)), suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.json)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

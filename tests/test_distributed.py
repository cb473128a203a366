"""Data-parallel training: minidl.distributed, DistributedDataParallel, SyncBatchNorm and
seg.data.DistributedSampler.

The multi-process tests run tests/distributed_job.py under `mpiexec -n 2` (one thread per
rank) and compare what the ranks wrote with a one-process reference computed here. They are
skipped, with the reason, only where MPI (the `dist` extra) is not installed.
"""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidl
from minidl import distributed as dist, functional as F, nn
from minidl.nn.parallel import DistributedDataParallel
import seg.data

from conftest import assert_close, to_numpy
import distributed_job as job

HERE = os.path.dirname(os.path.abspath(__file__))
MPIEXEC = (shutil.which("mpiexec", path=os.path.dirname(sys.executable))
           or shutil.which("mpiexec"))
needs_mpi = pytest.mark.skipif(not (dist.is_available() and MPIEXEC),
                               reason="MPI is not installed (pip install -e \".[dist]\")")


def run_on_two_ranks(args, timeout=60, cwd=None):
    """Run `python args...` on 2 ranks, one thread each; returns (completed process, seconds)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE,
                                           os.environ.get("PYTHONPATH", "")]))
    if "fake_cupy" in sys.modules:      # pytest -p fake_cupy: the ranks emulate the GPU too
        env["JOB_FAKE_CUPY"] = "1"
    start = time.perf_counter()
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable] + [str(a) for a in args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return done, time.perf_counter() - start


def run_job(name, out_dir, *args, timeout=60):
    """Run distributed_job.py `name` on 2 ranks."""
    return run_on_two_ranks([os.path.join(HERE, "distributed_job.py"), name, out_dir, *args],
                            timeout)


def ranks(out_dir, name):
    return [np.load(os.path.join(out_dir, f"{name}-rank{r}.npz"), allow_pickle=False)
            for r in range(2)]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_checks")
    done, _ = run_job("checks", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return ranks(out, "checks")


# ---------------------------------------------------------------------- 2 ranks under mpiexec
@needs_mpi
def test_two_ranks_with_sync_batchnorm_train_like_one_process_with_the_whole_batch(tmp_path,
                                                                                  device):
    done, _ = run_job("train", tmp_path, device)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = job.train(job.build_model(seed=0), job.batches())   # plain BatchNorm, batch 8
    for r, state in enumerate(ranks(tmp_path, "train")):
        assert int(state["n_buckets"]) > 1            # the tiny cap really made buckets
        for key, want in reference.items():
            got = state[key]
            rel = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
            assert rel <= 1e-5, f"rank {r}, {key}: relative difference {rel:.2e}"


@needs_mpi
def test_collectives_on_two_ranks(checks):
    a = [np.arange(5.0) * (r + 1) for r in range(2)]
    for out in checks:
        np.testing.assert_array_equal(out["all_reduce_sum"], a[0] + a[1])
        np.testing.assert_array_equal(out["all_reduce_max"], np.maximum(a[0], a[1]))
        np.testing.assert_array_equal(out["broadcast"], a[1])
        np.testing.assert_array_equal(out["all_gather"], np.stack(a))
    assert sorted(int(out["local_rank"]) for out in checks) == [0, 1]   # one machine


@needs_mpi
def test_bucketed_all_reduce_equals_one_all_reduce_per_tensor(checks):
    for out in checks:
        np.testing.assert_array_equal(out["bucketed"], out["per_tensor"])
    np.testing.assert_array_equal(checks[0]["bucketed"], checks[1]["bucketed"])


@needs_mpi
def test_no_sync_accumulates_and_the_next_backward_averages_the_sum(checks):
    # Loss(2x) after loss(x), both on the same rank's data: the accumulated, averaged gradient
    # is computed again here in one process from the per-rank halves.
    model = job.build_model(seed=0)
    x, y = job.batches()[0]
    for r in range(2):
        xr, yr = minidl.tensor(x[r::2]), minidl.tensor(y[r::2])
        F.cross_entropy(model(xr), yr).backward()
        F.cross_entropy(model(xr * 2), yr).backward()
    want = np.concatenate([to_numpy(p.grad).ravel() / 2 for p in model.parameters()])
    for out in checks:
        np.testing.assert_allclose(out["accumulated"], want, rtol=1e-10, atol=1e-14)


@needs_mpi
def test_sampler_partitions_every_epoch_on_two_ranks(checks):
    for n in (10, 11):
        for drop_last in (0, 1):
            for epoch in range(3):
                parts = [out[f"sampler_{n}_{drop_last}_{epoch}"] for out in checks]
                assert len(parts[0]) == len(parts[1])
                both = np.concatenate(parts)
                if drop_last or n % 2 == 0:
                    assert len(set(both.tolist())) == len(both)        # disjoint
                if not drop_last:
                    assert set(both.tolist()) == set(range(n))          # everything, every epoch
    first = [checks[0][f"sampler_10_0_{e}"].tolist() for e in range(3)]
    assert first[0] != first[1]                                         # reshuffled per epoch


@needs_mpi
def test_different_parameter_shapes_are_refused_on_every_rank(checks):
    for out in checks:
        assert "parameter '0.weight' has shape" in str(out["mismatch_error"])


@needs_mpi
def test_an_error_on_one_rank_ends_the_whole_job(tmp_path):
    # A rank left waiting at the barrier would hang: the timeout fails the test then.
    done, _ = run_job("crash", tmp_path, timeout=60)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert not os.path.exists(tmp_path / "crash-rank0.npz")   # rank 0 never got past the barrier


# ---------------------------------------------------------------------- one process
def test_collectives_without_a_process_group_say_how_to_start_one():
    assert not dist.is_initialized()
    assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        dist.all_reduce(np.zeros(3))
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedDataParallel(nn.Linear(2, 2))


def test_missing_mpi_names_the_dist_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)   # makes `from mpi4py import MPI` fail
    assert not dist.is_available()
    with pytest.raises(RuntimeError, match=r"\.\[dist\]"):
        dist.init_process_group()


def test_bad_backend_and_op_are_named():
    with pytest.raises(ValueError, match="unknown backend 'gloo'"):
        dist.init_process_group("gloo")
    with pytest.raises(ValueError, match="unknown reduction op 'mean'"):
        dist._check_op("mean")


@pytest.fixture
def world_of_one():
    """A process group of this one process (MPI singleton)."""
    if not dist.is_available():
        pytest.skip("MPI is not installed (pip install -e \".[dist]\")")
    dist.init_process_group("mpi")
    yield
    dist.destroy_process_group()


def test_one_rank_ddp_gives_the_plain_gradients_and_the_model_keys(world_of_one, device):
    model = job.build_model(seed=0).to(device)
    twin = job.build_model(seed=0).to(device)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.0005)
    assert ddp.module is model
    assert list(ddp.state_dict()) == list(twin.state_dict())
    x, y = job.batches()[0]
    x, y = minidl.tensor(x, device=device), minidl.tensor(y, device=device)
    F.cross_entropy(ddp(x), y).backward()
    F.cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="already called"):
        dist.init_process_group("mpi")


def test_collectives_of_one_rank_and_their_bad_input(world_of_one, device, xp):
    a = minidl.tensor(np.arange(6.0).reshape(2, 3), device=device)
    assert dist.all_reduce(a, op="avg") is a
    assert_close(a.data, np.arange(6.0).reshape(2, 3))
    out = dist.all_gather([xp.zeros((2, 3))], a)
    assert_close(out[0], a.data)
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.all_reduce(a.data.T)
    with pytest.raises(ValueError, match="a list of 1 arrays"):
        dist.all_gather([], a)
    with pytest.raises(ValueError, match=r"output 0 has shape \(3,\)"):
        dist.all_gather([xp.zeros(3)], a)
    with pytest.raises(ValueError, match="src=1 is not a rank"):
        dist.broadcast(a, src=1)


def test_ddp_refuses_a_backward_that_left_parameters_without_gradients(world_of_one):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    ddp = DistributedDataParallel(model, bucket_cap_mb=1e-5)
    out = ddp(minidl.randn(4, 3))
    # Backward through the second layer only: the first layer's gradient never arrives.
    model[1](minidl.tensor(out.data)).sum().backward()
    with pytest.raises(RuntimeError, match="depend on all of the model's outputs"):
        ddp(minidl.randn(4, 3))


# ---------------------------------------------------------------------- SyncBatchNorm
def test_convert_sync_batchnorm_keeps_parameters_buffers_and_keys():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNormReLU2d(3),
                          nn.Sequential(nn.BatchNorm2d(3, momentum=None)))
    weight, keys = model[1].weight, list(model.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is nn.SyncBatchNormReLU2d
    assert type(converted[2][0]) is nn.SyncBatchNorm
    assert converted[1].weight is weight and converted[2][0].momentum is None
    assert list(converted.state_dict()) == keys
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(2))) is nn.SyncBatchNorm


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_sync_batchnorm_on_one_process_is_batchnorm(device, relu, training):
    kind = nn.BatchNormReLU2d if relu else nn.BatchNorm2d
    plain = kind(3, device=device, momentum=None)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(kind(3, device=device, momentum=None))
    weight = minidl.tensor(np.random.default_rng(0).normal(size=3), device=device).data
    for module in (plain, synced):
        module.weight.data[...] = weight
        module.train(training)
    rng = np.random.default_rng(1)
    for _ in range(2):
        x = rng.normal(2.0, 3.0, size=(4, 3, 5, 5)).astype(np.float32)
        xs = [minidl.tensor(x, requires_grad=True, device=device) for _ in range(2)]
        ys = [plain(xs[0]), synced(xs[1])]
        assert_close(ys[1].data, ys[0].data, rtol=1e-4, atol=1e-5)
        g = rng.normal(size=x.shape).astype(np.float32)
        for y in ys:
            y.backward(g)
        assert_close(xs[1].grad, xs[0].grad, rtol=1e-4, atol=1e-5)
        assert_close(synced.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
        assert_close(synced.bias.grad, plain.bias.grad, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(synced, name), getattr(plain, name), rtol=1e-5, atol=1e-6)


@given(n=st.integers(2, 3), c=st.integers(1, 3), relu=st.booleans(), seed=st.integers(0, 99))
def test_sync_batchnorm_gradcheck(n, c, relu, seed):
    from minidl.ops.sync_batchnorm import sync_batch_norm
    rng = np.random.default_rng(seed)
    x = minidl.tensor(rng.normal(size=(n, c, 2, 3)), requires_grad=True)
    w = minidl.tensor(rng.normal(size=c), requires_grad=True)
    b = minidl.tensor(rng.normal(size=c), requires_grad=True)
    minidl.gradcheck(lambda x, w, b: sync_batch_norm(x, None, None, w, b, relu=relu), [x, w, b])


# ---------------------------------------------------------------------- the sampler, one process
@pytest.mark.parametrize("n, replicas", [(10, 3), (9, 3), (1, 2)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_partitions_every_epoch(n, replicas, shuffle):
    for drop_last in (False, True):
        samplers = [seg.data.DistributedSampler(range(n), num_replicas=replicas, rank=r,
                                                shuffle=shuffle, seed=5, drop_last=drop_last)
                    for r in range(replicas)]
        for epoch in range(3):
            for s in samplers:
                s.set_epoch(epoch)
            parts = [list(s) for s in samplers]
            assert {len(p) for p in parts} == {len(samplers[0])}
            flat = sum(parts, [])
            if drop_last:
                assert len(flat) == n // replicas * replicas == len(set(flat))
            else:
                assert set(flat) == set(range(n)) and len(flat) == -(-n // replicas) * replicas


def test_sampler_bad_rank_is_named():
    with pytest.raises(ValueError, match="rank must be in 0 .. 1"):
        seg.data.DistributedSampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas must be at least 1"):
        seg.data.DistributedSampler(range(4), num_replicas=0, rank=0)


def test_loader_takes_its_order_from_the_sampler():
    data = seg.data.Dataset(list(range(7)), lambda i: (np.full((2, 2), i, np.float32), None))
    sampler = seg.data.DistributedSampler(data, num_replicas=2, rank=1, seed=1)
    loader = seg.data.DataLoader(data, batch_size=2, sampler=sampler, prefetch=False)
    assert len(loader) == 2
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen = [int(v) for images, _ in loader for v in images[:, 0, 0, 0]]
        sampler.set_epoch(epoch)
        assert seen == list(sampler)
    with pytest.raises(ValueError, match="either shuffle=True or a sampler"):
        seg.data.DataLoader(data, shuffle=True, sampler=sampler)


# ---------------------------------------------------------------------- the documentation
def documented_code():
    from test_docs import python_blocks
    with open(os.path.join(os.path.dirname(HERE), "docs", "DISTRIBUTED.md"), encoding="utf-8") as f:
        blocks = [code for _, code, skipped in python_blocks(f.read()) if not skipped]
    assert blocks, "docs/DISTRIBUTED.md should show a runnable training loop"
    return blocks


@needs_mpi
def test_the_documented_training_loop_runs_on_two_ranks(tmp_path):
    (tmp_path / "loop.py").write_text("\n".join(documented_code()))
    done, _ = run_on_two_ranks(["loop.py"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(minidl.load(str(tmp_path / "model.npz"))) == sorted(job_keys_of_doc_model())


def job_keys_of_doc_model():
    return list(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNormReLU2d(4), nn.Conv2d(4, 2, 1))
                .state_dict())


@needs_mpi
def test_the_documented_training_loop_runs_as_one_rank(tmp_path, monkeypatch):
    blocks = documented_code()
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in blocks:
        exec(compile(code, "docs/DISTRIBUTED.md", "exec"), namespace)
    assert not dist.is_initialized()                       # the loop ends by leaving the group
    saved = minidl.load(str(tmp_path / "model.npz"))
    assert list(saved) == list(namespace["model"].state_dict())


@needs_mpi
def test_distributed_benchmark_workers_report_what_the_tables_print():
    from types import SimpleNamespace
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    import benchmark_distributed as bench
    args = SimpleNamespace(quick=True, rounds=1, timeout=120)
    rows = bench.launch("allreduce", 2, "mpi", args)
    assert [r["bytes"] for r in rows] == bench.QUICK_SIZES
    assert all(r["seconds"] > 0 and r["bus_gbps"] > 0 for r in rows)

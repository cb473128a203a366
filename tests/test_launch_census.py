"""scripts/launch_census.py: the emulated launch count of a training step is consistent.

The census installs the fake CuPy into its own process, so it runs in a subprocess here
(installing it into the test process would turn every later "gpu" test into an emulated one).
No count is hard-coded: the checks are relations that hold for any correct census.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "launch_census.py")


def census(tmp_path, *options):
    out = tmp_path / f"census{len(list(tmp_path.iterdir()))}.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    proc = subprocess.run([sys.executable, SCRIPT, "--batch", "2", "--size", "8",
                           "--features", "2", "--json", str(out), *options],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launches" in proc.stdout and "total" in proc.stdout
    return json.loads(out.read_text())


def total(result):
    return sum(result["launches_by_phase"].values())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("census")


@pytest.fixture(scope="module")
def depth2(tmp):
    return census(tmp, "--depth", "2")


def test_tables_add_up(depth2):
    by_op = sum(sum(c.values()) for c in depth2["launches_by_op"].values())
    by_kind = sum(sum(c.values()) for c in depth2["launches_by_kind"].values())
    reads = sum(depth2["host_reads"].values()) + sum(depth2["host_to_device"].values())
    assert total(depth2) == by_op == by_kind == sum(depth2["operations"].values())
    assert depth2["events"] == total(depth2) + reads
    # Every phase of a training step does device work.
    assert all(n > 0 for n in depth2["launches_by_phase"].values())


def test_more_layers_more_launches(tmp, depth2):
    depth3 = census(tmp, "--depth", "3")
    assert total(depth3) > total(depth2)
    for op in ("Conv2d", "MaxPool2d", "ConvTranspose2d"):
        assert sum(depth3["launches_by_op"][op].values()) > sum(depth2["launches_by_op"][op].values())


def test_flat_adam_updates_in_fewer_kernels(tmp, depth2):
    # FlatAdam runs one update kernel for all parameters where Adam runs one per parameter
    # (it still copies each gradient into its flat buffer: those count as copies).
    flat = census(tmp, "--depth", "2", "--optimizer", "flat")
    kernels = [r["launches_by_kind"]["kernel"]["optimizer"] for r in (flat, depth2)]
    assert kernels[0] < kernels[1]
    assert flat["launches_by_phase"]["forward"] == depth2["launches_by_phase"]["forward"]


def test_bf16_autocast_is_counted(tmp, depth2):
    bf16 = census(tmp, "--depth", "2", "--amp", "bf16")
    assert bf16["model"]["amp"] == "bf16"
    assert "autocast casts" in bf16["launches_by_op"]


def test_size_too_small_for_depth_is_refused(tmp):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    proc = subprocess.run([sys.executable, SCRIPT, "--depth", "4", "--size", "4"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert "--size must be at least 2**(depth - 1) = 8" in proc.stderr

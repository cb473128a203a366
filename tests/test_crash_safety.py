"""Crash safety of training: a run killed with SIGKILL at random moments, also while a
checkpoint is being written, always leaves a loadable last.npz (or none), and resuming from it
ends with the same weights, bit for bit, as a run that was never interrupted.

The killed run is tests/crash_job.py in a subprocess (a tiny U-Net with dropout, augmentation,
Adam and a schedule, so every random state matters); the reference runs here, in-process.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import crash_job
from minidl import backend
from seg.checkpoints import load_checkpoint, read_checkpoint_meta, remove_stale_temporaries
from seg.models.unet import UNet

JOB = Path(__file__).with_name("crash_job.py")
KILLS = 4                 # the first while a checkpoint is being written, the others at random
MAX_DELAY = 1.5           # seconds after set-up; a whole run takes about 1-2 s after set-up
DEADLINE = 300            # seconds for the whole test, however loaded the machine is

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX only")


def start(out_dir, device):
    env = dict(os.environ)
    if "fake_cupy" in sys.modules:      # pytest -p fake_cupy: the job emulates the GPU too
        env["JOB_FAKE_CUPY"] = "1"
    proc = subprocess.Popen([sys.executable, str(JOB), str(out_dir), device, "--slow-save"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()       # "training" once imports and set-up are done
    if line.strip() != "training":
        proc.kill()
        pytest.fail(f"crash_job did not start: {proc.communicate()[1]}")
    return proc


def wait_for_checkpoint_write(proc, out_dir, timeout):
    """Return once a temporary checkpoint file exists (a write is under way) or the job ended."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if any(name.endswith(".tmp") for name in os.listdir(out_dir)):
            return True
        time.sleep(0.0005)
    return False


def fresh_model():
    return UNet(2, 1, depth=2, features_root=4, padding="same", batch_norm=True, dropout=0.2)


def model_arrays(path):
    model = fresh_model()
    load_checkpoint(path, model)
    return {k: backend.to_numpy(v) for k, v in model.state_dict().items()}


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path, device):
    rng = random.Random(18)
    out = tmp_path / "killed"
    out.mkdir()
    deadline = time.monotonic() + DEADLINE
    killed, killed_writing, epochs_seen = 0, False, []
    for attempt in range(KILLS):
        proc = start(out, device)
        if attempt == 0:
            killed_writing = wait_for_checkpoint_write(proc, out, deadline - time.monotonic())
        else:
            time.sleep(rng.uniform(0.0, MAX_DELAY))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        # After every kill: last.npz is absent or complete and loadable, and never goes back.
        if (out / "last.npz").exists():
            epochs_seen.append(read_checkpoint_meta(out / "last.npz")["epoch"])
            model_arrays(out / "last.npz")
        assert epochs_seen == sorted(epochs_seen)
        assert time.monotonic() < deadline
    assert killed_writing and killed >= 1

    proc = start(out, device)          # resume (or start) and run to the end
    _, err = proc.communicate(timeout=max(60, deadline - time.monotonic()))
    assert proc.returncode == 0, err
    # The killed writers' temporary files are gone too (removed when the last run started).
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]

    reference = crash_job.make_trainer(tmp_path / "reference", device)
    reference.fit(crash_job.EPOCHS)
    assert read_checkpoint_meta(out / "last.npz")["epoch"] == crash_job.EPOCHS
    for name in ("last.npz", "best.npz"):
        got, want = model_arrays(out / name), model_arrays(tmp_path / "reference" / name)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    assert (read_checkpoint_meta(out / "best.npz")["epoch"]
            == read_checkpoint_meta(tmp_path / "reference" / "best.npz")["epoch"])


def test_only_temporaries_of_dead_writers_are_removed(tmp_path):
    dead, alive = subprocess.Popen([sys.executable, "-c", "pass"]), os.getppid()
    dead.wait()                        # its process id names no process any more
    names = {f".last.npz.{dead.pid}.tmp": False, f"..best.npz.{dead.pid}.tmp.x1y2.tmp": False,
             f".last.npz.{alive}.tmp": True, f".last.npz.{os.getpid()}.tmp": True,
             "metrics.csv.tmp": True, "notes.tmp": True}
    for name in names:
        (tmp_path / name).write_bytes(b"")
    remove_stale_temporaries(tmp_path)
    assert {name: (tmp_path / name).exists() for name in names} == names

"""Checkpoint files: a model's state with its optimizer, scheduler, random states and meta.

    save_checkpoint("runs/unet/last.npz", model, optimizer, scheduler, meta={"epoch": 3})
    meta = load_checkpoint("runs/unet/last.npz", model, optimizer, scheduler)
    read_checkpoint_meta("runs/unet/best.npz")["config"]      # without building a model

A checkpoint is one .npz or .safetensors file (minidl.save, by the suffix): the arrays of
model/optimizer/scheduler state, minidl's random state, and the meta dict (epoch, best score,
history, the run's config, NumPy's global random state) as JSON text in a uint8 array, so
reading it never needs pickle. It is written to a temporary file first (flushed to disk with fsync) and then renamed, and the folder
is fsync'ed after the rename, so a crash or power cut mid-write never leaves a broken file in
place of the previous one (tests/test_crash_safety.py kills training runs to check it).
"""
import json
import os
import re

import numpy as np

import minidl
import minidl.random
from minidl.serialization import fsync_folder

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "rng_state",
           "restore_rng_state", "remove_stale_temporaries"]


def _json_array(obj):
    """JSON text stored as a uint8 array: every .npz reader can load it without pickle."""
    return np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8).copy()


def _json_from_array(a):
    return json.loads(bytes(np.asarray(a, dtype=np.uint8)).decode("utf-8"))


def rng_state():
    """NumPy's global RNG state, as JSON-able data for a checkpoint's meta (minidl's own state
    is stored as arrays by save_checkpoint, see minidl.get_rng_state)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"numpy_global": {"name": name, "keys": keys.tolist(), "pos": int(pos),
                             "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def restore_rng_state(state):
    """Restore the random states that rng_state() and save_checkpoint stored."""
    g = state.get("numpy_global")
    if g:
        np.random.set_state((g["name"], np.asarray(g["keys"], dtype=np.uint32), g["pos"],
                             g["has_gauss"], g["cached_gaussian"]))
    if "minidl" in state:
        minidl.set_rng_state(state["minidl"])
    elif "minidl_cpu" in state:   # older checkpoints: the raw bit_generator state in the JSON
        minidl.set_rng_state({"seed": minidl.random.initial_seed(), "numpy": state["minidl_cpu"]})


def save_checkpoint(path, model, optimizer=None, scheduler=None, meta=None):
    """Write model/optimizer/scheduler state + meta (JSON-able dict) to `path` atomically.

    The file is written under a temporary name in the same folder and renamed over `path`,
    so `path` always holds either the previous complete checkpoint or the new one.
    """
    path = os.fspath(path)
    state = {"model": dict(model.state_dict()),
             # meta (history, config, NumPy's global RNG state) travels as JSON text.
             "meta": _json_array(meta or {}),
             # minidl's random streams (dropout masks, ...), so a resumed run draws the same.
             "rng": minidl.get_rng_state()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # minidl.save picks the format by the suffix: the temporary name ends in the checkpoint's
    # own (".tmp.safetensors"), else a best.safetensors would get .npz content.
    suffix = os.path.splitext(path)[1]
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp{suffix}")
    try:
        minidl.save(state, tmp)       # written and fsync'ed under the temporary name
        os.replace(tmp, path)
        fsync_folder(folder)          # and the rename itself made durable
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


#: The temporary names of a checkpoint write: `.NAME.PID.tmp.SUFFIX` (save_checkpoint; SUFFIX
#: .npz or .safetensors), and inside it `..NAME.PID.tmp.SUFFIX.RANDOM.tmp` (minidl.save's own
#: temporary file); without .SUFFIX as older versions wrote them.
_TEMPORARY = re.compile(r"^\.\.?(?P<name>.+\.(npz|safetensors))\.(?P<pid>\d+)\.tmp"
                        r"(\.npz|\.safetensors)?(\.[^.]+\.tmp)?$")


def remove_stale_temporaries(folder):
    """Delete the temporary checkpoint files in `folder` left by processes killed mid-write
    (their names hold the writer's process id; files of live processes are left alone)."""
    for entry in os.listdir(folder):
        m = _TEMPORARY.match(entry)
        if m is None or int(m["pid"]) == os.getpid() or _process_exists(int(m["pid"])):
            continue
        try:
            os.remove(os.path.join(folder, entry))
        except OSError:
            pass


def _process_exists(pid):
    try:
        os.kill(pid, 0)               # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:                   # it exists but belongs to someone else
        return True
    return True


def _read(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        state = minidl.load(path)
        state["meta"] = _json_from_array(state["meta"])
        state["model"]
    except (KeyError, ValueError, OSError, EOFError, TypeError) as exc:
        detail = str(exc).rstrip(".")
        raise ValueError(f"Checkpoint {path} is damaged or was not written by seg.train "
                         f"({type(exc).__name__}: {detail}).") from None
    return state


def read_checkpoint_meta(path):
    """The meta dict of a checkpoint (epoch, best score, config, history) without a model."""
    return _read(path)["meta"]


def _other_model_message(path, config, detail=None):
    """One sentence for a checkpoint whose weights do not fit the model: the command-line
    options it was trained with (from its stored config), so the user can repeat them, and
    `detail`, the first difference found (a layer name or shape), when given."""
    options = {"model": config.get("model"), **(config.get("model_options") or {})}
    flags = []
    for key, value in options.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags.append(f"{flag} {value}")
    made = [f"it was trained with {' '.join(flags)}"] if flags else []
    made += [str(detail)] if detail else []
    made = f" ({'; '.join(made)})" if made else ""
    return (f"Checkpoint {path} does not fit this model: it holds the weights of another architecture "
            f"or of other options than the ones these options build{made}; resume with the options it "
            "was trained with, or leave out --resume to start anew.")


def load_checkpoint(path, model, optimizer=None, scheduler=None):
    """Load a checkpoint into model (and optimizer/scheduler when given); return its meta dict.

    The meta's "rng" entry gets minidl's stored random state under "minidl" (restore it with
    minidl.set_rng_state); loading does not change the random streams by itself.
    """
    state = _read(path)
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as exc:     # other layer names or shapes
        raise ValueError(_other_model_message(path, state["meta"].get("config", {}),
                                              exc.args[0] if exc.args else exc)) from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    meta = state["meta"]
    if state.get("rng") is not None:
        meta.setdefault("rng", {})["minidl"] = state["rng"]
    return meta

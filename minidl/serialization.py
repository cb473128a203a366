"""save / load: checkpoints as .npz files (a zip of .npy arrays), never pickle.

    minidl.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, "ckpt.npz")
    ckpt = minidl.load("ckpt.npz")      # the same nesting: ckpt["epoch"] == 3

Nested dicts (and lists/tuples) are flattened into "/"-separated keys ("model/conv1.weight",
"optimizer/state/0/exp_avg"); arrays are moved to the host; Python numbers and strings are
stored as 0-d arrays. A small JSON layout entry lists every key in order with its kind
(array, number/string, None, dict, list, tuple) and which dict keys were integers, so `load`
gives back the same structure in the same order.

The file is written to a temporary file in the same folder and then renamed over the target
(os.replace is atomic), so a crash mid-save never leaves a half-written checkpoint.
Loading uses allow_pickle=False: a file holding object arrays (pickled Python objects, which
could run code when loaded) is refused.
"""
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping

import numpy

from . import backend
from .tensor import Tensor

_LAYOUT_KEY = "__minidl_layout__"
_CONTAINERS = ("dict", "list", "tuple")


# ---------------------------------------------------------------------- flattening
def _flatten(path, value, arrays, layout):
    kinds, int_keys = layout["kinds"], layout["int_keys"]
    if isinstance(value, Mapping):
        kinds[path] = "dict"
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int, numpy.integer)):
                raise TypeError(f"save() can only store dict keys that are strings or integers, got "
                                f"{key!r} under {path or 'the top level'!r}.")
            name = str(key)
            if not name or "/" in name or name == _LAYOUT_KEY:
                raise ValueError(f"save() cannot store the key {name!r} under {path or 'the top level'!r}: "
                                 "keys must be non-empty and must not contain '/'.")
            child = f"{path}/{name}" if path else name
            if not isinstance(key, str):
                int_keys.append(child)
            _flatten(child, item, arrays, layout)
    elif isinstance(value, (list, tuple)):
        kinds[path] = "list" if isinstance(value, list) else "tuple"
        for i, item in enumerate(value):
            _flatten(f"{path}/{i}" if path else str(i), item, arrays, layout)
    elif value is None:
        kinds[path] = "none"
    elif isinstance(value, (bool, int, float, str)):
        kinds[path] = "scalar"
        arrays[path] = _host_array(path, numpy.asarray(value))
    else:
        if isinstance(value, Tensor):
            value = value.data
        if not (isinstance(value, (numpy.ndarray, numpy.generic)) or backend.is_gpu_array(value)):
            raise TypeError(f"save() cannot store {path!r} of type {type(value).__name__}; store "
                            "arrays, tensors, numbers, strings, None, and dicts/lists of them.")
        kinds[path] = "array"
        arrays[path] = _host_array(path, value)


def _host_array(path, value):
    array = backend.to_numpy(value)
    if array.dtype.hasobject:
        raise TypeError(f"save() cannot store {path!r}: it is an object array, which would need "
                        "pickle; convert it to numbers or strings first.")
    return array


# ---------------------------------------------------------------------- writing
def _file_mode():
    """rw for everyone the umask allows, like a file made by open()."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_member(archive, name, array):
    with archive.open(name + ".npy", "w", force_zip64=True) as member:
        numpy.lib.format.write_array(member, numpy.asanyarray(array), allow_pickle=False)


def save(obj, path):
    """Write a (nested) dict of arrays/tensors/numbers/strings to `path` as .npz, atomically."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"save() needs a dict, e.g. model.state_dict() or {{'model': ..., "
                        f"'epoch': 3}}, got {type(obj).__name__}.")
    path = os.fspath(path)
    arrays, layout = {}, {"format": 1, "kinds": {}, "int_keys": []}
    _flatten("", obj, arrays, layout)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path!r}: the folder {folder!r} does not exist; "
                                "create it first.")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for key, array in arrays.items():
                    _write_member(archive, key, array)
                _write_member(archive, _LAYOUT_KEY, numpy.array(json.dumps(layout)))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------- reading
def _read(path):
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            single = f.read(6) == b"\x93NUMPY"
        if single:
            raise ValueError(f"cannot load {path!r}: it holds a single array (.npy), not a "
                             "checkpoint written by minidl.save; read it with numpy.load.")
        raise ValueError(f"cannot load {path!r}: the file is damaged or not an .npz checkpoint "
                         "(it is not a complete zip archive).")
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "Object arrays" in str(exc) or "pickle" in str(exc):
            raise ValueError(f"refusing to load {path!r}: it holds object arrays (pickled Python "
                             "objects, which can run code when loaded); re-save the data with "
                             "minidl.save from plain arrays.") from None
        raise ValueError(f"cannot load {path!r}: the file is damaged ({exc}).") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"cannot load {path!r}: the file is damaged ({type(exc).__name__}: "
                         f"{exc}).") from None


def _container(tree, path):
    node = tree
    for part in path.split("/"):
        node = node.setdefault(part, {})
    return node


def _insert(tree, path, value):
    parent, _, name = path.rpartition("/")
    (_container(tree, parent) if parent else tree)[name] = value


def _finish(node, path, kinds, int_keys):
    """Turn the all-dict tree back into the saved lists, tuples and integer keys."""
    if not isinstance(node, dict):
        return node
    items = {}
    for key, child in node.items():
        child_path = f"{path}/{key}" if path else key
        items[int(key) if child_path in int_keys else key] = _finish(child, child_path, kinds, int_keys)
    kind = kinds.get(path, "dict")
    if kind in ("list", "tuple"):
        values = [items[str(i)] for i in range(len(items))]
        return values if kind == "list" else tuple(values)
    return items


def load(path, map_location=None):
    """Read a checkpoint written by save(): the same nesting, arrays as numpy.ndarray.

    map_location: None/"cpu" keeps arrays on the host, "gpu" moves them to the GPU.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot load {path!r}: no such file.")
    arrays = _read(path)
    layout = {"kinds": {}, "int_keys": []}
    if _LAYOUT_KEY in arrays:
        try:
            layout = json.loads(str(arrays.pop(_LAYOUT_KEY)[()]))
        except ValueError:
            raise ValueError(f"cannot load {path!r}: its layout entry is damaged.") from None
    # The layout lists every path in the order it was saved; a plain .npz has no layout.
    kinds = layout.get("kinds") or {key: "array" for key in arrays}
    int_keys = set(layout.get("int_keys", []))
    tree = {}
    for p, kind in kinds.items():
        if not p:
            continue
        if kind in _CONTAINERS:
            _container(tree, p)
        elif kind == "none":
            _insert(tree, p, None)
        elif kind == "scalar":
            _insert(tree, p, arrays[p].item())
        else:
            array = arrays[p]
            _insert(tree, p, array if map_location is None else backend.to_device(array, map_location))
    return _finish(tree, "", kinds, int_keys)


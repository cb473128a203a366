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

A path ending in ".safetensors" is written and read in that format instead (the weight
format of the PyTorch world: a JSON header and raw tensor bytes, nothing to unpickle). Its
header has a str -> str metadata dict, which holds the same JSON layout entry; numbers,
strings and text arrays (not tensors there) go into the layout as well. A .safetensors file written by
another tool (e.g. torch's `safetensors.torch.save_file(model.state_dict(), ...)`) has no
layout and loads as a flat dict {name: array}.
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
SAFETENSORS_SUFFIX = ".safetensors"


def is_safetensors(path):
    """Whether `path` names a .safetensors file (chosen by the suffix, any case)."""
    return os.fspath(path).lower().endswith(SAFETENSORS_SUFFIX)


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError("reading or writing .safetensors files needs the safetensors package; "
                          "install it with pip install safetensors.") from None
    return safetensors.numpy


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
    """Write a (nested) dict of arrays/tensors/numbers/strings to `path`, atomically: as .npz,
    or as .safetensors when the path ends so."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"save() needs a dict, e.g. model.state_dict() or {{'model': ..., "
                        f"'epoch': 3}}, got {type(obj).__name__}.")
    path = os.fspath(path)
    arrays, layout = {}, {"format": 1, "kinds": {}, "int_keys": []}
    _flatten("", obj, arrays, layout)
    if is_safetensors(path):
        data = _safetensors_bytes(path, arrays, layout)
        write_atomically(path, lambda f: f.write(data))
        return

    def write(f):
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, array in arrays.items():
                _write_member(archive, key, array)
            _write_member(archive, _LAYOUT_KEY, numpy.array(json.dumps(layout)))
    write_atomically(path, write)


def _safetensors_bytes(path, arrays, layout):
    """The .safetensors file: numbers and strings move into the layout (only arrays of
    numbers and booleans are tensors there), and the layout into the metadata."""
    layout["scalars"], layout["strings"] = {}, {}
    tensors = {}
    for key, array in arrays.items():
        if layout["kinds"][key] == "scalar":
            layout["scalars"][key] = array.item()
        elif array.dtype.kind == "U":          # text arrays: nested lists in the JSON
            layout["strings"][key] = array.tolist()
        elif array.dtype.kind not in "biuf":
            raise TypeError(f"save() cannot store {key!r} (dtype {array.dtype}) in "
                            f"{os.path.basename(path)!r}: .safetensors holds arrays of numbers, "
                            "booleans and text only; save to .npz instead.")
        else:
            tensors[key] = numpy.ascontiguousarray(array).reshape(array.shape)
    return _safetensors_numpy().save(tensors, metadata={_LAYOUT_KEY: json.dumps(layout)})


def fsync_folder(folder):
    """Flush a folder's entries to disk, so that a rename in it survives a power cut (POSIX;
    a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it over `path`, so that
    a crash midway never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path!r}: the folder {folder!r} does not exist; "
                                "create it first.")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
        fsync_folder(folder)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------- reading
def _read_safetensors(path):
    """{name: array} and the metadata dict of a .safetensors file."""
    sn = _safetensors_numpy()
    with open(path, "rb") as f:
        data = f.read()
    try:
        arrays = sn.load(data)
        # The format: an 8-byte little-endian header length, then the JSON header.
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    except Exception as exc:    # safetensors raises its own SafetensorError
        raise ValueError(f"cannot load {path!r}: the file is damaged or not a .safetensors file "
                         f"({exc}).") from None
    return arrays, header.get("__metadata__") or {}


def read_arrays(path):
    """{name: numpy array} of a .npz or .safetensors file, flat, as stored (for files of
    named weights from other tools; minidl.load gives back a checkpoint's nesting)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot load {path!r}: no such file.")
    arrays = _read_safetensors(path)[0] if is_safetensors(path) else _read(path)
    arrays.pop(_LAYOUT_KEY, None)
    return arrays


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
    """Read a checkpoint written by save() (.npz or .safetensors): the same nesting, arrays as
    numpy.ndarray.

    map_location: None/"cpu" keeps arrays on the host, "gpu" moves them to the GPU.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot load {path!r}: no such file.")
    layout = {"kinds": {}, "int_keys": []}
    if is_safetensors(path):
        arrays, metadata = _read_safetensors(path)
        entry = metadata.get(_LAYOUT_KEY)
    else:
        arrays = _read(path)
        entry = arrays.pop(_LAYOUT_KEY)[()] if _LAYOUT_KEY in arrays else None
    if entry is not None:
        try:
            layout = json.loads(str(entry))
        except ValueError:
            raise ValueError(f"cannot load {path!r}: its layout entry is damaged.") from None
    scalars = layout.get("scalars", {})
    arrays.update({key: numpy.array(value, dtype=str)
                   for key, value in layout.get("strings", {}).items()})
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
            _insert(tree, p, scalars[p] if p in scalars else arrays[p].item())
        else:
            array = arrays[p]
            _insert(tree, p, array if map_location is None else backend.to_device(array, map_location))
    return _finish(tree, "", kinds, int_keys)


"""Load pretrained weights (e.g. VGG-16 trained on ImageNet) from a user-provided .npz file.

Nothing is downloaded: export the arrays from the framework you have them in, as one .npz of
named arrays (`numpy.savez("vgg16.npz", **{"conv1_1/W": w, "conv1_1/b": b, ...})`), then

    report = load_pretrained(model, "vgg16.npz", mapping="vgg16-caffe")
    report["loaded"], report["skipped"], report["mismatched"], report["missing"]

Accepted names (`mapping=`):

- None: the model's own state_dict names ("backbone.conv1_1.weight"); a name that is not a
  model key is also matched as a suffix ("conv1_1.weight" or "layer1.0.conv1.weight" finds
  "backbone.conv1_1.weight" / "backbone.layer1.0.conv1.weight"), loading every key it ends.
- "vgg16-caffe" / "vgg19-caffe": Caffe-model-zoo layer names with "/W" (or "/weight",
  "/weights") and "/b" (or "/bias", "/biases"): conv1_1/W .. conv5_3/W, fc6/W, fc7/W (fc8 is
  ImageNet's classifier and is skipped). Conv kernels are (out, in, kh, kw) as in Caffe and
  PyTorch, or (kh, kw, in, out) as in TensorFlow / MatConvNet (recognised by shape).
- "vgg16-torchvision" / "vgg19-torchvision" (and "vgg16_bn-torchvision", "vgg19_bn-..."):
  torchvision's features.0.weight ... and classifier.0 / classifier.3 (fc6 / fc7).
- "resnet101-torchvision": torchvision's names (conv1.weight, bn1.running_mean,
  layer1.0.conv1.weight, ...), which the ResNet trunk here uses too; fc.* is skipped.
- a dict {file name: model name}: names not in the dict are tried as with None.

Fully connected fc6 / fc7 weights ((4096, 25088) and (4096, 4096), or transposed as TensorFlow
stores them) are reshaped into the conv form (4096, 512, 7, 7) / (4096, 4096, 1, 1) when the
model's layer has that many weights; otherwise (DeepLab's 1024-channel 3x3 fc6) they are
reported as mismatched and left alone. Running statistics of BatchNorm are loaded as well.
"""
import os

import numpy

from .backbones import VGG_STAGES

__all__ = ["load_pretrained", "vgg_mapping", "MAPPINGS"]

_WEIGHT_SUFFIXES = {"W": "weight", "weight": "weight", "weights": "weight", "kernel": "weight",
                    "b": "bias", "bias": "bias", "biases": "bias"}


def _vgg_conv_names(depth):
    return [f"conv{s}_{i}" for s, n in enumerate(VGG_STAGES[depth], start=1) for i in range(1, n + 1)]


def vgg_mapping(depth=16, style="caffe", batch_norm=False):
    """{file name: model layer name} for a VGG of `depth` exported from Caffe or torchvision.

    Caffe names map by layer ("conv1_1/W" -> "conv1_1.weight"); torchvision's `features.i`
    indices count every conv, BN, ReLU and pool (a conv is followed by ReLU, or BN + ReLU).
    """
    names = _vgg_conv_names(depth)
    mapping = {}
    if style == "caffe":
        for layer in names + ["fc6", "fc7"]:
            for src, dst in _WEIGHT_SUFFIXES.items():
                mapping[f"{layer}/{src}"] = f"{layer}.{dst}"
        return mapping
    if style != "torchvision":
        raise ValueError(f"VGG mapping style must be 'caffe' or 'torchvision', got {style!r}.")
    index = 0
    for s, n in enumerate(VGG_STAGES[depth], start=1):
        for i in range(1, n + 1):
            mapping[f"features.{index}.weight"] = f"conv{s}_{i}.weight"
            mapping[f"features.{index}.bias"] = f"conv{s}_{i}.bias"
            index += 1
            if batch_norm:
                for p in ("weight", "bias", "running_mean", "running_var"):
                    mapping[f"features.{index}.{p}"] = f"bn{s}_{i}.{p}"
                index += 1
            index += 1            # ReLU
        index += 1                # pool
    mapping.update({"classifier.0.weight": "fc6.weight", "classifier.0.bias": "fc6.bias",
                    "classifier.3.weight": "fc7.weight", "classifier.3.bias": "fc7.bias"})
    return mapping


MAPPINGS = {
    "vgg16-caffe": lambda: vgg_mapping(16, "caffe"),
    "vgg19-caffe": lambda: vgg_mapping(19, "caffe"),
    "vgg16-torchvision": lambda: vgg_mapping(16, "torchvision"),
    "vgg19-torchvision": lambda: vgg_mapping(19, "torchvision"),
    "vgg16_bn-torchvision": lambda: vgg_mapping(16, "torchvision", batch_norm=True),
    "vgg19_bn-torchvision": lambda: vgg_mapping(19, "torchvision", batch_norm=True),
    "resnet101-torchvision": lambda: {},     # names already agree; suffix matching does the rest
}


def _targets(name, own):
    """Model keys that file name `name` (already mapped) refers to: exact, else by suffix."""
    if name in own:
        return [name]
    return [k for k in own if k.endswith("." + name)]


def _fit(array, shape, layout):
    """`array` rearranged to `shape`, or None when it cannot be.

    4-D: (out, in, kh, kw) as is, or (kh, kw, in, out) transposed. 2-D fully connected weights
    become conv weights: (out, in * kh * kw) (Caffe / PyTorch, C-major flattening) or its
    transpose (TensorFlow, (kh * kw * in, out), H-W-C flattening).
    """
    shape = tuple(shape)
    if array.shape == shape and layout != "hwio":
        return array
    if len(shape) == 4:
        out, cin, kh, kw = shape
        if array.ndim == 4 and array.shape == (kh, kw, cin, out) and layout != "oihw":
            return array.transpose(3, 2, 0, 1)
        if array.ndim == 2 and array.size == out * cin * kh * kw:
            if array.shape == (out, cin * kh * kw) and layout != "hwio":
                return array.reshape(shape)
            if array.shape == (cin * kh * kw, out):
                return array.T.reshape(out, kh, kw, cin).transpose(0, 3, 1, 2)
    if len(shape) == 1 and array.size == shape[0]:
        return array.reshape(shape)
    return None


def load_pretrained(model, path, mapping=None, strict=False, layout="auto", verbose=True):
    """Copy the arrays of the .npz file `path` into `model`'s parameters and buffers.

    model:   a minidl.nn.Module.
    path:    a .npz file of named arrays (loaded with allow_pickle=False).
    mapping: None, a name from MAPPINGS (e.g. "vgg16-caffe") or a dict {file name: model name}.
    strict:  raise ValueError if any file array is unused or does not fit.
    layout:  "auto" (recognise the layout by shape), "oihw" (Caffe / PyTorch) or "hwio"
             (TensorFlow); needed only when shapes are ambiguous, e.g. square fc7 weights.
    verbose: print the report.

    Returns {"loaded": [model keys], "skipped": [file names without a model key],
    "mismatched": [(file name, file shape, model key, model shape)], "missing": [model
    parameter keys nothing was loaded into]}.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained weight file {path!r} does not exist; export the "
                                "weights to a .npz of named arrays first (see seg.models.pretrained).")
    if layout not in ("auto", "oihw", "hwio"):
        raise ValueError(f"layout must be 'auto', 'oihw' or 'hwio', got {layout!r}.")
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {mapping!r}; choose one of {', '.join(sorted(MAPPINGS))} "
                             "or pass a dict {name in the file: name in the model}.")
        mapping = MAPPINGS[mapping]()
    elif mapping is not None and not isinstance(mapping, dict):
        raise TypeError(f"mapping must be None, a mapping name or a dict, got {type(mapping).__name__}.")
    mapping = mapping or {}
    own = model.state_dict()
    param_keys = [k for k, _ in model.named_parameters()]
    with numpy.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    update, loaded, skipped, mismatched = {}, [], [], []
    for src, array in arrays.items():
        targets = _targets(mapping.get(src, src), own)
        if not targets:
            skipped.append(src)
            continue
        for key in targets:
            current = own[key]
            fitted = None if current is None else _fit(numpy.asarray(array), current.shape, layout)
            if fitted is None:
                mismatched.append((src, tuple(array.shape), key,
                                   None if current is None else tuple(current.shape)))
            else:
                update[key] = numpy.ascontiguousarray(fitted)
                loaded.append(key)
    model.load_state_dict(update, strict=False)
    missing = [k for k in param_keys if k not in update]
    report = {"loaded": loaded, "skipped": skipped, "mismatched": mismatched, "missing": missing}
    if verbose:
        print(format_report(report, path))
    if strict and (skipped or mismatched):
        raise ValueError(f"load_pretrained(strict=True): {len(skipped)} arrays of {path!r} have no "
                         f"place in the model and {len(mismatched)} do not fit; pass strict=False "
                         "to load the rest, or a mapping that names them.")
    return report


def format_report(report, path=""):
    """The load report as a few readable lines."""
    lines = [f"load_pretrained({path!r}): loaded {len(report['loaded'])} arrays, skipped "
             f"{len(report['skipped'])}, shape-mismatched {len(report['mismatched'])}, "
             f"{len(report['missing'])} model parameters left as initialised"]
    if report["skipped"]:
        lines.append("  skipped (no such layer in the model): " + ", ".join(report["skipped"]))
    for src, sshape, key, mshape in report["mismatched"]:
        lines.append(f"  mismatched: {src} {sshape} -> {key} {mshape}")
    return "\n".join(lines)

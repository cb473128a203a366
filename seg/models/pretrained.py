"""Load pretrained weights (e.g. VGG-16 trained on ImageNet) from a user-provided file.

Nothing is downloaded: export the arrays from the framework you have them in, as one
.safetensors (PyTorch: `safetensors.torch.save_file(model.state_dict(), "vgg16.safetensors")`)
or .npz of named arrays (`numpy.savez("vgg16.npz", **{"conv1_1/W": w, ...})`), then

    report = load_pretrained(model, "vgg16.safetensors")      # layout guessed from the names
    report["loaded"], report["skipped"], report["mismatched"], report["missing"]

Accepted names (`mapping=`), either hyphen order ("vgg16-torchvision" or "torchvision-vgg16"):

- "auto" (the default): the layout recognised from the file's names (infer_mapping), else None.
- None: the model's own state_dict names ("backbone.conv1_1.weight"); a name that is not a
  model key is also matched as a suffix ("conv1_1.weight" or "layer1.0.conv1.weight" finds
  "backbone.conv1_1.weight" / "backbone.layer1.0.conv1.weight"), loading the shallowest
  keys it ends ("bn1.weight" is "backbone.bn1.weight", not "backbone.layer1.0.bn1.weight").
- "vgg16-caffe" / "vgg19-caffe": Caffe-model-zoo layer names with "/W" (or "/weight",
  "/weights") and "/b" (or "/bias", "/biases"): conv1_1/W .. conv5_3/W, fc6/W, fc7/W (fc8 is
  ImageNet's classifier and is skipped). Conv kernels are (out, in, kh, kw) as in Caffe and
  PyTorch, or (kh, kw, in, out) as in TensorFlow / MatConvNet (recognised by shape).
- "vgg16-torchvision" / "vgg19-torchvision" (and "vgg16_bn-torchvision", "vgg19_bn-..."):
  torchvision's features.0.weight ... and classifier.0 / classifier.3 (fc6 / fc7, fully
  connected (4096, 25088) and (4096, 4096)); classifier.6 (ImageNet's classes) is skipped.
- "vgg16-timm" / "vgg19-timm" / "vgg16_bn-timm" / "vgg19_bn-timm": timm's names: the same
  features.N, and fc6 / fc7 already as convolutions, pre_logits.fc1 (4096, 512, 7, 7) and
  pre_logits.fc2 (4096, 4096, 1, 1); head.fc is skipped.
- "resnet101-torchvision" / "resnet101-timm": conv1.weight, bn1.running_mean,
  layer1.0.conv1.weight, ... (both libraries use these names, and so does the ResNet trunk
  here); fc.* is skipped.
- a dict {file name: model name}: names not in the dict are tried as with None.

Fully connected fc6 / fc7 weights ((4096, 25088) and (4096, 4096), or transposed as TensorFlow
stores them) are reshaped into the conv form (4096, 512, 7, 7) / (4096, 4096, 1, 1) when the
model's layer has that many weights; otherwise (DeepLab's 1024-channel 3x3 fc6) they are
reported as mismatched and left alone. Running statistics of BatchNorm are loaded as well.
"""
import os
import re

import numpy

from minidl.serialization import read_arrays
from .backbones import VGG_STAGES

__all__ = ["load_pretrained", "vgg_mapping", "infer_mapping", "resolve_mapping", "MAPPINGS",
           "format_report"]

# Where weights come from; a mapping name is "<network>-<source>", in either order.
SOURCES = ("caffe", "torchvision", "timm")
_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

_WEIGHT_SUFFIXES = {"W": "weight", "weight": "weight", "weights": "weight", "kernel": "weight",
                    "b": "bias", "bias": "bias", "biases": "bias"}


def _vgg_conv_names(depth):
    return [f"conv{s}_{i}" for s, n in enumerate(VGG_STAGES[depth], start=1) for i in range(1, n + 1)]


def vgg_mapping(depth=16, style="caffe", batch_norm=False):
    """{file name: model layer name} for a VGG of `depth` exported from Caffe, torchvision or timm.

    Caffe names map by layer ("conv1_1/W" -> "conv1_1.weight"); the `features.i` indices of
    torchvision and timm count every conv, BN, ReLU and pool (a conv is followed by ReLU, or
    BN + ReLU). fc6 / fc7 are torchvision's classifier.0 / .3 and timm's pre_logits.fc1 / .fc2.
    """
    names = _vgg_conv_names(depth)
    mapping = {}
    if style == "caffe":
        for layer in names + ["fc6", "fc7"]:
            for src, dst in _WEIGHT_SUFFIXES.items():
                mapping[f"{layer}/{src}"] = f"{layer}.{dst}"
        return mapping
    if style not in ("torchvision", "timm"):
        raise ValueError(f"VGG mapping style must be 'caffe', 'torchvision' or 'timm', got {style!r}.")
    index = 0
    for s, n in enumerate(VGG_STAGES[depth], start=1):
        for i in range(1, n + 1):
            mapping[f"features.{index}.weight"] = f"conv{s}_{i}.weight"
            mapping[f"features.{index}.bias"] = f"conv{s}_{i}.bias"
            index += 1
            if batch_norm:
                for p in _BN_ENTRIES:
                    mapping[f"features.{index}.{p}"] = f"bn{s}_{i}.{p}"
                index += 1
            index += 1            # ReLU
        index += 1                # pool
    fc6, fc7 = ("classifier.0", "classifier.3") if style == "torchvision" else \
        ("pre_logits.fc1", "pre_logits.fc2")
    for src, dst in ((fc6, "fc6"), (fc7, "fc7")):
        mapping.update({f"{src}.weight": f"{dst}.weight", f"{src}.bias": f"{dst}.bias"})
    return mapping


MAPPINGS = {
    "vgg16-caffe": lambda: vgg_mapping(16, "caffe"),
    "vgg19-caffe": lambda: vgg_mapping(19, "caffe"),
    "resnet101-torchvision": lambda: {},     # names already agree; suffix matching does the rest
    "resnet101-timm": lambda: {},            # timm's ResNet uses torchvision's names
}
for _style in ("torchvision", "timm"):
    for _depth in (16, 19):
        MAPPINGS[f"vgg{_depth}-{_style}"] = (lambda d=_depth, st=_style: vgg_mapping(d, st))
        MAPPINGS[f"vgg{_depth}_bn-{_style}"] = (
            lambda d=_depth, st=_style: vgg_mapping(d, st, batch_norm=True))


def resolve_mapping(name):
    """The MAPPINGS key for a mapping name typed either way round: "torchvision-vgg16",
    "VGG16-torchvision" and "vgg16-torchvision" all give "vgg16-torchvision"."""
    parts = str(name).strip().lower().split("-")
    if len(parts) == 2 and parts[0] in SOURCES:
        parts.reverse()
    key = "-".join(parts)
    if key not in MAPPINGS:
        raise ValueError(f"unknown mapping {name!r}; choose one of {', '.join(sorted(MAPPINGS))} "
                         "(either hyphen order), 'auto', or pass a dict {name in the file: name "
                         "in the model}.")
    return key


def infer_mapping(names):
    """The MAPPINGS key whose layout the file names `names` follow, or None (own names).

    torchvision's VGG has classifier.0, timm's pre_logits.fc1, Caffe's layer/W names; BN
    variants have running statistics among features.*, VGG-19 a fourth conv in stage 5;
    a ResNet has layer1.0.conv1.weight.
    """
    names = set(names)
    if any(re.fullmatch(r"conv\d_\d/\w+", n) for n in names):
        return "vgg19-caffe" if any(n.startswith("conv5_4/") for n in names) else "vgg16-caffe"
    if "conv1.weight" in names and "layer1.0.conv1.weight" in names:
        return "resnet101-torchvision"     # (timm's ResNet writes the very same names)
    style = ("timm" if "pre_logits.fc1.weight" in names else
             "torchvision" if "classifier.0.weight" in names else None)
    features = [n for n in names if re.fullmatch(r"features\.\d+\.weight", n)]
    if style is None and not features:
        return None
    style = style or "torchvision"         # a features-only export (no classifier)
    bn = any(n.startswith("features.") and n.endswith(".running_mean") for n in names)
    convs = len(features) - (len([n for n in names if n.startswith("features.")
                                  and n.endswith(".running_mean")]) if bn else 0)
    depth = 19 if convs >= 16 else 16
    return f"vgg{depth}{'_bn' if bn else ''}-{style}"


def _targets(name, own):
    """Model keys that file name `name` (already mapped) refers to: exact, else by suffix."""
    if name in own:
        return [name]
    found = [k for k in own if k.endswith("." + name)]
    # The shallowest match only: ResNet's top-level "bn1.weight" is the trunk's
    # "backbone.bn1.weight", not also every block's "backbone.layer1.0.bn1.weight".
    depth = min((k.count(".") for k in found), default=0)
    return [k for k in found if k.count(".") == depth]


def _fit(array, shape, layout):
    """`array` rearranged to `shape`, or None when it cannot be.

    4-D: (out, in, kh, kw) as is, or (kh, kw, in, out) transposed; an RGB (out, 3, kh, kw)
    kernel for a 1-channel layer is summed over the colours. 2-D fully connected weights
    become conv weights: (out, in * kh * kw) (Caffe / PyTorch, C-major flattening) or its
    transpose (TensorFlow, (kh * kw * in, out), H-W-C flattening).
    """
    shape = tuple(shape)
    if array.shape == shape and layout != "hwio":
        return array
    if len(shape) == 4:
        out, cin, kh, kw = shape
        if cin == 1 and array.ndim == 4 and array.shape == (out, 3, kh, kw):
            # An RGB first layer for grayscale images (the ultrasound data): sum over the
            # colours, so a gray pixel g gives what the RGB pixel (g, g, g) gave (timm does so).
            return array.sum(axis=1, keepdims=True)
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


def load_pretrained(model, path, mapping="auto", strict=False, layout="auto", verbose=True):
    """Copy the arrays of the weight file `path` into `model`'s parameters and buffers.

    model:   a minidl.nn.Module.
    path:    a .safetensors or .npz file of named arrays (never unpickled).
    mapping: "auto" (recognise the layout from the names), None (the model's own names), a
             name from MAPPINGS (e.g. "vgg16-caffe" or "torchvision-vgg16") or a dict
             {file name: model name}.
    strict:  raise ValueError if any file array is unused or does not fit.
    layout:  "auto" (recognise the layout by shape), "oihw" (Caffe / PyTorch) or "hwio"
             (TensorFlow); needed only when shapes are ambiguous, e.g. square fc7 weights.
    verbose: print the report.

    Returns {"loaded": [model keys], "skipped": [file names without a model key],
    "mismatched": [(file name, file shape, model key, model shape)], "missing": [model
    parameter keys nothing was loaded into], "mapping": the mapping name used (or None)}.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained weight file {path!r} does not exist; export the "
                                "weights to a .safetensors or .npz of named arrays first (see "
                                "seg.models.pretrained).")
    if layout not in ("auto", "oihw", "hwio"):
        raise ValueError(f"layout must be 'auto', 'oihw' or 'hwio', got {layout!r}.")
    if mapping is not None and not isinstance(mapping, (str, dict)):
        raise TypeError(f"mapping must be None, 'auto', a mapping name or a dict, got "
                        f"{type(mapping).__name__}.")
    arrays = read_arrays(path)
    name = None
    if mapping == "auto":
        name = infer_mapping(arrays)
        mapping = MAPPINGS[name]() if name else None
    elif isinstance(mapping, str):
        name = resolve_mapping(mapping)
        mapping = MAPPINGS[name]()
    mapping = mapping or {}
    own = model.state_dict()
    param_keys = [k for k, _ in model.named_parameters()]
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
                # (ascontiguousarray alone would turn num_batches_tracked's 0-d count into 1-d)
                update[key] = numpy.ascontiguousarray(fitted).reshape(fitted.shape)
                loaded.append(key)
    model.load_state_dict(update, strict=False)
    missing = [k for k in param_keys if k not in update]
    report = {"loaded": loaded, "skipped": skipped, "mismatched": mismatched, "missing": missing,
              "mapping": name}
    if verbose:
        print(format_report(report, path))
    if strict and (skipped or mismatched):
        raise ValueError(f"load_pretrained(strict=True): {len(skipped)} arrays of {path!r} have no "
                         f"place in the model and {len(mismatched)} do not fit; pass strict=False "
                         "to load the rest, or a mapping that names them.")
    return report


def format_report(report, path=""):
    """The load report as a few readable lines."""
    used = f" with mapping {report['mapping']!r}" if report.get("mapping") else ""
    lines = [f"load_pretrained({path!r}){used}: loaded {len(report['loaded'])} arrays, skipped "
             f"{len(report['skipped'])}, shape-mismatched {len(report['mismatched'])}, "
             f"{len(report['missing'])} model parameters left as initialised"]
    if report["skipped"]:
        lines.append("  skipped (no such layer in the model): " + ", ".join(report["skipped"]))
    for src, sshape, key, mshape in report["mismatched"]:
        lines.append(f"  mismatched: {src} {sshape} -> {key} {mshape}")
    return "\n".join(lines)

"""Model summaries: parameter counts, output strides, and a layer-by-layer explanation.

    describe("fcn8s")                # {"params": 134489759, "output_stride": 8, "layers": [...], ...}
    models_table()                   # one row per reference configuration (python -m seg models)
    print(explain("dilation8", input_size=(321, 321)))

`explain` lists every conv layer with its parameter arithmetic (C_in x kh x kw x C_out + C_out),
the size of its output for a given input, and how the receptive field grows: the number of
input pixels (per side) that can influence one output pixel, grown by each layer as
    RF += (dilation * (k - 1)) * jump,    jump *= stride
where jump is the distance, in input pixels, between neighbouring pixels of the layer's input.
Pools count as layers (k, stride); an upsampling layer divides the jump. After upsampling
this is the field of a typical pixel: where a pixel sits in the pooling grid moves its own
field by up to the deepest jump (`measure=True` measures the centre pixel's).
The layer sizes come from running a width-reduced copy of the model (widths change channel
counts only, never spatial sizes) on a zero image; the parameter counts come from the full
model. In branching networks (FCN skips, ASPP, RefineNet) each layer's RF follows its own
input (the largest RF among the tensors that were combined to make it).
"""
import contextlib
import inspect

import numpy

import minidl
from minidl import nn
from minidl import functional as F
from minidl.function import Function
from minidl.ops.geometry import pair
from minidl.nn import pooling as nn_pooling
from minidl.tensor import Tensor

from . import available, build

__all__ = ["REFERENCE", "describe", "models_table", "format_table", "explain", "count_parameters",
           "fast_init", "paper_input_size"]

# (name, options, trainable parameters from /work/shared/reference/architectures.md or None).
REFERENCE = [
    ("unet", dict(num_classes=2, in_channels=1), 31_030_658),
    ("unet", dict(num_classes=2, in_channels=3, padding="same", batch_norm=True), 31_043_586),
    ("unet", dict(num_classes=2, in_channels=1, depth=3, features_root=16), 116_770),
    ("segnet", dict(num_classes=11), 29_449_355),
    ("deconvnet", dict(num_classes=21), 251_805_653),
    ("fcdensenet56", dict(num_classes=11), 1_376_795),
    ("fcdensenet67", dict(num_classes=11), 3_463_243),
    ("fcdensenet103", dict(num_classes=11), 9_322_091),
    ("fcn32s", dict(num_classes=21), 136_152_917),
    ("fcn16s", dict(num_classes=21), 134_815_994),
    ("fcn8s", dict(num_classes=21), 134_489_759),
    ("fcn8s", dict(num_classes=21, backbone="vgg19"), 139_799_455),
    ("deeplab_largefov", dict(num_classes=21), 20_505_429),
    ("deeplabv2", dict(num_classes=21), 37_877_652),
    ("deeplabv2", dict(num_classes=21, backbone="resnet101"), 44_048_532),
    ("deeplabv3", dict(num_classes=21), None),
    ("dilation8", dict(num_classes=21), 134_346_581),
    # front-end + context module (the module alone: basic 28,392, large 6,803,139 at C = 21)
    ("dilation8", dict(num_classes=21, context="basic"), 134_346_581 + 28_392),
    ("dilation8", dict(num_classes=21, context="large"), 134_346_581 + 6_803_139),
    ("refinenet", dict(num_classes=21), None),
]

# The input size each paper trained / evaluated at (used by explain and the benchmark).
PAPER_INPUT = {"fcn32s": 500, "fcn16s": 500, "fcn8s": 500, "unet": 572, "segnet": (360, 480),
               "deconvnet": 224, "fcdensenet56": 224, "fcdensenet67": 224, "fcdensenet103": 224,
               "dilation8": 321, "deeplab_largefov": 321, "deeplabv2": 321, "deeplabv3": 513,
               "refinenet": 512}


def paper_input_size(name):
    """(h, w) the paper used for model `name` (224 x 224 when unknown)."""
    s = PAPER_INPUT.get(name, 224)
    return (s, s) if isinstance(s, int) else tuple(s)


def count_parameters(model):
    """Trainable parameters: conv / linear weights and biases, BN gamma and beta (no buffers)."""
    return sum(int(p.data.size) for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def fast_init():
    """Build models without drawing their random weights (for counting parameters).

    Counting a 250M-parameter model needs its shapes, not good weights: inside this context
    the random initialisers of minidl.nn.init leave the freshly allocated (uninitialised)
    arrays untouched, so the operating system does not even commit their memory and a
    full-size model is built in a fraction of a second. A model built here cannot be trained.
    """
    names = ("uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_")
    saved = {n: getattr(nn.init, n) for n in names if hasattr(nn.init, n)}

    def skip(tensor, *args, **kwargs):
        return tensor

    for n in saved:
        setattr(nn.init, n, skip)
    try:
        # Rescaling such garbage (RefineNet's Fixup scale) may meet NaN bit patterns: no warning.
        with numpy.errstate(invalid="ignore", over="ignore"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _defaults(name):
    for row_name, options, _ in REFERENCE:
        if row_name == name:
            return dict(options)
    return {"num_classes": 21}


def _reference_for(name, options):
    for row_name, row_options, count in REFERENCE:
        if row_name == name and _same_options(name, row_options, options):
            return count
    return None


def _same_options(name, a, b):
    """Whether two option dicts build the same model (filling in the builder's defaults)."""
    from . import _BUILDERS
    sig = inspect.signature(_BUILDERS[name])
    full = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect._empty}
    return {**full, **a} == {**full, **b}


def _build(name, init, **options):
    if init == "none":
        with fast_init():
            return build(name, **options)
    if init != "default":
        raise ValueError(f"init must be 'default' or 'none', got {init!r}.")
    return build(name, **options)


def describe(name, init="none", **options):
    """Build model `name` (reference configuration unless `options` say otherwise) and describe it.

    Returns a dict: name, options, params (trainable), reference (the published count for
    this configuration or None), output_stride, layers (one dict per conv / BN layer: name,
    type, shape of the weight, params).
    """
    if name not in available():
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(available())}.")
    options = {**_defaults(name), **options}
    model = _build(name, init, **options)
    layers = []
    for qual, m in model.named_modules():
        own = [p for p in m._parameters.values() if p is not None]
        if own and not list(m.children()):
            weight = m._parameters.get("weight")
            layers.append({"name": qual, "type": type(m).__name__,
                           "weight_shape": None if weight is None else tuple(weight.shape),
                           "params": sum(int(p.data.size) for p in own)})
    return {"name": name, "options": options, "params": count_parameters(model),
            "reference": _reference_for(name, options),
            "output_stride": getattr(model, "output_stride", 1), "layers": layers}


def models_table(names=None):
    """One row per reference configuration (and per model without one): a list of dicts with
    name, config (options besides the class count), classes, params, reference, output_stride."""
    rows = []
    listed = set()
    for name, options, _ in REFERENCE:
        if names is not None and name not in names:
            continue
        if name not in available():
            continue
        d = describe(name, **options)
        config = {k: v for k, v in options.items() if k not in ("num_classes",)}
        rows.append({"name": name, "config": config, "classes": options["num_classes"],
                     "params": d["params"], "reference": d["reference"],
                     "output_stride": d["output_stride"]})
        listed.add(name)
    for name in available():
        if name not in listed and (names is None or name in names):
            d = describe(name)
            rows.append({"name": name, "config": {}, "classes": d["options"]["num_classes"],
                         "params": d["params"], "reference": None,
                         "output_stride": d["output_stride"]})
    return rows


def format_table(rows):
    """models_table() rows as aligned text."""
    head = f"{'model':<17} {'configuration':<52} {'params':>13} {'reference':>13} {'stride':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        config = f"{r['classes']} cls" + (f", {config}" if config else "")
        ref = "-" if r["reference"] is None else f"{r['reference']:,}"
        mark = "" if r["reference"] is None else (" ok" if r["reference"] == r["params"] else " !!")
        lines.append(f"{r['name']:<17} {config:<52} {r['params']:>13,} {ref:>13} "
                     f"{r['output_stride']:>6}{mark}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- explain
class _Recorder:
    """Follows receptive fields through one forward pass.

    Every op (Function call) gives its output the largest (rf, jump) among its tensor inputs;
    conv / pool / unpool / upsampling wrappers then grow it by their own geometry.
    """

    def __init__(self):
        self.meta, self.keep, self.events = {}, [], []

    def get(self, x):
        return self.meta.get(id(x), (1.0, 1.0))

    def set(self, y, value):
        self.meta[id(y)] = value
        self.keep.append(y)                     # keeps ids unique during the pass

    def inherit(self, inputs, out):
        best = None
        for x in inputs:
            if isinstance(x, Tensor) and id(x) in self.meta:
                m = self.meta[id(x)]
                best = m if best is None or m[0] > best[0] else best
        if best is not None:
            self.set(out, best)


@contextlib.contextmanager
def _recording(rec, module_names):
    saved_call = Function.__call__
    saved_conv, saved_tconv = nn.Conv2d.forward, nn.ConvTranspose2d.forward
    saved_f = {k: getattr(F, k) for k in ("max_pool2d", "avg_pool2d", "max_unpool2d", "interpolate")}

    def call(self, *inputs):
        out = saved_call(self, *inputs)
        rec.inherit(inputs, out)
        return out

    def grow(x, y, k, stride, dilation, kind, name, module=None):
        rf, jump = rec.get(x)
        if kind == "transposed":
            steps = -(-k // stride) - 1          # input pixels one output pixel reads, minus 1
            rf, jump = rf + steps * jump, jump / stride
        else:
            rf, jump = rf + dilation * (k - 1) * jump, jump * stride
        rec.set(y, (rf, jump))
        rec.events.append({"name": name, "kind": kind, "module": module, "in": tuple(x.shape),
                           "out": tuple(y.shape), "k": k, "stride": stride, "dilation": dilation,
                           "rf": rf, "jump": jump})

    def conv_forward(self, x):
        y = saved_conv(self, x)
        grow(x, y, self.weight.shape[2], pair(self.stride, "stride", "Conv2d")[0],
             pair(self.dilation, "dilation", "Conv2d")[0], "conv",
             module_names.get(id(self), "?"), self)
        return y

    def tconv_forward(self, x, *args, **kwargs):
        y = saved_tconv(self, x, *args, **kwargs)
        grow(x, y, self.weight.shape[2], pair(self.stride, "stride", "ConvTranspose2d")[0], 1,
             "transposed",
             module_names.get(id(self), "?"), self)
        return y

    def pool(fname):
        def wrapped(x, kernel_size, stride=None, padding=0, *args, **kwargs):
            y = saved_f[fname](x, kernel_size, stride, padding, *args, **kwargs)
            out = y[0] if isinstance(y, tuple) else y
            k = pair(kernel_size, "kernel_size", fname)[0]
            grow(x, out, k, pair(stride if stride is not None else kernel_size, "stride", fname)[0], 1,
                 fname.split("_")[0] + "pool", fname)
            return y
        return wrapped

    def unpool(x, indices, *args, **kwargs):
        y = saved_f["max_unpool2d"](x, indices, *args, **kwargs)
        rf, jump = rec.get(x)
        rec.set(y, (rf, jump * x.shape[2] / y.shape[2]))
        rec.events.append({"name": "max_unpool2d", "kind": "unpool", "module": None,
                           "in": tuple(x.shape), "out": tuple(y.shape), "rf": rf,
                           "jump": jump * x.shape[2] / y.shape[2]})
        return y

    def interpolate(x, *args, **kwargs):
        y = saved_f["interpolate"](x, *args, **kwargs)
        rf, jump = rec.get(x)
        rf = rf + jump if y.shape[2] > x.shape[2] else rf    # bilinear reads 2 neighbours
        rec.set(y, (rf, jump * x.shape[2] / y.shape[2]))
        rec.events.append({"name": "interpolate", "kind": "upsample", "module": None,
                           "in": tuple(x.shape), "out": tuple(y.shape), "rf": rf,
                           "jump": jump * x.shape[2] / y.shape[2]})
        return y

    Function.__call__ = call
    nn.Conv2d.forward, nn.ConvTranspose2d.forward = conv_forward, tconv_forward
    F.max_pool2d, F.avg_pool2d = pool("max_pool2d"), pool("avg_pool2d")
    F.max_unpool2d, F.interpolate = unpool, interpolate
    # The pooling layers (nn.MaxPool2d, as in the U-Net) call the functions by their own names.
    saved_layers = {k: getattr(nn_pooling, k) for k in ("max_pool2d", "avg_pool2d", "max_unpool2d")}
    for k in saved_layers:
        setattr(nn_pooling, k, getattr(F, k))
    try:
        yield
    finally:
        Function.__call__ = saved_call
        nn.Conv2d.forward, nn.ConvTranspose2d.forward = saved_conv, saved_tconv
        for k, v in saved_f.items():
            setattr(F, k, v)
        for k, v in saved_layers.items():
            setattr(nn_pooling, k, v)


def trace(model, input_size, in_channels=None):
    """Run `model` once on zeros of (1, C, *input_size) and return the recorded layer events."""
    in_channels = in_channels or getattr(model, "in_channels", 3)
    names = {id(m): n for n, m in model.named_modules()}
    rec = _Recorder()
    x = minidl.tensor(numpy.zeros((1, in_channels) + tuple(input_size), dtype=numpy.float32))
    rec.set(x, (1.0, 1.0))
    was_training = model.training
    model.eval()
    try:
        with minidl.no_grad(), _recording(rec, names):
            y = model(x)
    finally:
        model.train(was_training)
    return rec.events, tuple(y.shape)


def _check_options(name, options):
    """ValueError naming the options model `name`'s builder does not take."""
    from . import _BUILDERS
    takes = inspect.signature(_BUILDERS[name]).parameters
    unknown = sorted(set(options) - set(takes))
    if unknown:
        known = ", ".join(k for k in takes if k not in ("num_classes", "in_channels"))
        raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; its options are: {known}.")


def _small_copy(name, options, width):
    """A copy of model `name` with real weights and `width` times the channels, to be run.

    Spatial sizes and receptive fields do not depend on the widths. The U-Net has no width
    option: its first level's channels (features_root) shrink instead. (Running the model
    built by fast_init instead would compute with uninitialised memory: overflow warnings.)
    """
    from . import _BUILDERS
    takes = inspect.signature(_BUILDERS[name]).parameters
    if "width" in takes:
        return _build(name, "default", **{**options, "width": width})
    if "features_root" in takes:
        root = options.get("features_root", takes["features_root"].default)
        return _build(name, "default", **{**options, "features_root": max(1, round(root * width))})
    return _build(name, "default", **options)


def explain(name, input_size=None, width=1 / 16, measure=False, **options):
    """A text table of model `name`'s layers: parameter arithmetic, output sizes, receptive field.

    input_size: (h, w) or an int (default: the paper's input size, paper_input_size(name)).
    width:      channel multiplier of the copy that is run to find sizes (spatial sizes do not
                depend on it); models without a width option run at full size.
    measure:    also measure the whole model's receptive field with minidl.receptive_field
                (gradient support of the centre output pixel, on the width-reduced copy with
                input_size as the probe size; it must exceed the field to see all of it).
    options:    build options (default: the reference configuration).
    """
    if name not in available():
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(available())}.")
    if input_size is None:
        input_size = paper_input_size(name)
    elif isinstance(input_size, int):
        input_size = (input_size, input_size)
    _check_options(name, options)
    options = {**_defaults(name), **options}
    full = _build(name, "none", **options)
    full_params = dict(full.named_parameters())
    small = _small_copy(name, options, width)
    events, out_shape = trace(small, input_size, options.get("in_channels", 3))

    lines = [f"{name} ({', '.join(f'{k}={v}' for k, v in options.items())}), input "
             f"{input_size[0]}x{input_size[1]} -> output {out_shape[2]}x{out_shape[3]}",
             f"{'layer':<34} {'parameters (C_in x kh x kw x C_out + C_out)':<48} "
             f"{'out HxW':>10} {'RF':>6} {'jump':>6}"]
    lines.append("-" * len(lines[1]))
    seen, total = set(), 0
    for e in events:
        if e["module"] is not None:
            qual = e["name"]
            w = full_params.get(qual + ".weight")
            b = full_params.get(qual + ".bias")
            if w is not None:
                shape = tuple(w.shape)
                # Conv2d weights are (C_out, C_in, kh, kw); transposed convs (C_in, C_out, kh, kw).
                c_out, c_in = (shape[0], shape[1]) if e["kind"] == "conv" else (shape[1], shape[0])
                bias = 0 if b is None else int(b.data.size)
                n = int(w.data.size) + bias
                text = f"{c_in} x {shape[2]} x {shape[3]} x {c_out}" + (f" + {bias}" if bias else "")
                text += f" = {n:,}"
                if qual not in seen:
                    total += n
                    seen.add(qual)
            else:
                text = "?"
            extra = []
            if e.get("stride", 1) != 1:
                extra.append(f"s{e['stride']}")
            if e.get("dilation", 1) != 1:
                extra.append(f"d{e['dilation']}")
            label = qual + (f" ({', '.join(extra)})" if extra else "")
            if e["kind"] == "transposed":
                label = qual + f" (transposed, s{e['stride']})"
        else:
            label, text = e["name"], "-"
            if "k" in e:
                label += f" {e['k']}x{e['k']} s{e['stride']}"
        lines.append(f"{label:<34} {text:<48} {e['out'][2]:>4}x{e['out'][3]:<5} "
                     f"{e['rf']:>6.0f} {e['jump']:>6.3g}")
    others = sum(int(p.data.size) for k, p in full_params.items()
                 if not any(k.startswith(s + ".") for s in seen))
    lines.append("-" * len(lines[1]))
    lines.append(f"conv parameters {total:,} + other parameters (BatchNorm gamma/beta) {others:,} "
                 f"= {count_parameters(full):,}")
    if measure:
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rf = minidl.receptive_field(small, options.get("in_channels", 3), size=input_size,
                                        trials=1)
        note = " (reaches the probe's border: the field is at least this)" if caught else ""
        lines.append(f"measured receptive field of the centre output pixel "
                     f"(minidl.receptive_field): {rf[0]}x{rf[1]}{note}")
    return "\n".join(lines)

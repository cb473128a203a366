"""export(): one recorded forward pass written as an ONNX file."""
import os

import numpy

from .. import backend
from ..grad_mode import no_grad
from ..serialization import write_atomically
from ..tensor import Tensor
from .recorder import Recorder

# Opsets whose node forms ops.py writes (ReduceMean moved its axes to an input at 18).
MIN_OPSET, MAX_OPSET = 13, 18


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("minidl.onnx.export needs the onnx package; install it with "
                          "pip install -e \".[export]\" (the `export` extra) or pip install onnx."
                          ) from None
    return onnx


def _as_tuple(example_input):
    items = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    out = []
    for x in items:
        if not isinstance(x, Tensor):
            if not isinstance(x, numpy.ndarray) and not backend.is_gpu_array(x):
                raise TypeError(f"export: example_input must be a Tensor, an array or a tuple "
                                f"of them, got {type(x).__name__}.")
            x = Tensor(x)
        out.append(x)
    return tuple(out)


def _names(given, count, prefix, what):
    if given is None:
        return [f"{prefix}{i}" if count > 1 else prefix for i in range(count)]
    given = list(given)
    if len(given) != count or len(set(given)) != count:
        raise ValueError(f"export: {what} must list {count} distinct names (one per "
                         f"{what[:-6]}), got {given!r}.")
    return given


def _value_info(onnx, name, array, dynamic):
    """The declared type of a graph input/output; axes in `dynamic` get a symbolic size."""
    dims = list(array.shape)
    if isinstance(dynamic, dict):
        for axis, label in dynamic.items():
            dims[int(axis)] = str(label)
    else:
        for axis in dynamic:
            dims[int(axis)] = f"{name}_dim{int(axis)}"
    elem = onnx.helper.np_dtype_to_tensor_dtype(numpy.dtype(array.dtype))
    return onnx.helper.make_tensor_value_info(name, elem, dims)


def export(model, example_input, path, opset_version=17, input_names=None, output_names=None,
           dynamic_axes=None):
    """Run `model` once on `example_input` and write what it computed as an ONNX graph.

    model:         a minidl.nn.Module (or any callable of Tensors); exported in eval mode
                   (BatchNorm uses its running statistics; dropout is off), as torch.onnx does.
    example_input: a Tensor (e.g. (1, 3, H, W)) or a tuple of Tensors, one per forward argument.
    path:          the .onnx file to write (atomically: a temp file, then renamed).
    opset_version: the ONNX opset the graph uses (13..18).
    input_names, output_names: names of the graph's inputs / outputs ("input", "output").
    dynamic_axes:  {name: {axis: "label"} or [axis, ...]}: axes whose size may differ at run
                   time, e.g. {"input": {0: "batch"}, "output": {0: "batch"}}. Sizes that the
                   forward pass computed from the input's height/width (resize targets,
                   crops) stay those of example_input.
    Returns the onnx.ModelProto that was written.
    """
    onnx = _import_onnx()
    if not MIN_OPSET <= int(opset_version) <= MAX_OPSET:
        raise ValueError(f"export: opset_version must be between {MIN_OPSET} and {MAX_OPSET}, "
                         f"got {opset_version}.")
    inputs = _as_tuple(example_input)
    input_names = _names(input_names, len(inputs), "input", "input_names")
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    param_names = {id(a): k for k, a in state.items() if a is not None}
    modules = list(model.modules()) if hasattr(model, "modules") else []
    was_training = [m.training for m in modules]
    g = Recorder(onnx, int(opset_version), param_names)
    for name, x in zip(input_names, inputs):
        g.reserve(name)
        g.bind(x.data, name)
    for name in output_names or ():
        g.reserve(name)          # (the graph's outputs are named last)
    try:
        for m in modules:
            m.training = False
        with no_grad(), g:
            result = model(*inputs)
    finally:
        for m, flag in zip(modules, was_training):
            m.training = flag
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    if not all(isinstance(y, Tensor) for y in outputs):
        raise TypeError("export: the model must return a Tensor or a tuple of Tensors, got "
                        f"{type(result).__name__}.")
    output_names = _names(output_names, len(outputs), "output", "output_names")
    dynamic_axes = dynamic_axes or {}
    unknown = set(dynamic_axes) - set(input_names) - set(output_names)
    if unknown:
        raise ValueError(f"export: dynamic_axes names {sorted(unknown)}, which are not among the "
                         f"input names {input_names} or output names {output_names}.")
    for name, y in zip(output_names, outputs):
        if not g.knows(y.data):
            raise ValueError(f"export: output {name!r} was not computed from the inputs by "
                             "minidl ops, so the graph cannot compute it.")
        g.nodes.append(onnx.helper.make_node("Identity", [g.name(y.data)], [name],
                                             name=g.fresh("node.output")))
    graph = onnx.helper.make_graph(
        g.nodes, type(model).__name__,
        [_value_info(onnx, n, backend.to_numpy(x.data), dynamic_axes.get(n, ()))
         for n, x in zip(input_names, inputs)],
        [_value_info(onnx, n, backend.to_numpy(y.data), dynamic_axes.get(n, ()))
         for n, y in zip(output_names, outputs)],
        initializer=g.initializers)
    proto = onnx.helper.make_model(graph, producer_name="minidl",
                                   opset_imports=[onnx.helper.make_opsetid("", int(opset_version))])
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    write_atomically(os.fspath(path), lambda f: f.write(data))
    return proto

"""A trained checkpoint as an ONNX file: `python -m seg export`.

    python -m seg export --checkpoint runs/unet/best.npz --output unet.onnx
    export_checkpoint("runs/unet/best.npz", "unet.onnx", size=(64, 88))

The model is rebuilt from the checkpoint (seg.prediction_inputs.load_model_checked, as for
`predict`: an unusable checkpoint is one sentence) and exported by
minidl.onnx.export from one forward pass on a zero image of the training size (or `size`).
The graph's input is "image" (N, C, H, W) float32 and its output "logits" (N, K, H', W'),
with a dynamic batch axis; the height and width stay those of the example, because sizes
computed from them (resize targets, crops) are fixed in the graph. Needs the `onnx` package
(the `export` extra).
"""
import os

import numpy as np

import minidl
import minidl.onnx

from .errors import UsageError
from .prediction_inputs import load_model_checked

__all__ = ["export_checkpoint", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME, OUTPUT_NAME = "image", "logits"


def export_checkpoint(checkpoint, output, opset_version=17, size=None):
    """Write the model of `checkpoint` to the ONNX file `output`.

    size: (H, W) of the example input; default the checkpoint's training size.
    Returns a dict: path, input_shape (with "batch" for the dynamic axis), output_shape,
    opset_version, model (the name), nodes (the graph's node count).
    """
    checkpoint, output = os.fspath(checkpoint), os.fspath(output)
    model, config = load_model_checked(checkpoint, "cpu")
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a folder; name the file to write, e.g. "
                         f"{os.path.join(output, 'model.onnx')}.")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise UsageError(f"--output folder {folder} does not exist; create it first.")
    if size is None:
        size = config.get("size")
        if size is None:
            raise UsageError(f"checkpoint {checkpoint} stores no image size; pass --size HxW.")
    h, w = (int(s) for s in size)
    example = minidl.tensor(np.zeros((1, int(config.get("in_channels", 1)), h, w), np.float32))
    try:
        proto = minidl.onnx.export(model, example, output, opset_version=opset_version,
                                   input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                   dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except ImportError as exc:       # no onnx package: say how to install it
        raise UsageError(str(exc)) from None
    return {"path": output, "input_shape": _shape(proto.graph.input[0]),
            "output_shape": _shape(proto.graph.output[0]), "opset_version": int(opset_version),
            "model": config["model"], "nodes": len(proto.graph.node)}


def _shape(value_info):
    """A graph input's/output's declared shape, e.g. ("batch", 1, 64, 88)."""
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)

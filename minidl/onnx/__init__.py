"""minidl.onnx: write a model as an ONNX graph, for ONNX Runtime and the other ONNX tools.

    import minidl.onnx
    minidl.onnx.export(model, example_input, "model.onnx", input_names=["image"],
                       output_names=["logits"], dynamic_axes={"image": {0: "batch"}})

Export runs one forward pass on `example_input` and records every op it runs (recorder.py);
each op becomes one or a few ONNX nodes (ops.py, one small function per op). Needs the
`onnx` package (`pip install minidl[export]`); importing minidl.onnx does not.
"""
from .export import export
from .ops import UnsupportedOpError, register

__all__ = ["export", "register", "UnsupportedOpError"]

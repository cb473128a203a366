"""Recording one forward pass as ONNX nodes.

While a `Recorder` is active, minidl.function calls it after every op with (op, inputs,
output). Values are told apart by the identity of their arrays: the recorder remembers
which ONNX value name each array it has seen stands for. An input array it has never seen
(a model weight, a BatchNorm statistic, a number lifted to an array) becomes a constant
(an "initializer"), named after the model's state_dict key when it is one.
"""
import numpy

from .. import backend, function
from ..tensor import Tensor
from .ops import convert


class Recorder:
    """The graph being built: nodes, constants and the name of every array seen.

    onnx: the imported onnx module; opset: the ONNX opset version the nodes target;
    param_names: {id(array): state_dict key} for the model's parameters and buffers.
    """

    def __init__(self, onnx, opset, param_names):
        self.onnx, self.opset = onnx, opset
        self.nodes, self.initializers = [], []
        self._names = {}          # id(array) -> ONNX value name
        self._keep = []           # the arrays named, alive, so that no id is reused
        self._lazy = {}           # id(array) -> function that emits the nodes making it
        self._param_names = param_names
        self._used = set()
        # Facts an op mapping leaves for a later one (e.g. MaxPool's raw indices for MaxUnpool).
        self.notes = {}

    # ------------------------------------------------------------------ names
    def fresh(self, hint):
        """A value name not used yet, from `hint`."""
        base = hint.replace("/", ".") or "v"
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def reserve(self, name):
        """Keep `name` (a graph input or output) for the caller."""
        self._used.add(name)

    def bind(self, array, name):
        """From now on `array` is the value `name`."""
        self._names[id(array)] = name
        self._keep.append(array)

    def bind_lazy(self, array, emit):
        """`array` is made by the nodes emit() adds (and returns the name of), if it is used."""
        self._lazy[id(array)] = emit
        self._keep.append(array)

    def knows(self, array):
        return id(array) in self._names or id(array) in self._lazy

    def name(self, value, hint="const"):
        """The value name of a Tensor / array input; an unknown array becomes a constant."""
        if value is None:
            return ""
        array = value.data if isinstance(value, Tensor) else value
        key = id(array)
        if key not in self._names and key in self._lazy:
            self.bind(array, self._lazy.pop(key)())
        if key not in self._names:
            self.bind(array, self.constant(array, self._param_names.get(key, hint)))
        return self._names[key]

    # ------------------------------------------------------------------ building
    def constant(self, array, hint="const"):
        """A new initializer holding `array` (moved to the host); returns its name."""
        name = self.fresh(hint)
        host = numpy.asarray(backend.to_numpy(numpy.asarray(array) if numpy.isscalar(array)
                                              else array))
        self.initializers.append(self.onnx.numpy_helper.from_array(host, name))
        return name

    def node(self, op_type, inputs, n_outputs=1, hint=None, **attributes):
        """Add one ONNX node; returns its output name (or a list when n_outputs > 1)."""
        outputs = [self.fresh(hint or op_type) for _ in range(n_outputs)]
        self.nodes.append(self.onnx.helper.make_node(
            op_type, list(inputs), outputs, name=self.fresh("node." + op_type), **attributes))
        return outputs[0] if n_outputs == 1 else outputs

    # ------------------------------------------------------------------ recording
    def __call__(self, op, inputs, output):
        self.bind(output.data, convert(self, op, inputs, output.data))

    def __enter__(self):
        if function.recorder is not None:
            raise RuntimeError("minidl.onnx.export is already recording a forward pass; "
                               "export one model at a time.")
        function.recorder = self
        return self

    def __exit__(self, *exc):
        function.recorder = None
        return False

"""seg: image segmentation models, data, losses, metrics and training built on minidl.

`import seg` then `seg.models.build(...)`, `seg.crf.dense_crf(...)`, `seg.data`, `seg.losses`,
`seg.metrics`, `seg.tiling`, `seg.train`, `seg.setup`, `seg.inference`: each submodule is imported on first use, so
`import seg` itself stays quick.
"""
import importlib

_SUBMODULES = ("models", "data", "losses", "metrics", "tiling", "train", "crf", "plots",
               "classical", "autoencoders", "cli", "setup", "inference", "checkpoints", "errors")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'seg' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))

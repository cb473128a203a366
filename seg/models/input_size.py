"""The input size a model accepts nearest to the one asked for.

    fitting_input_size(model, (64, 64))     # DeconvNet: (224, 224) (its fc6 needs a 7x7 pool5)

Most models take any size; some do not: the valid-padding U-Net needs sizes that its pools
divide evenly, DeconvNet's 7x7 fc6 needs pool5 of at least 7x7 (224 px), FC-DenseNet at least
2**pools. The U-Net knows its rule (UNet.valid_input_size); for the others the model is run once
on zeros at growing sizes until it accepts one (a width-reduced model makes this cheap).
"""
import numpy as np

import minidl

__all__ = ["fitting_input_size"]


def _accepts(model, in_channels, h, w):
    try:
        with minidl.no_grad():
            model(minidl.tensor(np.zeros((1, in_channels, h, w), np.float32)))
    except ValueError:          # the models' "input too small / wrong multiple" errors
        return False
    return True


def fitting_input_size(model, size, in_channels=None, step=16, limit=2048):
    """The smallest (h', w') >= `size` (grown by `step` pixels per side at a time) that `model`
    accepts; `size` itself when it already fits. ValueError when nothing up to `limit` fits."""
    h, w = (int(s) for s in size)
    if hasattr(model, "valid_input_size"):
        return tuple(int(s) for s in model.valid_input_size(h, w))
    in_channels = in_channels or getattr(model, "in_channels", 3)
    was_training = model.training
    model.eval()                # batch 1 on a tiny map: no batch statistics needed
    try:
        while max(h, w) <= limit:
            if _accepts(model, in_channels, h, w):
                return h, w
            h, w = h + step, w + step
    finally:
        model.train(was_training)
    raise ValueError(f"{type(model).__name__} accepts no input size from {size[0]}x{size[1]} up to "
                     f"{limit}x{limit}.")

"""minidl.nn: layers as Modules (parameters + forward), mirroring torch.nn."""
from .module import Module, ModuleDict, ModuleList, Parameter, Sequential
from .activation import GELU, Identity, LeakyReLU, LogSoftmax, ReLU, Sigmoid, SiLU, Softmax, Tanh
from .dropout import Dropout, Dropout2d
from .flatten import Flatten
from .linear import Linear
from .conv import Conv2d, ConvReLU2d, ConvTranspose2d
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d, MaxUnpool2d
from .normalization import BatchNorm2d, BatchNormReLU2d
from .sample_norm import GroupNorm, InstanceNorm2d, LayerNorm
from .embedding import Embedding
from .pixel_shuffle import PixelShuffle, PixelUnshuffle
from .upsampling import Upsample
from .loss import (BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, KLDivLoss, L1Loss, MSELoss,
                   NLLLoss, SmoothL1Loss)
from .sync_batchnorm import SyncBatchNorm, SyncBatchNormReLU2d
from . import init, parallel, utils

# minidl.nn.functional is minidl.functional itself (one module, two names), so both
# `from minidl.nn import functional as F` and `import minidl.nn.functional as F` work as
# they do in PyTorch.
import sys as _sys
from .. import functional
_sys.modules[__name__ + ".functional"] = functional

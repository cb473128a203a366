"""minidl.nn: layers as Modules (parameters + forward), mirroring torch.nn."""
from .module import Module, ModuleDict, ModuleList, Parameter, Sequential
from .activation import Identity, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from .dropout import Dropout, Dropout2d
from .flatten import Flatten
from .linear import Linear
from .conv import Conv2d, ConvTranspose2d
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d, MaxUnpool2d
from .normalization import BatchNorm2d, BatchNormReLU2d
from .sync_batchnorm import SyncBatchNorm, SyncBatchNormReLU2d
from .upsampling import Upsample
from .loss import BCEWithLogitsLoss, CrossEntropyLoss, KLDivLoss, MSELoss, NLLLoss
from . import init, parallel

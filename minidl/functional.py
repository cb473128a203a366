"""minidl.functional (imported as F): the stateless ops, with torch.nn.functional's names.

Each name is defined in a module of minidl/ops/ next to its backward; this file only
gathers them into one namespace.
"""
from .ops.arithmetic import abs, add, clip, div, exp, log, matmul, maximum, minimum, mul, neg, pow, sqrt, sub, where  # noqa: F401,A004
from .ops.reduction import max, mean, min, sum  # noqa: F401,A004
from .ops.shape import cat, flatten, reshape, stack, transpose  # noqa: F401
from .ops.activation import leaky_relu, log_softmax, relu, sigmoid, softmax, softplus, tanh  # noqa: F401
from .ops.loss import (binary_cross_entropy_with_logits, cross_entropy, kl_div, mse_loss,  # noqa: F401
                       nll_loss)
from .ops.padding import center_crop, pad  # noqa: F401
from .ops.dropout import dropout, dropout2d  # noqa: F401
from .ops.linear import linear  # noqa: F401
from .ops.conv import conv2d, conv_transpose2d  # noqa: F401
from .ops.pooling import adaptive_avg_pool2d, avg_pool2d, max_pool2d, max_unpool2d  # noqa: F401
from .ops.normalization import batch_norm  # noqa: F401
from .ops.resize import interpolate  # noqa: F401

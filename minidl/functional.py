"""minidl.functional (imported as F): the stateless ops, with torch.nn.functional's names.

Each name is defined in a module of minidl/ops/ next to its backward; this file only
gathers them into one namespace.
"""
from .ops.arithmetic import abs, add, clip, div, exp, log, matmul, maximum, minimum, mul, neg, pow, sqrt, sub, where  # noqa: F401,A004
from .ops.reduction import amax, amin, argmax, argmin, max, mean, min, norm, std, sum, var  # noqa: F401,A004
from .ops.shape import (cat, chunk, clone, expand, flatten, gather, permute, repeat, reshape,  # noqa: F401
                        scatter, split, stack, transpose)
from .ops.activation import (gelu, leaky_relu, log_softmax, relu, sigmoid, silu, softmax,  # noqa: F401
                             softplus, tanh)
from .ops.loss import (binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy,  # noqa: F401
                       kl_div, l1_loss, mse_loss, nll_loss, smooth_l1_loss)
from .ops.sample_norm import group_norm, instance_norm, layer_norm  # noqa: F401
from .ops.embedding import embedding  # noqa: F401
from .ops.pixel_shuffle import pixel_shuffle, pixel_unshuffle  # noqa: F401
from .ops.padding import center_crop, pad  # noqa: F401
from .ops.dropout import dropout, dropout2d  # noqa: F401
from .ops.linear import linear  # noqa: F401
from .ops.conv import conv2d, conv2d_relu, conv_transpose2d  # noqa: F401
from .ops.pooling import adaptive_avg_pool2d, avg_pool2d, max_pool2d, max_unpool2d  # noqa: F401
from .ops.normalization import batch_norm  # noqa: F401
from .ops.resize import interpolate  # noqa: F401

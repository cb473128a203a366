"""minidl.functional (imported as F): the stateless ops, with torch.nn.functional's names.

Each name is defined in a module of minidl/ops/ next to its backward; this file only
gathers them into one namespace.
"""
from .ops.arithmetic import abs, add, clip, div, exp, log, matmul, maximum, minimum, mul, neg, pow, sqrt, sub, where  # noqa: F401,A004
from .ops.reduction import max, mean, min, sum  # noqa: F401,A004
from .ops.shape import cat, flatten, reshape, stack, transpose  # noqa: F401

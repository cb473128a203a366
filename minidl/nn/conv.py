"""Convolution layers: Conv2d and ConvTranspose2d (torch.nn's names, arguments and init)."""
import math

from .. import backend
from ..ops.conv import conv2d, conv2d_relu, conv_transpose2d
from ..ops.geometry import conv_transpose_output_size, pair
from . import init
from .module import Module, Parameter


class _ConvNd(Module):
    """What both layers share: parameters, torch's default initialisation, repr."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                 groups, bias, transposed, output_padding, device, dtype):
        super().__init__()
        name = type(self).__name__
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: groups={groups} must divide in_channels ({in_channels}) "
                             f"and out_channels ({out_channels}).")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size", name)
        self.stride = pair(stride, "stride", name)
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding", name)
        self.dilation = pair(dilation, "dilation", name)
        self.output_padding = pair(output_padding, "output_padding", name)
        xp = backend.array_module(device)
        dtype = "float32" if dtype is None else dtype
        # conv: (C_out, C_in / groups, kh, kw); transposed: (C_in, C_out / groups, kh, kw).
        shape = ((in_channels, out_channels // groups) if transposed
                 else (out_channels, in_channels // groups)) + self.kernel_size
        self.weight = Parameter(xp.empty(shape, dtype=dtype))
        self.bias = Parameter(xp.empty((out_channels,), dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """torch's default: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        with fan_in = weight.shape[1] * kh * kw; the bias uses the same bound."""
        fan_in, _ = init.calculate_fan_in_and_fan_out(self.weight)
        # kaiming_uniform_ with leaky-ReLU gain sqrt(2 / (1 + 5)): bound sqrt(1/3) sqrt(3/fan_in).
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            init.uniform_(self.bias, -bound, bound)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else \
                f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.output_padding != (0, 0):
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Conv2d(_ConvNd):
    """2-D convolution layer. x (N, C_in, H, W) -> (N, C_out, H_out, W_out).

    padding: int, pair, "valid" (= 0) or "same" (stride 1 only).
    """
    relu = False        # ConvReLU2d: the ReLU fused into the conv's epilogue

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, False, 0, device, dtype)

    def forward(self, x):
        op = conv2d_relu if self.relu else conv2d
        return op(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                  self.groups)


class ConvReLU2d(Conv2d):
    """Conv2d followed by ReLU, as one op (F.conv2d_relu): on the GPU the bias and the ReLU
    are one kernel after the conv's GEMM, and their backward one more. The same arguments,
    parameters and state-dict keys as Conv2d (torch.ao.nn.intrinsic.ConvReLU2d's role).

    x (N, C_in, H, W) -> relu(conv2d(x)) (N, C_out, H_out, W_out).
    """
    relu = True


class ConvTranspose2d(_ConvNd):
    """Transposed convolution ("deconvolution", "up-convolution") layer.

    x (N, C_in, H, W) -> (N, C_out, H_out, W_out), H_out = (H-1)s - 2p + d(k-1) + output_padding + 1.
    forward(x, output_size=None): output_size ((H, W) or (N, C, H, W)) picks the output_padding
    that gives that size, as in torch.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, True, output_padding, device, dtype)

    def forward(self, x, output_size=None):
        output_padding = self.output_padding
        if output_size is not None:
            target = tuple(int(s) for s in tuple(output_size)[-2:])
            h, w = x.shape[2:]
            smallest = tuple(conv_transpose_output_size(s, k, st, p, 0, d) for s, k, st, p, d in
                             zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation))
            output_padding = tuple(t - s for t, s in zip(target, smallest))
            for o, t, s, st in zip(output_padding, target, smallest, self.stride):
                if not 0 <= o < st:
                    raise ValueError(f"ConvTranspose2d: output_size {target} is not reachable; "
                                     f"with this input it must lie between {smallest} and "
                                     f"{tuple(a + b - 1 for a, b in zip(smallest, self.stride))}.")
        return conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                output_padding, self.groups, self.dilation)

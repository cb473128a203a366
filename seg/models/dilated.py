"""Dilated convolutions: Yu & Koltun, "Multi-Scale Context Aggregation by Dilated
Convolutions" (ICLR 2016) - the Dilation8 front-end and the context module.

    model = seg.models.build("dilation8", num_classes=21)                    # 134,346,581 params
    model = seg.models.build("dilation8", 21, context="basic")               # + 28,392
    ctx = ContextModule(21, "large")                                         # 6,803,139 params

Front-end: VGG-16 with pool4 and pool5 removed; to keep the receptive field the paper's
classification net had, conv5 is dilated by 2 and fc6 (7x7, 4096) by 4; fc7 (1x1, 4096) and a
final 1x1 conv to the classes follow. Three pools remain, so the output stride is 8.

Context module: C-channel maps in, C-channel maps out, 3x3 convs with dilations
1, 1, 2, 4, 8, 16, 1 and a final 1x1, ReLU after each, zero-padded so sizes do not change.
The receptive field grows exponentially - 3, 5, 9, 17, 33, 65, 67, 67 - while the parameter
count grows linearly. The "basic" module keeps C channels everywhere; the "large" one widens to
2C, 2C, 4C, 8C, 16C, 32C, 32C. Initialised to the identity ("identity initialisation", Sec. 3),
so adding it to a trained front-end starts from the front-end's own prediction.

Simplification: the reference front-end uses unpadded convs on a reflection-padded image (it
pads 186 pixels per side); here the convs are zero-padded, so the coarse output is simply
ceil(H / 8) x ceil(W / 8). With upsample=True (default) it is bilinearly upsampled to H x W, as
the reference's final fixed bilinear deconvolution does.
"""
import numpy

from minidl import nn
from minidl import functional as F
from minidl import backend

from . import register
from .backbones import VGG, check_common, init_weights_, pool_output_size, scaled

__all__ = ["ContextModule", "Dilation8", "dilation8", "CONTEXT_DILATIONS"]

CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
# Output widths of the seven 3x3 layers, in multiples of C (paper, Table 1).
_CONTEXT_WIDTHS = {"basic": (1, 1, 1, 1, 1, 1, 1), "large": (2, 2, 4, 8, 16, 32, 32)}
# Layer names of the reference implementation (fyu/dilation).
_CONTEXT_NAMES = ("ctx_conv1_1", "ctx_conv1_2", "ctx_conv2_1", "ctx_conv3_1", "ctx_conv4_1",
                  "ctx_conv5_1", "ctx_fc1", "ctx_final")


def identity_init_(weight, channels, noise_std=0.0, rng=None):
    """Yu & Koltun's identity initialisation, for equal or unequal widths, in place.

    weight: (c_out, c_in, k, k). With C = `channels` (the module's input/output width), tap
    (b, a) at the kernel centre gets C / c_out when floor(a C / c_in) == floor(b C / c_out), and
    every other tap gets noise_std * N(0, 1) (the paper's epsilon). For c_in == c_out == C this
    is the identity; for the widening layers of the "large" module each input channel is spread
    evenly over its group of outputs, and the final 1x1 gathers them back, so a whole
    noise-free module reproduces its (non-negative) input.
    """
    data = weight.data if hasattr(weight, "data") else weight
    c_out, c_in, kh, kw = data.shape
    w = numpy.zeros((c_out, c_in, kh, kw), dtype=numpy.float64)
    if noise_std:
        rng = rng or numpy.random.default_rng()
        w += noise_std * rng.standard_normal(w.shape)
    a = numpy.arange(c_in)[None, :]
    b = numpy.arange(c_out)[:, None]
    same = (a * channels) // c_in == (b * channels) // c_out
    w[:, :, kh // 2, kw // 2] += numpy.where(same, channels / c_out, 0.0)
    # Written into the existing array, so every holder of it sees the new values.
    data[...] = backend.to_device(w.astype(data.dtype), backend.device_of(data))
    return weight


class ContextModule(nn.Module):
    """The context module: (N, C, H, W) -> (N, C, H, W), receptive field 67 x 67.

    channels:  C (the number of classes when it follows a front-end).
    kind:      "basic" (C channels throughout) or "large" (widths 2C .. 32C).
    dilations: of the seven 3x3 layers (paper: 1, 1, 2, 4, 8, 16, 1).
    noise_std: standard deviation of the noise added to the identity initialisation.

    `layers` holds the 3x3 convs and the final 1x1 in order; `truncated(n)` is a module running
    only the first n of them (each followed by its ReLU), used to measure receptive fields.
    """

    def __init__(self, channels, kind="basic", dilations=CONTEXT_DILATIONS, noise_std=0.0):
        super().__init__()
        if kind not in _CONTEXT_WIDTHS:
            raise ValueError(f"context module kind must be 'basic' or 'large', got {kind!r}.")
        if len(dilations) != 7:
            raise ValueError(f"the context module has seven 3x3 layers, so it needs 7 dilations, "
                             f"got {len(dilations)}.")
        self.channels, self.kind, self.dilations = int(channels), kind, tuple(dilations)
        widths = [m * self.channels for m in _CONTEXT_WIDTHS[kind]]
        self.layers = nn.ModuleList()
        c_in = self.channels
        for width, d in zip(widths, self.dilations):
            self.layers.append(nn.Conv2d(c_in, width, 3, padding=d, dilation=d))
            c_in = width
        self.layers.append(nn.Conv2d(c_in, self.channels, 1))
        self.noise_std = noise_std
        self.reset_parameters()

    def reset_parameters(self):
        for conv in self.layers:
            identity_init_(conv.weight, self.channels, self.noise_std)
            nn.init.zeros_(conv.bias)

    def forward(self, x, num_layers=None):
        """x: (N, C, H, W) -> (N, C, H, W); num_layers runs only the first layers."""
        for conv in list(self.layers)[:num_layers]:
            x = F.relu(conv(x))
        return x

    def truncated(self, num_layers):
        """A module computing the first `num_layers` layers (shares the weights)."""
        return _Truncated(self, num_layers)

    def receptive_fields(self):
        """The paper's receptive field after each layer: 3, 5, 9, 17, 33, 65, 67, 67."""
        rf, out = 1, []
        for d in self.dilations + (None,):       # None: the final 1x1 adds nothing
            rf += 0 if d is None else 2 * d
            out.append(rf)
        return out

    def extra_repr(self):
        return f"channels={self.channels}, kind={self.kind!r}, dilations={self.dilations}"


class _Truncated(nn.Module):
    def __init__(self, module, num_layers):
        super().__init__()
        self.module, self.num_layers = module, num_layers

    def forward(self, x):
        return self.module(x, self.num_layers)


class Dilation8(nn.Module):
    """Dilation8 front-end (+ optional context module), output stride 8.

    num_classes, in_channels: output / input channels.
    context:  None, "basic" or "large".
    upsample: True -> logits bilinearly upsampled to (H, W); False -> the stride-8 logits
              (N, num_classes, *output_size(H, W)).
    width:    channel multiplier of the front-end (the context module keeps C = num_classes).
    dropout:  after fc6 and fc7 (0.5 as in VGG).
    """

    def __init__(self, num_classes, in_channels=3, context=None, upsample=True, width=1.0,
                 dropout=0.5):
        super().__init__()
        check_common(num_classes, in_channels, width)
        if context not in (None, "basic", "large"):
            raise ValueError(f"context must be None, 'basic' or 'large', got {context!r}.")
        self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), width
        self.upsample, self.output_stride, self.context_kind = bool(upsample), 8, context
        self.frontend = VGG(16, in_channels, width=width, pools=[(2, 2, 0)] * 3 + [None, None],
                            ceil_mode=True, dilation=(1, 1, 1, 1, 2))
        fc = scaled(4096, width)
        self.fc6 = nn.Conv2d(self.frontend.out_channels, fc, 7, padding=12, dilation=4)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop6, self.drop7 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.final = nn.Conv2d(fc, num_classes, 1)
        init_weights_(self.frontend)
        init_weights_(self.fc6)
        init_weights_(self.fc7)
        nn.init.normal_(self.final.weight, 0.0, 0.001)
        nn.init.zeros_(self.final.bias)
        self.context = ContextModule(num_classes, context) if context else None

    def output_size(self, h, w):
        """(h, w) with upsample=True, else the stride-8 map's size ceil(h/8) x ceil(w/8)."""
        if self.upsample:
            return int(h), int(w)
        return tuple(_three_pools(s) for s in (int(h), int(w)))

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Dilation8 expects input of shape (N, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}.")
        y = self.frontend(x)["out"]
        y = self.drop6(F.relu(self.fc6(y)))
        y = self.drop7(F.relu(self.fc7(y)))
        y = self.final(y)
        if self.context is not None:
            y = self.context(y)
        if self.upsample:
            y = F.interpolate(y, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
        return y

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, context={self.context_kind!r}, "
                f"upsample={self.upsample}, width={self.width}")


def _three_pools(s):
    for _ in range(3):
        s = pool_output_size(s, 2, 2, 0, ceil_mode=True)
    return s


@register("dilation8")
def dilation8(num_classes, in_channels=3, context=None, upsample=True, width=1.0, dropout=0.5):
    """Dilation8 (see Dilation8); 134,346,581 parameters at 21 classes without context."""
    return Dilation8(num_classes, in_channels, context, upsample, width, dropout)

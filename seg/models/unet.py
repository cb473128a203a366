"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015), built as in the paper.

    model = seg.models.build("unet", num_classes=2, in_channels=1)          # the paper's net
    model = seg.models.build("unet", 2, 1, depth=3, features_root=16)       # the seed's tf_unet size
    model.output_size(572, 572)        # (388, 388): valid convolutions shrink the map
    model.valid_input_size(570, 570)   # (572, 572): the smallest valid size at least as large

Shape of the network for depth d and features_root f (paper: d = 5, f = 64):

    contracting path, level l = 0 .. d-1:   two 3x3 convs (+BN) + ReLU with f * 2**l channels,
                                            then a 2x2 max-pool (not after the last level)
    expanding path, level l = d-2 .. 0:     2x2 up-conv (transposed conv, stride 2) to f * 2**l
                                            channels, centre-crop the skip of level l and
                                            concatenate [skip, up], two 3x3 convs (+BN) + ReLU
    output:                                 1x1 conv to num_classes (logits, no activation)

With padding="valid" (the paper) every 3x3 conv loses one pixel per side, so the output is
smaller than the input and only some input sizes work: every map that is max-pooled must
have an even size. padding="same" keeps sizes (the input must be divisible by 2**(d-1)).
"""
import math

from minidl import nn
from minidl import functional as F
from minidl import cat

from . import register

__all__ = ["UNet", "unet"]


class DoubleConv(nn.Module):
    """Two 3x3 convs, each followed by (BatchNorm) and ReLU, and optionally by dropout.

    With batch norm, BN and ReLU are one op (nn.BatchNormReLU2d: same parameters and
    state-dict keys as BatchNorm2d, one pass over memory instead of two plus a mask);
    without, conv and ReLU are (nn.ConvReLU2d: the same as Conv2d, the ReLU fused in).

    x: (N, in_channels, H, W) -> (N, out_channels, H - 4, W - 4) with valid padding, or
    (N, out_channels, H, W) with same padding.
    """

    def __init__(self, in_channels, out_channels, padding, batch_norm, dropout):
        super().__init__()
        pad = 0 if padding == "valid" else 1
        # Without batch norm the ReLU follows the conv directly: the conv's epilogue then.
        conv = nn.Conv2d if batch_norm else nn.ConvReLU2d
        self.conv1 = conv(in_channels, out_channels, 3, padding=pad)
        self.bn1 = nn.BatchNormReLU2d(out_channels) if batch_norm else None
        self.conv2 = conv(out_channels, out_channels, 3, padding=pad)
        self.bn2 = nn.BatchNormReLU2d(out_channels) if batch_norm else None
        # tf_unet (the seed's code) drops out after every conv; dropout=0 switches it off.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            x = conv(x)            # ConvReLU2d without batch norm: the ReLU is in the conv
            if bn is not None:
                x = bn(x)          # BatchNormReLU2d
            if self.dropout is not None:
                x = self.dropout(x)
        return x


class UNet(nn.Module):
    """The U-Net: contracting path, expanding path with crop-and-concat skips, 1x1 classifier.

    num_classes:   output channels (logits; apply softmax over axis 1 for probabilities).
    in_channels:   input channels (1 for grayscale ultrasound).
    depth:         number of resolution levels (paper 5 = four 2x2 max-pools).
    features_root: channels of the first level; level l has features_root * 2**l.
    padding:       "valid" (paper: unpadded convs, output smaller than input) or "same".
    batch_norm:    BatchNorm2d after every 3x3 conv (before the ReLU). Not in the paper.
    dropout:       drop probability; 0 disables it.
    dropout_mode:  "bottleneck" (paper: "drop-out layers at the end of the contracting path")
                   or "every_conv" (tf_unet, the seed's code: after every 3x3 conv).

    forward(x): (N, in_channels, H, W) -> (N, num_classes, *output_size(H, W)).
    """

    def __init__(self, num_classes, in_channels=1, depth=5, features_root=64, padding="valid",
                 batch_norm=False, dropout=0.0, dropout_mode="bottleneck"):
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}.")
        if dropout_mode not in ("bottleneck", "every_conv"):
            raise ValueError(f"dropout_mode must be 'bottleneck' or 'every_conv', got {dropout_mode!r}.")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                            ("depth", depth), ("features_root", features_root)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is a drop probability in [0, 1), got {dropout!r}.")
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        self.depth, self.features_root = int(depth), int(features_root)
        self.padding, self.batch_norm = padding, bool(batch_norm)
        self.dropout_p, self.dropout_mode = float(dropout), dropout_mode

        conv_dropout = self.dropout_p if dropout_mode == "every_conv" else 0.0
        widths = [self.features_root * 2 ** level for level in range(self.depth)]
        self.down = nn.ModuleList()
        channels = self.in_channels
        for width in widths:
            self.down.append(DoubleConv(channels, width, padding, batch_norm, conv_dropout))
            channels = width
        self.pool = nn.MaxPool2d(2)
        self.bottleneck_dropout = (nn.Dropout(self.dropout_p)
                                   if dropout_mode == "bottleneck" and self.dropout_p > 0 else None)
        self.upconvs = nn.ModuleList()
        self.up = nn.ModuleList()
        for width in reversed(widths[:-1]):
            # 2x2 up-conv halves the channels; after concatenating the skip (also `width`
            # channels) the double conv sees 2 * width channels again.
            self.upconvs.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
            self.up.append(DoubleConv(2 * width, width, padding, batch_norm, conv_dropout))
            channels = width
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self):
        """The paper's init: weights ~ N(0, sqrt(2 / N)), N = inputs of one neuron; biases 0.

        For a k x k conv N = k * k * C_in (kaiming_normal_ with fan_in). For the 2x2 stride-2
        up-conv every output pixel is reached by exactly one kernel tap per input channel, so
        N = C_in there (its weight is stored (C_in, C_out, 2, 2), which fan_in would misread).
        """
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight.shape[0]))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ sizes
    @property
    def total_stride(self):
        """Down-sampling factor of the deepest level, 2**(depth - 1)."""
        return 2 ** (self.depth - 1)

    def _trace_size(self, s):
        """Follow one spatial size through the network; None when it does not fit.

        A size fits when every max-pooled map is even (so pooling loses nothing and the
        up-conv restores it exactly) and no map shrinks to nothing.
        """
        shrink = 4 if self.padding == "valid" else 0     # two 3x3 convs per level
        skips = []
        for level in range(self.depth):
            s -= shrink
            if s < 1:
                return None
            if level < self.depth - 1:
                if s % 2:
                    return None
                skips.append(s)
                s //= 2
        for skip in reversed(skips):
            s = 2 * s
            if s > skip:          # same padding always has s == skip; valid has s < skip
                return None
            s -= shrink
            if s < 1:
                return None
        return s

    def _nearest_valid(self, s):
        """(largest valid size <= s or None, smallest valid size >= s) for one dimension."""
        below = next((t for t in range(s, 0, -1) if self._trace_size(t) is not None), None)
        above = next(t for t in range(max(s, 1), max(s, 1) + 8 * self.total_stride + 256)
                     if self._trace_size(t) is not None)
        return below, above

    def is_valid_input_size(self, h, w):
        """True when an (h, w) input passes through the network (see valid_input_size)."""
        return self._trace_size(int(h)) is not None and self._trace_size(int(w)) is not None

    def valid_input_size(self, h, w):
        """The smallest valid input size (h', w') with h' >= h and w' >= w.

        Equal to (h, w) exactly when (h, w) is valid. With valid padding and depth d the valid
        sizes are s = 2**(d-1) * b + 2**(d+2) - 4 for b >= 4 (depth 5: s = 12 mod 16, s >= 188);
        with same padding they are the multiples of 2**(d-1).
        """
        return self._nearest_valid(int(h))[1], self._nearest_valid(int(w))[1]

    def check_input_size(self, h, w):
        """Raise a ValueError naming the nearest valid sizes when (h, w) is not a valid input."""
        bad = []
        for name, s in (("height", int(h)), ("width", int(w))):
            if self._trace_size(s) is None:
                below, above = self._nearest_valid(s)
                options = f"{below} or {above}" if below is not None else f"{above}"
                bad.append(f"{name} {s} (nearest valid: {options})")
        if bad:
            rule = ("every max-pooled map must have an even size" if self.padding == "valid"
                    else f"sizes must be multiples of {self.total_stride}")
            raise ValueError(f"U-Net (depth {self.depth}, {self.padding} padding) cannot take an "
                             f"input of {int(h)}x{int(w)}: {'; '.join(bad)}, because {rule}; "
                             "resize or pad the input, or use seg.tiling.predict_tiled.")

    def output_size(self, h, w):
        """Spatial size (h_out, w_out) of the output for an (h, w) input; ValueError if invalid."""
        self.check_input_size(h, w)
        return self._trace_size(int(h)), self._trace_size(int(w))

    # ------------------------------------------------------------------ forward
    def forward(self, x):
        """x: (N, in_channels, H, W) -> logits (N, num_classes, H_out, W_out)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"U-Net expects input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}.")
        self.check_input_size(x.shape[2], x.shape[3])
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        if self.bottleneck_dropout is not None:
            x = self.bottleneck_dropout(x)
        for upconv, block, skip in zip(self.upconvs, self.up, reversed(skips)):
            x = upconv(x)
            # [skip, up]: the paper's order (copy and crop, then concatenate).
            x = cat([F.center_crop(skip, x.shape[2:]), x], axis=1)
            x = block(x)
        return self.classifier(x)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, in_channels={self.in_channels}, depth={self.depth}, "
                f"features_root={self.features_root}, padding={self.padding!r}, "
                f"batch_norm={self.batch_norm}, dropout={self.dropout_p}")


@register("unet")
def unet(num_classes, in_channels=1, depth=5, features_root=64, padding="valid", batch_norm=False,
         dropout=0.0, dropout_mode="bottleneck"):
    """Build a U-Net; see UNet. Defaults are the paper's network (31,030,658 parameters for
    1 input channel and 2 classes)."""
    return UNet(num_classes, in_channels, depth, features_root, padding, batch_norm, dropout,
                dropout_mode)

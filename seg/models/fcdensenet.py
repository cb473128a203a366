"""FC-DenseNet, "The One Hundred Layers Tiramisu" (Jegou et al., CVPRW 2017).

    model = seg.models.build("fcdensenet103", num_classes=11)   # 9,322,091 parameters

A dense block grows a stack of feature maps: every layer (BN - ReLU - 3x3 conv with k
"growth rate" filters - dropout 0.2) sees the concatenation of the block's input and all
earlier layers' outputs, and adds k maps to it.

    first conv 3x3 -> 48 maps
    down path:  dense block, keep the stack as a skip, transition down
                (BN - ReLU - 1x1 conv keeping the channel count - dropout - 2x2 max-pool)
    bottleneck: dense block
    up path:    transition up (3x3 transposed conv, stride 2) applied ONLY to the maps the
                previous block created (not its whole stack, which would explode the channel
                count), concatenated with the skip, then a dense block
    classifier: 1x1 conv on the last block's whole stack

Configurations (paper, Table 2): FC-DenseNet56: k = 12, 4 layers per block; FC-DenseNet67:
k = 16, 5 layers; FC-DenseNet103: k = 16, layers 4, 5, 7, 10, 12 | 15 | 12, 10, 7, 5, 4,
channel stack 48, 112, 192, 304, 464, 656, bottleneck 896 (+240 new), up 1088, 816, 576,
384, final 256. Parameters at 11 classes: 1,376,795 / 3,463,243 / 9,322,091 (the paper's
9.4M also counts BatchNorm running statistics).
"""
from minidl import cat, nn
from minidl import functional as F

from . import register
from .backbones import check_common, init_weights_, scaled

__all__ = ["FCDenseNet", "DenseBlock", "fcdensenet56", "fcdensenet67", "fcdensenet103"]

CONFIGS = {56: (12, (4,) * 11), 67: (16, (5,) * 11), 103: (16, (4, 5, 7, 10, 12, 15, 12, 10, 7, 5, 4))}


class DenseLayer(nn.Module):
    """BN - ReLU - 3x3 conv (growth_rate filters) - dropout: (N, C, H, W) -> (N, k, H, W)."""

    def __init__(self, in_channels, growth_rate, dropout):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth_rate, 3, padding=1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x):
        y = self.conv(F.relu(self.bn(x)))
        return y if self.drop is None else self.drop(y)


class DenseBlock(nn.Module):
    """`num_layers` dense layers; forward(x) -> (stack, new).

    stack: (N, C + num_layers * k, H, W), the input with every new map appended;
    new:   (N, num_layers * k, H, W), the new maps only (what the up path's transition needs).
    """

    def __init__(self, in_channels, growth_rate, num_layers, dropout):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(in_channels + i * growth_rate, growth_rate, dropout)
                                    for i in range(num_layers))
        self.out_channels = in_channels + num_layers * growth_rate
        self.new_channels = num_layers * growth_rate

    def forward(self, x):
        new = []
        for layer in self.layers:
            y = layer(x)
            new.append(y)
            x = cat([x, y], axis=1)
        return x, cat(new, axis=1)


class TransitionDown(nn.Module):
    """BN - ReLU - 1x1 conv (same channels) - dropout - 2x2 max-pool: halves H and W."""

    def __init__(self, channels, dropout):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x):
        y = self.conv(F.relu(self.bn(x)))
        if self.drop is not None:
            y = self.drop(y)
        return F.max_pool2d(y, 2, 2)


class FCDenseNet(nn.Module):
    """FC-DenseNet with growth rate k and 2n+1 dense blocks (n down, bottleneck, n up).

    num_classes, in_channels: output / input channels.
    growth_rate: k (scaled by width).
    layers:      layers per block, down blocks, bottleneck, up blocks (odd length).
    first_channels: output of the first 3x3 conv (48, scaled by width).
    dropout:     drop probability in every layer and transition down (paper 0.2).
    width:       channel multiplier.

    forward(x: (N, in_channels, H, W)) -> logits (N, num_classes, H, W) for any H, W (odd sizes
    are handled by cropping the transition-up output to its skip, as the reference does).
    """

    def __init__(self, num_classes, in_channels=3, growth_rate=16, layers=CONFIGS[103][1],
                 first_channels=48, dropout=0.2, width=1.0):
        super().__init__()
        check_common(num_classes, in_channels, width)
        layers = tuple(int(n) for n in layers)
        if len(layers) % 2 == 0 or len(layers) < 3:
            raise ValueError(f"layers lists the down blocks, the bottleneck and the up blocks, so its "
                             f"length must be odd and at least 3, got {len(layers)}.")
        self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), width
        self.output_stride = 1
        n = len(layers) // 2
        k = scaled(growth_rate, width)
        self.growth_rate, self.layer_counts = k, layers
        channels = scaled(first_channels, width)
        self.first_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down_blocks, self.transitions_down = nn.ModuleList(), nn.ModuleList()
        skip_channels = []
        for count in layers[:n]:
            block = DenseBlock(channels, k, count, dropout)
            self.down_blocks.append(block)
            channels = block.out_channels
            skip_channels.append(channels)
            self.transitions_down.append(TransitionDown(channels, dropout))
        self.bottleneck = DenseBlock(channels, k, layers[n], dropout)
        new = self.bottleneck.new_channels
        self.transitions_up, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for count, skip in zip(layers[n + 1:], reversed(skip_channels)):
            # Transition up keeps the channel count of the maps it upsamples (k * layers).
            self.transitions_up.append(nn.ConvTranspose2d(new, new, 3, stride=2))
            block = DenseBlock(new + skip, k, count, dropout)
            self.up_blocks.append(block)
            new, channels = block.new_channels, block.out_channels
        self.final_channels = channels
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights_(self)    # the paper uses He initialisation

    def output_size(self, h, w):
        """FC-DenseNet returns the input's size."""
        return int(h), int(w)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FC-DenseNet expects input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}.")
        smallest = 2 ** len(self.down_blocks)
        if min(x.shape[2], x.shape[3]) < smallest:
            raise ValueError(f"FC-DenseNet with {len(self.down_blocks)} pools needs inputs of at least "
                             f"{smallest}x{smallest}, got {x.shape[2]}x{x.shape[3]}; pad or resize it.")
        x = self.first_conv(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions_down):
            x, _ = block(x)
            skips.append(x)
            x = down(x)
        stack, new = self.bottleneck(x)
        for up, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips)):
            # A padding-0 3x3 stride-2 transposed conv gives 2h+1 >= the skip's size: crop
            # the centre to the skip (the reference's "center" cropping in its concat).
            y = up(new)
            h, w = skip.shape[2:]
            top, left = (y.shape[2] - h) // 2, (y.shape[3] - w) // 2
            y = y[:, :, top:top + h, left:left + w]
            stack, new = block(cat([y, skip], axis=1))
        return self.classifier(stack)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, growth_rate={self.growth_rate}, "
                f"layers={self.layer_counts}, width={self.width}")


def _builder(depth):
    k, layers = CONFIGS[depth]

    def build(num_classes, in_channels=3, dropout=0.2, width=1.0):
        return FCDenseNet(num_classes, in_channels, k, layers, 48, dropout, width)
    build.__name__ = f"fcdensenet{depth}"
    build.__doc__ = f"FC-DenseNet{depth}: growth rate {k}, layers {layers} (see FCDenseNet)."
    return build


fcdensenet56 = register("fcdensenet56")(_builder(56))
fcdensenet67 = register("fcdensenet67")(_builder(67))
fcdensenet103 = register("fcdensenet103")(_builder(103))

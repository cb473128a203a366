"""RefineNet (Lin, Milan, Shen & Reid, CVPR 2017): 4-cascaded RefineNet on ResNet-101.

    model = seg.models.build("refinenet", num_classes=21)

ResNet-101 gives features at 1/4, 1/8, 1/16 and 1/32 of the input (256, 512, 1024, 2048
channels). Four RefineNet blocks walk back up, each fusing the coarser block's output with the
next finer backbone feature:

    adapt:  3x3 conv (512 channels for the 1/32 feature, 256 for the others), then 2 residual
            conv units per input (RCU: x + conv3x3(relu(conv3x3(relu(x)))))
    multi-resolution fusion (blocks with two inputs): a 3x3 conv brings every input to the
            smaller width, bilinear upsampling to the largest resolution, sum
    chained residual pooling: x = relu(x); top = x; 4 times: top = conv3x3(maxpool5x5 s1 p2(top)),
            x = x + top  (pooling over ever larger regions, each result added back)
    output: 1 RCU per block

After the last (1/4) block, two more RCUs and a 3x3 conv to the classes give the logits at 1/4
resolution (output_stride 4), bilinearly upsampled to the input size (upsample=False keeps the
1/4 map). The paper reports no parameter count; `seg.models.summary.describe("refinenet")`
prints ours. The adaptation, fusion and CRP convs have no bias; the RCU convs and the
classifier have one.

Initialisation. The RCUs and the CRP stages are residual branches without normalisation, 36 of
them summed in a row at width 1; with He init each one adds its own variance and the logits of
an untrained model reach ~1e6. So every residual branch starts at zero, Fixup-style (Zhang,
Dauphin & Ma, "Fixup Initialization", ICLR 2019, Sec. 3): the last conv of each RCU and each
CRP conv are zero, the RCU's first conv is He init scaled by L^(-1/2) (L = the number of
residual branches; Fixup's L^(-1/(2m-2)) with m = 2 layers per branch). The backbone's
blocks start as their shortcuts too (zero gamma in their last BN, see backbones.Bottleneck).
"""
from minidl import nn
from minidl import functional as F

from . import register
from .backbones import ResNet, check_common, init_weights_, scaled

__all__ = ["RefineNet", "RefineNetBlock", "ResidualConvUnit", "ChainedResidualPooling", "fixup_init_",
           "refinenet"]


def _conv3x3(in_channels, out_channels, bias=False):
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """RCU: x + conv3x3(relu(conv3x3(relu(x)))); (N, C, H, W) -> same shape."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = _conv3x3(channels, channels, bias=True)
        self.conv2 = _conv3x3(channels, channels, bias=True)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ChainedResidualPooling(nn.Module):
    """CRP: relu, then `stages` times top = conv3x3(maxpool5x5(top)); x = x + top."""

    def __init__(self, channels, stages=4):
        super().__init__()
        self.convs = nn.ModuleList(_conv3x3(channels, channels) for _ in range(stages))

    def forward(self, x):
        x = F.relu(x)
        top = x
        for conv in self.convs:
            top = conv(F.max_pool2d(top, 5, 1, 2))
            x = x + top
        return x


class RefineNetBlock(nn.Module):
    """One RefineNet block: inputs of widths `in_channels` (coarsest first) -> `channels` maps
    at the resolution of the finest input.

    forward(*xs): xs[i] has in_channels[i] channels; returns (N, channels, H_max, W_max).
    """

    def __init__(self, in_channels, channels, rcus_in=2, crp_stages=4, rcus_out=1):
        super().__init__()
        self.paths = nn.ModuleList(nn.Sequential(*[ResidualConvUnit(c) for _ in range(rcus_in)])
                                   for c in in_channels)
        # Multi-resolution fusion: only needed when there is more than one input.
        self.fuse = (nn.ModuleList(_conv3x3(c, channels) for c in in_channels)
                     if len(in_channels) > 1 else None)
        self.crp = ChainedResidualPooling(channels, crp_stages)
        self.out = nn.Sequential(*[ResidualConvUnit(channels) for _ in range(rcus_out)])

    def forward(self, *xs):
        xs = [path(x) for path, x in zip(self.paths, xs)]
        if self.fuse is None:
            y = xs[0]
        else:
            size = max((tuple(x.shape[2:]) for x in xs), key=lambda s: s[0] * s[1])
            y = None
            for conv, x in zip(self.fuse, xs):
                x = conv(x)
                if tuple(x.shape[2:]) != size:
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                y = x if y is None else y + x
        return self.out(self.crp(y))


def fixup_init_(module):
    """Zero the last layer of every RCU / CRP branch in `module` and scale the RCUs' first convs
    by L^(-1/2) (Fixup, Zhang et al. 2019; see the module docstring). Returns `module`."""
    rcus = [m for m in module.modules() if isinstance(m, ResidualConvUnit)]
    crps = [m for m in module.modules() if isinstance(m, ChainedResidualPooling)]
    branches = len(rcus) + sum(len(crp.convs) for crp in crps)
    for rcu in rcus:
        rcu.conv1.weight.data *= branches ** -0.5
        nn.init.zeros_(rcu.conv2.weight)
    for crp in crps:
        for conv in crp.convs:
            nn.init.zeros_(conv.weight)
    return module


class RefineNet(nn.Module):
    """4-cascaded RefineNet on ResNet-101.

    num_classes, in_channels: output / input channels.
    upsample:  bilinear upsampling of the 1/4 logits to the input size (False: keep 1/4).
    width:     channel multiplier (backbone and RefineNet widths 512 / 256).
    dropout:   before the classifier (the released code uses 0.5 there).
    """

    def __init__(self, num_classes, in_channels=3, upsample=True, width=1.0, dropout=0.5):
        super().__init__()
        check_common(num_classes, in_channels, width)
        self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), width
        self.upsample, self.output_stride = bool(upsample), 4
        self.backbone = ResNet(in_channels=in_channels, width=width, output_stride=32)
        c1, c2, c3, c4 = self.backbone.channels
        wide, narrow = scaled(512, width), scaled(256, width)
        # Adaptation convs: the deepest feature keeps 512 channels, the others 256.
        self.adapt4 = _conv3x3(c4, wide)
        self.adapt3 = _conv3x3(c3, narrow)
        self.adapt2 = _conv3x3(c2, narrow)
        self.adapt1 = _conv3x3(c1, narrow)
        self.refine4 = RefineNetBlock([wide], wide)
        self.refine3 = RefineNetBlock([wide, narrow], narrow)
        self.refine2 = RefineNetBlock([narrow, narrow], narrow)
        self.refine1 = RefineNetBlock([narrow, narrow], narrow)
        # The paper: "two additional RCUs before the final softmax prediction step".
        self.final_rcus = nn.Sequential(ResidualConvUnit(narrow), ResidualConvUnit(narrow))
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.classifier = nn.Conv2d(narrow, num_classes, 3, padding=1)
        init_weights_(self)
        fixup_init_(self)

    def output_size(self, h, w):
        """(h, w) with upsample=True, else the 1/4 map's size."""
        if self.upsample:
            return int(h), int(w)
        return self.backbone.feature_sizes(int(h), int(w))["layer1"]

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"RefineNet expects input of shape (N, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}.")
        f = self.backbone(x)
        y = self.refine4(self.adapt4(f["layer4"]))
        y = self.refine3(y, self.adapt3(f["layer3"]))
        y = self.refine2(y, self.adapt2(f["layer2"]))
        y = self.refine1(y, self.adapt1(f["layer1"]))
        y = self.final_rcus(y)
        if self.drop is not None:
            y = self.drop(y)
        y = self.classifier(y)
        if self.upsample:
            y = F.interpolate(y, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
        return y

    def extra_repr(self):
        return f"num_classes={self.num_classes}, upsample={self.upsample}, width={self.width}"


@register("refinenet")
def refinenet(num_classes, in_channels=3, upsample=True, width=1.0, dropout=0.5):
    """4-cascaded RefineNet on ResNet-101 (see RefineNet)."""
    return RefineNet(num_classes, in_channels, upsample, width, dropout)

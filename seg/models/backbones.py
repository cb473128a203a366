"""Feature extractors shared by the segmentation models: VGG-16/19 and ResNet-101.

    vgg = VGG(depth=16, batch_norm=True, return_indices=True)   # SegNet's / DeconvNet's encoder
    feats = vgg(x)          # {"conv1": ..., "pool1": ..., "indices1": ..., "size1": (H, W), ...}
    resnet = ResNet(layers=(3, 4, 23, 3), output_stride=8)        # DeepLab's dilated ResNet-101
    feats = resnet(x)       # {"stem": ..., "layer1": ..., ..., "layer4": ...}

Both return *every* intermediate map a segmentation head may need, by name, so a model picks
what it wants (FCN: pool3/pool4/pool5; SegNet: the pooling switches; RefineNet: layer1..4).

`width` multiplies every channel count (width=1/16 turns 64..512 into 4..32): tests and
examples train tiny versions quickly while the full configuration is still what gets counted.
Layer names follow the reference implementations (VGG: conv1_1 .. conv5_3 as in the Caffe
model zoo; ResNet: conv1, bn1, layer1.0.conv1 ... as in torchvision) so that pretrained
weights map onto them by name (see seg/models/pretrained.py).
"""
import math

from minidl import nn
from minidl import functional as F
# Re-exported: the models size their maps with minidl's formulas.
from minidl.ops.geometry import conv_output_size, pool_output_size  # noqa: F401

__all__ = ["scaled", "pool_output_size", "conv_output_size", "VGG", "Bottleneck", "ResNet",
           "init_weights_", "PooledBatchNorm2d", "VGG_STAGES", "VGG_CHANNELS"]

# Convs per stage (VGG-16: 2,2,3,3,3 = 13 convs; VGG-19: 2,2,4,4,4 = 16) and their widths
# (Simonyan & Zisserman 2015, Table 1, configurations D and E).
VGG_STAGES = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
VGG_CHANNELS = (64, 128, 256, 512, 512)


def scaled(channels, width):
    """`channels * width`, rounded, at least 1: the channel count of a width-reduced layer."""
    return max(1, int(round(channels * width)))


def init_weights_(module, conv="kaiming"):
    """Re-initialise every conv in `module`: He normal weights (fan_in, ReLU gain), zero biases.

    He et al. 2015 initialisation is what SegNet, FC-DenseNet and the ResNets were trained
    from; BatchNorm keeps gamma = 1, beta = 0 from its constructor.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if conv == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that survives one value per channel (batch 1 on a 1x1 map) in training.

    Used where a map is 1x1: DeepLab v3's image-pooling branch, DeconvNet's fc6 / fc7. With
    N * H * W == 1 the batch variance is zero, so ordinary batch norm would output beta
    whatever the input (its gradient would vanish; minidl and PyTorch refuse it). In that case
    this layer normalises with its running statistics, as in eval mode, and leaves them
    unchanged; otherwise it is plain BatchNorm2d. x: (N, C, H, W) -> same shape.
    """

    def forward(self, x):
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=self.momentum, eps=self.eps)
        return super().forward(x)


# ---------------------------------------------------------------------------------- VGG
class VGG(nn.Module):
    """The convolutional part of VGG-16 / VGG-19 (5 stages of 3x3 convs, each ending in a pool).

    depth:          16 or 19.
    in_channels:    input channels.
    batch_norm:     BatchNorm2d after every conv, before its ReLU (SegNet, DeconvNet).
    width:          channel multiplier (1 = the paper's 64, 128, 256, 512, 512).
    first_padding:  padding of conv1_1 (FCN pads by 100 so any input size can be aligned).
    pools:          5 entries, one per stage: (kernel, stride, padding) of its max-pool, or
                    None to drop the pool (DilatedNet drops pool4 and pool5). Default 2x2 s2.
    ceil_mode:      round pooled sizes up (Caffe) instead of down (PyTorch's default).
    dilation:       5 entries, the dilation of every 3x3 conv of that stage (padding follows,
                    so the stage keeps its size): DeepLab / DilatedNet use 2 for conv5.
    return_indices: pools also return their argmax switches (SegNet / DeconvNet unpooling).

    forward(x: (N, in_channels, H, W)) -> dict with, for every stage s = 1..5,
        "conv{s}":    output of the stage's last conv + ReLU (before the pool),
        "size{s}":    its spatial size (h, w), the output size the matching unpool needs,
        "pool{s}":    output of the pool (the conv output itself when the pool is dropped),
        "indices{s}": the switches (only with return_indices and a pool),
    and "out", the last map.
    """

    def __init__(self, depth=16, in_channels=3, batch_norm=False, width=1.0, first_padding=1,
                 pools=None, ceil_mode=False, dilation=(1, 1, 1, 1, 1), return_indices=False):
        super().__init__()
        if depth not in VGG_STAGES:
            raise ValueError(f"VGG depth must be 16 or 19, got {depth!r}.")
        pools = [(2, 2, 0)] * 5 if pools is None else list(pools)
        if len(pools) != 5 or len(dilation) != 5:
            raise ValueError("pools and dilation need one entry per VGG stage (5 entries each), got "
                             f"{len(pools)} and {len(dilation)}.")
        self.depth, self.batch_norm, self.width = depth, bool(batch_norm), width
        self.ceil_mode, self.return_indices = bool(ceil_mode), bool(return_indices)
        self.pool_specs = [None if p is None else tuple(p) for p in pools]
        self.dilations = tuple(int(d) for d in dilation)
        self.first_padding = int(first_padding)
        self.stage_channels = tuple(scaled(c, width) for c in VGG_CHANNELS)
        # The plan: for each stage, the names of its convs in order (conv{s}_{i}).
        self.plan = []
        channels = in_channels
        for s, (n_convs, out) in enumerate(zip(VGG_STAGES[depth], self.stage_channels), start=1):
            names = []
            d = self.dilations[s - 1]
            for i in range(1, n_convs + 1):
                pad = self.first_padding if (s, i) == (1, 1) else d
                # Without batch norm the ReLU is the conv's epilogue (nn.ConvReLU2d).
                conv = nn.Conv2d if self.batch_norm else nn.ConvReLU2d
                setattr(self, f"conv{s}_{i}", conv(channels, out, 3, padding=pad, dilation=d))
                if self.batch_norm:
                    setattr(self, f"bn{s}_{i}", nn.BatchNormReLU2d(out))   # BN + ReLU
                names.append(f"{s}_{i}")
                channels = out
            self.plan.append(names)
        self.out_channels = channels

    def _pool(self, s, x):
        k, stride, pad = self.pool_specs[s - 1]
        return F.max_pool2d(x, k, stride, pad, ceil_mode=self.ceil_mode,
                            return_indices=self.return_indices)

    def forward(self, x):
        feats = {}
        for s, names in enumerate(self.plan, start=1):
            for name in names:
                x = getattr(self, "conv" + name)(x)
                if self.batch_norm:
                    x = getattr(self, "bn" + name)(x)
            feats[f"conv{s}"] = x
            feats[f"size{s}"] = tuple(x.shape[2:])
            if self.pool_specs[s - 1] is not None:
                x = self._pool(s, x)
                if self.return_indices:
                    x, feats[f"indices{s}"] = x
            feats[f"pool{s}"] = x
        feats["out"] = x
        return feats

    def output_size(self, h, w):
        """Spatial size of the trunk's last map ("out") for an (h, w) input."""
        sizes = []
        for s in (h, w):
            for stage in range(1, 6):
                if stage == 1:     # conv1_1 may pad by more than 1 (FCN's 100)
                    s = s + 2 * self.first_padding - 2
                if self.pool_specs[stage - 1] is not None:
                    k, stride, pad = self.pool_specs[stage - 1]
                    s = pool_output_size(s, k, stride, pad, ceil_mode=self.ceil_mode)
            sizes.append(s)
        return tuple(sizes)

    def extra_repr(self):
        return (f"depth={self.depth}, batch_norm={self.batch_norm}, width={self.width}, "
                f"dilation={self.dilations}")


# ---------------------------------------------------------------------------------- ResNet
class Bottleneck(nn.Module):
    """ResNet bottleneck block (He et al. 2016): 1x1 reduce, 3x3, 1x1 expand (x4), + shortcut.

    x: (N, in_channels, H, W) -> (N, 4 * planes, H / stride, W / stride). The stride sits on
    the 3x3 conv (torchvision's "ResNet v1.5"; Caffe's original puts it on the first 1x1 -
    the parameter count is the same). All convs are bias-free: BatchNorm follows each.
    """
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, dilation=1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        # The residual branch starts as zero (gamma = 0 in its last BN; Goyal et al. 2017,
        # "Accurate, Large Minibatch SGD", Sec. 5.1): each block begins as its shortcut, so 33
        # summed branches do not multiply the activations' scale (~1e6 at init otherwise,
        # worse in eval mode, where BN's initial statistics do not normalise).
        nn.init.zeros_(self.bn3.weight)
        # Projection shortcut when the shape changes (1x1 conv + BN, "option B").
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))
        self.stride, self.dilation = stride, dilation

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet trunk without the classifier (ResNet-101 by default), optionally dilated.

    layers:        bottleneck blocks per stage ((3, 4, 23, 3) = ResNet-101, (3, 4, 6, 3) = 50).
    in_channels:   input channels.
    width:         channel multiplier (1 = 64 .. 2048 channels).
    output_stride: 32 (classification), 16 (layer4 dilated 2) or 8 (layer3 dilation 2, layer4
                   dilation 4): DeepLab's "atrous" trick trades the last strides for dilation so
                   the maps stay dense while the receptive field keeps growing.
    multi_grid:    per-block dilation multipliers of layer4 (DeepLab v3: (1, 2, 4)).
    ceil_mode:     Caffe-style rounding in the stem max-pool (DeepLab v2's Caffe model).

    Unlike torchvision, every block of a dilated stage (its first included) uses that stage's
    dilation, as DeepLab's models do.

    forward(x: (N, in_channels, H, W)) -> dict: "stem" (1/4, 64 ch), "layer1" (1/4, 256),
    "layer2" (1/8, 512), "layer3" (1/16 or 1/8, 1024), "layer4" (1/32, 1/16 or 1/8, 2048),
    and "out" (= layer4). `channels` lists the four layers' channel counts.
    """

    def __init__(self, layers=(3, 4, 23, 3), in_channels=3, width=1.0, output_stride=32,
                 multi_grid=(1, 1, 1), ceil_mode=False):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}.")
        self.width, self.output_stride = width, output_stride
        self.multi_grid = tuple(multi_grid)
        self.ceil_mode = bool(ceil_mode)
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        # Strides / dilations of layer1..4 for each output stride.
        strides = {32: (1, 2, 2, 2), 16: (1, 2, 2, 1), 8: (1, 2, 1, 1)}[output_stride]
        dilations = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}[output_stride]
        channels = stem
        self.channels = []
        for i, (blocks, stride, dilation) in enumerate(zip(layers, strides, dilations)):
            planes = scaled(64 * 2 ** i, width)
            grid = self.multi_grid if i == 3 else (1,) * blocks
            if len(grid) < blocks:
                grid = tuple(grid) + (grid[-1],) * (blocks - len(grid))
            stage = nn.Sequential()
            for b in range(blocks):
                stage.append(Bottleneck(channels, planes, stride if b == 0 else 1,
                                        dilation * grid[b]))
                channels = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", stage)
            self.channels.append(channels)
        self.out_channels = channels
        self.strides, self.dilations = strides, dilations

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2, 1, ceil_mode=self.ceil_mode)
        feats = {"stem": x}
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats[f"layer{i}"] = x
        feats["out"] = x
        return feats

    def feature_sizes(self, h, w):
        """Spatial sizes {"layer1": (h, w), ...} of the four stages for an (h, w) input."""
        sizes = {}
        hw = []
        for s in (h, w):
            s = conv_output_size(s, 7, 2, 3)
            s = pool_output_size(s, 3, 2, 1, ceil_mode=self.ceil_mode)
            hw.append(s)
        for i, stride in enumerate(self.strides, start=1):
            if stride == 2:
                hw = [conv_output_size(s, 3, 2, 1) for s in hw]
            sizes[f"layer{i}"] = tuple(hw)
        return sizes

    def extra_repr(self):
        return f"width={self.width}, output_stride={self.output_stride}"


def resnet101(**options):
    """ResNet-101 trunk: bottleneck blocks [3, 4, 23, 3] (42,500,160 parameters at width 1)."""
    return ResNet(layers=(3, 4, 23, 3), **options)


def _check_positive(name, value):
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_common(num_classes, in_channels, width):
    """Validate the options every builder takes, with one clear sentence each."""
    _check_positive("num_classes", num_classes)
    _check_positive("in_channels", in_channels)
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"width is a positive channel multiplier (e.g. 1 or 1/16), got {width!r}.")

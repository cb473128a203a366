"""DeepLab v1 (LargeFOV), v2 (ASPP) and v3 (Chen et al., ICLR 2015 / TPAMI 2017 / arXiv 2017).

    model = seg.models.build("deeplab_largefov", num_classes=21)            # 20,505,429 params
    model = seg.models.build("deeplabv2", 21)                               # VGG-16:  37,877,652
    model = seg.models.build("deeplabv2", 21, backbone="resnet101")         # ResNet: 44,048,532
    model = seg.models.build("deeplabv3", 21, output_stride=16)

Atrous (dilated) convolution keeps maps dense: instead of striding, later layers dilate their
kernels, so the net sees as much context at output stride 8 as the classifier did at 32.

- v1 LargeFOV: VGG-16 with every pool 3x3 (pool1-3 stride 2, pool4/pool5 stride 1, pad 1,
  Caffe round-up), conv5 dilation 2, a 3x3 average pool ("pool5a"), fc6 = 3x3 conv 1024 with
  dilation 12 (the large field of view), fc7 = 1x1 1024, fc8 = 1x1 to the classes; output
  stride 8. A fully connected CRF (seg.crf) refines the upsampled scores.
- v2 ASPP: atrous spatial pyramid pooling - parallel branches at rates 6, 12, 18, 24 whose
  class scores are summed. VGG-16 ("ASPP-L"): each branch is fc6 (3x3, 1024, rate r) -> fc7
  (1x1, 1024) -> fc8. ResNet-101 (block3 dilation 2, block4 dilation 4): each branch is one
  3x3 conv 2048 -> classes with bias at rate r.
- v3: ResNet-101 at output stride 16 (or 8) with multi-grid (1, 2, 4) in block4; ASPP = a 1x1
  conv and three 3x3 convs at rates 6, 12, 18 (doubled at stride 8), 256 channels + BN + ReLU
  each, plus an image-level branch (global average pool, 1x1 conv 256 + BN + ReLU, upsampled
  back); the five are concatenated, projected by 1x1 conv 256 + BN + ReLU, and classified.

Batch-1 training and the image-level branch: after global pooling the map is 1x1, so with one
image BatchNorm would normalise a single value per channel - its batch variance is 0 and the
output collapses to beta (PyTorch even refuses it). `PooledBatchNorm2d` therefore normalises
with its running statistics (without updating them) whenever a training batch has only one
value per channel (N * H * W == 1); with two or more images it is ordinary batch norm.

All models upsample their logits bilinearly to the input size; upsample=False returns the
stride-8 (or 16) logits instead (`output_size(h, w)` tells their size).
"""
from minidl import cat, nn
from minidl import functional as F

from . import register
from .backbones import (VGG, PooledBatchNorm2d, ResNet, check_common, init_weights_,
                        pool_output_size, scaled)

__all__ = ["DeepLabLargeFOV", "DeepLabV2", "DeepLabV3", "ASPP", "PooledBatchNorm2d",
           "deeplab_largefov", "deeplabv2", "deeplabv3"]

# DeepLab's VGG pools: 3x3 windows, stride 2 for pool1-3, stride 1 for pool4/5, all pad 1.
_DEEPLAB_POOLS = [(3, 2, 1)] * 3 + [(3, 1, 1)] * 2
ASPP_V2_RATES = (6, 12, 18, 24)
ASPP_V3_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _deeplab_vgg(in_channels, width):
    """DeepLab's VGG-16 trunk: 3x3 pools, pool4/pool5 stride 1, conv5 dilation 2 (stride 8)."""
    return VGG(16, in_channels, width=width, pools=_DEEPLAB_POOLS, ceil_mode=True,
               dilation=(1, 1, 1, 1, 2))


def _vgg_stride8_size(s):
    for k, stride, pad in _DEEPLAB_POOLS:
        s = pool_output_size(s, k, stride, pad, ceil_mode=True)
    return s


def _check_input(name, model, x):
    if x.ndim != 4 or x.shape[1] != model.in_channels:
        raise ValueError(f"{name} expects input of shape (N, {model.in_channels}, H, W), got "
                         f"{tuple(x.shape)}.")


def _upsample_to(y, size):
    return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)


class _DeepLabBase(nn.Module):
    """Shared: size bookkeeping and the final bilinear upsampling."""

    def output_size(self, h, w):
        """(h, w) with upsample=True, else the size of the stride-8/16 logits."""
        if self.upsample:
            return int(h), int(w)
        return self._coarse_size(int(h)), self._coarse_size(int(w))

    def _finish(self, y, x):
        return _upsample_to(y, x.shape[2:]) if self.upsample else y


def _head_init_(conv, std=0.01):
    """DeepLab's classifier init: Gaussian std 0.01, zero bias (the deploy prototxts)."""
    nn.init.normal_(conv.weight, 0.0, std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class _VGGBranch(nn.Module):
    """fc6 (3x3, rate r) - ReLU - dropout - fc7 (1x1) - ReLU - dropout - fc8 (1x1 to classes)."""

    def __init__(self, in_channels, hidden, num_classes, rate, dropout):
        super().__init__()
        self.fc6 = nn.Conv2d(in_channels, hidden, 3, padding=rate, dilation=rate)
        self.fc7 = nn.Conv2d(hidden, hidden, 1)
        self.fc8 = nn.Conv2d(hidden, num_classes, 1)
        self.drop6, self.drop7 = nn.Dropout(dropout), nn.Dropout(dropout)
        init_weights_(self)
        _head_init_(self.fc8)

    def forward(self, x):
        x = self.drop6(F.relu(self.fc6(x)))
        x = self.drop7(F.relu(self.fc7(x)))
        return self.fc8(x)


class DeepLabLargeFOV(_DeepLabBase):
    """DeepLab v1 LargeFOV on VGG-16 (output stride 8).

    num_classes, in_channels: output / input channels.
    upsample: bilinear upsampling of the logits to the input size (False: stride-8 logits).
    pool5a:   the 3x3 stride-1 average pool between pool5 and fc6 of the reference prototxt.
    width:    channel multiplier (VGG widths and fc6/fc7's 1024).
    dropout:  after fc6 and fc7 (0.5).
    """

    def __init__(self, num_classes, in_channels=3, upsample=True, pool5a=True, width=1.0,
                 dropout=0.5):
        super().__init__()
        check_common(num_classes, in_channels, width)
        self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), width
        self.upsample, self.pool5a, self.output_stride = bool(upsample), bool(pool5a), 8
        self.backbone = _deeplab_vgg(in_channels, width)
        init_weights_(self.backbone)
        self.head = _VGGBranch(self.backbone.out_channels, scaled(1024, width), num_classes, 12,
                               dropout)

    _coarse_size = staticmethod(_vgg_stride8_size)

    def forward(self, x):
        _check_input("DeepLab-LargeFOV", self, x)
        y = self.backbone(x)["out"]
        if self.pool5a:
            y = F.avg_pool2d(y, 3, 1, 1)
        return self._finish(self.head(y), x)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, upsample={self.upsample}, width={self.width}"


class DeepLabV2(_DeepLabBase):
    """DeepLab v2: ASPP on VGG-16 ("ASPP-L") or on a dilated ResNet-101 (output stride 8).

    num_classes, in_channels: output / input channels.
    backbone: "vgg16" or "resnet101".
    rates:    the ASPP dilation rates (ASPP-L: 6, 12, 18, 24; ASPP-S: 2, 4, 8, 12).
    upsample, width, dropout: as in DeepLabLargeFOV.
    """

    def __init__(self, num_classes, in_channels=3, backbone="vgg16", rates=ASPP_V2_RATES,
                 upsample=True, width=1.0, dropout=0.5):
        super().__init__()
        check_common(num_classes, in_channels, width)
        if backbone not in ("vgg16", "resnet101"):
            raise ValueError(f"DeepLab v2 backbone must be 'vgg16' or 'resnet101', got {backbone!r}.")
        self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), width
        self.backbone_name, self.rates = backbone, tuple(rates)
        self.upsample, self.output_stride = bool(upsample), 8
        self.branches = nn.ModuleList()
        if backbone == "vgg16":
            self.backbone = _deeplab_vgg(in_channels, width)
            init_weights_(self.backbone)
            for r in self.rates:
                self.branches.append(_VGGBranch(self.backbone.out_channels, scaled(1024, width),
                                                num_classes, r, dropout))
        else:
            # Caffe's ResNet rounds the stem pool up, as every DeepLab v2 model does.
            self.backbone = ResNet(in_channels=in_channels, width=width, output_stride=8,
                                   ceil_mode=True)
            init_weights_(self.backbone)
            for r in self.rates:
                conv = nn.Conv2d(self.backbone.out_channels, num_classes, 3, padding=r, dilation=r)
                _head_init_(conv)
                self.branches.append(conv)

    def _coarse_size(self, s):
        if self.backbone_name == "vgg16":
            return _vgg_stride8_size(s)
        return self.backbone.feature_sizes(s, s)["layer4"][0]

    def forward(self, x):
        _check_input("DeepLab v2", self, x)
        y = self.backbone(x)["out"]
        scores = None
        for branch in self.branches:       # ASPP: the branches' class scores are summed
            s = branch(y)
            scores = s if scores is None else scores + s
        return self._finish(scores, x)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, backbone={self.backbone_name!r}, "
                f"rates={self.rates}, width={self.width}")


def _conv_bn_relu(in_channels, out_channels, kernel_size, dilation=1, bn=nn.BatchNorm2d):
    pad = dilation * (kernel_size // 2)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad,
                                   dilation=dilation, bias=False),
                         bn(out_channels), nn.ReLU())


class ASPP(nn.Module):
    """DeepLab v3's ASPP: (N, C_in, H, W) -> (N, out_channels, H, W).

    Branches: 1x1 conv, one 3x3 conv per rate, and image pooling (global average -> 1x1 conv
    -> BN -> ReLU -> bilinear upsampling to H x W); each has out_channels maps with BN + ReLU.
    They are concatenated and projected by a 1x1 conv + BN + ReLU (+ dropout).
    """

    def __init__(self, in_channels, out_channels=256, rates=(6, 12, 18), dropout=0.1):
        super().__init__()
        self.rates = tuple(rates)
        self.convs = nn.ModuleList([_conv_bn_relu(in_channels, out_channels, 1)])
        for r in self.rates:
            self.convs.append(_conv_bn_relu(in_channels, out_channels, 3, r))
        self.pool_conv = _conv_bn_relu(in_channels, out_channels, 1, bn=PooledBatchNorm2d)
        self.project = _conv_bn_relu((len(self.rates) + 2) * out_channels, out_channels, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x):
        outs = [branch(x) for branch in self.convs]
        pooled = self.pool_conv(x.mean(axis=(2, 3), keepdims=True))
        outs.append(_upsample_to(pooled, x.shape[2:]))
        y = self.project(cat(outs, axis=1))
        return y if self.drop is None else self.drop(y)


class DeepLabV3(_DeepLabBase):
    """DeepLab v3: dilated ResNet-101 + ASPP with image pooling.

    num_classes, in_channels: output / input channels.
    output_stride: 16 (ASPP rates 6, 12, 18) or 8 (12, 24, 36).
    multi_grid: block4's dilation multipliers (paper's best: 1, 2, 4).
    aspp_channels: 256 (scaled by width).
    upsample, width: as in DeepLabLargeFOV.
    """

    def __init__(self, num_classes, in_channels=3, output_stride=16, multi_grid=(1, 2, 4),
                 aspp_channels=256, upsample=True, width=1.0, dropout=0.1):
        super().__init__()
        check_common(num_classes, in_channels, width)
        if output_stride not in ASPP_V3_RATES:
            raise ValueError(f"DeepLab v3 output_stride must be 16 or 8, got {output_stride!r}.")
        self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), width
        self.upsample, self.output_stride = bool(upsample), output_stride
        self.backbone = ResNet(in_channels=in_channels, width=width, output_stride=output_stride,
                               multi_grid=multi_grid)
        channels = scaled(aspp_channels, width)
        self.aspp = ASPP(self.backbone.out_channels, channels, ASPP_V3_RATES[output_stride], dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights_(self)
        _head_init_(self.classifier)

    def _coarse_size(self, s):
        return self.backbone.feature_sizes(s, s)["layer4"][0]

    def forward(self, x):
        _check_input("DeepLab v3", self, x)
        y = self.aspp(self.backbone(x)["out"])
        return self._finish(self.classifier(y), x)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, output_stride={self.output_stride}, "
                f"width={self.width}")


@register("deeplab_largefov")
def deeplab_largefov(num_classes, in_channels=3, upsample=True, pool5a=True, width=1.0, dropout=0.5):
    """DeepLab v1 LargeFOV (see DeepLabLargeFOV); 20,505,429 parameters at 21 classes."""
    return DeepLabLargeFOV(num_classes, in_channels, upsample, pool5a, width, dropout)


@register("deeplabv2")
def deeplabv2(num_classes, in_channels=3, backbone="vgg16", rates=ASPP_V2_RATES, upsample=True,
              width=1.0, dropout=0.5):
    """DeepLab v2 with ASPP (see DeepLabV2); 37,877,652 (VGG-16) / 44,048,532 (ResNet-101)."""
    return DeepLabV2(num_classes, in_channels, backbone, rates, upsample, width, dropout)


@register("deeplabv3")
def deeplabv3(num_classes, in_channels=3, output_stride=16, multi_grid=(1, 2, 4), aspp_channels=256,
              upsample=True, width=1.0, dropout=0.1):
    """DeepLab v3 (see DeepLabV3)."""
    return DeepLabV3(num_classes, in_channels, output_stride, multi_grid, aspp_channels, upsample,
                     width, dropout)

"""Fully Convolutional Networks (Long, Shelhamer & Darrell, CVPR 2015): FCN-32s, -16s, -8s.

    model = seg.models.build("fcn8s", num_classes=21)                    # 134,489,759 parameters
    model = seg.models.build("fcn8s", 21, backbone="vgg19")               # 139,799,455
    model = seg.models.build("fcn8s", 2, 1, fusion="tensorflow")          # the seed's FCN.tensorflow

The classifier of VGG becomes convolutions (fc6 = 7x7 conv 4096, fc7 = 1x1 conv 4096, each with
ReLU and dropout 0.5; score_fr = 1x1 conv to the classes), so the net takes any input size and
returns a coarse score map (stride 32). Transposed convolutions initialised to bilinear
interpolation, without bias and trainable, bring it back to the input size:

    FCN-32s: score_fr --k64 s32--> crop 19 --> output
    FCN-16s: score_fr --k4 s2--> + crop5(score_pool4(pool4)) --k32 s16--> crop 27 --> output
    FCN-8s:  ... fuse_pool4 --k4 s2--> + crop9(score_pool3(pool3)) --k16 s8--> crop 31 --> output

conv1_1 pads the input by 100 pixels so that, with Caffe's round-up pooling, every coarse map
is large enough; the fixed crop offsets (from the reference prototxts) then align the maps
exactly and the output has the input's size for every input size.

fusion="tensorflow" is the variant of the seed talk (shekkizh/FCN.tensorflow): "same" padding
everywhere (no pad 100, no crop offsets), and the transposed-conv outputs (with bias) are added
to the *raw* pool4 / pool3 features (512 / 256 channels) instead of to 1x1 score layers:
score_fr --k4 s2 (cls->512)--> + pool4 --k4 s2 (512->256)--> + pool3 --k16 s8 (256->cls)--> out.
Each transposed conv is cropped to its target size as TensorFlow's "SAME" conv2d_transpose does.
"""
from minidl import nn
from minidl import functional as F

from . import register
from .backbones import VGG, check_common, init_weights_, scaled

__all__ = ["FCN", "fcn32s", "fcn16s", "fcn8s"]

# Crop offsets of the reference Caffe models (voc-fcn32s/16s/8s train.prototxt, Crop layers).
CROP_OFFSETS = {"pool4": 5, "pool3": 9, 32: 19, 16: 27, 8: 31}


def _crop(x, offset, size):
    """x[:, :, offset:offset+h, offset':offset'+w]; offset is an int or a (top, left) pair."""
    top, left = (offset, offset) if isinstance(offset, int) else offset
    h, w = size
    if top < 0 or left < 0 or top + h > x.shape[2] or left + w > x.shape[3]:
        raise ValueError(f"cannot crop a {x.shape[2]}x{x.shape[3]} map to {h}x{w} at offset "
                         f"({top}, {left}); the input is too small for this network.")
    return x[:, :, top:top + h, left:left + w]


def _same_crop(x, size):
    """Crop a padding-0 transposed-conv output to `size` as TF's SAME conv2d_transpose does.

    TF pads the equivalent forward conv by pad_total = max((out - 1) * s + k - in, 0) on
    both sides together, pad_total // 2 before; the transposed conv removes the same rows.
    """
    # The full output is (in - 1) * s + k long, so full - target is exactly TF's pad_total.
    offsets = tuple(max(full - target, 0) // 2 for full, target in zip(x.shape[2:], size))
    return _crop(x, offsets, size)


class FCN(nn.Module):
    """FCN-32s / 16s / 8s on a VGG-16 or VGG-19 trunk.

    num_classes, in_channels: output / input channels.
    stride:   32, 16 or 8 (FCN-32s, -16s, -8s): the stride of the coarsest fused score map.
    backbone: "vgg16" or "vgg19".
    fusion:   "caffe" (the paper's score layers and crops) or "tensorflow" (see module doc).
    width:    channel multiplier for quick tiny versions (VGG widths and fc6/fc7's 4096).
    dropout:  drop probability after fc6 and fc7 (paper 0.5).

    forward(x: (N, in_channels, H, W)) -> logits (N, num_classes, H, W) for any H, W >= 1.
    """

    def __init__(self, num_classes, in_channels=3, stride=8, backbone="vgg16", fusion="caffe",
                 width=1.0, dropout=0.5):
        super().__init__()
        check_common(num_classes, in_channels, width)
        if stride not in (32, 16, 8):
            raise ValueError(f"FCN stride must be 32, 16 or 8, got {stride!r}.")
        if backbone not in ("vgg16", "vgg19"):
            raise ValueError(f"FCN backbone must be 'vgg16' or 'vgg19', got {backbone!r}.")
        if fusion not in ("caffe", "tensorflow"):
            raise ValueError(f"fusion must be 'caffe' or 'tensorflow', got {fusion!r}.")
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        self.output_stride, self.fusion, self.backbone_name = stride, fusion, backbone
        caffe = fusion == "caffe"
        self.backbone = VGG(depth=int(backbone[3:]), in_channels=in_channels, width=width,
                            first_padding=100 if caffe else 1, ceil_mode=True)
        c3, c4, c5 = self.backbone.stage_channels[2:]
        fc = scaled(4096, width)
        # fc6 / fc7: VGG's fully connected layers as convolutions (7x7 over pool5, then 1x1).
        self.fc6 = nn.Conv2d(c5, fc, 7, padding=0 if caffe else 3)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop6, self.drop7 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        C = num_classes
        if caffe:
            if stride == 32:
                self.upscore = nn.ConvTranspose2d(C, C, 64, stride=32, bias=False)
            else:
                self.upscore2 = nn.ConvTranspose2d(C, C, 4, stride=2, bias=False)
                self.score_pool4 = nn.Conv2d(c4, C, 1)
            if stride == 16:
                self.upscore16 = nn.ConvTranspose2d(C, C, 32, stride=16, bias=False)
            if stride == 8:
                self.upscore_pool4 = nn.ConvTranspose2d(C, C, 4, stride=2, bias=False)
                self.score_pool3 = nn.Conv2d(c3, C, 1)
                self.upscore8 = nn.ConvTranspose2d(C, C, 16, stride=8, bias=False)
        else:
            # FCN.tensorflow's W_t1 / W_t2 / W_t3 (with biases b_t1 / b_t2 / b_t3).
            if stride == 32:
                self.upscore = nn.ConvTranspose2d(C, C, 64, stride=32)
            else:
                self.conv_t1 = nn.ConvTranspose2d(C, c4, 4, stride=2)
            if stride == 16:
                self.upscore16 = nn.ConvTranspose2d(c4, C, 32, stride=16)
            if stride == 8:
                self.conv_t2 = nn.ConvTranspose2d(c4, c3, 4, stride=2)
                self.conv_t3 = nn.ConvTranspose2d(c3, C, 16, stride=8)
        self.reset_parameters()

    def reset_parameters(self):
        """Init as the reference: trunk/fc He-normal, score layers zero, upsampling bilinear.

        The reference zero-fills score_fr / score_pool4 / score_pool3 (the "net surgery" of
        the FCN repository): the net then starts from the upsampled coarse prediction and the
        skips learn corrections. The TF variant's upsampling kernels map between different
        channel counts, so a bilinear diagonal does not apply: they start N(0, 0.02) as in
        FCN.tensorflow, with zero biases.
        """
        init_weights_(self)
        for name, m in self.named_modules():
            if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("score"):
                nn.init.zeros_(m.weight)
            elif isinstance(m, nn.ConvTranspose2d):
                if m.weight.shape[0] == m.weight.shape[1]:
                    nn.init.bilinear_(m.weight)
                else:
                    nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def output_size(self, h, w):
        """FCN returns the input's size."""
        return int(h), int(w)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"FCN expects input of shape (N, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}.")
        size = tuple(x.shape[2:])
        feats = self.backbone(x)
        y = self.drop6(F.relu(self.fc6(feats["pool5"])))
        y = self.drop7(F.relu(self.fc7(y)))
        y = self.score_fr(y)
        if self.fusion == "caffe":
            return self._fuse_caffe(y, feats, size)
        return self._fuse_tensorflow(y, feats, size)

    def _fuse_caffe(self, y, feats, size):
        s = self.output_stride
        if s == 32:
            return _crop(self.upscore(y), CROP_OFFSETS[32], size)
        y = self.upscore2(y)
        y = y + _crop(self.score_pool4(feats["pool4"]), CROP_OFFSETS["pool4"], y.shape[2:])
        if s == 16:
            return _crop(self.upscore16(y), CROP_OFFSETS[16], size)
        y = self.upscore_pool4(y)
        y = y + _crop(self.score_pool3(feats["pool3"]), CROP_OFFSETS["pool3"], y.shape[2:])
        return _crop(self.upscore8(y), CROP_OFFSETS[8], size)

    def _fuse_tensorflow(self, y, feats, size):
        s = self.output_stride
        if s == 32:
            return _same_crop(self.upscore(y), size)
        y = _same_crop(self.conv_t1(y), feats["pool4"].shape[2:]) + feats["pool4"]
        if s == 16:
            return _same_crop(self.upscore16(y), size)
        y = _same_crop(self.conv_t2(y), feats["pool3"].shape[2:]) + feats["pool3"]
        return _same_crop(self.conv_t3(y), size)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, stride={self.output_stride}, "
                f"backbone={self.backbone_name!r}, fusion={self.fusion!r}")


def _builder(stride):
    def build(num_classes, in_channels=3, backbone="vgg16", fusion="caffe", width=1.0, dropout=0.5):
        return FCN(num_classes, in_channels, stride, backbone, fusion, width, dropout)
    build.__name__ = f"fcn{stride}s"
    build.__doc__ = (f"FCN-{stride}s (see FCN). Options: backbone='vgg16'|'vgg19', "
                     "fusion='caffe'|'tensorflow', width, dropout.")
    return build


fcn32s = register("fcn32s")(_builder(32))
fcn16s = register("fcn16s")(_builder(16))
fcn8s = register("fcn8s")(_builder(8))

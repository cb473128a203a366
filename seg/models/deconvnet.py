"""DeconvNet (Noh, Hong & Han, ICCV 2015): a VGG-16 encoder mirrored by a deconvolution network.

    model = seg.models.build("deconvnet", num_classes=21)   # 251,805,653 parameters, input 224

Encoder: VGG-16's 13 convs + BN + ReLU, five 2x2 max-pools that keep their switches, then
fc6 (7x7 conv 4096: the 7x7 pool5 map becomes 1x1) and fc7 (1x1 conv 4096). Decoder: the
mirror: fc6-deconv (7x7 transposed conv to 512: 1x1 back to 7x7), then five stages of
"unpool with the matching switches, then 3x3 deconvolutions":

    unpool5 -> 512, 512, 512 | unpool4 -> 512, 512, 256 | unpool3 -> 256, 256, 128 |
    unpool2 -> 128, 64       | unpool1 -> 64, 64          | 1x1 score to the classes

every layer but the score followed by BN + ReLU. A 3x3 stride-1 "deconvolution" (transposed
conv, padding 1) has the same shape and parameter count as a conv; it is kept as a transposed
conv to stay faithful to the paper. The fc layers need pool5 to be at least fc_kernel wide
(7: inputs of 224 and more; the paper uses 224x224 crops); fc_kernel lets tiny test versions
run on small inputs. At 224x224 fc6 and fc7 are 1x1 maps, so their BatchNorms are
PooledBatchNorm2d (seg/models/backbones.py): with a batch of one image they normalise with
their running statistics instead of failing on a single value per channel.
"""
from minidl import nn
from minidl import functional as F

from . import register
from .backbones import VGG, PooledBatchNorm2d, check_common, init_weights_, scaled

__all__ = ["DeconvNet", "deconvnet"]

_DECODER = {5: ((512, 512), (512, 512), (512, 512)),
            4: ((512, 512), (512, 512), (512, 256)),
            3: ((256, 256), (256, 256), (256, 128)),
            2: ((128, 128), (128, 64)),
            1: ((64, 64), (64, 64))}


class DeconvNet(nn.Module):
    """DeconvNet with batch normalisation (the authors' trained model).

    num_classes, in_channels: output / input channels.
    width:     channel multiplier (VGG widths and fc6/fc7's 4096).
    fc_kernel: kernel of fc6 and fc6-deconv (paper 7).

    forward(x: (N, in_channels, H, W)) -> logits (N, num_classes, H, W); pool5 (about H/32)
    must be at least fc_kernel pixels.
    """

    def __init__(self, num_classes, in_channels=3, width=1.0, fc_kernel=7):
        super().__init__()
        check_common(num_classes, in_channels, width)
        self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), width
        self.fc_kernel = int(fc_kernel)
        self.output_stride = 1
        self.encoder = VGG(16, in_channels, batch_norm=True, width=width, ceil_mode=True,
                           return_indices=True)
        c5, fc = self.encoder.out_channels, scaled(4096, width)
        self.fc6 = nn.Conv2d(c5, fc, self.fc_kernel)
        # fc6 / fc7 are 1x1 maps at 224x224: with one image BatchNorm would see one value per
        # channel, so these two fall back to their running statistics then (PooledBatchNorm2d).
        self.bn6 = PooledBatchNorm2d(fc)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.bn7 = PooledBatchNorm2d(fc)
        self.fc6_deconv = nn.ConvTranspose2d(fc, c5, self.fc_kernel)
        self.fc6_deconv_bn = nn.BatchNorm2d(c5)
        self.decoder_plan = {}
        for stage, convs in _DECODER.items():
            names = []
            for j, (cin, cout) in enumerate(convs, start=1):
                name = f"deconv{stage}_{j}"
                setattr(self, name, nn.ConvTranspose2d(scaled(cin, width), scaled(cout, width), 3,
                                                       padding=1))
                setattr(self, name + "_bn", nn.BatchNorm2d(scaled(cout, width)))
                names.append(name)
            self.decoder_plan[stage] = names
        self.score = nn.Conv2d(scaled(64, width), num_classes, 1)
        init_weights_(self)

    def output_size(self, h, w):
        """DeconvNet returns the input's size (ValueError when the input is too small)."""
        self._check_size(h, w)
        return int(h), int(w)

    def _check_size(self, h, w):
        ph, pw = self.encoder.output_size(h, w)
        if min(ph, pw) < self.fc_kernel:
            raise ValueError(f"DeconvNet needs pool5 to be at least {self.fc_kernel}x{self.fc_kernel} "
                             f"for its {self.fc_kernel}x{self.fc_kernel} fc6, but a {h}x{w} input gives "
                             f"{ph}x{pw}; use inputs of at least {32 * self.fc_kernel - 31} pixels "
                             "(the paper uses 224) or a smaller fc_kernel.")

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DeconvNet expects input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}.")
        self._check_size(x.shape[2], x.shape[3])
        feats = self.encoder(x)
        y = F.relu(self.bn6(self.fc6(feats["pool5"])))
        y = F.relu(self.bn7(self.fc7(y)))
        y = F.relu(self.fc6_deconv_bn(self.fc6_deconv(y)))
        for stage in (5, 4, 3, 2, 1):
            y = F.max_unpool2d(y, feats[f"indices{stage}"], 2, 2,
                               output_size=feats[f"size{stage}"])
            for name in self.decoder_plan[stage]:
                y = F.relu(getattr(self, name + "_bn")(getattr(self, name)(y)))
        return self.score(y)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, in_channels={self.in_channels}, width={self.width}"


@register("deconvnet")
def deconvnet(num_classes, in_channels=3, width=1.0, fc_kernel=7):
    """DeconvNet (see DeconvNet); 251,805,653 parameters at 3 input channels and 21 classes."""
    return DeconvNet(num_classes, in_channels, width, fc_kernel)

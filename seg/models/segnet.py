"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017).

    model = seg.models.build("segnet", num_classes=11)   # CamVid: 29,449,355 parameters

Encoder: VGG-16's 13 convs, each + BatchNorm + ReLU, and five 2x2 stride-2 max-pools that
keep their argmax "switches". Decoder: the mirror image; each stage max-unpools with the
switches of the matching encoder pool (putting every value back where its maximum came from,
zeros elsewhere) and then convolves:

    unpool5 -> 512, 512, 512 | unpool4 -> 512, 512, 256 | unpool3 -> 256, 256, 128 |
    unpool2 -> 128, 64       | unpool1 -> 64, then a 3x3 conv to the classes (no BN / ReLU)

Only the switches cross from encoder to decoder (no feature maps, unlike U-Net), which is why
SegNet is memory-light at inference. Pools round up as in the Caffe reference, and every
unpool is given the exact size of the map before its pool, so odd sizes round-trip:
CamVid's 360x480 pools to 180x240, 90x120, 45x60, 23x30, 12x15 and unpools back to 360x480.
"""
from minidl import nn
from minidl import functional as F

from . import register
from .backbones import VGG, check_common, init_weights_, scaled

__all__ = ["SegNet", "segnet"]

# (input, output) channels of the decoder's convs, stage 5 first (all + BN + ReLU).
_DECODER = {5: ((512, 512), (512, 512), (512, 512)),
            4: ((512, 512), (512, 512), (512, 256)),
            3: ((256, 256), (256, 256), (256, 128)),
            2: ((128, 128), (128, 64)),
            1: ((64, 64),)}


class SegNet(nn.Module):
    """SegNet: VGG-16 encoder with BN, switch-unpooling decoder.

    num_classes, in_channels: output / input channels.
    width: channel multiplier (1 = the paper's 64..512).

    forward(x: (N, in_channels, H, W)) -> logits (N, num_classes, H, W) for any H, W >= 1.
    Decoder layers are named as in the reference prototxt: conv5_3_D ... conv1_1_D.
    """

    def __init__(self, num_classes, in_channels=3, width=1.0):
        super().__init__()
        check_common(num_classes, in_channels, width)
        self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), width
        self.output_stride = 1
        self.encoder = VGG(16, in_channels, batch_norm=True, width=width, ceil_mode=True,
                           return_indices=True)
        # Caffe names count down inside a stage: conv5_3_D is the first conv of stage 5's decoder.
        self.decoder_plan = {}
        for stage, convs in _DECODER.items():
            names = []
            for j, (cin, cout) in enumerate(convs):
                name = f"{stage}_{len(convs) - j + (1 if stage == 1 else 0)}_D"
                setattr(self, "conv" + name, nn.Conv2d(scaled(cin, width), scaled(cout, width), 3,
                                                       padding=1))
                setattr(self, "bn" + name, nn.BatchNorm2d(scaled(cout, width)))
                names.append(name)
            self.decoder_plan[stage] = names
        self.conv1_1_D = nn.Conv2d(scaled(64, width), num_classes, 3, padding=1)
        init_weights_(self)    # SegNet trains from He ("MSRA") initialisation

    def output_size(self, h, w):
        """SegNet returns the input's size."""
        return int(h), int(w)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SegNet expects input of shape (N, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}.")
        feats = self.encoder(x)
        y = feats["pool5"]
        for stage in (5, 4, 3, 2, 1):
            y = F.max_unpool2d(y, feats[f"indices{stage}"], 2, 2,
                               output_size=feats[f"size{stage}"])
            for name in self.decoder_plan[stage]:
                y = F.relu(getattr(self, "bn" + name)(getattr(self, "conv" + name)(y)))
        return self.conv1_1_D(y)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, in_channels={self.in_channels}, width={self.width}"


@register("segnet")
def segnet(num_classes, in_channels=3, width=1.0):
    """SegNet (see SegNet); 29,449,355 parameters at 3 input channels and 11 classes."""
    return SegNet(num_classes, in_channels, width)

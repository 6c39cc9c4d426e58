"""MobileNetV2 backbone in torchvision's module layout, with dilation for output stride 8 / 16 / 32.

Parameter names are torchvision's (`features.0.0.weight`, `features.3.conv.1.1.running_mean`, ...), so its
`mobilenet_v2` ImageNet checkpoints (IMAGENET1K_V1 / V2) and other checkpoints in that layout load with no key
mapping. The segmentation backbone stops at the last inverted-residual block (features.17, 320 channels at width
1.0); torchvision's final 1x1 conv (features.18, 320 -> 1280) and classifier belong to the ImageNet head and are
not built (`HEAD_PREFIXES`). Features: c1..c4 after blocks 3 / 6 / 13 / 17, at strides 4 / 8 / 16 / 32 (24 / 32
/ 96 / 320 channels at width 1.0); below output stride 32 the later stages are dilated instead of strided, as in
DeepLab's MobileNetV2.

`tf_padding=True` pads the stride-2 convolutions like TensorFlow's "SAME" (0 before, 1 after on even sizes): the
sampling grid of weights trained in TensorFlow (e.g. converted TF-slim checkpoints). torch's symmetric padding shifts
that grid by one pixel; for fine-tuning either works.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# (expansion t, output channels c, repeats n, first stride s) of the inverted-residual stages (Sandler et al. 2018).
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
FEATURE_BLOCKS = (3, 6, 13, 17)
"""index in `features` of the block after which c1, c2, c3, c4 are taken"""
HEAD_PREFIXES = ("features.18.", "classifier.")
"""checkpoint entries of the ImageNet classification head, which a segmentation backbone does not build"""
OUTPUT_STRIDES = (8, 16, 32)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Channel count rounded to a multiple of `divisor`, never below 90 % of v (torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of TF "SAME" along one axis of length `size`."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameter names) with two MobileNetV2 options.

    `same=True`: TF "SAME" padding computed from the input size (the module's own padding is 0).
    Depthwise convolutions (groups == channels > 1) run in fp32 under CPU autocast: PyTorch's bf16 depthwise backward
    on CPU is 3-10x slower than fp32's (README, training speed), while the 1x1 convolutions around them gain in bf16.
    """

    def __init__(self, *args, same: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.same = same
        self.depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.same:
            top, bottom = same_pads(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
            left, right = same_pads(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
            x = F.pad(x, (left, right, top, bottom))
        if self.depthwise and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def conv_bn_relu6(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1, tf_padding=False
) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias), BN, ReLU6 -> keys `0.weight`, `1.running_mean`."""
    same = tf_padding and stride > 1
    padding = 0 if same else (kernel - 1) // 2 * dilation
    conv = Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=False, same=same)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand (unless t = 1), 3x3 depthwise (stride, dilation), 1x1 linear projection; residual if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilation: int, expand: int, tf_padding: bool = False):
        super().__init__()
        hidden = round(in_ch * expand)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, dilation, groups=hidden, tf_padding=tf_padding),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """forward(x (B, 3, H, W)) -> [c1, c2, c3, c4] at strides 4, 8, min(16, OS), min(32, OS)."""

    # torchvision's ImageNet checkpoints expect ImageNet normalisation; converted TF checkpoints say otherwise in
    # their metadata (models.pretrained.weights_normalization), which takes precedence.
    input_mean = (0.485, 0.456, 0.406)
    input_std = (0.229, 0.224, 0.225)
    head_prefixes = HEAD_PREFIXES

    def __init__(self, width_mult: float = 1.0, output_stride: int = 16, tf_padding: bool = False):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        in_ch = make_divisible(32 * width_mult)
        features: list[nn.Module] = [conv_bn_relu6(3, in_ch, 3, stride=2, tf_padding=tf_padding)]
        stride, dilation = 2, 1
        for t, c, n, s in SETTINGS:
            out_ch = make_divisible(c * width_mult)
            first_dilation = dilation
            if stride * s > output_stride:  # keep the resolution: dilate this stage instead of striding it
                dilation *= s
                s = 1
            stride *= s
            for i in range(n):
                block_dilation = first_dilation if i == 0 else dilation
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, block_dilation, t, tf_padding))
                in_ch = out_ch
        self.features = nn.Sequential(*features)
        self.channels = tuple(self.features[i].out_channels for i in FEATURE_BLOCKS)
        self.output_stride = output_stride
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in FEATURE_BLOCKS:
                feats.append(x)
        return feats


def build_mobilenet_v2(width_mult: float = 1.0, output_stride: int = 16, tf_padding: bool = False) -> MobileNetV2:
    """A randomly initialised MobileNetV2 backbone."""
    return MobileNetV2(width_mult, output_stride, tf_padding)

"""Aligned Xception-65 (DeepLabV3+ encoder, as used by ST++/UniMatch for COCO), output stride 16 or 8.

Parameter names match the `xception.pth` checkpoint distributed with ST++/UniMatch (`conv1`, `bn1`, `conv2`,
`bn2`, `block1..20.{skip,skipbn,sepconv1..3}`, `conv3..5`; each separable conv has `depthwise`, `bn1`,
`pointwise`, `bn2`). The low-level feature c1 is taken inside block2, before its strided conv: 256 channels
at stride 4, as in DeepLabV3+ and the reference code.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

OUTPUT_STRIDES = (8, 16)


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 + BN, pointwise 1x1 + BN; ReLU first (pre-activation) or after each BN (exit flow)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, activate_first: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, 3, stride, dilation, dilation, groups=in_ch, bias=False)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.activate_first = activate_first

    def forward(self, x: Tensor) -> Tensor:
        if self.activate_first:
            return self.bn2(self.pointwise(self.bn1(self.depthwise(F.relu(x)))))
        x = F.relu(self.bn1(self.depthwise(x)))
        return F.relu(self.bn2(self.pointwise(x)))


class Block(nn.Module):
    """Three separable convs (the last carries the stride) plus a 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, grow_first: bool = True):
        super().__init__()
        if out_ch != in_ch or stride != 1:
            self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(out_ch)
        else:
            self.skip = None
        mid = out_ch if grow_first else in_ch
        self.sepconv1 = SeparableConv2d(in_ch, mid, 1, dilation)
        self.sepconv2 = SeparableConv2d(mid, out_ch, 1, dilation)
        self.sepconv3 = SeparableConv2d(out_ch, out_ch, stride, dilation)

    def forward_with_hook(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (block output, the feature before the strided conv)."""
        skip = x if self.skip is None else self.skipbn(self.skip(x))
        hook = self.sepconv2(self.sepconv1(x))
        return self.sepconv3(hook) + skip, hook

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_hook(x)[0]


class Xception(nn.Module):
    """Xception-65 trunk; forward(x (B,3,H,W)) -> [c1, c2, c3, c4] at strides 4, 8, OS, OS."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"Xception output stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        entry_stride3 = 2 if output_stride == 16 else 1
        rate = 16 // output_stride
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.block1 = Block(64, 128, 2)
        self.block2 = Block(128, 256, 2)
        self.block3 = Block(256, 728, entry_stride3)
        for i in range(4, 20):
            setattr(self, f"block{i}", Block(728, 728, 1, rate))
        self.block20 = Block(728, 1024, 1, rate, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536, 1, rate, activate_first=False)
        self.conv4 = SeparableConv2d(1536, 1536, 1, rate, activate_first=False)
        self.conv5 = SeparableConv2d(1536, 2048, 1, rate, activate_first=False)
        self.channels = (256, 256, 728, 2048)
        self.output_stride = output_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) -> [c1, c2, c3, c4], channels `self.channels`."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.block1(x)
        c2, c1 = self.block2.forward_with_hook(x)
        x = self.block3(c2)
        for i in range(4, 20):
            x = getattr(self, f"block{i}")(x)
        c3 = x
        x = self.block20(x)
        c4 = self.conv5(self.conv4(self.conv3(x)))
        return [c1, c2, c3, c4]


def build_xception(output_stride: int = 16) -> Xception:
    """A randomly initialised Xception-65 trunk."""
    return Xception(output_stride)

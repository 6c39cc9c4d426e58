"""Segmentation heads on a backbone's [c1, c2, c3, c4]: DeepLabV3+ (UniMatch's and CPS's form), DeepLabV3, DeepLabV2
and CTT's DeepLabV2 head.

Every head has the same interface, so a Segmentor can hold any of them (and several at once):
  features(feats) -> (B, out_channels, h, w)   the pre-classifier map (the embedding methods work on)
  fp_features(feats, n, p) -> ((n+1)B, ...)    the same map for the clean features followed by n copies
                                                perturbed with channel dropout, decoded in one batch
  classifier                                   module mapping that map to logits
  forward(feats) = classifier(features(feats)) logits at the head's resolution (not upsampled)
ASPP / decoder names (`b0..b4`, `project`, `reduce`, `fuse`, `classifier`) follow ST++/UniMatch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def default_rates(head: str, output_stride: int) -> tuple[int, ...]:
    """Atrous rates used by the reference code for this head and output stride."""
    if head in ("deeplabv2", "deeplabv2_ctt"):
        return (6, 12, 18, 24)
    return {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]


def perturb(f: Tensor, n: int, p: float) -> Tensor:
    """f (B, C, h, w) -> ((n+1)B, C, h, w): f, then n independent channel-dropout copies (dropout always on)."""
    # Always active, like the reference's freshly built nn.Dropout2d: the FP streams are perturbed in eval too.
    return torch.cat([f] + [F.dropout2d(f, p, training=True) for _ in range(n)])


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, size-preserving padding) + BN + ReLU."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer when `channels` is not a multiple of 32 (CPU-sized heads)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ImagePooling(nn.Module):
    """ASPP image-pooling branch: global average, 1x1 conv + BN + ReLU, broadcast back to (h, w)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_ch, out_ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        # Bilinear upsampling of a 1x1 map is a broadcast; expand avoids the interpolation kernel.
        return self.gap(x).expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """x (B, in_ch, h, w) -> (B, out_ch, h, w): 1x1, one 3x3 atrous branch per rate, image pooling; 1x1 projection."""

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int], dropout: bool = False):
        super().__init__()
        self.num_branches = len(rates) + 2
        self.b0 = conv_bn_relu(in_ch, out_ch, 1)
        for i, rate in enumerate(rates, start=1):
            setattr(self, f"b{i}", conv_bn_relu(in_ch, out_ch, 3, rate))
        setattr(self, f"b{len(rates) + 1}", ImagePooling(in_ch, out_ch))
        project = [*conv_bn_relu(self.num_branches * out_ch, out_ch, 1)]
        if dropout:
            project.append(nn.Dropout2d(0.5))
        self.project = nn.Sequential(*project)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([getattr(self, f"b{i}")(x) for i in range(self.num_branches)], dim=1))


class LowLevelDecoder(nn.Module):
    """A head that decodes c4 with c1 (`decode(c1, c4)` in the subclass): features, perturbed streams, logits."""

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """[c1..c4] -> (B, head_channels, h1, w1)."""
        return self.decode(feats[0], feats[-1])

    def fp_features(self, feats: Sequence[Tensor], n: int, p: float) -> Tensor:
        """[c1..c4] -> ((n+1)B, head_channels, h1, w1): clean, then n streams with c1 and c4 channel-dropped."""
        return self.decode(perturb(feats[0], n, p), perturb(feats[-1], n, p))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))


class DeepLabV3PlusHead(LowLevelDecoder):
    """ASPP on c4, fused with the reduced c1 by two 3x3 convs; features at c1's stride (4)."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18),
        head_channels: int = 256,
        low_level_channels: int = 48,
        dropout: bool = False,
    ):
        super().__init__()
        self.aspp = ASPP(channels[-1], head_channels, rates, dropout)
        self.reduce = conv_bn_relu(channels[0], low_level_channels, 1)
        fuse = [
            *conv_bn_relu(head_channels + low_level_channels, head_channels, 3),
            *conv_bn_relu(head_channels, head_channels, 3),
        ]
        if dropout:
            fuse.append(nn.Dropout(0.1))
        self.fuse = nn.Sequential(*fuse)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.out_channels = head_channels

    def decode(self, c1: Tensor, c4: Tensor) -> Tensor:
        """c1 (B, C1, h1, w1), c4 (B, C4, h4, w4) -> (B, head_channels, h1, w1)."""
        x = F.interpolate(self.aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([self.reduce(c1), x], dim=1))


class CPSASPP(nn.Module):
    """CPS's ASPP (TorchSemiSeg `network.py`, which CTT's DeepLabV3+ uses): a 1x1 and one 3x3 atrous conv per rate,
    BatchNorm over their concatenation, LeakyReLU, a 1x1 reduction; the image-pooling branch (1x1, BN, LeakyReLU, 1x1)
    is added to that reduction rather than concatenated; then BN and LeakyReLU. x (B, in_ch, h, w) -> (B, out_ch, h, w).
    Module names follow the reference's."""

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int], hidden: int = 256):
        super().__init__()
        convs = [nn.Conv2d(in_ch, hidden, 1, bias=False)]
        convs += [nn.Conv2d(in_ch, hidden, 3, padding=r, dilation=r, bias=False) for r in rates]
        self.map_convs = nn.ModuleList(convs)
        self.map_bn = nn.BatchNorm2d(hidden * len(convs))
        self.global_pooling_conv = nn.Conv2d(in_ch, hidden, 1, bias=False)
        self.global_pooling_bn = nn.BatchNorm2d(hidden)
        self.red_conv = nn.Conv2d(hidden * len(convs), out_ch, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden, out_ch, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(out_ch)
        self.leak_relu = nn.LeakyReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.red_conv(self.leak_relu(self.map_bn(torch.cat([m(x) for m in self.map_convs], dim=1))))
        pool = self.leak_relu(self.global_pooling_bn(self.global_pooling_conv(x.mean(dim=(2, 3), keepdim=True))))
        # the pooled branch is one value per image and channel: adding it broadcasts it over the map
        return self.leak_relu(self.red_bn(out + self.pool_red_conv(pool)))


class DeepLabV3PlusCPSHead(LowLevelDecoder):
    """CPS's DeepLabV3+ head (CTT's `cross_teacher_deeplabv3+.py` network): CPSASPP on c4, upsampled and concatenated
    before the 48-channel reduction of c1, two 3x3 convs (BN, ReLU), no dropout; features at c1's stride (4). Its convs
    start from Kaiming normal (fan_in, ReLU), the reference's init of these layers."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18),
        head_channels: int = 256,
        low_level_channels: int = 48,
    ):
        super().__init__()
        self.aspp = CPSASPP(channels[-1], head_channels, rates, head_channels)
        self.reduce = conv_bn_relu(channels[0], low_level_channels, 1)
        self.last_conv = nn.Sequential(
            *conv_bn_relu(head_channels + low_level_channels, head_channels, 3),
            *conv_bn_relu(head_channels, head_channels, 3),
        )
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.out_channels = head_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def decode(self, c1: Tensor, c4: Tensor) -> Tensor:
        """c1 (B, C1, h1, w1), c4 (B, C4, h4, w4) -> (B, head_channels, h1, w1)."""
        x = F.interpolate(self.aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat([x, self.reduce(c1)], dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP on c4 and a 1x1 classifier, no decoder; features at c4's stride (BST's context branch)."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18),
        head_channels: int = 256,
        dropout: bool = False,
    ):
        super().__init__()
        self.aspp = ASPP(channels[-1], head_channels, rates, dropout)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.out_channels = head_channels

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """[c1..c4] -> (B, head_channels, h4, w4)."""
        return self.aspp(feats[-1])

    def fp_features(self, feats: Sequence[Tensor], n: int, p: float) -> Tensor:
        """[c1..c4] -> ((n+1)B, head_channels, h4, w4) with c4 channel-dropped in the n perturbed streams."""
        return self.aspp(perturb(feats[-1], n, p))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))


class SummedAtrousClassifier(nn.Module):
    """DeepLabV2's ASPP: parallel 3x3 atrous conv classifiers whose logits are summed."""

    def __init__(self, in_ch: int, num_classes: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_ch, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2Head(nn.Module):
    """DeepLabV2: the summed atrous classifier directly on c4, so the pre-classifier map is c4 itself."""

    def __init__(self, channels: Sequence[int], num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.classifier = SummedAtrousClassifier(channels[-1], num_classes, rates)
        self.out_channels = channels[-1]

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """[c1..c4] -> c4 (B, C4, h4, w4)."""
        return feats[-1]

    def fp_features(self, feats: Sequence[Tensor], n: int, p: float) -> Tensor:
        """[c1..c4] -> ((n+1)B, C4, h4, w4): c4, then n channel-dropped copies."""
        return perturb(feats[-1], n, p)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))


class SqueezeExcite(nn.Module):
    """Channel attention: x * sigmoid(FC(ReLU(FC(GAP(x))))), reduction r."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.se = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.se(x.mean(dim=(2, 3)))[:, :, None, None]


class CTTDeepLabV2Head(nn.Module):
    """CTT's (ProDA-style) DeepLabV2 head: 1x1 + atrous 3x3 branches with GN, concat, SE, 3x3 conv + GN, dropout.

    The contrastive embedding of CTT is F.normalize(features(feats), dim=1); the classifier (1x1, no bias)
    is applied to the un-normalised map, as in the reference.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18, 24),
        head_channels: int = 256,
    ):
        super().__init__()
        in_ch, width = channels[-1], head_channels
        branches = [nn.Sequential(nn.Conv2d(in_ch, width, 1), group_norm(width), nn.ReLU(inplace=True))]
        for r in rates:
            conv = nn.Conv2d(in_ch, width, 3, padding=r, dilation=r)
            branches.append(nn.Sequential(conv, group_norm(width), nn.ReLU(inplace=True)))
        self.branches = nn.ModuleList(branches)
        cat_ch = width * len(branches)
        self.bottleneck = nn.Sequential(
            SqueezeExcite(cat_ch, 16), nn.Conv2d(cat_ch, width, 3, padding=1), group_norm(width)
        )
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(width, num_classes, 1, bias=False)
        self.out_channels = width
        # The reference's model-wide init (normal, std 0.01, on every conv) runs last and overrides the head's own.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def decode(self, c4: Tensor) -> Tensor:
        """c4 (B, C4, h, w) -> (B, head_channels, h, w)."""
        x = torch.cat([branch(c4) for branch in self.branches], dim=1)
        return self.dropout(self.bottleneck(x))

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """[c1..c4] -> (B, head_channels, h4, w4), before L2 normalisation."""
        return self.decode(feats[-1])

    def fp_features(self, feats: Sequence[Tensor], n: int, p: float) -> Tensor:
        """[c1..c4] -> ((n+1)B, head_channels, h4, w4) with c4 channel-dropped in the n perturbed streams."""
        return self.decode(perturb(feats[-1], n, p))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))

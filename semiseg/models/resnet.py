"""ResNet-18/34/50/101 backbones with torchvision-compatible parameter names, a 7x7 or deep (v1c) stem,
a configurable base width and output stride 8, 16 or 32.

Parameter names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...) so its
ImageNet checkpoints load directly. The deep stem's `conv1` is an nn.Sequential whose indices (0, 1, 3, 4, 6)
match the v1c checkpoints distributed with ST++/UniMatch. Strides follow torchvision v1.5 (on the 3x3 conv).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

STEMS = ("deep", "torchvision")
OUTPUT_STRIDES = (8, 16, 32)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias whose padding keeps the size (up to the stride) for any dilation."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; unlike torchvision it accepts dilation > 1, so ResNet-18/34 work at OS 8/16.

    conv1 sees the input grid (first_dilation), conv2 the output grid (dilation): the receptive field of the
    strided block is kept exactly when its stride is replaced by dilation.
    """

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, first_dilation: int, downsample):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride, first_dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, v1.5), 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, first_dilation: int, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, first_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


DEPTHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def build_stem(stem: str, width: int) -> tuple[nn.Module, int]:
    """The stride-2 stem conv(s) named `conv1` and the number of channels it outputs (bn1 follows)."""
    if stem == "torchvision":
        return nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), width
    if stem == "deep":
        # Indices 0..6 must stay as they are: v1c checkpoints name conv1.0, conv1.1, conv1.3, conv1.4, conv1.6.
        layers = nn.Sequential(
            conv3x3(3, width, stride=2),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            conv3x3(width, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            conv3x3(width, 2 * width),
        )
        return layers, 2 * width
    raise ValueError(f"unknown ResNet stem {stem!r}; valid: {', '.join(STEMS)}")


def build_layer(
    block: type[BasicBlock] | type[Bottleneck],
    in_ch: int,
    planes: int,
    blocks: int,
    stride: int,
    dilation: int,
    dilate: bool,
    multi_grid: Sequence[int] = (),
) -> tuple[nn.Sequential, int, int]:
    """One stage (`layerN`); returns (stage, its output channels, the dilation after it).

    multi_grid (a dilated stage only): block i's 3x3 convs use the stage's dilation x multi_grid[i] (DeepLabV3's
    Multi-Grid; CPS and CTT's DeepLabV3+: (1, 2, 4) at OS 16, dilations 2/4/8) instead of torchvision's scheme.
    """
    # With dilate, the stride becomes dilation; the first block keeps the previous dilation, as in torchvision.
    first_dilation = dilation
    if dilate:
        dilation *= stride
        stride = 1
    out_ch = planes * block.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
    if multi_grid:
        if not dilate or len(multi_grid) != blocks:
            raise ValueError(f"multi_grid needs a dilated stage and one value per block ({blocks}), got {multi_grid}")
        rates = [dilation * g for g in multi_grid]
        layers = [
            block(in_ch if i == 0 else out_ch, planes, 1, r, r, downsample if i == 0 else None)
            for i, r in enumerate(rates)
        ]
        return nn.Sequential(*layers), out_ch, dilation
    layers = [block(in_ch, planes, stride, dilation, first_dilation, downsample)]
    layers += [block(out_ch, planes, 1, dilation, dilation, None) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_ch, dilation


class ResNet(nn.Module):
    """ResNet trunk without pooling/fc; forward(x (B,3,H,W)) -> [c1, c2, c3, c4] at strides 4, 8, 8|16, 8|16|32."""

    def __init__(
        self,
        depth: str = "resnet50",
        stem: str = "torchvision",
        width: int = 64,
        output_stride: int = 16,
        multi_grid: Sequence[int] = (),
    ):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"unknown ResNet depth {depth!r}; valid: {', '.join(DEPTHS)}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"ResNet output stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        block, counts = DEPTHS[depth]
        self.conv1, stem_ch = build_stem(stem, width)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        # torchvision's replace_stride_with_dilation for layer2..4: OS16 dilates layer4, OS8 layer3 and layer4.
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[output_stride]
        in_ch, dilation = stem_ch, 1
        self.layer1, in_ch, dilation = build_layer(block, in_ch, width, counts[0], 1, dilation, False)
        self.layer2, in_ch, dilation = build_layer(block, in_ch, 2 * width, counts[1], 2, dilation, dilate[0])
        self.layer3, in_ch, dilation = build_layer(block, in_ch, 4 * width, counts[2], 2, dilation, dilate[1])
        self.layer4, in_ch, dilation = build_layer(
            block, in_ch, 8 * width, counts[3], 2, dilation, dilate[2], multi_grid
        )
        self.channels = tuple(m * width * block.expansion for m in (1, 2, 4, 8))
        self.output_stride = output_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) -> [c1, c2, c3, c4], channels `self.channels`."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


def build_resnet(
    depth: str, stem: str = "deep", width: int = 64, output_stride: int = 16, multi_grid: Sequence[int] = ()
) -> ResNet:
    """A randomly initialised ResNet trunk (weights are loaded separately by semiseg.models.pretrained)."""
    return ResNet(depth, stem, width, output_stride, multi_grid)

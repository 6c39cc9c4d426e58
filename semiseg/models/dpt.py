"""DPT decoder (Ranftl et al., ICCV 2021) as UniMatch V2 uses it on DINOv2 features (`model/semseg/dpt.py`,
`model/util/blocks.py`; METHODS.md 8(g2)).

Four same-resolution maps (B, D, p, p) become a pyramid: 1x1 projections, then x4 / x2 transposed convs, identity
and a stride-2 conv (4p, 2p, p, ceil(p/2)); 3x3 convs to a common width F; fusion blocks from the coarsest level
(each adds a residual conv unit of the skip, applies a second one, resizes bilinearly to the next level, 1x1 conv);
the finest is upsampled x2, so the fused map is at 8p. Widths follow the encoder: S -> F 64, (48, 96, 192, 384);
B -> F 128, (96, 192, 384, 768); L -> F 256, (256, 512, 1024, 1024). No BatchNorm. Module names follow the reference,
so its released checkpoints map onto `head.` keys one to one.

Same interface as the DeepLab heads (deeplab.py): features(feats) is the fused map, classifier is the reference's
`scratch.output_conv` (3x3 conv, ReLU, 1x1 conv to the classes), fp_features(feats, n, p) perturbs all four maps with
channel dropout (UniMatch V1's feature perturbation). UniMatch V2's complementary dropout acts on the encoder maps
before any head (methods/unimatch_v2.py), so it needs no head hook.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from semiseg.models.deeplab import perturb

DPT_WIDTHS: dict[int, tuple[int, tuple[int, int, int, int]]] = {
    384: (64, (48, 96, 192, 384)),
    768: (128, (96, 192, 384, 768)),
    1024: (256, (256, 512, 1024, 1024)),
}
"""encoder width D -> (fusion width F, projection widths), UniMatch V2's `model_configs`"""


def dpt_widths(channels: Sequence[int], default_features: int) -> tuple[int, tuple[int, ...]]:
    """(F, projection widths): the reference's for a DINOv2 width, else (default_features, the channels themselves)."""
    if len(set(channels)) == 1 and channels[0] in DPT_WIDTHS:
        return DPT_WIDTHS[channels[0]]
    return default_features, tuple(channels)


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convs with bias, no normalisation."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """(x, skip) -> out_conv(resize(rcu2(x + rcu1(skip)))), resized to `size` or x2 (bilinear, align_corners True)."""

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: Sequence[int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """[f1..f4] (B, C_i, p, p) -> fused map (B, F, 8p, 8p) -> logits (B, K, 8p, 8p)."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
    ):
        super().__init__()
        if len(channels) != 4 or len(out_channels) != 4:
            raise ValueError(f"the DPT head takes 4 feature maps, got channels {tuple(channels)}")
        o = tuple(out_channels)
        self.projects = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(channels, o))
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(o[0], o[0], 4, stride=4),
                nn.ConvTranspose2d(o[1], o[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(o[3], o[3], 3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, width in enumerate(o, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(width, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(features))
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, num_classes, 1),
        )
        # The coarsest fusion block has no skip, so its first unit never runs: frozen, it is exactly as in the
        # reference (AdamW never moves it) and distributed training needs no unused-parameter search.
        self.scratch.refinenet4.resConfUnit1.requires_grad_(False)
        self.out_channels = features

    @property
    def classifier(self) -> nn.Module:
        """Fused map (B, F, h, w) -> logits (B, K, h, w): the reference's `scratch.output_conv`."""
        return self.scratch.output_conv

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """[f1..f4] -> (B, F, 8p, 8p) for maps of side p (any four maps: each level is resized to the next)."""
        s = self.scratch
        l1, l2, l3, l4 = (
            getattr(s, f"layer{i}_rn")(resize(project(f)))
            for i, (f, project, resize) in enumerate(zip(feats, self.projects, self.resize_layers), start=1)
        )
        x = s.refinenet4(l4, size=l3.shape[-2:])
        x = s.refinenet3(x, l3, size=l2.shape[-2:])
        x = s.refinenet2(x, l2, size=l1.shape[-2:])
        return s.refinenet1(x, l1)

    def fp_features(self, feats: Sequence[Tensor], n: int, p: float) -> Tensor:
        """[f1..f4] -> ((n+1)B, F, 8p, 8p): clean, then n streams with every map channel-dropped independently."""
        return self.features([perturb(f, n, p) for f in feats])

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))

"""BST's branch network: B decoder branches on a shared encoder (or one encoder each), fused by BAFM.

Branch kinds: context (DeepLabV3 ASPP head, stride 8), detail (DeepLabV3+ decoder, stride 4), pyramid (PSP pooling,
stride 8). The branch attention fusion module (BAFM) fuses the branches' pre-classifier maps, aligned to the first
encoder's stride-4 size; its output is the prediction. Design: METHODS.md section 2 (2(g) BAFM, 2(h) shared/separate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from semiseg.models.deeplab import conv_bn_relu
from semiseg.models.segmentor import InputNorm, upsample

BRANCH_KINDS = ("context", "detail", "pyramid")
"""context: DeepLabV3 ASPP head (stride 8); detail: DeepLabV3+ decoder (stride 4); pyramid: PSP pooling (stride 8)"""


class PyramidPoolingHead(nn.Module):
    """PSPNet head: c4 average-pooled to bins 1/2/3/6, each reduced by a 1x1 conv and upsampled, concatenated with c4,
    then a 3x3 conv; features at c4's stride."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        head_channels: int = 256,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: bool = False,
    ):
        super().__init__()
        in_ch = channels[-1]
        reduced = max(in_ch // len(bins), 1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(in_ch, reduced, 1)) for b in bins
        )
        bottleneck = [*conv_bn_relu(in_ch + reduced * len(bins), head_channels, 3)]
        if dropout:
            bottleneck.append(nn.Dropout2d(0.1))
        self.bottleneck = nn.Sequential(*bottleneck)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.out_channels = head_channels

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """[c1..c4] -> (B, head_channels, h4, w4)."""
        x = feats[-1]
        pooled = [F.interpolate(s(x), size=x.shape[-2:], mode="bilinear", align_corners=True) for s in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))


class BranchAttentionFusion(nn.Module):
    """BAFM: selective-kernel channel attention across the branch features (softmax over branches), a spatial gate
    sigmoid(conv7x7([mean_c f; max_c f])), then a 3x3 conv (BN, ReLU) and a 1x1 classifier."""

    def __init__(self, channels: int, num_branches: int, num_classes: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.num_branches, self.channels = num_branches, channels
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.excite = nn.Linear(hidden, num_branches * channels)
        self.gate = nn.Conv2d(2, 1, 7, padding=3)
        self.fuse = conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """S branch maps (N, D, h, w) of one size -> the fused map (N, D, h, w)."""
        stack = torch.stack(list(feats), dim=1)
        n, s, d = stack.shape[:3]
        attention = self.excite(self.squeeze(stack.sum(1).mean(dim=(2, 3)))).view(n, s, d).softmax(dim=1)
        f = (stack * attention[..., None, None]).sum(1)
        gate = torch.sigmoid(self.gate(torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], dim=1)))
        return self.fuse(f * gate)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))


@dataclass
class BranchOutput:
    fused: Tensor
    """BAFM logits (N, K, H, W): the prediction"""
    branches: list[Tensor]
    """logits (N, K, H, W) of every branch"""
    features: list[Tensor]
    """pre-classifier maps (N, D, h1, w1) of every branch at the stride-4 size BAFM fuses"""


class BranchNet(nn.Module):
    """Encoder(s), B decoder branches and BAFM; forward(x) -> the fused logits (N, K, H, W)."""

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        branches: Sequence[nn.Module],
        fusion: BranchAttentionFusion,
        input_norm: InputNorm | None = None,
    ):
        super().__init__()
        self.input_norm = input_norm or InputNorm()
        if len(encoders) not in (1, len(branches)):
            raise ValueError(f"{len(encoders)} encoders for {len(branches)} branches: give 1 (shared) or one each")
        self.encoders = nn.ModuleList(encoders)
        self.branches = nn.ModuleList(branches)
        self.fusion = fusion

    def forward_branches(self, x: Tensor) -> BranchOutput:
        """x (N, 3, H, W) uint8 or in [0, 1] -> fused logits, branch logits and the branch features BAFM fused."""
        x = self.input_norm(x)
        if len(self.encoders) == 1:
            shared = self.encoders[0](x)
            feats = [shared] * len(self.branches)
        else:
            feats = [encoder(x) for encoder in self.encoders]
        size = feats[0][0].shape[-2:]
        raw = [branch.features(f) for branch, f in zip(self.branches, feats)]
        logits = [upsample(branch.classifier(r), x.shape[-2:]) for branch, r in zip(self.branches, raw)]
        aligned = [upsample(r, size) for r in raw]
        return BranchOutput(upsample(self.fusion(aligned), x.shape[-2:]), logits, aligned)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 3, H, W) -> fused logits (N, K, H, W)."""
        return self.forward_branches(x).fused

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Encoder parameters: the base learning rate."""
        return list(self.encoders.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Branches and BAFM: the learning rate times head_lr_mult."""
        encoder = {id(p) for p in self.encoders.parameters()}
        return [p for p in self.parameters() if id(p) not in encoder]


class LabelSources(nn.Module):
    """A view of a BranchNet whose forward stacks its label sources along the batch: (S x N, K, H, W), so that
    evaluate.predict_multiscale runs the TTA of every source at once."""

    def __init__(self, net: BranchNet, with_fused: bool):
        super().__init__()
        self.net, self.with_fused = net, with_fused

    def forward(self, x: Tensor) -> Tensor:
        out = self.net.forward_branches(x)
        return torch.cat(out.branches + ([out.fused] if self.with_fused else []))

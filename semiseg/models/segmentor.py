"""Segmentor: input normalisation, one backbone, one head, optional projection head.

Every entry point takes uint8 or float-in-[0, 1] images (B, 3, H, W) and normalises them itself (`InputNorm`).

Return types never depend on a flag: each kind of output has its own method.
  model(x)                       -> logits (B, K, H, W), upsampled to the input size
  model.features(x)              -> feat (B, D, h, w), the head's pre-classifier map
  model.forward_with_features(x) -> (logits, feat)
  model.forward_fp(x, n)         -> (logits, [fp_logits_1 .. fp_logits_n])   UniMatch/DSSN feature perturbation
  model.forward_fp_features(x, n) -> (logits, [fp_logits..], feat of all n+1 streams)   DSSN's InfoNCE alignment
  model.encode(x)                -> [c1, c2, c3, c4] for methods that decode the encoder output themselves
  model.project(feat)            -> (B, proj_dim, h, w) when built with proj_dim > 0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNorm(nn.Module):
    """uint8 or float-in-[0, 1] images (B, 3, H, W) -> float (x - mean) / std with the network's own statistics.

    The mean and std are buffers, so exports and checkpoints carry them: a reloaded model normalises exactly as the
    trained one did, whatever weights it started from. Methods and tools pass raw images; only networks normalise.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"input mean/std need 3 values and a positive std, got {tuple(mean)} / {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={tuple(round(v, 4) for v in self.mean.flatten().tolist())}, std=" + str(
            tuple(round(v, 4) for v in self.std.flatten().tolist())
        )


def upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    """logits (B, K, h, w) -> (B, K, *size), bilinear with align_corners=True as in the reference code."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def build_projector(in_ch: int, proj_dim: int) -> nn.Sequential:
    """Contrastive projection head: 1x1 conv, BN, ReLU, 1x1 conv to proj_dim."""
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 1, bias=False),
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, proj_dim, 1),
    )


class Segmentor(nn.Module):
    """Backbone + head; the backbone returns [c1..c4], the head maps them to a feature map and logits."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        fp_dropout: float = 0.5,
        proj_dim: int = 0,
        input_norm: InputNorm | None = None,
    ):
        super().__init__()
        self.input_norm = input_norm or InputNorm()
        self.backbone = backbone
        self.head = head
        self.projector = build_projector(head.out_channels, proj_dim) if proj_dim > 0 else None
        self.fp_dropout = fp_dropout

    def encode(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) uint8 or in [0, 1] -> [c1, c2, c3, c4]."""
        return self.backbone(self.input_norm(x))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> logits (B, K, H, W)."""
        return upsample(self.head(self.encode(x)), x.shape[-2:])

    def features(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> feat (B, D, h, w), the head's pre-classifier map."""
        return self.head.features(self.encode(x))

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) -> (logits (B, K, H, W), feat (B, D, h, w))."""
        feat = self.head.features(self.encode(x))
        return upsample(self.head.classifier(feat), x.shape[-2:]), feat

    def forward_fp(self, x: Tensor, n: int = 1) -> tuple[Tensor, list[Tensor]]:
        """x (B, 3, H, W) -> (logits, [fp_logits_1 .. fp_logits_n]), each (B, K, H, W).

        The encoder runs once; its features are stacked with n channel-dropout copies (p = fp_dropout) and
        decoded in one batch, so the decoder's BatchNorm sees clean and perturbed streams together.
        """
        feat = self.head.fp_features(self.encode(x), n, self.fp_dropout)
        logits = upsample(self.head.classifier(feat), x.shape[-2:]).chunk(n + 1)
        return logits[0], list(logits[1:])

    def forward_fp_features(self, x: Tensor, n: int = 1) -> tuple[Tensor, list[Tensor], Tensor]:
        """forward_fp that also returns the decoded features ((n+1)B, D, h, w) of the clean and perturbed streams."""
        feat = self.head.fp_features(self.encode(x), n, self.fp_dropout)
        logits = upsample(self.head.classifier(feat), x.shape[-2:]).chunk(n + 1)
        return logits[0], list(logits[1:]), feat

    def project(self, feat: Tensor) -> Tensor:
        """feat (B, D, h, w) -> (B, proj_dim, h, w) through the projection head."""
        if self.projector is None:
            raise ValueError("this model has no projection head: set model.proj_dim > 0")
        return self.projector(feat)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (usually pretrained) encoder: the base learning rate."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Every other parameter (head, projector): the learning rate times head_lr_mult."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]

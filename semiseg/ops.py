"""Pure tensor operations shared by methods: pseudo-labels, confidence masks, CutMix targets.

Shapes: logits (B, C, H, W); label (B, H, W) long; conf (B, H, W) float; pad / box (B, H, W) bool.
"""

from __future__ import annotations

import torch

from semiseg.data.augment import mix


def pseudo_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(conf, label): max softmax probability and argmax of detached logits; (B, H, W) each."""
    prob = logits.detach().float().softmax(dim=1)
    conf, label = prob.max(dim=1)
    return conf, label


def confident(conf: torch.Tensor, tau: float) -> torch.Tensor:
    """Float weight 1[conf >= tau]; tau = 0 keeps every pixel."""
    return (conf >= tau).float()


def cutmix_targets(
    label: torch.Tensor,
    conf: torch.Tensor,
    pad: torch.Tensor,
    label_p: torch.Tensor,
    conf_p: torch.Tensor,
    pad_p: torch.Tensor,
    box: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of a CutMix-composed strong view: inside `box` the partner's label, confidence and padding."""
    return mix(label, label_p, box), mix(conf, conf_p, box), mix(pad, pad_p, box)


def mask_ratio(conf: torch.Tensor, tau: float, pad: torch.Tensor) -> torch.Tensor:
    """Share of non-padded pixels whose confidence passes tau (the field's "mask ratio"); scalar."""
    valid = ~pad
    return ((conf >= tau) & valid).sum() / valid.sum().clamp(min=1)


def label_accuracy(label: torch.Tensor, gt: torch.Tensor, weight: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """Accuracy of pseudo-labels against ground truth over pixels with weight > 0 and a known label; scalar.

    A diagnostic only (unlabeled ground truth is never used for training)."""
    sel = (weight > 0) & (gt != ignore)
    return ((label == gt) & sel).sum() / sel.sum().clamp(min=1)


def roll(t: torch.Tensor) -> torch.Tensor:
    """The batch rolled by one sample: sample i's CutMix partner is sample i - 1 (train.mix_partner = roll)."""
    return t.roll(1, dims=0)

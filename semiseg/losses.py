"""Losses: pure tensor functions. Shapes: logits (B, C, H, W), mask (B, H, W) long with IGNORE = 255."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.data.info import IGNORE


def ce(logits: torch.Tensor, mask: torch.Tensor, ignore: int = IGNORE) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels of the batch (0 when every pixel is ignored)."""
    total = F.cross_entropy(logits.float(), mask, ignore_index=ignore, reduction="sum")
    return total / (mask != ignore).sum().clamp(min=1)


def ohem_ce(
    logits: torch.Tensor, mask: torch.Tensor, thresh: float = 0.7, min_kept: int = 200000, ignore: int = IGNORE
) -> torch.Tensor:
    """Online hard example mining CE (UniMatch/PSPNet): keep pixels whose ground-truth probability is at most
    max(thresh, the probability of the min_kept-th hardest valid pixel); average over the kept pixels."""
    logits = logits.float()
    valid = mask != ignore
    with torch.no_grad():
        prob = logits.softmax(1)
        target = mask.clone()
        target[~valid] = 0
        p_gt = prob.gather(1, target.unsqueeze(1)).squeeze(1)
        p_valid = p_gt[valid]
        threshold = torch.tensor(thresh, device=logits.device)
        if min_kept > 0 and p_valid.numel() > 0:
            kth = p_valid.kthvalue(min(min_kept, p_valid.numel())).values
            threshold = torch.maximum(threshold, kth)
        keep = valid & (p_gt <= threshold)
    target = mask.clone()
    target[~keep] = ignore
    return ce(logits, target, ignore)


def supervised_loss(logits: torch.Tensor, mask: torch.Tensor, criterion: str, thresh: float, min_kept: int):
    """The labeled term of every method: plain CE or OHEM CE."""
    if criterion == "ohem":
        return ohem_ce(logits, mask, thresh, min_kept)
    return ce(logits, mask)


def masked_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum of per-pixel CE x weight over the batch, divided by the count of valid (non-padded) pixels.

    UniMatch's normalisation: the denominator counts non-padded pixels, not confident ones, so the effective
    weight of the term scales with the share of confident pixels.
    logits (B, C, H, W); target (B, H, W) long (values on invalid pixels are ignored); weight (B, H, W) float
    (e.g. 1[conf >= tau]); valid (B, H, W) bool.
    """
    safe = target.clone()
    safe[(safe < 0) | (safe >= logits.shape[1])] = 0
    per_pixel = F.cross_entropy(logits.float(), safe, reduction="none")
    w = weight.float() * valid.float()
    return (per_pixel * w).sum() / valid.sum().clamp(min=1)

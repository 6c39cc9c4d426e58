"""CTT's memory bank: per-class FIFO queues of L2-normalised teacher features (Xiao et al. 2022, METHODS.md 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.data.info import IGNORE
from semiseg.ops import fifo_push, resize_nearest


class MemoryBank(nn.Module):
    """Per-class FIFO queues of L2-normalised features; buffers, so checkpoints save and restore them."""

    def __init__(self, num_classes: int, size: int, dim: int):
        super().__init__()
        self.register_buffer("feats", torch.zeros(num_classes, size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        """the step's labeled (image, mask), fed to the bank after the EMA step (not saved: consumed every step)"""

    def valid(self) -> torch.Tensor:
        """bool (C, N): the filled slots."""
        return torch.arange(self.feats.shape[1], device=self.feats.device)[None, :] < self.count[:, None]

    def filled(self) -> bool:
        """Every class has at least one entry."""
        return bool((self.count > 0).all())

    @torch.no_grad()
    def push(self, cls: int, items: torch.Tensor) -> None:
        """Append items (n, D) to class cls's queue, evicting the oldest past capacity."""
        self.feats[cls], self.ptr[cls] = fifo_push(self.feats[cls], self.ptr[cls], F.normalize(items.float(), dim=1))
        self.count[cls] = (self.count[cls] + items.shape[0]).clamp(max=self.feats.shape[1])

    @torch.no_grad()
    def feed(self, teacher: nn.Module, image: torch.Tensor, mask: torch.Tensor, gate: float, n: int) -> None:
        """Push the teacher's labeled features (B, D, h, w) whose prediction is correct with softmax probability
        >= gate, at most n per class, the most confident first; clears `pending`."""
        self.pending = None
        feat = teacher.features(image)
        score, pred = teacher.head.classifier(feat).float().softmax(1).max(1)
        gt = resize_nearest(mask, feat.shape[-2:])
        # an all-zero feature (every channel cut by the ReLU) has no direction to contrast with
        unusable = (pred != gt) | (score < gate) | (gt == IGNORE) | (feat.detach().abs().amax(1) == 0)
        score, cls = score.masked_fill(unusable, -1.0).flatten(), gt.flatten()
        flat = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
        for c in cls[score >= 0].unique().tolist():
            top = torch.where(cls == c, score, torch.full_like(score, -1.0)).topk(min(n, score.numel()))
            self.push(c, flat[top.indices[top.values >= 0]])

"""Named batches that flow from the loader to a method's train_step.

Images travel as uint8 (B, 3, H, W) so that host-to-device copies are 4x smaller; normalisation and
strong views happen on the training device (`semiseg.data.augment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class LabeledBatch:
    image: torch.Tensor
    """uint8 (B, 3, H, W)"""
    mask: torch.Tensor
    """long (B, H, W); IGNORE = 255 on padding and void pixels"""
    ids: list[str] = field(default_factory=list)
    """sample ids"""
    pseudo: torch.Tensor | None = None
    """bool (B,): the mask is a pseudo-label (ST-style retraining applies strong augmentation to these)"""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> LabeledBatch:
        return _to(self, device, non_blocking)

    def pin_memory(self) -> LabeledBatch:
        return _pin(self)


@dataclass
class UnlabeledBatch:
    image: torch.Tensor
    """uint8 (B, 3, H, W), the weak view"""
    pad: torch.Tensor
    """bool (B, H, W): True on padded pixels, which every unlabeled loss ignores"""
    ids: list[str] = field(default_factory=list)
    """sample ids"""
    mask: torch.Tensor | None = None
    """long (B, H, W) ground truth when the reader has it (diagnostics only: pseudo-label accuracy)"""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> UnlabeledBatch:
        return _to(self, device, non_blocking)

    def pin_memory(self) -> UnlabeledBatch:
        return _pin(self)


@dataclass
class Batch:
    """What one training step receives: a labeled batch and, for semi-supervised methods, unlabeled ones."""

    l: LabeledBatch  # noqa: E741
    u: UnlabeledBatch | None = None
    u_mix: UnlabeledBatch | None = None
    """CutMix partners from a second unlabeled stream (train.mix_partner = stream), else None"""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(
            self.l.to(device, non_blocking),
            self.u.to(device, non_blocking) if self.u is not None else None,
            self.u_mix.to(device, non_blocking) if self.u_mix is not None else None,
        )


def _to(batch, device, non_blocking):
    moved = {
        f.name: getattr(batch, f.name).to(device, non_blocking=non_blocking)
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return replace(batch, **moved)


def _pin(batch):
    pinned = {
        f.name: getattr(batch, f.name).pin_memory()
        for f in fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return replace(batch, **pinned)

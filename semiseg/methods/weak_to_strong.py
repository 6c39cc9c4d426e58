"""The weak-to-strong core: CutMix partners, strong views, pseudo-labels and the targets of mixed views.

Used by FixMatch, UniMatch, UniMatch V2, DSSN, SWDBN (the strong view of its weak branch) and CTT (the partners).
One step of these methods reads:

    partner = partners(batch)                                   # train.mix_partner: stream batch, or the batch rolled
    views = strong_views(batch.u, partner, 2, ctx.gen, aug)     # 2 strong views, each CutMixed with the partner's
    pl = PseudoLabel.of(logits_w, batch.u.pad)                  # the weak view's label, confidence, padding
    targets = views.targets(pl, PseudoLabel.of(logits_p, partner.pad))   # per view: the partner's inside its box
    loss_s = strong_loss(logits_s1, targets[0], tau)

Random draws come from the step's CPU generator in a fixed order (every view's colour ops, every box, then the
partner stream's strong views), so a seed reproduces the step on any device and on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from semiseg.data.augment import StrongAugConfig, cutmix_box, mix, strong_view
from semiseg.data.batch import Batch, UnlabeledBatch
from semiseg.losses import masked_ce
from semiseg.ops import confident, label_accuracy, mask_ratio, pseudo_label, roll


@dataclass(frozen=True)
class Partners:
    """The CutMix partner of every unlabeled image, as an unlabeled batch of the same size."""

    image: Tensor
    """uint8 (B, 3, H, W), the partners' weak view"""
    pad: Tensor
    """bool (B, H, W)"""
    mask: Tensor | None
    """long (B, H, W) ground truth when the reader has it (diagnostics only)"""
    ids: list[str]
    rolled: bool
    """the partners are the batch rolled by one (image i's partner is image i - 1): a per-image prediction of the
    batch, rolled, is the partners' prediction"""


def partners(batch: Batch) -> Partners:
    """The second unlabeled stream's batch (train.mix_partner = stream), else the unlabeled batch rolled by one."""
    if batch.u_mix is not None:
        m = batch.u_mix
        return Partners(m.image, m.pad, m.mask, list(m.ids), rolled=False)
    u = batch.u
    mask = roll(u.mask) if u.mask is not None else None
    return Partners(roll(u.image), roll(u.pad), mask, u.ids[-1:] + u.ids[:-1], rolled=True)


@dataclass(frozen=True)
class StrongViews:
    """Strong views of an unlabeled batch, view k CutMixed with the partners' strong view inside boxes[k]."""

    images: list[Tensor]
    """uint8 (B, 3, H, W) per view: the strong view, the partner's strong view pasted inside the box"""
    boxes: list[Tensor]
    """bool (B, H, W) per view: True where the partner shows (all False where no box was drawn)"""

    def paste(self, own: Tensor, partner: Tensor) -> list[Tensor]:
        """Per view: `own` (B, ...) with `partner` (B, ...) inside the view's box (maps, logits or images)."""
        return [mix(own, partner, box) for box in self.boxes]

    def targets(self, pl: PseudoLabel, partner: PseudoLabel) -> list[PseudoLabel]:
        """Per view: the pseudo-label of the composed image (the partner's label, confidence, padding in its box)."""
        return [pl.pasted(partner, box) for box in self.boxes]


def strong_views(
    u: UnlabeledBatch, partner: Partners, n: int, gen: torch.Generator, aug: StrongAugConfig, shared_box: bool = False
) -> StrongViews:
    """n strong views of u (colour jitter, grayscale, blur, ...), each with its own CutMix box (one box for all with
    shared_box); the partners' strong views are the batch's rolled, or drawn from their own images, in view order."""
    b, _, h, w = u.image.shape
    views = [strong_view(u.image, gen, aug) for _ in range(n)]
    box = lambda: cutmix_box(b, h, w, gen, aug.cutmix_p, aug.mix_area, aug.mix_ratio, views[0].device)  # noqa: E731
    boxes = [box()] * n if shared_box else [box() for _ in range(n)]
    if partner.rolled:
        others = [roll(v) for v in views]
    else:
        others = [strong_view(partner.image, gen, aug) for _ in range(n)]
    return StrongViews([mix(v, o, box) for v, o, box in zip(views, others, boxes)], boxes)


@dataclass(frozen=True)
class PseudoLabel:
    """Per-pixel targets of unlabeled images: label long, conf float, pad bool, each (B, H, W)."""

    label: Tensor
    conf: Tensor
    pad: Tensor

    @classmethod
    def of(cls, logits: Tensor, pad: Tensor) -> PseudoLabel:
        """Argmax and max softmax probability of logits (B, K, H, W), detached."""
        conf, label = pseudo_label(logits)
        return cls(label, conf, pad)

    def rolled(self) -> PseudoLabel:
        """The pseudo-label of the rolled batch (Partners.rolled)."""
        return PseudoLabel(roll(self.label), roll(self.conf), roll(self.pad))

    def pasted(self, partner: PseudoLabel, box: Tensor) -> PseudoLabel:
        """Inside box (B, H, W) the partner's label, confidence and padding."""
        return PseudoLabel(
            mix(self.label, partner.label, box), mix(self.conf, partner.conf, box), mix(self.pad, partner.pad, box)
        )


def partner_label(pl: PseudoLabel, partner: Partners, predict) -> PseudoLabel:
    """The partners' pseudo-label: `pl` rolled when the partners are the rolled batch and `pl` came from a prediction
    that does not depend on the rest of the batch, else PseudoLabel.of(predict(partner.image))."""
    return pl.rolled() if partner.rolled else PseudoLabel.of(predict(partner.image), partner.pad)


def strong_loss(logits: Tensor, target: PseudoLabel, tau: float) -> Tensor:
    """Masked CE of logits (B, K, H, W) against the target where its confidence >= tau, divided by the count of
    non-padded pixels (UniMatch's normalisation); scalar."""
    return masked_ce(logits, target.label, confident(target.conf, tau), ~target.pad)


def label_logs(pl: PseudoLabel, gt: Tensor | None, tau: float) -> dict[str, Tensor]:
    """train/mask_ratio (share of non-padded pixels at conf >= tau) and, with ground truth, train/pl_acc there."""
    logs = {"train/mask_ratio": mask_ratio(pl.conf, tau, pl.pad)}
    if gt is not None:
        logs["train/pl_acc"] = label_accuracy(pl.label, gt, confident(pl.conf, tau) * (~pl.pad))
    return logs

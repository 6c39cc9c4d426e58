"""FixMatch for segmentation (UniMatch's baseline): weak-view pseudo-labels supervise a CutMix strong view.

Paper: Sohn et al., NeurIPS 2020; segmentation form of Yang et al., "Revisiting Weak-to-Strong Consistency in
Semi-Supervised Semantic Segmentation" (UniMatch, CVPR 2023), `fixmatch.py`.
Loss: L = w_x CE(labeled) + w_s masked CE(strong view, CutMix-composed pseudo-label), where the masked CE sums
over pixels with confidence >= tau and divides by the count of non-padded pixels.
Command: `semiseg train configs/pascal/fixmatch_r101_92.yaml`; expected about 63.9 mIoU on VOC-92 (R101).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from semiseg.config import MethodConfig
from semiseg.data.augment import StrongAugConfig
from semiseg.engine.evaluate import evaluating
from semiseg.engine.loop import StepOut
from semiseg.losses import supervised_loss
from semiseg.methods.weak_to_strong import PseudoLabel, label_logs, partners, strong_loss, strong_views
from semiseg.models import build_model


@dataclass(frozen=True)
class Config(MethodConfig):
    name: str = "fixmatch"
    """method name"""
    tau: float = 0.95
    """confidence threshold of pseudo-labels (0 = every pixel; Cityscapes)"""
    w_x: float = 0.5
    """weight of the labeled loss (reference: (L_x + L_s) / 2)"""
    w_s: float = 0.5
    """weight of the strong-view loss"""
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    """strong view: colour jitter, grayscale, blur, CutMix probability and box ranges"""
    joint_forward: bool = True
    """labeled and weak unlabeled crops in one forward, one BatchNorm batch (the reference); false = two forwards,
    so the labeled crops are normalised among themselves as in supervised training (README, CamVid)"""


TRAINED = ("model",)
EVAL_NETS = ("model",)
USES_UNLABELED = True


def build(cfg, info):
    return {"model": build_model(cfg.model, info.num_classes)}


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    model = nets["model"]
    l, u = batch.l, batch.u
    partner = partners(batch)
    views = strong_views(u, partner, 1, ctx.gen, cfg.strong)

    # The partner's pseudo-label comes from an eval-mode (running BN statistics), no-grad pass, as in the reference.
    with evaluating(model):
        partner_pl = PseudoLabel.of(model(partner.image), partner.pad)

    if cfg.joint_forward:
        n_l = l.image.shape[0]
        logits = model(torch.cat([l.image, u.image]))
        logits_x, logits_w = logits[:n_l], logits[n_l:]
    else:
        logits_x, logits_w = model(l.image), model(u.image)
    logits_s = model(views.images[0])

    pl = PseudoLabel.of(logits_w, u.pad)
    (target,) = views.targets(pl, partner_pl)
    loss_x = supervised_loss(logits_x, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    loss_s = strong_loss(logits_s, target, cfg.tau)
    loss = cfg.w_x * loss_x + cfg.w_s * loss_s
    logs = {"train/loss_x": loss_x.detach(), "train/loss_s": loss_s.detach(), **label_logs(pl, u.mask, cfg.tau)}
    return StepOut(loss, logs)

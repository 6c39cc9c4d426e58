"""UniMatch: weak-to-strong consistency with two strong views and a feature-perturbation stream.

Paper: Yang et al., "Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic Segmentation", CVPR 2023
(official code `LiheYoung/UniMatch`, `unimatch.py`).
Loss: L = w_x L_x + w_s1 L_s1 + w_s2 L_s2 + w_fp L_fp (reference: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2).
L_s1, L_s2: masked CE of two independently augmented, independently CutMixed strong views against the weak view's
pseudo-label (partner's inside the box); L_fp: masked CE of the channel-dropout stream of the weak view. Masked CE
sums over pixels with confidence >= tau and divides by the count of non-padded pixels.
Command: `semiseg train configs/pascal/unimatch_r101_92.yaml`; expected 75.2 mIoU on VOC-92 (R101, README).
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
    name: str = "unimatch"
    """method name"""
    tau: float = 0.95
    """confidence threshold of pseudo-labels (0 = every pixel; Cityscapes)"""
    w_x: float = 0.5
    """weight of the labeled loss"""
    w_s1: float = 0.125
    """weight of the first strong view's loss"""
    w_s2: float = 0.125
    """weight of the second strong view's loss"""
    w_fp: float = 0.25
    """weight of the feature-perturbation loss"""
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    """strong views: colour jitter, grayscale, blur, CutMix probability and box ranges"""
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
    views = strong_views(u, partner, 2, ctx.gen, cfg.strong)

    # The partner's pseudo-label comes from an eval-mode (running BN statistics), no-grad pass, as in the reference.
    with evaluating(model):
        partner_pl = PseudoLabel.of(model(partner.image), partner.pad)

    if cfg.joint_forward:
        n_l = l.image.shape[0]
        logits, (logits_fp,) = model.forward_fp(torch.cat([l.image, u.image]), 1)
        logits_x, logits_w, logits_w_fp = logits[:n_l], logits[n_l:], logits_fp[n_l:]
    else:  # the labeled crops skip the feature-perturbed stream, whose labeled half the reference discards anyway
        logits_x = model(l.image)
        logits_w, (logits_w_fp,) = model.forward_fp(u.image, 1)
    logits_s1, logits_s2 = model(torch.cat(views.images)).chunk(2)

    pl = PseudoLabel.of(logits_w, u.pad)
    target1, target2 = views.targets(pl, partner_pl)
    loss_x = supervised_loss(logits_x, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    loss_s1 = strong_loss(logits_s1, target1, cfg.tau)
    loss_s2 = strong_loss(logits_s2, target2, cfg.tau)
    loss_fp = strong_loss(logits_w_fp, pl, cfg.tau)
    loss = cfg.w_x * loss_x + cfg.w_s1 * loss_s1 + cfg.w_s2 * loss_s2 + cfg.w_fp * loss_fp
    logs = {
        "train/loss_x": loss_x.detach(),
        "train/loss_s": (loss_s1.detach() + loss_s2.detach()) / 2,
        "train/loss_fp": loss_fp.detach(),
        **label_logs(pl, u.mask, cfg.tau),
    }
    return StepOut(loss, logs)

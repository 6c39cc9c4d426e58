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
from semiseg.data.augment import StrongAugConfig, cutmix_box, mix, partner_views, strong_view
from semiseg.engine.evaluate import evaluating
from semiseg.engine.loop import StepOut
from semiseg.losses import masked_ce, supervised_loss
from semiseg.models import build_model
from semiseg.ops import confident, cutmix_targets, label_accuracy, mask_ratio, pseudo_label


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
    n_l, (n_u, _, h, w) = l.image.shape[0], u.image.shape
    aug = cfg.strong
    s1, s2 = strong_view(u.image, ctx.gen, aug), strong_view(u.image, ctx.gen, aug)
    box1 = cutmix_box(n_u, h, w, ctx.gen, aug.cutmix_p, aug.mix_area, aug.mix_ratio, s1.device)
    box2 = cutmix_box(n_u, h, w, ctx.gen, aug.cutmix_p, aug.mix_area, aug.mix_ratio, s1.device)
    u_mix = batch.u_mix
    partner_w, partner_pad, (partner_s1, partner_s2) = partner_views(
        u.image, u.pad, [s1, s2], ctx.gen, aug, *((u_mix.image, u_mix.pad) if u_mix else ())
    )

    # The partner's pseudo-label comes from an eval-mode (running BN statistics), no-grad pass, as in the reference.
    with evaluating(model):
        conf_p, label_p = pseudo_label(model(partner_w))

    if cfg.joint_forward:
        logits, (logits_fp,) = model.forward_fp(torch.cat([l.image, u.image]), 1)
        logits_x, logits_w, logits_w_fp = logits[:n_l], logits[n_l:], logits_fp[n_l:]
    else:  # the labeled crops skip the feature-perturbed stream, whose labeled half the reference discards anyway
        logits_x = model(l.image)
        logits_w, (logits_w_fp,) = model.forward_fp(u.image, 1)
    strong = torch.cat([mix(s1, partner_s1, box1), mix(s2, partner_s2, box2)])
    logits_s1, logits_s2 = model(strong).chunk(2)

    conf, label = pseudo_label(logits_w)
    label1, conf1, pad1 = cutmix_targets(label, conf, u.pad, label_p, conf_p, partner_pad, box1)
    label2, conf2, pad2 = cutmix_targets(label, conf, u.pad, label_p, conf_p, partner_pad, box2)
    loss_x = supervised_loss(logits_x, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    loss_s1 = masked_ce(logits_s1, label1, confident(conf1, cfg.tau), ~pad1)
    loss_s2 = masked_ce(logits_s2, label2, confident(conf2, cfg.tau), ~pad2)
    loss_fp = masked_ce(logits_w_fp, label, confident(conf, cfg.tau), ~u.pad)
    loss = cfg.w_x * loss_x + cfg.w_s1 * loss_s1 + cfg.w_s2 * loss_s2 + cfg.w_fp * loss_fp
    logs = {
        "train/loss_x": loss_x.detach(),
        "train/loss_s": (loss_s1.detach() + loss_s2.detach()) / 2,
        "train/loss_fp": loss_fp.detach(),
        "train/mask_ratio": mask_ratio(conf, cfg.tau, u.pad),
    }
    if u.mask is not None:
        logs["train/pl_acc"] = label_accuracy(label, u.mask, confident(conf, cfg.tau) * (~u.pad))
    return StepOut(loss, logs)

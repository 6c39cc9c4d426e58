"""DSSN: a student with two feature-perturbation streams, its EMA teacher, and dual-level view alignment.

The EMA teacher (BatchNorm in train mode, EMA over parameters and BN buffers) labels two CutMixed strong views
through CutMix-composed teacher logits; the student's own clean weak prediction labels its two channel-dropout
streams; pixels are kept by class-aware selection (per image and class, within 4% of the class's peak when that
peak exceeds 0.92). The "dual-level Siamese" alignment pulls together the standardised logits of the two strong
views (image level) and of the two perturbed streams (feature level), both sides with gradient.
Paper: Tian, Zhang, Zhang, Zhan, "Dual-Level Siamese Structure Network for Semi-Supervised Semantic
Segmentation", ACM MM 2023 (official code `kunzhan/DSSN`, `voc/DSSN.py`, `city/DSSN.py`; METHODS.md section 4).
Loss (VOC): L = 1/2 [L_x + 1/4 (L_s1 + L_s2 + L_fp + L_Fp) + 0.01 (L_img + L_feat)]; L_s*, L_*p are class-aware
masked CE summed over pixels and divided by the count of non-padded pixels; L_img, L_feat are MSEs of per-pixel
standardised logits (align: infonce swaps them for a pixel InfoNCE on projected embeddings, an ablation).
Warm-up: for the first `warmup_steps` steps the teacher copies the student and L_s1, L_s2 are off.
Command: `torchrun --nproc_per_node 4 -m semiseg train configs/pascal/dssn_r101_92.yaml`; expected about
74.9 (student) / 75.2 (teacher) mIoU on VOC-92 with R101 at crop 513 (best epoch of the official log).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from semiseg.config import ConfigError, MethodConfig
from semiseg.data.augment import StrongAugConfig
from semiseg.engine.checkpoint import unwrap
from semiseg.engine.ema import ema_update
from semiseg.engine.loop import StepOut
from semiseg.losses import masked_ce, paired_info_nce, standardized_mse, supervised_loss
from semiseg.methods.weak_to_strong import partners, strong_views
from semiseg.models import build_model
from semiseg.ops import class_aware_selection, confident, label_accuracy, mask_ratio, pseudo_label, roll, sample_pixels

SELECTIONS = ("class_aware", "threshold")
ALIGNS = ("mse", "infonce", "none")


@dataclass(frozen=True)
class Config(MethodConfig):
    name: str = "dssn"
    """method name"""
    w_x: float = 0.5
    """weight of the labeled loss"""
    w_s1: float = 0.125
    """weight of the first strong view's loss (teacher targets)"""
    w_s2: float = 0.125
    """weight of the second strong view's loss (teacher targets)"""
    w_fp: float = 0.125
    """weight of the first feature-perturbation stream's loss (the student's own weak targets)"""
    w_fp2: float = 0.125
    """weight of the second feature-perturbation stream's loss"""
    w_img: float = 0.005
    """weight of the image-level alignment (strong view 1 vs strong view 2)"""
    w_feat: float = 0.005
    """weight of the feature-level alignment (perturbed stream 1 vs perturbed stream 2)"""
    selection: str = "class_aware"
    """pseudo-label selection: class_aware (VOC/COCO) | threshold (conf >= tau; Cityscapes uses tau = 0)"""
    ca_ratio: float = 0.96
    """class-aware selection: keep a class's pixels above ratio x its per-image peak ..."""
    ca_thresh: float = 0.92
    """... when that peak exceeds this; a class whose peak does not contributes no pixel"""
    tau: float = 0.0
    """threshold selection: confidence threshold (0 = every non-padded pixel)"""
    ema_keep: float = 0.996
    """EMA keep rate of the teacher, over parameters and BatchNorm buffers"""
    warmup_steps: int = 1
    """steps with keep rate 0 (the teacher copies the student) and no strong-view loss (VOC 1; Cityscapes 5 epochs)"""
    align: str = "mse"
    """dual-level alignment: mse (standardised logits, the code) | infonce (projected embeddings) | none"""
    align_same_box: bool = False
    """image level: compare only pixels where both strong views carry the same content (box1 == box2)"""
    shared_box: bool = False
    """one CutMix box for both strong views (the city code's commented-out box2 = box1)"""
    nce_tau: float = 0.1
    """infonce: temperature"""
    nce_pixels: int = 256
    """infonce: pixels sampled per image (negatives come from the same image)"""
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    """strong views: colour jitter, grayscale, blur, AugSeg intensity ops (VOC: intensity_ops 3), CutMix"""

    def __post_init__(self):
        super().__post_init__()
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.align not in ALIGNS:
            raise ValueError(f"align must be one of {', '.join(ALIGNS)}, got {self.align!r}")
        if not 0.0 <= self.ema_keep <= 1.0:
            raise ValueError(f"ema_keep must be in [0, 1], got {self.ema_keep}")
        if self.warmup_steps < 0 or self.nce_pixels < 1 or self.nce_tau <= 0:
            raise ValueError("warmup_steps must be >= 0, nce_pixels >= 1 and nce_tau > 0")


TRAINED = ("student",)
EVAL_NETS = ("student", "teacher")
USES_UNLABELED = True
TRAIN_MODE_TEACHERS = ("teacher",)
"""teachers in train mode (BatchNorm on batch statistics): SyncBatchNorm with the students under model.sync_bn"""


def build(cfg, info):
    """Student and teacher: identical copies; the projection head only when align = infonce."""
    model_cfg = cfg.model
    if cfg.method.align == "infonce":
        if model_cfg.proj_dim <= 0:
            raise ConfigError("model.proj_dim: method.align=infonce needs a projection head; set e.g. 128")
    elif model_cfg.proj_dim > 0:
        # an unused projection head would receive no gradient (and stall DDP); leave it out
        model_cfg = dataclasses.replace(model_cfg, proj_dim=0)
    student = build_model(model_cfg, info.num_classes)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return {"student": student, "teacher": teacher}


def _selection(logits: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Float (B, H, W) weight of the pixels whose pseudo-label is used."""
    if cfg.selection == "class_aware":
        return class_aware_selection(logits.detach().float().softmax(1), cfg.ca_ratio, cfg.ca_thresh).float()
    return confident(pseudo_label(logits)[0], cfg.tau)


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    student, teacher = nets["student"], nets["teacher"]
    l, u = batch.l, batch.u
    n_l = l.image.shape[0]
    partner = partners(batch)
    views = strong_views(u, partner, 2, ctx.gen, cfg.strong, shared_box=cfg.shared_box)
    box1, box2 = views.boxes

    # The teacher stays in train mode (BatchNorm on batch statistics), as in the reference; it never gets gradients.
    with torch.no_grad():
        t_w = teacher(u.image)
        # train-mode BatchNorm statistics do not depend on the order of the batch: with rolled partners, roll the
        # teacher's output instead of running it again
        t_p = roll(t_w) if partner.rolled else teacher(partner.image)

    x_lw = torch.cat([l.image, u.image])
    strong = torch.cat(views.images)
    emb_w = emb_s = None
    if cfg.align == "infonce":
        logits, (logits_fp1, logits_fp2), feat_w = student.forward_fp_features(x_lw, 2)
        emb_w = student.project(feat_w).chunk(3)
        logits_s, feat_s = student.forward_with_features(strong)
        emb_s = student.project(feat_s).chunk(2)
    else:
        logits, (logits_fp1, logits_fp2) = student.forward_fp(x_lw, 2)
        logits_s = student(strong)
    logits_x, logits_w = logits[:n_l], logits[n_l:].detach()
    logits_fp1, logits_fp2 = logits_fp1[n_l:], logits_fp2[n_l:]
    logits_s1, logits_s2 = logits_s.chunk(2)

    # Strong-view targets: the teacher's logits composed like the images, then selected and argmaxed.
    t1, t2 = views.paste(t_w, t_p)
    label1, label2, label_w = t1.argmax(1), t2.argmax(1), logits_w.argmax(1)
    pad1, pad2 = views.paste(u.pad, partner.pad)
    sel1, sel2, sel_w = _selection(t1, cfg), _selection(t2, cfg), _selection(logits_w, cfg)

    warm = ctx.step < cfg.warmup_steps
    loss_x = supervised_loss(logits_x, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    loss_s1 = masked_ce(logits_s1, label1, sel1, ~pad1)
    loss_s2 = masked_ce(logits_s2, label2, sel2, ~pad2)
    loss_fp1 = masked_ce(logits_fp1, label_w, sel_w, ~u.pad)
    loss_fp2 = masked_ce(logits_fp2, label_w, sel_w, ~u.pad)
    if cfg.align == "mse":
        loss_img = standardized_mse(logits_s1, logits_s2, (box1 == box2).float() if cfg.align_same_box else None)
        loss_feat = standardized_mse(logits_fp1, logits_fp2)
    elif cfg.align == "infonce":
        img_valid = ~pad1 & ~pad2 & (box1 == box2) if cfg.align_same_box else ~pad1 & ~pad2
        (e1, e2), v = sample_pixels(list(emb_s), img_valid, cfg.nce_pixels, ctx.gen)
        loss_img = paired_info_nce(e1, e2, v, cfg.nce_tau)
        (f1, f2), v = sample_pixels([emb_w[1][n_l:], emb_w[2][n_l:]], ~u.pad, cfg.nce_pixels, ctx.gen)
        loss_feat = paired_info_nce(f1, f2, v, cfg.nce_tau)
    else:
        loss_img = loss_feat = logits_s.new_zeros(())
    w_s1, w_s2 = (0.0, 0.0) if warm else (cfg.w_s1, cfg.w_s2)
    loss = cfg.w_x * loss_x + w_s1 * loss_s1 + w_s2 * loss_s2 + cfg.w_fp * loss_fp1 + cfg.w_fp2 * loss_fp2
    loss = loss + cfg.w_img * loss_img + cfg.w_feat * loss_feat
    logs = {
        "train/loss_x": loss_x.detach(),
        "train/loss_s": (loss_s1.detach() + loss_s2.detach()) / 2,
        "train/loss_fp": (loss_fp1.detach() + loss_fp2.detach()) / 2,
        "train/loss_img": loss_img.detach(),
        "train/loss_feat": loss_feat.detach(),
        "train/mask_ratio": mask_ratio(sel_w, 0.5, u.pad),
        "train/mask_ratio_teacher": mask_ratio(sel1, 0.5, pad1),
    }
    if u.mask is not None:
        logs["train/pl_acc"] = label_accuracy(t_w.argmax(1), u.mask, _selection(t_w, cfg) * (~u.pad))
    return StepOut(loss, logs)


def after_step(nets, cfg: Config, ctx) -> None:
    """EMA of the whole state (parameters and BatchNorm buffers); the teacher copies the student while warming up."""
    keep = 0.0 if ctx.step < cfg.warmup_steps else cfg.ema_keep
    ema_update(nets["teacher"], unwrap(nets["student"]), keep, buffers=True)

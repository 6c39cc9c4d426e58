"""CTT: two students, each taught by the OTHER student's EMA teacher, plus two pixel-contrastive modules.

Student k learns from the peer teacher's pseudo-labels on a mixed (ClassMix / CutMix) view; a high-level module
contrasts its features with its own teacher's memory banks (semiseg.models.memory_bank), a low-level module pulls
its unsure features towards the peer student's more confident feature at the same pixel.
Paper: Xiao et al., "Semi-Supervised Semantic Segmentation with Cross Teacher Training", Neurocomputing 508
(2022) (official code `pdacorn/Semi-Supervised-Semantic-Segmentation-with-Cross-Teacher-Training`,
`cross_teacher_contr.py`, `cross_teacher_deeplabv3+.py`; METHODS.md section 5).
Loss per student k (peer k'): L_k = CE(S_k(x_l), y_l) + w_u * omega * CE(S_k(mixed u), argmax T_k'(u) mixed)
+ w_high * InfoNCE(anchors of S_k vs bank of T_k, tau 0.1) + w_low * InfoNCE(S_k vs detached S_k', tau 0.5),
omega = share of pixels whose peer-teacher confidence >= 0.968; the step minimises L_a + L_b (each term reaches
only its own student). One mix mask per batch serves both students, so their views stay pixel-aligned.
Command: `semiseg train configs/cityscapes/ctt_deeplabv2_1_8.yaml`. No verified result table exists (METHODS.md
5(f)); the DeepLabV2 + ClassMix family reaches about 61.4 mIoU on Cityscapes 1/8.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from semiseg.config import MethodConfig
from semiseg.data.augment import MIX_MASKS, StrongAugConfig, mix, mix_mask, strong_view
from semiseg.engine.checkpoint import unwrap
from semiseg.engine.ema import ema_update, mean_teacher_keep
from semiseg.engine.loop import StepOut
from semiseg.losses import high_level_contrast, low_level_contrast, masked_ce, supervised_loss
from semiseg.methods.weak_to_strong import partners
from semiseg.models import build_model
from semiseg.models.memory_bank import MemoryBank
from semiseg.ops import label_accuracy, mask_ratio, resize_nearest, roll

PAIRS = (("student_a", "teacher_a", "bank_a"), ("student_b", "teacher_b", "bank_b"))
"""(student, its own teacher, that teacher's bank); student k is supervised by the OTHER pair's teacher"""


def ctt_strong() -> StrongAugConfig:
    """CTT's strong view after the mix: colour jitter 0.25 (p 0.8), blur (p 0.5, sigma 0.15-1.15), no grayscale."""
    colour = dict(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25, jitter_p=0.8, grayscale_p=0.0, blur_p=0.5)
    return StrongAugConfig(**colour, blur_sigma=(0.15, 1.15), cutmix_p=1.0, mix_area=(0.5, 0.5), mix_ratio=(0.5, 2.0))


@dataclass(frozen=True)
class Config(MethodConfig):
    name: str = "ctt"
    """method name"""
    w_u: float = 1.0
    """weight of the cross-teacher unlabeled loss (the reference's consistency_weight)"""
    conf_tau: float = 0.968
    """omega = share of non-padded pixels whose peer-teacher confidence reaches this (ClassMix threshold_uniform)"""
    mix: str = "classmix"
    """mix of the unlabeled view: classmix (Cityscapes config) | cutmix (strong.mix_area box) | none (VOC config)"""
    strong: StrongAugConfig = field(default_factory=ctt_strong)
    """colour jitter and blur after the mix; cutmix_p / mix_area / mix_ratio shape the CutMix box"""
    ema_keep: float = 0.99
    """teacher keep rate, ramped as min(1 - 1/(step + 1), ema_keep); parameters only (teachers stay in train mode)"""
    contrast: bool = True
    """enable the contrastive modules and their memory banks (the released HEAD computes but drops them)"""
    w_high: float = 0.1
    """weight of the high-level (memory-bank) contrastive term; 0 = off"""
    w_low: float = 0.1
    """weight of the low-level (peer-feature) contrastive term; 0 = off"""
    gamma: float = 0.75
    """confidence that makes an unlabeled pixel an anchor (high level) or a trusted peer (low level)"""
    tau_high: float = 0.1
    """temperature of the high-level term"""
    tau_low: float = 0.5
    """temperature of the low-level term"""
    bank_size: int = 256
    """memory-bank slots per class"""
    bank_gate: float = 0.95
    """teacher softmax probability a correct labeled pixel needs to enter the bank (the reference gates raw logits)"""
    bank_push: int = 0
    """entries pushed per class per step, most confident first; 0 = the labeled batch size (METHODS.md 5)"""
    bank_warmup_steps: int = 0
    """start the contrast at this step even with empty classes; 0 = when every class has entries in both banks"""
    max_anchors: int = 0
    """anchors per contrastive term, a random subset when there are more (bounds memory); 0 = all (reference)"""
    seed_offset: int = 1
    """student_b is built with torch seed train.seed + seed_offset (different heads; same pretrained backbone)"""
    pretrained_b: str = ""
    """backbone weights of student_b; empty = model.pretrained (the DeepLabV2 script used COCO for a, ImageNet for b)"""

    def __post_init__(self):
        super().__post_init__()
        if self.mix not in MIX_MASKS:
            raise ValueError(f"mix must be one of {', '.join(MIX_MASKS)}, got {self.mix!r}")
        if not 0.0 <= self.ema_keep <= 1.0 or min(self.tau_high, self.tau_low) <= 0:
            raise ValueError("need ema_keep in [0, 1] and tau_high, tau_low > 0")
        if self.bank_size < 1 or self.bank_push < 0 or self.bank_warmup_steps < 0 or self.max_anchors < 0:
            raise ValueError("bank_size must be >= 1; bank_push, bank_warmup_steps and max_anchors >= 0")


TRAINED = ("student_a", "student_b")
EVAL_NETS = ("student_a", "student_b")
USES_UNLABELED = True
TRAIN_MODE_TEACHERS = ("teacher_a", "teacher_b")
"""teachers in train mode (BatchNorm on batch statistics): SyncBatchNorm with the students under model.sync_bn"""


def build(cfg, info):
    """Two students (student_b with another seed), their EMA teachers, and one memory bank per teacher."""
    student_a = build_model(cfg.model, info.num_classes)
    model_b = dataclasses.replace(cfg.model, pretrained=cfg.method.pretrained_b or cfg.model.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + cfg.method.seed_offset)
        student_b = build_model(model_b, info.num_classes)
    nets = {"student_a": student_a, "student_b": student_b}
    for student, teacher, bank in PAIRS:
        nets[teacher] = copy.deepcopy(nets[student]).requires_grad_(False)
        nets[bank] = MemoryBank(info.num_classes, cfg.method.bank_size, nets[student].head.out_channels)
    return nets


@torch.no_grad()
def _feature_probs(model, feat: torch.Tensor) -> torch.Tensor:
    """Softmax (B, C, h, w) of the classifier at feature resolution: pixel selection only."""
    return unwrap(model).head.classifier(feat.detach()).float().softmax(1)


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    l, u, partner = batch.l, batch.u, partners(batch)

    # Teachers stay in train mode (the reference never calls eval on them) and never receive gradients.
    prob, prob_partner = {}, {}
    with torch.no_grad():
        for _, teacher, _ in PAIRS:
            prob[teacher] = nets[teacher](u.image).float().softmax(1)
            p = roll(prob[teacher]) if partner.rolled else nets[teacher](partner.image).float().softmax(1)
            prob_partner[teacher] = p
        # One mask for both students keeps their views pixel-aligned for the low-level module (METHODS.md 5(h)4).
        keep = mix_mask(cfg.mix, (prob["teacher_a"] + prob["teacher_b"]).argmax(1), ctx.gen, cfg.strong)
        mixed, pad = mix(partner.image, u.image, keep), mix(partner.pad, u.pad, keep)

    contrast = cfg.contrast and (cfg.w_high > 0 or cfg.w_low > 0)
    # the reference waited for full banks; here every class needs an entry in both, or bank_warmup_steps has come
    active = contrast and (0 < cfg.bank_warmup_steps <= ctx.step or all(nets[b].filled() for _, _, b in PAIRS))
    out, total = {}, 0.0
    for k, (student, _, bank) in enumerate(PAIRS):
        peer_teacher = PAIRS[1 - k][1]
        with torch.no_grad():
            conf, label = mix(prob_partner[peer_teacher], prob[peer_teacher], keep).max(dim=1)
        logits_l, feat_l = nets[student].forward_with_features(l.image)
        logits_u, feat_u = nets[student].forward_with_features(strong_view(mixed, ctx.gen, cfg.strong))
        omega = mask_ratio(conf, cfg.conf_tau, pad)
        loss_x = supervised_loss(logits_l, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
        loss_u = masked_ce(logits_u, label, omega.expand_as(conf), ~pad)
        size = feat_u.shape[-2:]
        out[student] = dict(loss_x=loss_x, loss_u=loss_u, omega=omega, label=label, feat_l=feat_l, feat_u=feat_u,
                            conf_f=resize_nearest(conf, size), label_f=resize_nearest(label, size),
                            probs_u=_feature_probs(nets[student], feat_u), loss_high=0.0, loss_low=0.0)  # fmt: skip
        total = total + loss_x + cfg.w_u * loss_u
        if contrast:
            nets[bank].pending = (l.image, l.mask)

    if active:
        banks = [nets[b] for _, _, b in PAIRS]
        for k, (student, _, bank) in enumerate(PAIRS):
            me, peer = out[student], out[PAIRS[1 - k][0]]
            valid_f = ~resize_nearest(pad, me["feat_u"].shape[-2:])
            if cfg.w_high > 0:  # the student's labeled and sure unlabeled pixels against its own teacher's bank
                gt_f = resize_nearest(l.mask, me["feat_l"].shape[-2:])
                sure = valid_f & (me["conf_f"] >= cfg.gamma)
                me["loss_high"] = high_level_contrast(me["feat_l"], gt_f, me["feat_u"], me["label_f"], sure,
                    nets[bank].feats, nets[bank].valid(), cfg.tau_high, cfg.max_anchors, ctx.gen)  # fmt: skip
            if cfg.w_low > 0:  # unsure pixels pulled to the peer student's more confident feature there
                peer_conf, peer_label = peer["probs_u"].max(1)
                more_sure = (peer_conf > me["probs_u"].max(1).values) & (peer_conf >= cfg.gamma)
                unsure = valid_f & (me["conf_f"] < cfg.gamma) & more_sure
                feats, valid = torch.cat([b.feats for b in banks], 1), torch.cat([b.valid() for b in banks], 1)
                me["loss_low"] = low_level_contrast(me["feat_u"], peer["feat_u"], peer_label, unsure, feats, valid,
                    cfg.tau_low, cfg.max_anchors, ctx.gen)  # fmt: skip
            total = total + cfg.w_high * me["loss_high"] + cfg.w_low * me["loss_low"]

    mean = lambda key: sum(torch.as_tensor(o[key]).detach() for o in out.values()) / 2  # noqa: E731
    logs = {f"train/{key}": mean(key) for key in ("loss_x", "loss_u", "loss_high", "loss_low")}
    logs.update({"train/mask_ratio": mean("omega"), "train/contrast_on": float(active)})
    if contrast:
        fill = [nets[b].count.float().mean() / cfg.bank_size for _, _, b in PAIRS]
        logs["train/bank_fill"] = torch.stack(fill).mean()
    if u.mask is not None and partner.mask is not None:
        gt = mix(partner.mask, u.mask, keep)
        logs["train/pl_acc"] = label_accuracy(out["student_a"]["label"], gt, (~pad).float())
    return StepOut(total, logs)


def after_step(nets, cfg: Config, ctx) -> None:
    """EMA of each student into its own teacher (parameters only), then feed each teacher's bank."""
    keep = mean_teacher_keep(ctx.step, cfg.ema_keep)
    for student, teacher, bank in PAIRS:
        ema_update(nets[teacher], unwrap(nets[student]), keep, buffers=False)
        if nets[bank].pending is not None:
            image, mask = nets[bank].pending
            nets[bank].feed(nets[teacher], image, mask, cfg.bank_gate, cfg.bank_push or image.shape[0])

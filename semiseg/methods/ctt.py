"""CTT: two students, each taught by the OTHER student's EMA teacher, plus two pixel-contrastive modules.

Student k learns from the peer teacher's pseudo-labels on a mixed (ClassMix / CutMix) colour-jittered view,
weighted by the share of confident pixels; a high-level module contrasts its features with per-class memory banks
of its own teacher's confident, correct labeled features, and a low-level module pulls its unsure features
towards the peer student's more confident feature at the same pixel.
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
import torch.nn.functional as F
from torch import nn

from semiseg.config import MethodConfig
from semiseg.data.augment import StrongAugConfig, classmix_mask, cutmix_box, mix, strong_view
from semiseg.data.info import IGNORE
from semiseg.engine.checkpoint import unwrap
from semiseg.engine.ema import ema_update, mean_teacher_keep
from semiseg.engine.loop import StepOut
from semiseg.losses import bank_info_nce, masked_ce, peer_info_nce, supervised_loss
from semiseg.models import build_model
from semiseg.ops import fifo_push, label_accuracy, mask_ratio, roll

MIXES = ("classmix", "cutmix", "none")
PAIRS = (("student_a", "teacher_a", "bank_a"), ("student_b", "teacher_b", "bank_b"))
"""(student, its own teacher, that teacher's bank); student k is supervised by the OTHER pair's teacher"""


def ctt_strong() -> StrongAugConfig:
    """CTT's strong view after the mix: colour jitter 0.25 (p 0.8), blur (p 0.5, sigma 0.15-1.15), no grayscale."""
    return StrongAugConfig(
        brightness=0.25,
        contrast=0.25,
        saturation=0.25,
        hue=0.25,
        jitter_p=0.8,
        grayscale_p=0.0,
        blur_p=0.5,
        blur_sigma=(0.15, 1.15),
        cutmix_p=1.0,
        mix_area=(0.5, 0.5),
        mix_ratio=(0.5, 2.0),
    )


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
    """entries pushed per class per step, the most confident first; 0 = the labeled batch size (the reference's
    max(floor(2 * slots / labeled images), batch) for every split with more than 2 * slots / batch images)"""
    bank_warmup_steps: int = 0
    """start the contrastive terms at this step even if some class has no bank entry; 0 = wait until every class
    has entries in both banks (the reference waited until every class was full)"""
    max_anchors: int = 0
    """anchors per contrastive term, a random subset when there are more (bounds memory); 0 = all (reference)"""
    seed_offset: int = 1
    """student_b is built with torch seed train.seed + seed_offset (different heads; same pretrained backbone)"""
    pretrained_b: str = ""
    """backbone weights of student_b; empty = model.pretrained (the DeepLabV2 script used COCO for a, ImageNet for b)"""

    def __post_init__(self):
        super().__post_init__()
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {self.mix!r}")
        if not 0.0 <= self.ema_keep <= 1.0:
            raise ValueError(f"ema_keep must be in [0, 1], got {self.ema_keep}")
        if self.bank_size < 1 or self.bank_push < 0 or self.bank_warmup_steps < 0 or self.max_anchors < 0:
            raise ValueError("bank_size must be >= 1; bank_push, bank_warmup_steps and max_anchors >= 0")
        if self.tau_high <= 0 or self.tau_low <= 0:
            raise ValueError("tau_high and tau_low must be > 0")


TRAINED = ("student_a", "student_b")
EVAL_NETS = ("student_a", "student_b")
USES_UNLABELED = True


class MemoryBank(nn.Module):
    """Per-class FIFO queues of L2-normalised teacher features; buffers, so checkpoints save and restore them."""

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

    @torch.no_grad()
    def push(self, cls: int, items: torch.Tensor) -> None:
        """Append items (n, D) to class cls's queue, evicting the oldest past capacity."""
        self.feats[cls], self.ptr[cls] = fifo_push(self.feats[cls], self.ptr[cls], F.normalize(items.float(), dim=1))
        self.count[cls] = (self.count[cls] + items.shape[0]).clamp(max=self.feats.shape[1])


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


def _resize_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) map of any dtype -> (B, *size), nearest, as the reference downsamples labels to feature size."""
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(x.dtype)


def _feature_probs(model, feat: torch.Tensor) -> torch.Tensor:
    """Softmax (B, C, h, w) of the classifier at feature resolution; no gradient (selection only)."""
    with torch.no_grad():
        return unwrap(model).head.classifier(feat.detach()).float().softmax(1)


def _pixels(feat: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """feat (B, D, h, w), where (B, h, w) bool -> (M, D)."""
    return feat.permute(0, 2, 3, 1)[where]


def _subsample(n: int, limit: int, gen: torch.Generator, device) -> torch.Tensor | None:
    """Indices of a random subset of `limit` of n rows, or None to keep all."""
    if limit <= 0 or n <= limit:
        return None
    return torch.randperm(n, generator=gen)[:limit].to(device)


def _contrast_ready(nets, cfg: Config, step: int) -> bool:
    """Every class has entries in both banks, or the partial-bank start step has come."""
    if cfg.bank_warmup_steps > 0 and step >= cfg.bank_warmup_steps:
        return True
    return bool(torch.stack([(nets[bank].count > 0).all() for _, _, bank in PAIRS]).all())


def _mix_mask(cfg: Config, teacher_label: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """bool (B, H, W): True where the mixed view keeps the image itself, False where the partner shows through."""
    b, h, w = teacher_label.shape
    if cfg.mix == "classmix":
        return classmix_mask(teacher_label, gen)
    if cfg.mix == "cutmix":
        s = cfg.strong
        return ~cutmix_box(b, h, w, gen, s.cutmix_p, s.mix_area, s.mix_ratio, teacher_label.device)
    return torch.ones_like(teacher_label, dtype=torch.bool)


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    l, u = batch.l, batch.u
    x_u = u.image
    if batch.u_mix is not None:
        partner_image, partner_pad = batch.u_mix.image, batch.u_mix.pad
    else:
        partner_image, partner_pad = roll(u.image), roll(u.pad)

    # Teachers stay in train mode (the reference never calls eval on them) and never receive gradients.
    prob, prob_partner = {}, {}
    with torch.no_grad():
        for _, teacher, _ in PAIRS:
            prob[teacher] = nets[teacher](x_u).float().softmax(1)
            if batch.u_mix is None:
                prob_partner[teacher] = roll(prob[teacher])
            else:
                prob_partner[teacher] = nets[teacher](partner_image).float().softmax(1)
        # One mask for both students keeps their views pixel-aligned for the low-level module (METHODS.md 5(h)4).
        keep = _mix_mask(cfg, (prob["teacher_a"] + prob["teacher_b"]).argmax(1), ctx.gen)
        mixed = mix(partner_image, u.image, keep)
        pad = mix(partner_pad, u.pad, keep)

    contrast = cfg.contrast and (cfg.w_high > 0 or cfg.w_low > 0)
    active = contrast and _contrast_ready(nets, cfg, ctx.step)
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
        out[student] = dict(loss_x=loss_x, loss_u=loss_u, omega=omega, conf=conf, label=label, feat_l=feat_l)
        out[student].update(feat_u=feat_u, probs_u=_feature_probs(nets[student], feat_u))
        total = total + loss_x + cfg.w_u * loss_u
        if contrast:
            nets[bank].pending = (l.image, l.mask)

    zero = total.new_zeros(())
    loss_high, loss_low = {s: zero for s, _, _ in PAIRS}, {s: zero for s, _, _ in PAIRS}
    if active:
        for k, (student, _, bank) in enumerate(PAIRS):
            me, peer = out[student], out[PAIRS[1 - k][0]]
            size = me["feat_u"].shape[-2:]
            conf_f = _resize_nearest(me["conf"], size)
            label_f = _resize_nearest(me["label"], size)
            valid_f = ~_resize_nearest(pad, size)
            emb_u = F.normalize(me["feat_u"].float(), dim=1)
            if cfg.w_high > 0:
                gt_f = _resize_nearest(l.mask, me["feat_l"].shape[-2:])
                sure = valid_f & (conf_f >= cfg.gamma)
                emb_l = F.normalize(me["feat_l"].float(), dim=1)
                anchors = torch.cat([_pixels(emb_l, gt_f != IGNORE), _pixels(emb_u, sure)])
                labels = torch.cat([gt_f[gt_f != IGNORE], label_f[sure]])
                idx = _subsample(anchors.shape[0], cfg.max_anchors, ctx.gen, anchors.device)
                if idx is not None:
                    anchors, labels = anchors[idx], labels[idx]
                bank_net = nets[bank]
                loss_high[student] = bank_info_nce(anchors, labels, bank_net.feats, bank_net.valid(), cfg.tau_high)
            if cfg.w_low > 0:
                my_conf = me["probs_u"].max(1).values
                peer_conf, peer_label = peer["probs_u"].max(1)
                unsure = valid_f & (conf_f < cfg.gamma) & (peer_conf > my_conf) & (peer_conf >= cfg.gamma)
                anchors = _pixels(emb_u, unsure)
                positives = _pixels(F.normalize(peer["feat_u"].detach().float(), dim=1), unsure)
                labels = peer_label[unsure]
                idx = _subsample(anchors.shape[0], cfg.max_anchors, ctx.gen, anchors.device)
                if idx is not None:
                    anchors, positives, labels = anchors[idx], positives[idx], labels[idx]
                banks = [nets[b] for _, _, b in PAIRS]
                both = torch.cat([b.feats for b in banks], dim=1)
                both_valid = torch.cat([b.valid() for b in banks], dim=1)
                loss_low[student] = peer_info_nce(anchors, positives, labels, both, both_valid, cfg.tau_low)
            total = total + cfg.w_high * loss_high[student] + cfg.w_low * loss_low[student]

    def mean(values):
        return (values[0].detach() + values[1].detach()) / 2

    students = [s for s, _, _ in PAIRS]
    logs = {
        "train/loss_x": mean([out[s]["loss_x"] for s in students]),
        "train/loss_u": mean([out[s]["loss_u"] for s in students]),
        "train/loss_high": mean([loss_high[s] for s in students]),
        "train/loss_low": mean([loss_low[s] for s in students]),
        "train/mask_ratio": mean([out[s]["omega"] for s in students]),
        "train/contrast_on": float(active),
    }
    if contrast:
        logs["train/bank_fill"] = torch.stack(
            [nets[b].count.float().mean() / cfg.bank_size for _, _, b in PAIRS]
        ).mean()
    partner_gt = None if u.mask is None else roll(u.mask) if batch.u_mix is None else batch.u_mix.mask
    if partner_gt is not None:
        gt = mix(partner_gt, u.mask, keep)
        logs["train/pl_acc"] = label_accuracy(out[students[0]]["label"], gt, (~pad).float())
    return StepOut(total, logs)


@torch.no_grad()
def _feed_bank(teacher: nn.Module, bank: MemoryBank, cfg: Config) -> None:
    """Push the teacher's confident, correct labeled features into its bank, top-n per class."""
    image, mask = bank.pending
    bank.pending = None
    feat = teacher.features(image)
    prob = teacher.head.classifier(feat).float().softmax(1)
    score, pred = prob.max(1)
    gt = _resize_nearest(mask, feat.shape[-2:])
    # an all-zero feature (every channel cut by the ReLU) has no direction to contrast with
    unusable = (pred != gt) | (score < cfg.bank_gate) | (gt == IGNORE) | (feat.detach().abs().amax(1) == 0)
    score = score.masked_fill(unusable, -1.0)
    n = cfg.bank_push or image.shape[0]
    flat_feat, flat_score, flat_gt = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1]), score.flatten(), gt.flatten()
    for cls in flat_gt[flat_score >= 0].unique().tolist():
        cls_score = torch.where(flat_gt == cls, flat_score, torch.full_like(flat_score, -1.0))
        top = cls_score.topk(min(n, cls_score.numel()))
        chosen = top.indices[top.values >= 0]
        bank.push(cls, flat_feat[chosen])


def after_step(nets, cfg: Config, ctx) -> None:
    """EMA of each student into its own teacher (parameters only), then feed each teacher's bank."""
    keep = mean_teacher_keep(ctx.step, cfg.ema_keep)
    for student, teacher, bank in PAIRS:
        ema_update(nets[teacher], unwrap(nets[student]), keep, buffers=False)
        if nets[bank].pending is not None:
            _feed_bank(nets[teacher], nets[bank], cfg)

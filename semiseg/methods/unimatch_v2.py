"""UniMatch V2: an EMA teacher labels the weak view; two CutMixed strong views train the student in one batch, their
encoder features perturbed by complementary channel dropout.

Paper: Yang, Zhao, Zhao, "UniMatch V2: Pushing the Limit of Semi-Supervised Semantic Segmentation", TPAMI 2025
(arXiv 2410.10777; official code `LiheYoung/UniMatch-V2`, `unimatch_v2.py`, `model/semseg/dpt.py`; METHODS.md 8).
Loss: L = w_x L_x + w_s1 L_s1 + w_s2 L_s2 (reference: 1/2, 1/4, 1/4). L_x: CE (Cityscapes: OHEM); L_sk: CE of strong
view k against the teacher's hard pseudo-label (the partner's inside the CutMix box), summed over pixels whose
confidence is >= tau and divided by the count of non-padded pixels. Complementary dropout: for half the images,
every encoder channel is kept (x2) in exactly one of the two strong views and zeroed in the other; the other half
stay clean. The teacher is the EMA of the student, keep min(1 - 1/(t+1), 0.996); both are evaluated, the teacher
is the reported net. The reference trains with AdamW (encoder lr 5e-6, decoder x40, weight decay 0.01), fp32.
Command: `torchrun --nproc_per_node 4 -m semiseg train configs/pascal/unimatch_v2_dinov2s_92.yaml`; expected 79.0
mIoU on VOC-92 with DINOv2-S (86.3 with DINOv2-B: `unimatch_v2_dinov2b_92.yaml`), best-epoch EMA of the official logs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from semiseg.config import MethodConfig
from semiseg.data.augment import StrongAugConfig
from semiseg.engine.checkpoint import unwrap
from semiseg.engine.ema import ema_update, mean_teacher_keep
from semiseg.engine.evaluate import evaluating
from semiseg.engine.loop import StepOut
from semiseg.losses import supervised_loss
from semiseg.methods.weak_to_strong import PseudoLabel, label_logs, partner_label, partners, strong_loss, strong_views
from semiseg.models import build_model, upsample


@dataclass(frozen=True)
class Config(MethodConfig):
    name: str = "unimatch_v2"
    """method name"""
    tau: float = 0.95
    """confidence threshold of the teacher's pseudo-labels (inclusive; 0.95 on every dataset, Cityscapes too)"""
    w_x: float = 0.5
    """weight of the labeled loss"""
    w_s1: float = 0.25
    """weight of the first strong view's loss"""
    w_s2: float = 0.25
    """weight of the second strong view's loss"""
    ema_keep: float = 0.996
    """cap of the teacher's EMA keep rate; step t (0-based) uses min(1 - 1/(t + 1), ema_keep)"""
    perturb_frac: float = 0.5
    """share of images whose two strong views get complementary channel dropout (the reference's dropout_prob);
    int(n * (1 - perturb_frac)) of the n images stay clean in both views"""
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    """strong views: colour jitter, grayscale, blur, CutMix probability and box ranges (UniMatch's)"""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema_keep <= 1.0:
            raise ValueError(f"ema_keep must be in [0, 1], got {self.ema_keep}")
        if not 0.0 <= self.perturb_frac <= 1.0:
            raise ValueError(f"perturb_frac must be in [0, 1], got {self.perturb_frac}")


TRAINED = ("student",)
EVAL_NETS = ("teacher", "student")
USES_UNLABELED = True


def build(cfg, info):
    """Student and teacher: identical copies (pretrained encoder loaded once); the teacher never gets gradients."""
    student = build_model(cfg.model, info.num_classes)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return {"student": student, "teacher": teacher}


def complementary_masks(n: int, dim: int, perturb_frac: float, gen: torch.Generator) -> torch.Tensor:
    """Channel scales (2n, dim) for the batch [view 1 of n images; view 2 of the same n images].

    Rows i and n + i are M1 = 2 Bernoulli(0.5) and M2 = 2 - M1, i.i.d. per image and channel: each channel is kept
    (x2, dropout's rescaling at p = 0.5) in exactly one view. int(n * (1 - perturb_frac)) images, drawn without
    replacement, get all-ones rows in both views (clean). Drawn on the CPU from `gen`, so a resumed run redraws them.
    """
    m1 = torch.bernoulli(torch.full((n, dim), 0.5), generator=gen) * 2.0
    m2 = 2.0 - m1
    clean = torch.randperm(n, generator=gen)[: int(n * (1 - perturb_frac))]
    m1[clean] = 1.0
    m2[clean] = 1.0
    return torch.cat([m1, m2])


def scale_channels(feats: Sequence[torch.Tensor], scales: torch.Tensor) -> list[torch.Tensor]:
    """Every encoder map (B, C_i, h, w) times scales (B, D)[:, :C_i], broadcast over positions.

    One draw serves all maps, as in the reference (where every map has D channels); a narrower map takes the first C_i.
    """
    return [f * scales[:, : f.shape[1], None, None].to(f.device, f.dtype) for f in feats]


def forward_complementary(model, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (2n, 3, H, W) -> logits (2n, K, H, W), the encoder maps scaled per image and channel before the head."""
    feats = scale_channels(model.encode(x), scales)
    return upsample(unwrap(model).head(feats), x.shape[-2:])


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    student, teacher = nets["student"], nets["teacher"]
    l, u = batch.l, batch.u
    partner = partners(batch)
    views = strong_views(u, partner, 2, ctx.gen, cfg.strong)

    # The teacher runs in eval mode without gradients, as in the reference; its prediction does not depend on the
    # rest of the batch, so rolled partners take the rolled output instead of a second pass.
    with evaluating(teacher):
        pl = PseudoLabel.of(teacher(u.image), u.pad)
        partner_pl = partner_label(pl, partner, teacher)

    logits_x = student(l.image)
    scales = complementary_masks(u.image.shape[0], max(unwrap(student).backbone.channels), cfg.perturb_frac, ctx.gen)
    logits_s1, logits_s2 = forward_complementary(student, torch.cat(views.images), scales).chunk(2)

    target1, target2 = views.targets(pl, partner_pl)
    loss_x = supervised_loss(logits_x, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    loss_s1 = strong_loss(logits_s1, target1, cfg.tau)
    loss_s2 = strong_loss(logits_s2, target2, cfg.tau)
    loss = cfg.w_x * loss_x + cfg.w_s1 * loss_s1 + cfg.w_s2 * loss_s2
    logs = {
        "train/loss_x": loss_x.detach(),
        "train/loss_s": (loss_s1.detach() + loss_s2.detach()) / 2,
        **label_logs(pl, u.mask, cfg.tau),
    }
    return StepOut(loss, logs)


def after_step(nets, cfg: Config, ctx) -> None:
    """teacher <- keep teacher + (1 - keep) student with keep = min(1 - 1/(step + 1), ema_keep): step 0 copies."""
    ema_update(nets["teacher"], unwrap(nets["student"]), mean_teacher_keep(ctx.step, cfg.ema_keep), buffers=True)

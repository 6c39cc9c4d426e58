"""Mean Teacher: an EMA of the student labels nothing; its softmax on the weak view is the student's target on a
strong view of the same crop, a squared-error consistency ramped in over the first steps.

Paper: Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency targets improve
semi-supervised deep learning results", NeurIPS 2017 (official code `CuriousAI/mean-teacher`: `softmax_mse_loss`,
`sigmoid_rampup`, `update_ema_variables`); per pixel here, the baseline of the segmentation tables (CCT, CPS).
Loss: L = CE(student(x_l), y_l) + w(t) * mean over non-padded pixels of sum_c (softmax(student(strong u)) -
softmax(teacher(u)))^2, w(t) = w_u * exp(-5 (1 - min(t / T_r, 1))^2), T_r = rampup x the run's steps. The teacher
runs in train mode without gradients (noise on both sides, as the reference code) and is the EMA of the student,
parameters and BatchNorm buffers, keep min(1 - 1/(t + 1), ema_keep). The strong view is colour jitter, grayscale and
blur (no CutMix).
Command: `semiseg train configs/demo.yaml --set method.name=mean_teacher`: 29.65 best / 29.45 last mIoU (student;
teacher 29.27 last), against 27.83 for `supervised` on the same command and 2-core CPU (seed 0 only: the demo's
seed-to-seed spread is as large, README). No published segmentation number is claimed here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from semiseg.config import MethodConfig
from semiseg.data.augment import StrongAugConfig, strong_view
from semiseg.engine.checkpoint import unwrap
from semiseg.engine.ema import ema_update, mean_teacher_keep, sigmoid_rampup
from semiseg.engine.loop import StepOut
from semiseg.losses import softmax_mse, supervised_loss
from semiseg.models import build_model


@dataclass(frozen=True)
class Config(MethodConfig):
    name: str = "mean_teacher"
    """method name"""
    w_u: float = 1.0
    """weight of the consistency term once ramped up"""
    rampup: float = 0.1
    """share of the run's steps over which the consistency weight ramps up (the paper's sigmoid); 0 = full weight"""
    ema_keep: float = 0.99
    """cap of the teacher's EMA keep rate; step t (0-based) uses min(1 - 1/(t + 1), ema_keep)"""
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    """the student's view: colour jitter, grayscale and blur of the teacher's crop (the CutMix fields are unused)"""

    def __post_init__(self):
        super().__post_init__()
        if self.w_u < 0 or not 0.0 <= self.rampup <= 1.0 or not 0.0 <= self.ema_keep <= 1.0:
            raise ValueError("need w_u >= 0, rampup in [0, 1] and ema_keep in [0, 1]")


TRAINED = ("student",)
EVAL_NETS = ("teacher", "student")
USES_UNLABELED = True
TRAIN_MODE_TEACHERS = ("teacher",)
"""teachers in train mode (BatchNorm on batch statistics): SyncBatchNorm with the students under model.sync_bn"""


def build(cfg, info):
    """Student and teacher: identical copies; the teacher never gets gradients."""
    student = build_model(cfg.model, info.num_classes)
    return {"student": student, "teacher": copy.deepcopy(student).requires_grad_(False)}


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    student, teacher = nets["student"], nets["teacher"]
    l, u = batch.l, batch.u
    strong = strong_view(u.image, ctx.gen, cfg.strong)
    with torch.no_grad():
        target = teacher(u.image).float().softmax(1)
    logits_x = student(l.image)
    logits_u = student(strong)
    loss_x = supervised_loss(logits_x, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    loss_u = softmax_mse(logits_u, target, ~u.pad)
    w = cfg.w_u * sigmoid_rampup(ctx.step, round(cfg.rampup * ctx.iters))
    loss = loss_x + w * loss_u
    valid = ~u.pad  # the share of non-padded pixels where student and teacher predict the same class
    agree = ((logits_u.detach().argmax(1) == target.argmax(1)) & valid).sum() / valid.sum().clamp(min=1)
    logs = {"train/loss_x": loss_x.detach(), "train/loss_u": loss_u.detach(), "train/w_u": w, "train/agree": agree}
    return StepOut(loss, logs)


def after_step(nets, cfg: Config, ctx) -> None:
    """teacher <- keep teacher + (1 - keep) student, parameters and BatchNorm buffers; step 0 copies the student."""
    ema_update(nets["teacher"], unwrap(nets["student"]), mean_teacher_keep(ctx.step, cfg.ema_keep), buffers=True)

"""SWDBN: a strong-weak dual-branch network; pixel labels and weak labels train separate branches on shared features.

A shared backbone and neck feed two identical branches: the strong branch learns from the pixel-level labels, the
weak branch from proxy masks of the weak images, so inaccurate proxies shape the shared features without
corrupting the classifier that is evaluated. Paper: Luo & Yang, "Semi-supervised Semantic Segmentation via
Strong-weak Dual-branch Network", ECCV 2020 (no official code; METHODS.md section 3).
Loss: L = CE(strong branch on the labeled crops, GT) + lam * CE(weak branch on the weak crops, proxy mask), each CE
averaged over its non-ignored pixels; `single_branch` routes both terms through the strong branch (the paper's
premise check: one branch on mixed labels). Each step holds data.batch_size strong and data.batch_size_u weak crops.
Weak sources (`weak_source`):
  pseudo  pseudo-labels (the semi-supervised setting, as the third-party StrongWeakLearner): the teacher's argmax on
          the weak crop, pixels below tau ignored; the weak branch sees the CutMixed strong view (weak_to_strong)
  tags    image-level tags (a file, or derived from the masks): the teacher's prediction restricted to the image's
          tags plus the background class, pixels below tau ignored; online, without gradient (no CAM classifier)
  boxes   boxes (a file, or derived from the masks: one per connected component): filled, smaller boxes on top,
          an inner band of box_band x the half-size ignored, background outside; painted in the data path
The teacher is an EMA of the model (teacher: ema) or the model itself in eval mode (teacher: self), used through
its strong branch; the network is semiseg.models.dual_branch, whose forward (evaluation, export) is the strong branch.
Command: `semiseg train configs/pascal/swdbn_r101_1464_boxes.yaml`; the [3rd] reference points are 68.9 mIoU for
one branch on the 1.4k strong images and 62.8 for one branch on 1.4k strong + 9k weak (DSRG tags), VOC val.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from semiseg.config import ConfigError, MethodConfig
from semiseg.data.augment import StrongAugConfig
from semiseg.data.info import IGNORE
from semiseg.data.loader import Part
from semiseg.data.weak import background_index, tag_matrix, tag_proxy
from semiseg.engine.checkpoint import unwrap
from semiseg.engine.ema import ema_update, mean_teacher_keep
from semiseg.engine.evaluate import evaluating
from semiseg.engine.loop import StepOut, TrainData
from semiseg.losses import ce, supervised_loss
from semiseg.methods.weak_to_strong import PseudoLabel, partners, strong_views
from semiseg.models import build_dual_branch
from semiseg.ops import confident, label_accuracy

log = logging.getLogger(__name__)

SOURCES = ("pseudo", "tags", "boxes")
TEACHERS = ("ema", "self")


@dataclass(frozen=True)
class Config(MethodConfig):
    name: str = "swdbn"
    """method name"""
    weak_source: str = "pseudo"
    """weak labels of the weak (unlabeled-stream) images: pseudo | tags | boxes"""
    lam: float = 1.0
    """lambda: weight of the weak-branch loss (the paper's equal weighting is 1)"""
    single_branch: bool = False
    """train one branch on strong and weak labels together (no weak branch is built)"""
    neck_depth: int = 2
    """3x3 conv + BN + ReLU layers of the shared neck on c4 (width model.head_channels); 0 = none"""
    branch_depth: int = 2
    """3x3 conv + BN + ReLU layers of each branch before its 1x1 classifier"""
    tau: float = 0.95
    """pseudo / tags: proxy pixels whose (tag-restricted) confidence is below tau are ignored"""
    teacher: str = "ema"
    """pseudo / tags: proxy masks from an EMA copy of the model (ema) or the model itself in eval mode (self)"""
    ema_keep: float = 0.99
    """teacher: ema: keep rate, ramped as min(1 - 1/(step + 1), ema_keep)"""
    augment_weak: bool = False
    """tags / boxes: also give the weak branch the strong view with CutMix (pseudo always does)"""
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    """strong view of the weak branch's input: colour jitter, grayscale, blur, CutMix probability and box ranges"""
    tags_file: str = ""
    """tags: file of image tags (text, JSON or a VOC Annotations folder); empty = derived from the weak images' masks"""
    boxes_file: str = ""
    """boxes: file of boxes (text, JSON, folder of per-image .txt / VOC .xml); empty = derived from the masks"""
    box_band: float = 0.2
    """boxes: inner border band set to ignore, as a fraction of each box's half-width and half-height"""
    min_box_area: int = 32
    """boxes derived from masks: connected components smaller than this (pixels, original resolution) get no box"""
    background: str = "auto"
    """class outside every box and always allowed with tags: auto (a class named background, if any) | '' | a name"""
    weak_ids: str = ""
    """weak images: empty = every unlabeled image (with an entry in the tags/boxes file); a count or fraction of
    the unlabeled images (drawn with data.split_seed); or a file of ids"""

    def __post_init__(self):
        super().__post_init__()
        if self.weak_source not in SOURCES:
            raise ValueError(f"weak_source must be one of {', '.join(SOURCES)}, got {self.weak_source!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.lam < 0 or not 0.0 <= self.tau <= 1.0 or not 0.0 <= self.ema_keep <= 1.0:
            raise ValueError("need lam >= 0, tau in [0, 1] and ema_keep in [0, 1]")
        if self.neck_depth < 0 or self.branch_depth < 0:
            raise ValueError("neck_depth and branch_depth must be >= 0")
        if not 0.0 <= self.box_band < 1.0 or self.min_box_area < 1:
            raise ValueError("need box_band in [0, 1) and min_box_area >= 1")


TRAINED = ("model",)
EVAL_NETS = ("model",)
USES_UNLABELED = True


def build(cfg, info):
    m = cfg.method
    model = build_dual_branch(cfg.model, info.num_classes, m.neck_depth, m.branch_depth, not m.single_branch)
    nets = {"model": model}
    # box proxies are fixed: only pseudo-labels and tag-restricted predictions need a teacher
    if cfg.method.weak_source != "boxes" and cfg.method.teacher == "ema":
        nets["teacher"] = copy.deepcopy(model).requires_grad_(False)
    return nets


def proxy(nets, image: Tensor, ids: list[str], mask: Tensor | None, pad: Tensor, cfg: Config, ctx) -> PseudoLabel:
    """Targets of weak crops: the box proxy mask as read (conf 1 where labelled), or the teacher's argmax
    (restricted to each image's tags, ctx.tags, plus the background for tags)."""
    if cfg.weak_source == "boxes":
        return PseudoLabel(mask, (mask != IGNORE).float(), pad)
    with evaluating(nets["teacher" if cfg.teacher == "ema" else "model"]) as teacher:
        logits = teacher(image)
    if cfg.weak_source == "pseudo":
        return PseudoLabel.of(logits, pad)
    if ctx.tags is None:
        raise ConfigError("method.weak_source=tags: this fit has no tags; swdbn.prepare reads them (fit calls it)")
    background = background_index(cfg.background, ctx.info.classes)
    conf, label = tag_proxy(logits, tag_matrix(ids, ctx.tags, ctx.info.num_classes, background, logits.device))
    return PseudoLabel(label, conf, pad)


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    model = nets["model"]
    l, u = batch.l, batch.u
    partner = partners(batch)
    augment = cfg.weak_source == "pseudo" or cfg.augment_weak
    if augment and not partner.rolled:  # one teacher pass over both streams
        n, cat = u.image.shape[0], lambda a, b: None if a is None or b is None else torch.cat([a, b])  # noqa: E731
        both = proxy(nets, cat(u.image, partner.image), u.ids + partner.ids, cat(u.mask, partner.mask),
                     cat(u.pad, partner.pad), cfg, ctx)  # fmt: skip
        pl = PseudoLabel(both.label[:n], both.conf[:n], both.pad[:n])
        partner_pl = PseudoLabel(both.label[n:], both.conf[n:], both.pad[n:])
    else:
        pl = proxy(nets, u.image, u.ids, u.mask, u.pad, cfg, ctx)
        partner_pl = pl.rolled()
    target, image_w = pl, u.image
    if augment:
        views = strong_views(u, partner, 1, ctx.gen, cfg.strong)
        (target,), (image_w,) = views.targets(pl, partner_pl), views.images
    label_w = torch.where((target.conf >= cfg.tau) & ~target.pad, target.label, IGNORE)

    logits_x, logits_w = model.forward_branches(torch.cat([l.image, image_w]), l.image.shape[0])
    loss_x = supervised_loss(logits_x, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    loss_w = ce(logits_w, label_w)
    loss = loss_x + cfg.lam * loss_w
    valid = ~target.pad
    logs = {
        "train/loss_x": loss_x.detach(),
        "train/loss_w": loss_w.detach(),
        "train/mask_ratio": ((label_w != IGNORE) & valid).sum() / valid.sum().clamp(min=1),
    }
    if cfg.weak_source != "boxes" and u.mask is not None:
        # u.mask is ground truth here (boxes replace it with the proxy): a diagnostic, never a target
        logs["train/pl_acc"] = label_accuracy(pl.label, u.mask, confident(pl.conf, cfg.tau) * (~u.pad))
    return StepOut(loss, logs)


def after_step(nets, cfg: Config, ctx) -> None:
    if "teacher" in nets:
        ema_update(nets["teacher"], unwrap(nets["model"]), mean_teacher_keep(ctx.step, cfg.ema_keep))


def prepare(cfg, run_dir: Path, info) -> TrainData:
    """The strong (labeled) and weak images, the weak labels read from method.tags_file / boxes_file or derived from
    the masks (run_dir/weak_<kind>.txt); tags go to ctx.tags, boxes are painted into the weak masks (data path)."""
    from semiseg.data.datasets import resolve_train_split
    from semiseg.data.weak import BoxProxyDataset, read_or_derive, select_ids

    m = cfg.method
    labeled, unlabeled = resolve_train_split(cfg.data)
    weak = unlabeled.subset(select_ids(m.weak_ids, unlabeled.ids, cfg.data.split_seed, "method.weak_ids"))
    strong = [Part(labeled, repeat=max(cfg.data.repeat_labeled, 1))]
    kind, tags = m.weak_source, None
    if kind != "pseudo":
        background = background_index(m.background, info.classes)
        note = f"min_box_area={m.min_box_area} background={m.background} weak_ids={m.weak_ids or 'all'}"
        source = m.tags_file if kind == "tags" else m.boxes_file
        cache = Path(run_dir) / f"weak_{kind}.txt"
        weak, labels = read_or_derive(weak, kind, source, cache, background, m.min_box_area, note)
        if kind == "boxes":
            weak = BoxProxyDataset(weak, labels, background, m.box_band)
        else:
            tags = labels
    log.info("swdbn: %d strong images, %d weak images (%s)", len(labeled), len(weak), kind)
    return TrainData(strong, [Part(weak)], tags)

"""SWDBN: a strong-weak dual-branch network; pixel labels and weak labels train separate branches on shared features.

A shared backbone and neck feed two identical branches: the strong branch learns from the pixel-level labels, the
weak branch from proxy masks of the weak images, so inaccurate proxies shape the shared features without
corrupting the classifier that is evaluated. Paper: Luo & Yang, "Semi-supervised Semantic Segmentation via
Strong-weak Dual-branch Network", ECCV 2020 (no official code; METHODS.md section 3).
Loss: L = CE(strong branch on the labeled crops, GT) + lam * CE(weak branch on the weak crops, proxy mask), each CE
averaged over its non-ignored pixels; `single_branch` routes both terms through the strong branch (the paper's
premise check: one branch on mixed labels). Each step holds data.batch_size strong and data.batch_size_u weak crops.
Weak sources (`weak_source`):
  pseudo  the unlabeled images' pseudo-labels (the semi-supervised setting, as the third-party StrongWeakLearner):
          the teacher's argmax on the weak crop, pixels below tau ignored; the weak branch sees the strong view
          (colour, blur) CutMixed with a partner, whose pseudo-label fills the box
  tags    image-level tags (a file, or derived from the masks): the teacher's strong-branch prediction restricted
          to the image's tags plus the background class (softmax over those classes), pixels below tau ignored;
          computed online, without gradient (no CAM classifier)
  boxes   boxes (a file, or derived from the masks: one per connected component): filled, smaller boxes on top,
          an inner band of box_band x the half-size ignored, background outside; painted in the data path
The teacher is an EMA of the model (teacher: ema, used through its strong branch) or the model itself in eval mode
under no_grad (teacher: self). Only the strong branch is evaluated and exported: the exported net is the whole
DualBranchNet (semiseg eval / predict rebuild it with this module's build), and its forward returns the strong
branch's logits, so the weak branch is never called at inference.
Command: `semiseg train configs/pascal/swdbn_r101_1464_boxes.yaml`; the [3rd] reference points are 68.9 mIoU for
one branch on the 1.4k strong images and 62.8 for one branch on 1.4k strong + 9k weak (DSRG tags), VOC val.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from semiseg.config import ConfigError, MethodConfig
from semiseg.data.augment import StrongAugConfig, cutmix_box, mix, strong_view
from semiseg.data.info import IGNORE
from semiseg.data.weak import background_index, tag_matrix, tag_proxy
from semiseg.engine.checkpoint import unwrap
from semiseg.engine.ema import ema_update, mean_teacher_keep
from semiseg.engine.evaluate import evaluating
from semiseg.engine.loop import StepOut
from semiseg.losses import ce, supervised_loss
from semiseg.models import InputNorm, build_encoder, upsample
from semiseg.models.deeplab import conv_bn_relu
from semiseg.ops import confident, cutmix_targets, label_accuracy, pseudo_label, roll

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


@dataclass
class WeakLabels:
    """What `run` prepared for the tags / boxes steps: the source, and the tags of every weak image."""

    source: str
    tags: dict | None = None


def convs(in_ch: int, width: int, depth: int) -> nn.Sequential:
    """`depth` x [3x3 conv, BN, ReLU], the first from in_ch channels, the rest at `width`."""
    return nn.Sequential(*[conv_bn_relu(in_ch if i == 0 else width, width, 3) for i in range(depth)])


class Branch(nn.Module):
    """One SWDBN branch: depth x [3x3 conv, BN, ReLU], then a 1x1 classifier; logits at the feature stride."""

    def __init__(self, in_ch: int, width: int, depth: int, num_classes: int):
        super().__init__()
        self.convs = convs(in_ch, width, depth)
        self.classifier = nn.Conv2d(width if depth else in_ch, num_classes, 1)

    def forward(self, feat: Tensor) -> Tensor:
        return self.classifier(self.convs(feat))


class DualBranchNet(nn.Module):
    """Backbone, shared neck on c4, strong branch and (unless single-branch) weak branch.

    model(x)                      -> strong-branch logits (B, K, H, W): evaluation, export, teachers
    model.forward_branches(x, n)  -> (strong logits of x[:n], weak logits of x[n:]): the backbone and neck see the
                                     whole batch, each branch only its own part (the strong branch takes both
                                     parts when there is no weak branch)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        width: int,
        neck_depth: int,
        branch_depth: int,
        dual=True,
        input_norm: InputNorm | None = None,
    ):
        super().__init__()
        self.input_norm = input_norm or InputNorm()
        c4 = backbone.channels[-1]
        self.backbone = backbone
        self.neck = convs(c4, width, neck_depth)
        ch = width if neck_depth else c4
        self.strong = Branch(ch, width, branch_depth, num_classes)
        self.weak = Branch(ch, width, branch_depth, num_classes) if dual else None
        self.weak_labels: WeakLabels | None = None

    def encode(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) uint8 or in [0, 1] -> shared neck features (B, D, h, w)."""
        return self.neck(self.backbone(self.input_norm(x))[-1])

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> strong-branch logits (B, K, H, W)."""
        return upsample(self.strong(self.encode(x)), x.shape[-2:])

    def forward_branches(self, x: Tensor, n_strong: int) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) -> (strong logits (n, K, H, W) of x[:n], weak-branch logits (B - n, K, H, W) of x[n:])."""
        feat, size = self.encode(x), x.shape[-2:]
        if self.weak is None:
            logits = upsample(self.strong(feat), size)
            return logits[:n_strong], logits[n_strong:]
        return upsample(self.strong(feat[:n_strong]), size), upsample(self.weak(feat[n_strong:]), size)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Encoder parameters: the base learning rate."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Neck and branches: the learning rate times head_lr_mult."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]


def build_dual_branch(cfg, num_classes: int) -> DualBranchNet:
    """The SWDBN network of a Config (model.head is not used: the neck and branches replace it)."""
    backbone, input_norm = build_encoder(cfg.model)
    m = cfg.method
    return DualBranchNet(
        backbone, num_classes, cfg.model.head_channels, m.neck_depth, m.branch_depth, not m.single_branch, input_norm
    )


def build(cfg, info):
    model = build_dual_branch(cfg, info.num_classes)
    nets = {"model": model}
    # box proxies are fixed: only pseudo-labels and tag-restricted predictions need a teacher
    if cfg.method.weak_source != "boxes" and cfg.method.teacher == "ema":
        nets["teacher"] = copy.deepcopy(model).requires_grad_(False)
    return nets


@torch.no_grad()
def teacher_logits(nets, image: Tensor, cfg: Config) -> Tensor:
    """Strong-branch logits (B, K, H, W) of uint8 images from the teacher, in eval mode, without gradient."""
    if cfg.teacher == "ema":
        teacher = nets["teacher"].eval()
        return teacher(image)
    with evaluating(nets["model"]):
        return nets["model"](image)


def proxy(nets, image: Tensor, ids: list[str], mask: Tensor | None, cfg: Config, ctx) -> tuple[Tensor, Tensor]:
    """(label, conf) (B, H, W) of weak crops: the box proxy mask as read (conf 1 where labelled), or the teacher's
    argmax (restricted to each image's tags plus the background for tags)."""
    if cfg.weak_source == "boxes":
        return mask, (mask != IGNORE).float()
    logits = teacher_logits(nets, image, cfg)
    if cfg.weak_source == "tags":
        labels = unwrap(nets["model"]).weak_labels
        background = background_index(cfg.background, ctx.info.classes)
        allowed = tag_matrix(ids, labels.tags, ctx.info.num_classes, background, logits.device)
        conf, label = tag_proxy(logits, allowed)
    else:
        conf, label = pseudo_label(logits)
    return label, conf


def _check_prepared(nets, cfg: Config) -> None:
    if cfg.weak_source == "pseudo":
        return
    labels = unwrap(nets["model"]).weak_labels
    if labels is None or labels.source != cfg.weak_source:
        raise ConfigError(
            f"method.weak_source={cfg.weak_source}: the weak labels are prepared by swdbn.run; "
            "train with `semiseg train` / `semiseg bench` (or call swdbn.run), not fit() alone"
        )


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    _check_prepared(nets, cfg)
    model = nets["model"]
    l, u, u_mix = batch.l, batch.u, batch.u_mix
    n_l, (n_u, _, h, w) = l.image.shape[0], u.image.shape

    augment = cfg.weak_source == "pseudo" or cfg.augment_weak
    if augment and u_mix is not None:
        both = proxy(nets, torch.cat([u.image, u_mix.image]), u.ids + u_mix.ids, _cat(u.mask, u_mix.mask), cfg, ctx)
        (label, label_p), (conf, conf_p) = (t.split([n_u, u_mix.image.shape[0]]) for t in both)
    else:
        label, conf = proxy(nets, u.image, u.ids, u.mask, cfg, ctx)
    if augment:
        aug = cfg.strong
        s = strong_view(u.image, ctx.gen, aug)
        box = cutmix_box(n_u, h, w, ctx.gen, aug.cutmix_p, aug.mix_area, aug.mix_ratio, s.device)
        if u_mix is not None:
            partner_s, pad_p = strong_view(u_mix.image, ctx.gen, aug), u_mix.pad
        else:
            partner_s, label_p, conf_p, pad_p = roll(s), roll(label), roll(conf), roll(u.pad)
        image_w = mix(s, partner_s, box)
        label_w, conf_w, pad_w = cutmix_targets(label, conf, u.pad, label_p, conf_p, pad_p, box)
    else:
        image_w, label_w, conf_w, pad_w = u.image, label, conf, u.pad
    target = torch.where((conf_w >= cfg.tau) & ~pad_w, label_w, IGNORE)

    logits_x, logits_w = model.forward_branches(torch.cat([l.image, image_w]), n_l)
    loss_x = supervised_loss(logits_x, l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    loss_w = ce(logits_w, target)
    loss = loss_x + cfg.lam * loss_w
    logs = {
        "train/loss_x": loss_x.detach(),
        "train/loss_w": loss_w.detach(),
        "train/mask_ratio": ((target != IGNORE) & ~pad_w).sum() / (~pad_w).sum().clamp(min=1),
    }
    if cfg.weak_source != "boxes" and u.mask is not None:
        # u.mask is ground truth here (boxes replace it with the proxy): a diagnostic, never a target
        logs["train/pl_acc"] = label_accuracy(label, u.mask, confident(conf, cfg.tau) * (~u.pad))
    return StepOut(loss, logs)


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return torch.cat([a, b]) if a is not None and b is not None else None


def after_step(nets, cfg: Config, ctx) -> None:
    if "teacher" in nets:
        ema_update(nets["teacher"], unwrap(nets["model"]), mean_teacher_keep(ctx.step, cfg.ema_keep))


def weak_training_set(cfg, run_dir: Path, info):
    """(labeled dataset, weak dataset, WeakLabels): the weak images and their labels, read or derived from masks.

    Labels derived from masks are written to run_dir/weak_<kind>.txt (inspectable, the format `semiseg weak
    derive` writes) and read back on a rerun with the same settings.
    """
    from semiseg.data.datasets import resolve_train_split
    from semiseg.data.weak import BoxProxyDataset, derive, first_line, read_weak, select_ids, write_weak
    from semiseg.errors import DataError

    m = cfg.method
    labeled, unlabeled = resolve_train_split(cfg.data)
    weak = unlabeled.subset(select_ids(m.weak_ids, unlabeled.ids, cfg.data.split_seed, "method.weak_ids"))
    if m.weak_source == "pseudo":
        return labeled, weak, WeakLabels("pseudo")
    kind = m.weak_source
    background = background_index(m.background, info.classes)
    source = m.tags_file if kind == "tags" else m.boxes_file
    if source:
        labels = read_weak(source, kind, info.classes, weak.ids)
    else:
        path = run_dir / f"weak_{kind}.txt"
        header = (
            f"{kind} derived from the masks of {len(weak)} weak images: min_box_area={m.min_box_area} "
            f"background={m.background} weak_ids={m.weak_ids or 'all'}"
        )
        if first_line(path) == f"# {header}":
            labels = read_weak(path, kind, info.classes)
        else:
            labels = derive(weak, kind, background, m.min_box_area)
            write_weak(path, kind, labels, info.classes, header)
        source = str(path)
    kept = [i for i in weak.ids if i in labels]
    if not kept:
        raise DataError(f"{source}: none of the {len(weak)} weak images has {kind} (ids are file stems)")
    weak = weak.subset(kept)
    if kind == "boxes":
        return labeled, BoxProxyDataset(weak, labels, background, m.box_band), WeakLabels(kind)
    return labeled, weak, WeakLabels(kind, {i: labels[i] for i in kept})


def run(cfg, run_dir):
    """Gather the strong and weak images (reading or deriving weak labels), then fit; rerunning resumes."""
    from semiseg.data.datasets import dataset_info
    from semiseg.data.loader import Part
    from semiseg.engine.loop import TrainData, fit

    run_dir = Path(run_dir)
    info = dataset_info(cfg.data)
    labeled, weak, labels = weak_training_set(cfg, run_dir, info)
    print(f"swdbn: {len(labeled)} strong images, {len(weak)} weak images ({labels.source})")
    torch.manual_seed(cfg.train.seed)
    nets = build(cfg, info)
    nets["model"].weak_labels = labels
    train = TrainData([Part(labeled, repeat=max(cfg.data.repeat_labeled, 1))], [Part(weak)])
    return fit(cfg, run_dir, sys.modules[__name__], train=train, info=info, nets=nets)

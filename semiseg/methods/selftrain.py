"""The stages ST, ST++ and BST share: pseudo-labeling, ST++'s stability selection, the retraining lists.

A self-training method (semiseg.methods.st, semiseg.methods.bst) declares `stages(cfg)` by calling `stages` here
with how it pseudo-labels (TTA, fusion, noise) and how it predicts (plain, for the stability score);
semiseg.engine.run runs them (one folder each, resumable) and `summarize` adds the pseudo-label diagnostics to the
run's results.json. Neither method imports the other.

  ST:   1_teacher   2_label (every unlabeled image, best teacher)   3_student (labeled + all pseudo-labeled)
  ST++: 1_teacher (K snapshots)   2_select (stability; the top share is reliable)   3_label (reliable, best teacher)
        4_student1 (labeled + reliable)   5_relabel (unreliable, student 1)   6_student2 (labeled + all)

Budget: every training stage trains a FRESH network from the configured init for the preset's train.iters (or
train.epochs over that stage's own list: the labeled list for the teacher, the mixed list for a student), so ST costs
two trainings and ST++ three.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semiseg import atomic
from semiseg import config as config_mod
from semiseg.config import Config, ConfigError, MethodConfig
from semiseg.data.augment import StrongAugConfig, cutout, strong_view
from semiseg.data.datasets import MaskDecoder, Sample, SegDataset, index_image, resolve_train_split
from semiseg.data.loader import Part
from semiseg.data.splits import Item, format_items
from semiseg.engine import dist
from semiseg.engine.evaluate import to_unit
from semiseg.engine.log import RunLog
from semiseg.engine.loop import TrainData, amp_dtype, autocast, snapshot_name
from semiseg.engine.run import Stage, StageEnv, TrainStage, WorkStage
from semiseg.errors import DataError
from semiseg.ops import class_iou, confusion_matrix, stability_score

TEACHER, SELECT = "1_teacher", "2_select"
"""the stage folders `semiseg suggest` reads: teacher snapshots, stored stability scores"""
SCORES = "scores.json"
"""2_select: {id: stability in [0, 1]} in dataset order"""
PSEUDO_DIR, IDS_FILE, LIST_FILE = "pseudo", "ids.txt", "pseudo_labels.txt"
"""a label stage's outputs: index PNGs, the ids it labeled, an 'image pseudo_mask' list a user can inspect"""
DIAGNOSTIC_NOTE = "pseudo-label quality against the unlabeled images' ground truth: a diagnostic, never used to train"


@dataclass(frozen=True)
class SelfTrainConfig(MethodConfig):
    """Stage settings shared by the self-training methods (ST, ST++, BST)."""

    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    """SDA of the pseudo-labeled crops: colour jitter, grayscale, blur, then Cutout (cutmix_p, mix_area, mix_ratio)"""
    tta_scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)
    """pseudo-labeling test-time scales; softmax summed at the original size"""
    tta_flip: bool = True
    """pseudo-labeling: add the horizontal flip of every scale"""
    snapshots: int = 3
    """K teacher snapshots exported at iterations floor(jT/K), j = 1..K (ST++ stability, `semiseg suggest`)"""
    reliable_share: float = 0.5
    """ST++: share of the unlabeled images, most stable first, that the teacher labels (floor(N x share))"""
    batch_size: int = 0
    """crops per step per process in every training stage; 0 = data.batch_size"""
    small_split: int = 200
    """the teacher trains on 2 copies of a labeled list shorter than this (the reference's `ids * 2` below 200 ids,
    ST++ main.py); 0 = never"""

    def __post_init__(self):
        super().__post_init__()
        if not self.tta_scales or min(self.tta_scales) <= 0:
            raise ValueError(f"tta_scales must be positive scales, got {self.tta_scales}")
        if self.snapshots < 0 or self.snapshots == 1:
            raise ValueError(f"snapshots must be 0 or at least 2, got {self.snapshots}")
        if not 0.0 < self.reliable_share < 1.0:
            raise ValueError(f"reliable_share must be in (0, 1), got {self.reliable_share}")
        if self.batch_size < 0 or self.small_split < 0:
            raise ValueError(f"batch_size and small_split must be >= 0, got {self.batch_size}, {self.small_split}")


def augment_pseudo(
    image: torch.Tensor, mask: torch.Tensor, pseudo: torch.Tensor | None, gen: torch.Generator, aug: StrongAugConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """ST++'s SDA on the pseudo-labeled crops only: colour jitter, grayscale, blur, then Cutout (noise, mask IGNORE).

    image uint8 (B, 3, H, W), mask long (B, H, W), pseudo bool (B,) or None (no pseudo-labeled crop); the other
    crops are returned bit for bit.
    """
    if pseudo is None:
        return image, mask
    # the flags are B booleans: one tiny host read, and the ops below then draw parameters for these crops only
    idx = pseudo.detach().cpu().nonzero().flatten()
    if idx.numel() == 0:
        return image, mask
    idx = idx.to(image.device)
    x = strong_view(image.index_select(0, idx), gen, aug)
    x, m = cutout(x, mask.index_select(0, idx), gen, aug.cutmix_p, aug.mix_area, aug.mix_ratio)
    return image.index_copy(0, idx, x), mask.index_copy(0, idx, m)


def split_reliable(ids: Sequence[str], scores: dict[str, float], share: float) -> tuple[list[str], list[str]]:
    """(reliable, unreliable): the top floor(N x share) ids by score, descending; ties keep the order of `ids`
    (a stable sort, as the reference's); a NaN score counts as the lowest."""
    key = {i: (scores[i] if math.isfinite(scores[i]) else -math.inf) for i in ids}
    order = sorted(ids, key=lambda i: -key[i])
    n = math.floor(len(order) * share)
    return order[:n], order[n:]


def rank_least_stable(ids: Sequence[str], scores: dict[str, float]) -> list[tuple[str, float]]:
    """(id, score) pairs, least stable first; ties keep the order of `ids`; NaN (undefined) scores come first."""
    key = {i: (scores[i] if math.isfinite(scores[i]) else -math.inf) for i in ids}
    return [(i, scores[i]) for i in sorted(ids, key=lambda i: key[i])]


def class_counts(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore: int) -> torch.Tensor:
    """int64 (3, C): true positives, predicted and ground-truth pixel counts per class, over pixels where neither
    map is `ignore` (a prediction may carry IGNORE, e.g. BST's flip noise)."""
    target = gt.long().masked_fill(pred == ignore, ignore)
    cm = confusion_matrix(pred.long().masked_fill(pred == ignore, 0), target, num_classes, ignore)
    return torch.stack([cm.diag(), cm.sum(0), cm.sum(1)])


def quality(counts: torch.Tensor | Sequence, classes: Sequence[str], images: int) -> dict | None:
    """{'miou', 'acc', 'iou': {class: IoU}, 'images'} in percent from class_counts sums; None without images."""
    if images == 0:
        return None
    c = torch.as_tensor(counts, dtype=torch.float64)
    tp, gt = c[0], c[2]
    iou = class_iou(tp, c[1], gt)
    pct = lambda v: None if math.isnan(float(v)) else round(float(v) * 100, 2)  # noqa: E731
    return {
        "miou": pct(iou.nanmean()),
        "acc": pct(tp.sum() / gt.sum()) if gt.sum() > 0 else None,
        "iou": {name: pct(v) for name, v in zip(classes, iou)},
        "images": images,
    }


class PseudoLabeled(torch.utils.data.Dataset):
    """Unlabeled images whose masks are pseudo-label PNGs: ds[i] -> Sample(image, pseudo-label, id)."""

    def __init__(self, images: SegDataset, masks: Sequence[Path]):
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} pseudo-label files")
        self.images = images
        self.masks = list(masks)
        self.decode = MaskDecoder()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        sample = self.images[i]
        mask = self.decode(self.masks[i])
        if mask.shape != sample.image.shape[:2]:
            raise DataError(
                f"{self.masks[i]}: pseudo-label {mask.shape[1]}x{mask.shape[0]} differs from the image "
                f"{sample.image.shape[1]}x{sample.image.shape[0]}; delete this stage folder to label again"
            )
        return Sample(sample.image, mask, sample.id)


def images_only(dataset: SegDataset) -> SegDataset:
    """A copy of `dataset` whose items have no mask: ground truth of unlabeled images is never read for training."""
    out = copy.copy(dataset)
    out.items = [Item(it.image, None, it.id, it.source) for it in dataset.items]
    return out


def image_tensor(sample: Sample, device: torch.device) -> torch.Tensor:
    """A sample's image as float in [0, 1] (1, 3, H, W) on `device`; the networks normalise it."""
    # a copy: dataset images may be read-only views (torch warns on non-writable arrays)
    return to_unit(torch.from_numpy(np.array(sample.image)).to(device).permute(2, 0, 1)[None])


def snapshot_predictions(
    nets: Sequence[nn.Module],
    dataset: SegDataset,
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    device: torch.device,
    indices: Sequence[int],
    amp: Callable = contextlib.nullcontext,
) -> Iterator[tuple[Sample, torch.Tensor]]:
    """(sample, preds long (K, H, W)) per index: the plain predictions of the K nets, the last one the reference."""
    for i in indices:
        sample = dataset[i]
        x = image_tensor(sample, device)
        with amp():
            preds = torch.cat([predict(net, x) for net in nets])
        yield sample, preds


def _gather(obj: dict) -> dict:
    """The union of every rank's dict (one rank: the dict)."""
    if not dist.is_dist():
        return obj
    parts = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, obj)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def _sum_over_ranks(counts: torch.Tensor, images: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(class_counts (3, C), image count) summed over ranks in one collective (on the device: NCCL needs it)."""
    totals = dist.all_reduce_sum(torch.cat([counts.flatten(), counts.new_tensor([images])]).to(device)).cpu()
    return totals[:-1].view(counts.shape), int(totals[-1])


def _read_ids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class _Progress:
    """A line every ~10% of a stage's images, with the throughput."""

    def __init__(self, log: RunLog, what: str, total: int):
        self.log, self.what, self.total, self.start, self.done = log, what, total, time.perf_counter(), 0
        self.every = max(1, math.ceil(total / 10))

    def step(self) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            self.log.info(f"{self.what} {self.done}/{self.total} images, {rate:.2f} img/s")


@dataclass
class _SelfTraining:
    """The run's lists and the method's labeling functions, bound into the stages' data and work."""

    cfg: Config
    labeled: SegDataset
    unlabeled: SegDataset
    label: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
    """(net, x (1, 3, H, W) in [0, 1], CPU generator) -> pseudo-label long (1, H, W) (TTA, fusion, noise)"""
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(net, x) -> plain argmax long (1, H, W): the predictions compared by the stability score"""

    def teacher_data(self, env: StageEnv) -> TrainData:
        """The labeled list: 2 copies below method.small_split ids (the reference's), at least data.repeat_labeled."""
        copies = 2 if len(self.labeled) < self.cfg.method.small_split else 1
        return TrainData([Part(self.labeled, repeat=max(self.cfg.data.repeat_labeled, copies))])

    def student_data(self, env: StageEnv, label_stages: Sequence[str]) -> TrainData:
        """The labeled ids repeated ceil(|U'|/|L|) times, then the pseudo-labeled images of `label_stages` (the
        reference's list), the latter flagged pseudo."""
        listed = [(s, i) for s in label_stages for i in _read_ids(env.root / s / IDS_FILE)]
        masks = [env.root / s / PSEUDO_DIR / f"{i}.png" for s, i in listed]
        pseudo = PseudoLabeled(images_only(self.unlabeled.subset([i for _, i in listed])), masks)
        repeat = max(1, math.ceil(len(pseudo) / len(self.labeled)))
        return TrainData([Part(self.labeled, repeat=repeat), Part(pseudo, pseudo=True)])

    def label_stage(self, env: StageEnv, folder: Path, model_stage: str, ids: Callable[[], list[str]]) -> dict:
        """Pseudo-label `ids()` with the model of `model_stage` (self.label: TTA, no threshold) as index PNGs."""
        net, source = env.load(model_stage)
        ids = ids()
        dataset = self.unlabeled.subset(ids)
        out = folder / PSEUDO_DIR
        out.mkdir(parents=True, exist_ok=True)
        decode = MaskDecoder()
        c, ignore = env.info.num_classes, env.info.ignore_index
        counts, with_gt = torch.zeros(3, c, dtype=torch.int64), 0
        progress = _Progress(env.log, folder.name, len(dataset))
        dtype = amp_dtype(self.cfg, env.device)
        for i in dist.shard(len(dataset)):
            sample = dataset[i]
            path = out / f"{sample.id}.png"
            if path.is_file():  # labeled before an interruption: PNGs are written atomically
                label = torch.from_numpy(decode(path)).long()
            else:
                # a per-image seed: noisy labels do not depend on the rank count or on resuming
                gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + i)
                with autocast(env.device, dtype):
                    label = self.label(net, image_tensor(sample, env.device), gen)[0].cpu()
                image = index_image(label.to(torch.uint8).numpy(), env.info.palette)
                atomic.write_bytes(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
            if sample.mask is not None:
                counts += class_counts(label, torch.from_numpy(sample.mask), c, ignore)
                with_gt += 1
            progress.step()
        counts, with_gt = _sum_over_ranks(counts, with_gt, env.device)
        if dist.is_main():
            atomic.write_text(folder / IDS_FILE, "".join(f"{i}\n" for i in ids))
            items = [Item(it.image, out / f"{it.id}.png", it.id) for it in dataset.items]
            atomic.write_text(folder / LIST_FILE, format_items(items, self.cfg.data.root or "."))
        dist.barrier()
        return {
            "kind": "label",
            "model": source,
            "images": len(dataset),
            "tta": {"scales": list(self.cfg.method.tta_scales), "flip": self.cfg.method.tta_flip},
            "quality": quality(counts, env.info.classes, with_gt),
            "counts": counts.tolist(),
        }

    def select_stage(self, env: StageEnv, folder: Path) -> dict:
        """ST++ stage 2: stability of every unlabeled image across the teacher snapshots; split by score."""
        k = self.cfg.method.snapshots
        paths = [env.root / TEACHER / snapshot_name(j) for j in range(1, k + 1)]
        nets = [env.load_export(p) for p in paths]
        c, ignore = env.info.num_classes, env.info.ignore_index
        scores: dict[str, float] = {}
        per_image: dict[str, torch.Tensor] = {}
        progress = _Progress(env.log, folder.name, len(self.unlabeled))
        indices = dist.shard(len(self.unlabeled))
        dtype = amp_dtype(self.cfg, env.device)
        for sample, preds in snapshot_predictions(
            nets, self.unlabeled, self.predict, env.device, indices, lambda: autocast(env.device, dtype)
        ):
            scores[sample.id] = float(stability_score(preds, c))
            if sample.mask is not None:
                per_image[sample.id] = class_counts(preds[-1].cpu(), torch.from_numpy(sample.mask), c, ignore)
            progress.step()
        ids = self.unlabeled.ids
        scores = _gather(scores)
        reliable, unreliable = split_reliable(ids, scores, self.cfg.method.reliable_share)
        diagnostics = {}
        for name, half in (("reliable", reliable), ("unreliable", unreliable)):
            mine = [per_image[i] for i in half if i in per_image]
            summed = torch.stack(mine).sum(0) if mine else torch.zeros(3, c, dtype=torch.int64)
            total, images = _sum_over_ranks(summed, len(mine), env.device)
            diagnostics[name] = quality(total, env.info.classes, images)
        if dist.is_main():
            atomic.write_json(folder / SCORES, {i: scores[i] for i in ids})
            atomic.write_text(folder / "reliable_ids.txt", "".join(f"{i}\n" for i in reliable))
            atomic.write_text(folder / "unreliable_ids.txt", "".join(f"{i}\n" for i in unreliable))
        dist.barrier()
        values = [scores[i] for i in ids if math.isfinite(scores[i])]
        return {
            "kind": "select",
            "snapshots": [str(p.relative_to(env.root)) for p in paths],
            "images": len(ids),
            "reliable": len(reliable),
            "unreliable": len(unreliable),
            "score_mean": sum(values) / len(values) if values else None,
            "threshold": scores[reliable[-1]] if reliable else None,
            "teacher_quality": diagnostics,
        }


def stages(cfg: Config, label: Callable, predict: Callable) -> list[Stage]:
    """ST's three stages, or ST++'s six when cfg.method.plus, labeling with `label` and scoring with `predict`."""
    labeled, unlabeled = resolve_train_split(cfg.data)
    if len(unlabeled) == 0:
        raise ConfigError(f"method.name: {cfg.method.name} needs unlabeled images; data.unlabeled is empty")
    run = _SelfTraining(cfg, labeled, unlabeled, label, predict)
    train_cfg = cfg
    if cfg.method.batch_size:
        train_cfg = config_mod.replace(cfg, data={"batch_size": cfg.method.batch_size})
    k = cfg.method.snapshots
    teacher = TrainStage(TEACHER, run.teacher_data, k, train_cfg)

    def student(name: str, label_stages: Sequence[str]) -> TrainStage:
        return TrainStage(name, lambda env: run.student_data(env, label_stages), cfg=train_cfg)

    def labels(name: str, model_stage: str, ids: Callable[[StageEnv], list[str]]) -> WorkStage:
        return WorkStage(name, lambda env, folder: run.label_stage(env, folder, model_stage, lambda: ids(env)))

    if not cfg.method.plus:
        return [teacher, labels("2_label", TEACHER, lambda env: unlabeled.ids), student("3_student", ["2_label"])]
    return [
        teacher,
        WorkStage(SELECT, run.select_stage),
        labels("3_label", TEACHER, lambda env: _read_ids(env.root / SELECT / "reliable_ids.txt")),
        student("4_student1", ["3_label"]),
        labels("5_relabel", "4_student1", lambda env: _read_ids(env.root / SELECT / "unreliable_ids.txt")),
        student("6_student2", ["3_label", "5_relabel"]),
    ]


def summarize(env: StageEnv, summaries: dict[str, dict]) -> dict:
    """{"diagnostics": pseudo-label quality against ground truth per half (ST++) or overall (ST)} for results.json."""
    plus = env.cfg.method.plus
    out: dict = {"note": DIAGNOSTIC_NOTE}
    label_stages = {"3_label": "reliable", "5_relabel": "unreliable"} if plus else {"2_label": "all"}
    total, images = torch.zeros(3, env.info.num_classes, dtype=torch.int64), 0
    for stage, half in label_stages.items():
        summary = summaries.get(stage, {})
        if half != "all":
            out[half] = summary.get("quality")
        total += torch.as_tensor(summary.get("counts", total.tolist()))
        images += (summary.get("quality") or {}).get("images", 0)
    out["all"] = quality(total, env.info.classes, images)
    if plus:
        out["teacher_on_selection"] = summaries.get(SELECT, {}).get("teacher_quality")
    return {"diagnostics": out}

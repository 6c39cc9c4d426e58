"""Offline self-training as stages on the one loop: ST (3 stages), ST++ and BST (6 stages).

A method (semiseg.methods.st, semiseg.methods.bst) hands `run_stages` a `Recipe`: how to build a fresh network, its
per-batch train_step, and how it pseudo-labels (TTA) and predicts (plain, for the stability score). This module owns
the stages, so neither method imports the other. Every stage has its own folder under the run and a `done.json` marker
written last; rerunning the same command resumes at the first stage without one (fit resumes inside a training stage).
To redo a stage, delete its folder, those of every later stage and the root results.json.

  ST:   1_teacher   2_label (every unlabeled image, best teacher)   3_student (labeled + all pseudo-labeled)
  ST++: 1_teacher (K snapshots)   2_select (stability; the top share is reliable)   3_label (reliable, best teacher)
        4_student1 (labeled + reliable)   5_relabel (unreliable, student 1)   6_student2 (labeled + all)

Budget: every training stage trains a FRESH network from the configured init for the preset's train.iters (or
train.epochs over that stage's own list: the labeled list for the teacher, the mixed list for a student), so ST costs
two trainings and ST++ three. The run root receives config.yaml (the run's config), results.json (the final stage's
result, every stage's summary and the pseudo-label diagnostics), best.safetensors and last.safetensors (the final
stage's), which is what `semiseg bench` reads; its train_seconds is the sum over all stages, selection and labeling
included, and its steps the sum over the training stages.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semiseg import config as config_mod
from semiseg.config import Config, ConfigError, MethodConfig
from semiseg.data.augment import StrongAugConfig, cutout, strong_view
from semiseg.data.datasets import MaskDecoder, Sample, SegDataset, build_dataset, dataset_info, resolve_train_split
from semiseg.data.info import DatasetInfo
from semiseg.data.loader import Part
from semiseg.data.splits import Item, format_items, write_text_atomic
from semiseg.engine import checkpoint, dist
from semiseg.engine.evaluate import confusion_matrix, to_unit
from semiseg.engine.log import RunLog, format_duration
from semiseg.engine.loop import TrainData, amp_dtype, fit
from semiseg.errors import DataError
from semiseg.ops import stability_score
from semiseg.predict import index_image

DONE = "done.json"
"""a stage folder's completion marker, written last"""
TEACHER, SELECT = "1_teacher", "2_select"
"""the stage folders `semiseg suggest` reads: teacher snapshots, stored stability scores"""
SCORES = "scores.json"
"""2_select: {id: stability in [0, 1]} in dataset order"""
PSEUDO_DIR, IDS_FILE, LIST_FILE = "pseudo", "ids.txt", "pseudo_labels.txt"
"""a label stage's outputs: index PNGs, the ids it labeled, an 'image pseudo_mask' list a user can inspect"""
DIAGNOSTIC_NOTE = "pseudo-label quality against the unlabeled images' ground truth: a diagnostic, never used to train"


def snapshot_name(k: int) -> str:
    """File name of teacher snapshot k (1-based)."""
    return f"snapshot_{k}.safetensors"


def snapshot_steps(iters: int, k: int) -> list[int]:
    """Iterations floor(j * iters / k), j = 1..k (at least 1), after which the teacher snapshots are exported."""
    return [max(1, j * iters // k) for j in range(1, k + 1)]


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

    def __post_init__(self):
        super().__post_init__()
        if not self.tta_scales or min(self.tta_scales) <= 0:
            raise ValueError(f"tta_scales must be positive scales, got {self.tta_scales}")
        if self.snapshots < 0 or self.snapshots == 1:
            raise ValueError(f"snapshots must be 0 or at least 2, got {self.snapshots}")
        if not 0.0 < self.reliable_share < 1.0:
            raise ValueError(f"reliable_share must be in (0, 1), got {self.reliable_share}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {self.batch_size}")


@dataclass(frozen=True)
class Recipe:
    """What a self-training method plugs into the stages."""

    build: Callable[[Config, DatasetInfo], dict[str, nn.Module]]
    """fresh networks {"model": net} from the configured init (the method's build)"""
    train_step: Callable
    """the method's per-batch step; batch.l holds labeled and pseudo-labeled crops, batch.l.pseudo flags the latter"""
    label: Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
    """(net, x normalised (1, 3, H, W), CPU generator) -> pseudo-label long (1, H, W) (TTA, fusion, noise)"""
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(net, x) -> plain argmax long (1, H, W): the predictions compared by the stability score"""
    plus: bool
    """ST++'s six stages instead of ST's three"""
    ddp_find_unused: bool = False
    """some trained parameters are unused in a step (DDP must look for them)"""


class StageMethod:
    """The method object fit() runs in one training stage: the recipe's network and step, and the teacher snapshots
    (exported from after_step at the iterations of `snapshot_steps`, so the loop itself is untouched)."""

    TRAINED = ("model",)
    EVAL_NETS = ("model",)
    USES_UNLABELED = False

    def __init__(self, recipe: Recipe, snapshots: int = 0, folder: Path | None = None):
        self.build = recipe.build
        self.train_step = recipe.train_step
        self.DDP_FIND_UNUSED = recipe.ddp_find_unused
        self.snapshots = snapshots
        self.folder = folder

    def after_step(self, nets, cfg, ctx) -> None:
        if not self.snapshots or not dist.is_main():
            return
        done = ctx.step + 1
        for k, step in enumerate(snapshot_steps(ctx.iters, self.snapshots), start=1):
            if step == done:
                meta = {
                    "config": config_mod.to_dict(ctx.config),
                    "classes": list(ctx.info.classes),
                    "net": "model",
                    "palette": [list(c) for c in ctx.info.palette],
                    "step": done,
                    "snapshot": k,
                }
                checkpoint.export_model(self.folder / snapshot_name(k), nets["model"], meta)


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
    tp, pred, gt = c[0], c[1], c[2]
    iou = tp / (pred + gt - tp)
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
    autocast: Callable = contextlib.nullcontext,
) -> Iterator[tuple[Sample, torch.Tensor]]:
    """(sample, preds long (K, H, W)) per index: the plain predictions of the K nets, the last one the reference."""
    for i in indices:
        sample = dataset[i]
        x = image_tensor(sample, device)
        with autocast():
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


def _copy(src: Path, dst: Path) -> None:
    checkpoint.atomic_write_bytes(dst, lambda tmp: shutil.copyfile(src, tmp))


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
class _Pipeline:
    cfg: Config
    """the run's config (written to the run root)"""
    stage_cfg: Config
    """what every training stage trains with (cfg with method.batch_size applied)"""
    recipe: Recipe
    root: Path
    info: DatasetInfo
    labeled: SegDataset
    unlabeled: SegDataset
    val_set: SegDataset | None
    device: torch.device
    log: RunLog

    def stages(self) -> list[tuple[str, Callable[[Path], dict]]]:
        """(folder name, work) in order; work(folder) -> the stage's summary (written to folder/done.json)."""
        k = self.cfg.method.snapshots
        if not self.recipe.plus:
            return [
                (TEACHER, lambda d: self.train(d, [], snapshots=k)),
                ("2_label", lambda d: self.label(d, TEACHER, self.unlabeled.ids)),
                ("3_student", lambda d: self.train(d, ["2_label"])),
            ]
        return [
            (TEACHER, lambda d: self.train(d, [], snapshots=k)),
            (SELECT, self.select),
            ("3_label", lambda d: self.label(d, TEACHER, _read_ids(self.root / SELECT / "reliable_ids.txt"))),
            ("4_student1", lambda d: self.train(d, ["3_label"])),
            ("5_relabel", lambda d: self.label(d, "4_student1", _read_ids(self.root / SELECT / "unreliable_ids.txt"))),
            ("6_student2", lambda d: self.train(d, ["3_label", "5_relabel"])),
        ]

    def autocast(self):
        dtype = amp_dtype(self.cfg, self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def model_of(self, stage: str) -> tuple[nn.Module, str]:
        """The best (else last) export of a training stage, on the device, and its path relative to the root."""
        folder = self.root / stage
        path = folder / "best.safetensors"
        if not path.is_file():
            path = folder / "last.safetensors"
        _, net, _ = checkpoint.load_export(path)
        return net.to(self.device), str(path.relative_to(self.root))

    def train(self, folder: Path, pseudo_stages: Sequence[str], snapshots: int = 0) -> dict:
        """Fit a fresh network on the labeled list (+ the pseudo-labeled images of `pseudo_stages`)."""
        parts = [Part(self.labeled, repeat=max(self.cfg.data.repeat_labeled, 1))]
        n_pseudo = 0
        if pseudo_stages:
            listed = [(s, i) for s in pseudo_stages for i in _read_ids(self.root / s / IDS_FILE)]
            masks = [self.root / s / PSEUDO_DIR / f"{i}.png" for s, i in listed]
            pseudo = PseudoLabeled(images_only(self.unlabeled.subset([i for _, i in listed])), masks)
            n_pseudo = len(pseudo)
            # the reference's list: the labeled ids repeated ceil(|U'|/|L|) times, then the pseudo-labeled ids
            parts = [
                Part(self.labeled, repeat=max(1, math.ceil(n_pseudo / len(self.labeled)))),
                Part(pseudo, pseudo=True),
            ]
        fit(
            self.stage_cfg,
            folder,
            StageMethod(self.recipe, snapshots, folder),
            TrainData(parts),
            self.val_set,
            self.info,
        )
        dist.barrier()
        result = json.loads((folder / "results.json").read_text())
        summary = {"kind": "train", **result, "seconds": result.get("train_seconds", 0.0)}
        summary["list"] = {"labeled": len(self.labeled) * parts[0].repeat, "pseudo": n_pseudo}
        if snapshots:
            summary["snapshots"] = [snapshot_name(k) for k in range(1, snapshots + 1)]
        return summary

    def label(self, folder: Path, model_stage: str, ids: Sequence[str]) -> dict:
        """Pseudo-label `ids` with the model of `model_stage` (recipe.label: TTA, no threshold) as index PNGs."""
        net, source = self.model_of(model_stage)
        dataset = self.unlabeled.subset(ids)
        out = folder / PSEUDO_DIR
        out.mkdir(parents=True, exist_ok=True)
        decode = MaskDecoder()
        c, ignore = self.info.num_classes, self.info.ignore_index
        counts, with_gt = torch.zeros(3, c, dtype=torch.int64), 0
        progress = _Progress(self.log, folder.name, len(dataset))
        for i in dist.shard(len(dataset)):
            sample = dataset[i]
            path = out / f"{sample.id}.png"
            if path.is_file():  # labeled before an interruption: PNGs are written atomically
                label = torch.from_numpy(decode(path)).long()
            else:
                # a per-image seed: noisy labels do not depend on the rank count or on resuming
                gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + i)
                with self.autocast():
                    label = self.recipe.label(net, image_tensor(sample, self.device), gen)[0].cpu()
                image = index_image(label.to(torch.uint8).numpy(), self.info.palette)
                checkpoint.atomic_write_bytes(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
            if sample.mask is not None:
                counts += class_counts(label, torch.from_numpy(sample.mask), c, ignore)
                with_gt += 1
            progress.step()
        counts, with_gt = _sum_over_ranks(counts, with_gt, self.device)
        if dist.is_main():
            write_text_atomic(folder / IDS_FILE, "".join(f"{i}\n" for i in ids))
            items = [Item(it.image, out / f"{it.id}.png", it.id) for it in dataset.items]
            write_text_atomic(folder / LIST_FILE, format_items(items, self.cfg.data.root or "."))
        dist.barrier()
        return {
            "kind": "label",
            "model": source,
            "images": len(dataset),
            "tta": {"scales": list(self.cfg.method.tta_scales), "flip": self.cfg.method.tta_flip},
            "quality": quality(counts, self.info.classes, with_gt),
            "counts": counts.tolist(),
        }

    def select(self, folder: Path) -> dict:
        """ST++ stage 2: stability of every unlabeled image across the teacher snapshots; split by score."""
        k = self.cfg.method.snapshots
        paths = [self.root / TEACHER / snapshot_name(j) for j in range(1, k + 1)]
        nets = [checkpoint.load_export(p)[1].to(self.device) for p in paths]
        c, ignore = self.info.num_classes, self.info.ignore_index
        scores: dict[str, float] = {}
        per_image: dict[str, torch.Tensor] = {}
        progress = _Progress(self.log, folder.name, len(self.unlabeled))
        indices = dist.shard(len(self.unlabeled))
        for sample, preds in snapshot_predictions(
            nets, self.unlabeled, self.recipe.predict, self.device, indices, self.autocast
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
            total, images = _sum_over_ranks(summed, len(mine), self.device)
            diagnostics[name] = quality(total, self.info.classes, images)
        if dist.is_main():
            checkpoint.atomic_write_json(folder / SCORES, {i: scores[i] for i in ids})
            write_text_atomic(folder / "reliable_ids.txt", "".join(f"{i}\n" for i in reliable))
            write_text_atomic(folder / "unreliable_ids.txt", "".join(f"{i}\n" for i in unreliable))
        dist.barrier()
        values = [scores[i] for i in ids if math.isfinite(scores[i])]
        return {
            "kind": "select",
            "snapshots": [str(p.relative_to(self.root)) for p in paths],
            "images": len(ids),
            "reliable": len(reliable),
            "unreliable": len(unreliable),
            "score_mean": sum(values) / len(values) if values else None,
            "threshold": scores[reliable[-1]] if reliable else None,
            "teacher_quality": diagnostics,
        }

    def diagnostics(self, summaries: dict[str, dict]) -> dict:
        """Pseudo-label quality against ground truth per half (ST++) or overall (ST), when the images have it."""
        out: dict = {"note": DIAGNOSTIC_NOTE}
        label_stages = {"3_label": "reliable", "5_relabel": "unreliable"} if self.recipe.plus else {"2_label": "all"}
        total, images = torch.zeros(3, self.info.num_classes, dtype=torch.int64), 0
        for stage, half in label_stages.items():
            summary = summaries.get(stage, {})
            if half != "all":
                out[half] = summary.get("quality")
            total += torch.as_tensor(summary.get("counts", total.tolist()))
            images += (summary.get("quality") or {}).get("images", 0)
        out["all"] = quality(total, self.info.classes, images)
        if self.recipe.plus:
            out["teacher_on_selection"] = summaries.get(SELECT, {}).get("teacher_quality")
        return out

    def finish(self, summaries: dict[str, dict]) -> dict:
        """Copy the final stage's exports to the root and write the root results.json (read by `semiseg bench`)."""
        final_name = list(summaries)[-1]
        final = summaries[final_name]
        trains = [s for s in summaries.values() if s.get("kind") == "train"]
        results = {
            "method": self.cfg.method.name,
            "steps": sum(s.get("steps", 0) for s in trains),
            "best": final.get("best"),
            "last": final.get("last"),
            "train_seconds": round(sum(s.get("seconds", 0.0) for s in summaries.values()), 1),
            "images_per_second": final.get("images_per_second"),
            "peak_memory_mb": max((s.get("peak_memory_mb", 0.0) for s in trains), default=0.0),
            "eval_mode": final.get("eval_mode"),
            "val_split": final.get("val_split"),
            "final_stage": final_name,
            "stages": {name: {k: v for k, v in s.items() if k != "counts"} for name, s in summaries.items()},
            "diagnostics": self.diagnostics(summaries),
        }
        if dist.is_main():
            for name in ("best.safetensors", "last.safetensors"):
                if (self.root / final_name / name).is_file():
                    _copy(self.root / final_name / name, self.root / name)
            checkpoint.atomic_write_json(self.root / "results.json", results)
        dist.barrier()
        return results


def run_stages(cfg: Config, run_dir: str | Path, recipe: Recipe) -> dict:
    """Run (or resume) the ST / ST++ stages of `recipe` in `run_dir`; return the root results.json content."""
    root = Path(run_dir)
    if (root / "results.json").is_file():
        if dist.is_main():
            print(f"{root}: already finished; nothing to do")
        return json.loads((root / "results.json").read_text())
    device = dist.init(cfg.train.device)
    stage_cfg = cfg
    if cfg.method.batch_size:
        stage_cfg = config_mod.replace(cfg, data={"batch_size": cfg.method.batch_size})
    info = dataset_info(cfg.data)
    labeled, unlabeled = resolve_train_split(cfg.data)
    if len(unlabeled) == 0:
        raise ConfigError(f"method.name: {cfg.method.name} needs unlabeled images; data.unlabeled is empty")
    val_set = build_dataset(cfg.data, cfg.data.val_split) if cfg.data.val_split else None
    log = RunLog(root, tensorboard=False)
    if dist.is_main() and not (root / "config.yaml").is_file():
        checkpoint.atomic_write_text(root / "config.yaml", config_mod.dump(cfg))
    pipe = _Pipeline(cfg, stage_cfg, recipe, root, info, labeled, unlabeled, val_set, device, log)
    summaries: dict[str, dict] = {}
    try:
        for name, work in pipe.stages():
            folder = root / name
            if (folder / DONE).is_file():
                summaries[name] = json.loads((folder / DONE).read_text())
                log.info(f"{root}: stage {name} finished; skipped")
                continue
            log.info(f"{root}: stage {name}")
            start = time.perf_counter()
            summary = work(folder)
            summary.setdefault("seconds", round(time.perf_counter() - start, 1))
            if dist.is_main():
                checkpoint.atomic_write_json(folder / DONE, summary)
            dist.barrier()
            summaries[name] = summary
            log.info(f"{root}: stage {name} done in {format_duration(summary['seconds'])}")
        return pipe.finish(summaries)
    finally:
        log.close()

"""Evaluation: a dataset-level confusion matrix (one bincount per batch, all-reduced once) and the
inference modes of the field: whole image, sliding window, multi-scale + flip.

The protocol follows the reference code (METHODS.md 6.4): the confusion matrix is accumulated over the whole
split, per-class IoU = TP / (TP + FP + FN), mIoU = nan-mean over classes in percent, IGNORE pixels excluded.
Under torchrun every rank evaluates its own shard (`dist.shard`: no image padded or counted twice).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from semiseg.data.info import DatasetInfo
from semiseg.engine import dist
from semiseg.engine.checkpoint import unwrap
from semiseg.errors import DataError
from semiseg.ops import class_iou, confusion_matrix

EVAL_MODES = ("whole", "sliding", "multiscale", "center_crop")
"""modes accepted by evaluate(); predict() accepts all but center_crop, which also crops the mask"""


def metrics_from_confusion(cm: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """{'miou', 'iou': {class: IoU}, 'acc', 'macc'} in percent (2 decimals); IoU NaN for absent classes."""
    cm = cm.detach().to("cpu", torch.float64)
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix {tuple(cm.shape)} does not match {len(class_names)} class names")
    tp, gt = cm.diag(), cm.sum(1)
    iou = class_iou(tp, cm.sum(0), gt)
    class_acc = tp / gt
    total = cm.sum()
    return {
        "miou": _percent(iou.nanmean()),
        "iou": {name: _percent(v) for name, v in zip(class_names, iou)},
        "acc": _percent(tp.sum() / total) if total > 0 else math.nan,
        "macc": _percent(class_acc.nanmean()),
    }


def _percent(v: torch.Tensor) -> float:
    return round(float(v) * 100, 2)


def format_table(metrics: dict[str, Any]) -> str:
    """Per-class IoU table with class names, then mIoU and pixel accuracy (plain text, aligned)."""
    rows = [(name, v) for name, v in metrics["iou"].items()]
    rows += [("mIoU", metrics["miou"]), ("pixel acc", metrics["acc"])]
    width = max(len("class"), *(len(name) for name, _ in rows))
    rule = f"{'-' * width}  ------"
    lines = [f"{'class':<{width}}     IoU", rule]
    for i, (name, v) in enumerate(rows):
        if i == len(metrics["iou"]):
            lines.append(rule)
        lines.append(f"{name:<{width}}  {'n/a' if math.isnan(v) else f'{v:.2f}':>6}")
    return "\n".join(lines)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() under torch.no_grad() (yields the model); every submodule's train/eval flag is restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in flags:
            m.training = training


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float in [0, 1]; the model normalises them itself."""
    return image.float().div_(255) if image.dtype == torch.uint8 else image


def _forward(model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """float32 logits (B, C, H, W) at x's size."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        logits = model(x)
    if logits.shape[-2:] != x.shape[-2:]:
        logits = F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits.float()


def predict_whole(
    model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None = None, channels_last: bool = False
) -> torch.Tensor:
    """Logits (B, C, H, W) of the whole image x (B, 3, H, W) in one pass."""
    with evaluating(model):
        return _forward(model, x, amp_dtype, channels_last)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every `stride`, the last one snapped to the border."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def predict_sliding(
    model: nn.Module,
    x: torch.Tensor,
    window: int | tuple[int, int],
    num_classes: int,
    stride_ratio: float = 2 / 3,
    window_batch: int = 8,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Probabilities (B, C, H, W): softmax of `window`-sized crops, summed over overlaps, divided by counts.

    Stride = floor(window * stride_ratio); the last window touches the border; an image smaller than the
    window is padded with the network's input mean (zero once normalised). Up to `window_batch` crops go through
    the model at once. x: float in [0, 1].
    """
    wh, ww = (window, window) if isinstance(window, int) else window
    if wh <= 0 or ww <= 0:
        raise ValueError(f"sliding window must be positive, got {window}")
    b, _, h, w = x.shape
    pad = (0, max(ww - w, 0), 0, max(wh - h, 0))
    if any(pad):
        norm = getattr(unwrap(model), "input_norm", None)
        mean = norm.mean.to(x.device, x.dtype) if norm is not None else x.new_zeros(1, 3, 1, 1)
        x = F.pad(x - mean, pad) + mean
    hp, wp = x.shape[-2:]
    boxes = [
        (top, left)
        for top in _window_starts(hp, wh, max(1, int(wh * stride_ratio)))
        for left in _window_starts(wp, ww, max(1, int(ww * stride_ratio)))
    ]
    prob = x.new_zeros(b, num_classes, hp, wp)
    count = x.new_zeros(1, 1, hp, wp)
    per_call = max(1, window_batch // b)
    with evaluating(model):
        for i in range(0, len(boxes), per_call):
            chunk = boxes[i : i + per_call]
            crops = torch.cat([x[:, :, t : t + wh, l : l + ww] for t, l in chunk])
            out = _forward(model, crops, amp_dtype, channels_last).softmax(1)
            for (t, l), p in zip(chunk, out.split(b)):
                prob[:, :, t : t + wh, l : l + ww] += p
                count[:, :, t : t + wh, l : l + ww] += 1
    return (prob / count)[:, :, :h, :w]


def predict_multiscale(
    model: nn.Module,
    x: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Probabilities (B, C, H, W): the whole image at each scale (and flipped), softmax averaged at x's size."""
    h, w = x.shape[-2:]
    total = None
    with evaluating(model):
        for s in scales:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            views = [(xs, False), (xs.flip(-1), True)] if flip else [(xs, False)]
            for view, flipped in views:
                logits = _forward(model, view, amp_dtype, channels_last)
                if flipped:
                    logits = logits.flip(-1)
                if size != (h, w):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                total = logits.softmax(1) if total is None else total + logits.softmax(1)
    if total is None:
        raise ValueError("multiscale inference needs at least one scale")
    return total / (len(scales) * (2 if flip else 1))


def predict(
    model: nn.Module,
    x: torch.Tensor,
    mode: str = "whole",
    *,
    num_classes: int = 0,
    window: int | tuple[int, int] = 0,
    stride: float = 2 / 3,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Scores (B, C, H, W) of x (B, 3, H, W) by `mode`: whole -> logits; sliding, multiscale -> probabilities."""
    run = {"amp_dtype": amp_dtype, "channels_last": channels_last}
    modes = {
        "whole": lambda: predict_whole(model, x, **run),
        "sliding": lambda: predict_sliding(model, x, window, num_classes, stride_ratio=stride, **run),
        "multiscale": lambda: predict_multiscale(model, x, scales, flip, **run),
    }
    if mode not in modes:
        raise ValueError(f"unknown inference mode {mode!r}; choose from {', '.join(modes)}")
    if mode == "sliding" and (not window or num_classes <= 0):
        raise ValueError("sliding inference needs window > 0 and num_classes > 0")
    return modes[mode]()


def describe_mode(mode: str, window: int = 0, stride: float = 2 / 3, scales=(1.0,), flip=False) -> str:
    """Human-readable protocol, recorded with every result: 'sliding window=801 stride=534'."""
    if mode == "sliding":
        return f"sliding window={window} stride={max(1, int(window * stride))}"
    if mode == "multiscale":
        return f"multiscale scales={','.join(f'{s:g}' for s in scales)}" + (" flip" if flip else "")
    if mode == "center_crop":
        return f"center_crop {window}"
    return mode


def _center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """The central size x size region of an (H, W, ...) array (whole axis where it is shorter)."""
    h, w = a.shape[:2]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return a[top : top + size, left : left + size]


def _identity(item: Any) -> Any:
    return item


def _read(dataset: Sequence, indices: range, workers: int) -> Iterator[Any]:
    """dataset[i] for i in indices, decoded by `workers` loader processes when > 0."""
    if workers <= 0:
        return (dataset[i] for i in indices)
    subset = torch.utils.data.Subset(dataset, list(indices))
    return iter(torch.utils.data.DataLoader(subset, batch_size=None, num_workers=workers, collate_fn=_identity))


def _groups(items: Iterator[Any], batch_size: int) -> Iterator[list[Any]]:
    """Lists of at most batch_size items whose images have one size; every item in exactly one list."""
    pending: dict[tuple, list] = {}
    for item in items:
        key = (item.image.shape, item.mask.shape)
        group = pending.setdefault(key, [])
        group.append(item)
        if len(group) >= batch_size:
            yield pending.pop(key)
        # Many distinct sizes (VOC) would otherwise hold most of the split in memory.
        elif sum(len(g) for g in pending.values()) > 4 * batch_size:
            yield pending.pop(max(pending, key=lambda k: len(pending[k])))
    yield from pending.values()


def dataset_confusion(
    model: nn.Module,
    dataset: Sequence,
    info: DatasetInfo,
    mode: str = "whole",
    window: int = 0,
    stride: float = 2 / 3,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_images: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    workers: int = 0,
) -> tuple[torch.Tensor, int]:
    """(confusion matrix (C, C) int64 summed over ranks, number of images) of `model` on `dataset`."""
    mode = mode or info.eval_mode
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose from {', '.join(EVAL_MODES)}")
    if mode in ("sliding", "center_crop") and window <= 0:
        raise ValueError(f"{mode} evaluation needs window > 0")
    if isinstance(model, DistributedDataParallel):
        # DDP's forward would broadcast buffers, a collective that deadlocks when shards differ in length.
        model = model.module
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    c = info.num_classes
    n = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    cm = torch.zeros(c, c, dtype=torch.int64, device=device)
    images = 0
    with evaluating(model):
        for group in _groups(_read(dataset, dist.shard(n), workers), max(1, batch_size)):
            image = np.stack([it.image for it in group])
            mask = np.stack([it.mask for it in group])
            if mask.shape != image.shape[:3]:
                raise DataError(f"{group[0].id}: mask {mask.shape[1:]} and image {image.shape[1:3]} differ in size")
            if mode == "center_crop":
                image = np.stack([_center_crop(a, window) for a in image])
                mask = np.stack([_center_crop(a, window) for a in mask])
            x = to_unit(torch.from_numpy(image).to(device, non_blocking=True).permute(0, 3, 1, 2))
            target = torch.from_numpy(mask).to(device, non_blocking=True)
            scores = predict(
                model,
                x,
                "whole" if mode == "center_crop" else mode,
                num_classes=c,
                window=window,
                stride=stride,
                scales=scales,
                flip=flip,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
            )
            try:
                cm += confusion_matrix(scores.argmax(1), target, c, info.ignore_index)
            except ValueError as err:
                raise DataError(f"{', '.join(str(it.id) for it in group)}: mask has {err}") from None
            images += len(group)
    # One collective for the whole split: the image count rides along with the matrix.
    totals = dist.all_reduce_sum(torch.cat([cm.flatten(), cm.new_tensor([images])]))
    return totals[:-1].reshape(c, c).cpu(), int(totals[-1])


def evaluate(
    model: nn.Module,
    dataset: Sequence,
    info: DatasetInfo,
    mode: str = "whole",
    window: int = 0,
    stride: float = 2 / 3,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_images: int = 0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    workers: int = 0,
) -> dict[str, Any]:
    """Metrics of `model` on `dataset`: miou, iou per class, acc, macc, mode, protocol, images.

    Call it on every rank: each evaluates its shard and the counts are summed once. `mode` '' means the
    dataset's default; batch_size > 1 batches images of equal size; `workers` > 0 decodes in loader processes.
    """
    mode = mode or info.eval_mode
    cm, images = dataset_confusion(
        model, dataset, info, mode, window, stride, scales, flip, batch_size, device, max_images, amp_dtype,
        channels_last, workers,
    )  # fmt: skip
    metrics = metrics_from_confusion(cm, info.classes)
    metrics["mode"] = mode
    metrics["protocol"] = describe_mode(mode, window, stride, scales, flip)
    metrics["images"] = images
    return metrics


def evaluate_config(
    model: nn.Module,
    dataset: Sequence,
    info: DatasetInfo,
    cfg,
    device: torch.device | str | None = None,
    mode: str = "",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """`evaluate` with the settings of a run's Config (eval section, crop as default window); `mode` overrides."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return evaluate(
        model,
        dataset,
        info,
        mode=mode or cfg.eval.mode or info.eval_mode,
        window=cfg.eval.window or cfg.data.crop,
        stride=cfg.eval.stride,
        scales=cfg.eval.scales,
        flip=cfg.eval.flip,
        batch_size=cfg.eval.batch_size,
        device=device,
        max_images=cfg.eval.max_images,
        amp_dtype=amp_dtype,
        channels_last=cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and on_cuda),
    )

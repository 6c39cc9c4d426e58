"""Pure tensor operations shared by methods: pseudo-labels, confidence masks, CutMix targets.

Shapes: logits (B, C, H, W); label (B, H, W) long; conf (B, H, W) float; pad / box (B, H, W) bool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.data.info import IGNORE


def pseudo_label(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(conf, label): max softmax probability and argmax of detached logits; (B, H, W) each."""
    prob = logits.detach().float().softmax(dim=1)
    conf, label = prob.max(dim=1)
    return conf, label


def confident(conf: torch.Tensor, tau: float) -> torch.Tensor:
    """Float weight 1[conf >= tau]; tau = 0 keeps every pixel."""
    return (conf >= tau).float()


def mask_ratio(conf: torch.Tensor, tau: float, pad: torch.Tensor) -> torch.Tensor:
    """Share of non-padded pixels whose confidence passes tau (the field's "mask ratio"); scalar."""
    valid = ~pad
    return ((conf >= tau) & valid).sum() / valid.sum().clamp(min=1)


def label_accuracy(label: torch.Tensor, gt: torch.Tensor, weight: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """Accuracy of pseudo-labels against ground truth over pixels with weight > 0 and a known label; scalar.

    A diagnostic only (unlabeled ground truth is never used for training)."""
    sel = (weight > 0) & (gt != ignore)
    return ((label == gt) & sel).sum() / sel.sum().clamp(min=1)


def confident_class_counts(
    conf: torch.Tensor, label: torch.Tensor, gt: torch.Tensor, tau: float, num_classes: int, ignore: int = 255
) -> torch.Tensor:
    """Per-class pixel counts (3, K) int64 of pseudo-labels against ground truth; a diagnostic, like label_accuracy.

    conf, label (...) the confidence and class of each pixel's pseudo-label, gt (...) its true class (`ignore` pixels
    skipped). Rows: [0] ground-truth pixels of class k; [1] of those, confidently (conf >= tau) labeled k; [2] pixels
    confidently labeled k. Row 1 / row 0 is the share of class k that the unlabeled loss trains towards k (coverage),
    row 1 / row 2 the precision of the confident labels of k.
    """
    known = gt != ignore
    gt_k, sure = gt[known].long(), conf[known] >= tau
    pred = label[known].long()
    counts = torch.zeros(3, num_classes, dtype=torch.int64, device=gt.device)
    counts[0] = torch.bincount(gt_k, minlength=num_classes)[:num_classes]
    counts[1] = torch.bincount(gt_k[sure & (pred == gt_k)], minlength=num_classes)[:num_classes]
    counts[2] = torch.bincount(pred[sure], minlength=num_classes)[:num_classes]
    return counts


def roll(t: torch.Tensor) -> torch.Tensor:
    """The batch rolled by one sample: sample i's CutMix partner is sample i - 1 (train.mix_partner = roll)."""
    return t.roll(1, dims=0)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = IGNORE) -> torch.Tensor:
    """(C, C) int64 pixel counts, rows = ground truth, columns = prediction; `ignore` pixels excluded.

    pred, target: integer tensors of one shape on one device. A target value >= C other than `ignore` is a
    ValueError (a silently dropped label would hide a dataset bug).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    c = num_classes
    target = target.long()
    # Ignored pixels go to bucket 0 and real pairs to 1..C*C, so any label >= C lengthens the bincount.
    index = torch.where(target != ignore, c * target + pred.long() + 1, 0)
    counts = torch.bincount(index.flatten(), minlength=c * c + 1)
    if counts.numel() > c * c + 1:
        raise ValueError(f"label values outside 0..{c - 1} that are not the ignore index {ignore}")
    return counts[1:].reshape(c, c)


def class_iou(tp: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """IoU per class (C,) float64 = TP / (predicted + actual - TP) from per-class pixel counts (C,) each; NaN for a
    class absent from prediction and ground truth (0 / 0), which nan-means then leave out."""
    tp = tp.double()
    return tp / (predicted.double() + actual.double() - tp)


def map_miou(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mIoU in [0, 1] of label map `pred` against `ref` (same shape, integer): the nan-mean over classes present in
    either map (ST++'s meanIOU); pixels with a value outside 0..num_classes-1 in either map are left out; scalar."""
    c = num_classes
    valid = (ref >= 0) & (ref < c) & (pred >= 0) & (pred < c)
    cm = confusion_matrix(pred[valid], ref[valid], c)
    return class_iou(cm.diag(), cm.sum(0), cm.sum(1)).nanmean()


def stability_score(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """ST++ reliability of one image: preds (K, H, W) are the argmax maps of K checkpoints, the last one taken as
    the reference; the mean over k < K of map_miou(preds[k], preds[K-1]); scalar in [0, 1]."""
    if preds.shape[0] < 2:
        raise ValueError(f"the stability score needs at least 2 checkpoints, got {preds.shape[0]}")
    return torch.stack([map_miou(p, preds[-1], num_classes) for p in preds[:-1]]).mean()


def entropy(prob: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy in nats of probabilities along `dim` (0 log 0 = 0); that dim is removed."""
    return -torch.special.xlogy(prob, prob).sum(dim)


def entropy_weights(probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BST fusion weights (S, B, H, W) = softmax over the S branches of -H(p_s) / T, per pixel; probs (S, B, C, H, W).

    The more certain a branch is at a pixel, the more its prediction counts there.
    """
    return (-entropy(probs.float(), dim=2) / temperature).softmax(dim=0)


def fuse_branches(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel weighted sum over branches: probs (S, B, C, H, W), weights (S, B, H, W) -> (B, C, H, W)."""
    return (probs * weights.unsqueeze(2)).sum(0)


def noisy_argmax(prob: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """argmax over classes of prob (B, C, H, W) + N(0, std^2) i.i.d. per pixel and class; long (B, H, W).

    With a small std only near-tie pixels change label. `gen` is a CPU generator (the noise is drawn there, so a
    seed gives the same labels on every device); std = 0 is the plain argmax.
    """
    if std <= 0:
        return prob.argmax(1)
    eps = torch.randn(prob.shape, generator=gen, dtype=torch.float32).to(prob.device)
    return (prob.float() + std * eps).argmax(1)


def drop_pixels(label: torch.Tensor, rate: float, gen: torch.Generator, ignore: int = 255) -> torch.Tensor:
    """label (B, H, W) with each pixel independently set to `ignore` with probability `rate` (CPU generator)."""
    drop = (torch.rand(label.shape, generator=gen) < rate).to(label.device)
    return label.masked_fill(drop, ignore)


def input_noise(x: torch.Tensor, std: float, gen: torch.Generator, select: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, C, H, W) + N(0, std^2) per element on the samples where `select` (B,) bool is set (all when None)."""
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
    if select is not None:
        eps = eps * select.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x + std * eps


def class_aware_selection(prob: torch.Tensor, ratio: float = 0.96, thresh: float = 0.92) -> torch.Tensor:
    """DSSN's class-aware pseudo-label selection: bool (B, H, W) from probabilities prob (B, C, H, W).

    Per image and class c, with peak m_c = max over pixels of prob[c]: t_c = ratio * m_c if m_c > thresh else m_c;
    a pixel is kept if prob[c] > t_c for some c. Comparisons are strict, so a class whose peak is <= thresh keeps
    no pixel at all, and only the argmax class can pass (ratio < 1 and thresh >= 0.5).
    """
    prob = prob.detach().float()
    peak = prob.amax(dim=(2, 3), keepdim=True)
    t = torch.where(peak > thresh, peak * ratio, peak)
    return (prob > t).any(dim=1)


def fifo_push(bank: torch.Tensor, ptr: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One class's FIFO queue after pushing items (n, D) into bank (N, D) at slot ptr (long, 0-dim).

    Returns (new bank, new pointer): item k lands in slot (ptr + k) mod N, so past capacity the oldest entries
    are overwritten first and the pointer wraps; pushing n > N items keeps the last N. The input is not modified.
    """
    size, n = bank.shape[0], items.shape[0]
    if n == 0:
        return bank.clone(), ptr.clone()
    kept = items[-size:].to(bank.dtype)
    slots = (ptr + (n - kept.shape[0]) + torch.arange(kept.shape[0], device=bank.device)) % size
    return bank.index_copy(0, slots, kept), (ptr + n) % size


def sample_pixels(
    maps: list[torch.Tensor], valid: torch.Tensor, n: int, gen: torch.Generator
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Up to n random valid pixels per image, the same pixels from every map (B, D, h, w): ([(B, n', D), ...], valid
    (B, n')), n' = min(n, h w). valid (B, H, W) bool is resized to (h, w) (nearest); invalid pixels are drawn only
    when an image has fewer than n' valid ones, and are marked so. Drawn on the CPU from `gen`."""
    b, _, h, w = maps[0].shape
    valid = F.interpolate(valid[:, None].float(), size=(h, w), mode="nearest")[:, 0].bool().flatten(1)
    n = min(n, h * w)
    score = torch.rand(b, h * w, generator=gen).to(valid.device).masked_fill(~valid, 2.0)
    idx = score.topk(n, dim=1, largest=False).indices
    picked = [m.flatten(2).gather(2, idx[:, None].expand(-1, m.shape[1], -1)).transpose(1, 2) for m in maps]
    return picked, valid.gather(1, idx)


def resize_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) map of any dtype -> (B, *size), nearest (how the reference code downsamples labels to features)."""
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(x.dtype)


def pixels(feat: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The feature vectors (M, D) of feat (B, D, h, w) at the M pixels where (B, h, w) is set."""
    return feat.permute(0, 2, 3, 1)[where]


def subsample(n: int, limit: int, gen: torch.Generator, device) -> torch.Tensor | None:
    """Indices of a random subset of `limit` of n rows (CPU generator), or None to keep all (limit 0 or n <= limit)."""
    if limit <= 0 or n <= limit:
        return None
    return torch.randperm(n, generator=gen)[:limit].to(device)

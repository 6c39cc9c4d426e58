"""Losses: pure tensor functions. Shapes: logits (B, C, H, W), mask (B, H, W) long with IGNORE = 255."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.data.info import IGNORE
from semiseg.ops import pixels, subsample


def ce(logits: torch.Tensor, mask: torch.Tensor, ignore: int = IGNORE) -> torch.Tensor:
    """Cross-entropy averaged over non-ignored pixels of the batch (0 when every pixel is ignored)."""
    total = F.cross_entropy(logits.float(), mask, ignore_index=ignore, reduction="sum")
    return total / (mask != ignore).sum().clamp(min=1)


def ohem_ce(
    logits: torch.Tensor, mask: torch.Tensor, thresh: float = 0.7, min_kept: int = 200000, ignore: int = IGNORE
) -> torch.Tensor:
    """Online hard example mining CE (UniMatch/PSPNet): keep pixels whose ground-truth probability is at most
    max(thresh, the probability of the min_kept-th hardest valid pixel); average over the kept pixels."""
    logits = logits.float()
    valid = mask != ignore
    with torch.no_grad():
        prob = logits.softmax(1)
        target = mask.clone()
        target[~valid] = 0
        p_gt = prob.gather(1, target.unsqueeze(1)).squeeze(1)
        p_valid = p_gt[valid]
        threshold = torch.tensor(thresh, device=logits.device)
        if min_kept > 0 and p_valid.numel() > 0:
            kth = p_valid.kthvalue(min(min_kept, p_valid.numel())).values
            threshold = torch.maximum(threshold, kth)
        keep = valid & (p_gt <= threshold)
    target = mask.clone()
    target[~keep] = ignore
    return ce(logits, target, ignore)


def supervised_loss(logits: torch.Tensor, mask: torch.Tensor, criterion: str, thresh: float, min_kept: int):
    """The labeled term of every method: plain CE or OHEM CE."""
    if criterion == "ohem":
        return ohem_ce(logits, mask, thresh, min_kept)
    return ce(logits, mask)


def masked_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum of per-pixel CE x weight over the batch, divided by the count of valid (non-padded) pixels.

    UniMatch's normalisation: the denominator counts non-padded pixels, not confident ones, so the effective
    weight of the term scales with the share of confident pixels.
    logits (B, C, H, W); target (B, H, W) long (values on invalid pixels are ignored); weight (B, H, W) float
    (e.g. 1[conf >= tau]); valid (B, H, W) bool.
    """
    safe = target.clone()
    safe[(safe < 0) | (safe >= logits.shape[1])] = 0
    per_pixel = F.cross_entropy(logits.float(), safe, reduction="none")
    w = weight.float() * valid.float()
    return (per_pixel * w).sum() / valid.sum().clamp(min=1)


def softmax_mse(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean Teacher's consistency: the squared distance sum_c (softmax(logits) - target)^2 per pixel, averaged over
    the valid pixels; logits (B, C, H, W), target probabilities (B, C, H, W) (detach them), valid (B, H, W) bool."""
    per_pixel = (logits.float().softmax(1) - target.float()).square().sum(1)
    return (per_pixel * valid.float()).sum() / valid.sum().clamp(min=1)


def standardized_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """DSSN's alignment: MSE between per-pixel standardised logits, z = (x - mean_c) / std_c (unbiased std).

    a, b (B, C, H, W); both sides keep their gradient. Equals 2(C-1)/C * (1 - Pearson correlation) averaged over
    pixels. weight (B, H, W) (e.g. pixels where the two views share their content): a weighted mean over pixels.
    """

    def z(x):
        x = x.float()
        return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)

    per_pixel = (z(a) - z(b)).pow(2).mean(dim=1)
    if weight is None:
        return per_pixel.mean()
    w = weight.float()
    return (per_pixel * w).sum() / w.sum().clamp(min=1)


def paired_info_nce(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between two views' pixel embeddings, negatives from the same image.

    a, b (B, P, D): P sampled pixels per image, row p of a and of b is the same pixel (the positive pair); the
    other valid pixels of that image in the other view are the negatives. valid (B, P) bool. Cosine similarity
    over tau; the mean over valid anchors of both directions (0 when none).
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    w = valid.float()

    def one_way(sim):
        # invalid keys drop out of the softmax; invalid anchors get a finite dummy row and weight 0
        sim = sim.masked_fill(~valid[:, None, :], float("-inf")).masked_fill(~valid[:, :, None], 0.0)
        per_anchor = sim.logsumexp(dim=-1) - sim.diagonal(dim1=1, dim2=2)
        return (per_anchor * w).sum() / w.sum().clamp(min=1)

    sim = a @ b.transpose(1, 2) / tau
    return (one_way(sim) + one_way(sim.transpose(1, 2))) / 2


def _class_mean(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean over the classes present in labels (M,) of the per-class mean of values (M,); 0 when M = 0."""
    if values.numel() == 0:
        return values.sum()
    sums = values.new_zeros(num_classes).index_add(0, labels, values)
    counts = torch.bincount(labels, minlength=num_classes).to(values.dtype)
    present = (counts > 0).to(values.dtype)
    return (sums / counts.clamp(min=1) * present).sum() / present.sum()


def _limit(rows: list[torch.Tensor], limit: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    """The same random `limit` rows of every tensor (M, ...) when M > limit > 0 (CPU generator), else all."""
    idx = subsample(rows[0].shape[0], limit, gen, rows[0].device) if gen is not None else None
    return rows if idx is None else [r[idx] for r in rows]


def bank_info_nce(
    anchor: torch.Tensor,
    label: torch.Tensor,
    bank: torch.Tensor,
    bank_valid: torch.Tensor,
    tau: float = 0.1,
    limit: int = 0,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Pixel contrast against a per-class memory bank (CTT's high-level module).

    anchor (M, D) embeddings with class label (M,); bank (C, N, D) with bank_valid (C, N) marking filled slots.
    Each valid entry q+ of the anchor's class is a positive, every valid entry q- of another class a negative:
    loss = -log(e^{s(a,q+)/tau} / (e^{s(a,q+)/tau} + sum_q- e^{s(a,q-)/tau})), s = cosine similarity; averaged
    over positives, then over the anchors of a class, then over classes. Anchors whose class has no valid entry
    are skipped; 0 when no anchor is left. With limit > 0 and a generator, a random subset of `limit` anchors.
    """
    anchor, label = _limit([anchor, label], limit, gen)
    num_classes, size, dim = bank.shape
    has_pos = bank_valid.any(dim=1)[label]
    anchor, label = anchor[has_pos], label[has_pos]
    if anchor.shape[0] == 0:
        return anchor.sum() * 0.0
    sim = F.normalize(anchor.float(), dim=1) @ F.normalize(bank.float().reshape(-1, dim), dim=1).T / tau
    entry_class = torch.arange(num_classes, device=bank.device).repeat_interleave(size)
    entry_valid = bank_valid.reshape(-1)
    same = entry_class[None, :] == label[:, None]
    positive, negative = same & entry_valid[None, :], ~same & entry_valid[None, :]
    neg_lse = sim.masked_fill(~negative, float("-inf")).logsumexp(dim=1, keepdim=True)
    per_pair = torch.logaddexp(sim, neg_lse) - sim
    per_anchor = (per_pair * positive).sum(dim=1) / positive.sum(dim=1)
    return _class_mean(per_anchor, label, num_classes)


def peer_info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    label: torch.Tensor,
    bank: torch.Tensor,
    bank_valid: torch.Tensor,
    tau: float = 0.5,
    limit: int = 0,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """InfoNCE with one given positive per anchor and memory-bank negatives (CTT's low-level module).

    anchor, positive (M, D) (detach the positive to make it a target); label (M,): the class whose bank entries
    are NOT negatives (the peer's prediction); bank (C, N, D), bank_valid (C, N). Cosine similarity over tau;
    averaged over the anchors of a label, then over labels; 0 when M = 0. With limit > 0 and a generator, a random
    subset of `limit` anchors.
    """
    anchor, positive, label = _limit([anchor, positive, label], limit, gen)
    num_classes, size, dim = bank.shape
    if anchor.shape[0] == 0:
        return anchor.sum() * 0.0
    a = F.normalize(anchor.float(), dim=1)
    pos = (a * F.normalize(positive.float(), dim=1)).sum(dim=1) / tau
    sim = a @ F.normalize(bank.float().reshape(-1, dim), dim=1).T / tau
    entry_class = torch.arange(num_classes, device=bank.device).repeat_interleave(size)
    negative = (entry_class[None, :] != label[:, None]) & bank_valid.reshape(-1)[None, :]
    neg_lse = sim.masked_fill(~negative, float("-inf")).logsumexp(dim=1)
    per_anchor = torch.logaddexp(pos, neg_lse) - pos
    return _class_mean(per_anchor, label, num_classes)


def high_level_contrast(
    feat_l: torch.Tensor,
    gt: torch.Tensor,
    feat_u: torch.Tensor,
    label_u: torch.Tensor,
    sure: torch.Tensor,
    bank: torch.Tensor,
    bank_valid: torch.Tensor,
    tau: float,
    limit: int = 0,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """CTT's high-level term: bank_info_nce of the labeled pixels (feat_l (B, D, h, w) where gt (B, h, w) is not
    IGNORE, class gt) and the sure unlabeled pixels (feat_u where sure (B, h, w), class label_u) against the bank."""
    emb_l, emb_u = F.normalize(feat_l.float(), dim=1), F.normalize(feat_u.float(), dim=1)
    known = gt != IGNORE
    anchors = torch.cat([pixels(emb_l, known), pixels(emb_u, sure)])
    labels = torch.cat([gt[known], label_u[sure]])
    return bank_info_nce(anchors, labels, bank, bank_valid, tau, limit, gen)


def low_level_contrast(
    feat: torch.Tensor,
    peer_feat: torch.Tensor,
    peer_label: torch.Tensor,
    unsure: torch.Tensor,
    bank: torch.Tensor,
    bank_valid: torch.Tensor,
    tau: float,
    limit: int = 0,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """CTT's low-level term: peer_info_nce pulling feat (B, D, h, w) at the unsure pixels (B, h, w) towards the
    detached peer feature there (class peer_label (B, h, w)), the bank's other classes as negatives."""
    anchors = pixels(F.normalize(feat.float(), dim=1), unsure)
    positives = pixels(F.normalize(peer_feat.detach().float(), dim=1), unsure)
    return peer_info_nce(anchors, positives, peer_label[unsure], bank, bank_valid, tau, limit, gen)


def feature_cosine(feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean cosine similarity between the feature maps of every pair of branches, averaged over pixels; feats: S >= 2
    maps (B, D, h, w) of one size. BST's optional branch-diversity penalty (minimising it decorrelates branches)."""
    pairs = [(i, j) for i in range(len(feats)) for j in range(i + 1, len(feats))]
    if not pairs:
        raise ValueError("feature_cosine needs at least 2 feature maps")
    sims = [F.cosine_similarity(feats[i].float(), feats[j].float(), dim=1).mean() for i, j in pairs]
    return torch.stack(sims).mean()

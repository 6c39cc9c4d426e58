import math

import torch

from semiseg.losses import ce, masked_ce, ohem_ce
from semiseg.ops import confident, confident_class_counts, mask_ratio, pseudo_label


def nll(logit_row, k):
    return -math.log(math.exp(logit_row[k]) / sum(math.exp(v) for v in logit_row))


def test_ce_averages_over_non_ignored_pixels():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): pixel a = (2, 0), pixel b = (0, 1)
    mask = torch.tensor([[[0, 255]]])
    assert math.isclose(ce(logits, mask).item(), nll([2.0, 0.0], 0), rel_tol=1e-6)
    mask = torch.tensor([[[255, 255]]])
    assert ce(logits, mask).item() == 0.0


def test_masked_ce_normalises_by_valid_not_confident_pixels():
    # 2x2 unlabeled crop, 2 classes. Pixel (1,1) is padding; pixel (0,1) is below tau = 0.95.
    logits = torch.tensor([[[[4.0, 0.5], [0.0, 9.0]], [[0.0, 0.0], [5.0, 0.0]]]])  # (1, 2, 2, 2)
    conf, label = pseudo_label(logits)
    pad = torch.tensor([[[False, False], [False, True]]])
    weight = confident(conf, 0.95)
    assert weight.tolist() == [[[1.0, 0.0], [1.0, 1.0]]]
    # The student predicts other logits for the strong view.
    student = torch.tensor([[[[1.0, 2.0], [0.5, 3.0]], [[0.0, 1.0], [1.5, 3.0]]]])
    loss = masked_ce(student, label, weight, ~pad)
    expected = (nll([1.0, 0.0], 0) + nll([0.5, 1.5], 1)) / 3  # two confident valid pixels, three valid pixels
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(mask_ratio(conf, 0.95, pad).item(), 2 / 3, rel_tol=1e-6)
    # tau = 0 keeps every valid pixel.
    loss0 = masked_ce(student, label, confident(conf, 0.0), ~pad)
    expected0 = (nll([1.0, 0.0], 0) + nll([2.0, 1.0], 0) + nll([0.5, 1.5], 1)) / 3
    assert math.isclose(loss0.item(), expected0, rel_tol=1e-6)


def test_masked_ce_all_padded_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2)
    label = torch.zeros(1, 2, 2, dtype=torch.long)
    out = masked_ce(logits, label, torch.ones(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))
    assert out.item() == 0.0


def test_ohem_keeps_hard_pixels_or_min_kept():
    # 4 pixels, 2 classes, gt = 0 everywhere; p(gt) = sigmoid(z).
    z = torch.tensor([3.0, 1.0, -1.0, 0.0])
    logits = torch.stack([z, torch.zeros(4)]).view(1, 2, 1, 4)
    mask = torch.zeros(1, 1, 4, dtype=torch.long)
    p = torch.sigmoid(z)
    # thresh 0.7 keeps pixels with p <= 0.7: z = -1 and z = 0 (p = 0.27, 0.5).
    loss = ohem_ce(logits, mask, thresh=0.7, min_kept=0)
    expected = (-math.log(p[2]) - math.log(p[3])) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    # min_kept 3 raises the threshold to the 3rd smallest p (z = 1, p = 0.73).
    loss3 = ohem_ce(logits, mask, thresh=0.7, min_kept=3)
    expected3 = (-math.log(p[1]) - math.log(p[2]) - math.log(p[3])) / 3
    assert math.isclose(loss3.item(), expected3, rel_tol=1e-5)


def test_confident_class_counts_by_hand():
    # six pixels, three classes; the last pixel's truth is unknown (255) and must not count anywhere
    conf = torch.tensor([0.99, 0.96, 0.50, 0.97, 0.99, 0.99])
    label = torch.tensor([0, 1, 0, 2, 2, 1])
    gt = torch.tensor([0, 0, 0, 2, 1, 255])
    counts = confident_class_counts(conf, label, gt, 0.95, 3)
    assert counts.tolist() == [
        [3, 1, 1],  # truth: three 0s, one 1, one 2
        [1, 0, 1],  # confident and right: pixel 0 (class 0), pixel 3 (class 2); pixel 2 is right but unsure
        [1, 1, 2],  # confident labels among known pixels: 0 -> 0, 1 -> 1, 3 and 4 -> 2
    ]
    assert confident_class_counts(conf, label, gt, 0.0, 3)[1].tolist() == [2, 0, 1]  # tau 0: pixel 2 counts too

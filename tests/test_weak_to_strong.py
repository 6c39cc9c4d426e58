"""The weak-to-strong core: partners, strong views with their CutMix boxes, pasted pseudo-labels, the strong loss."""

import math

import pytest
import torch

from semiseg.data.augment import StrongAugConfig
from semiseg.data.batch import Batch, LabeledBatch, UnlabeledBatch
from semiseg.methods.weak_to_strong import (
    PseudoLabel,
    label_logs,
    partner_label,
    partners,
    strong_loss,
    strong_views,
)

NO_COLOUR = StrongAugConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, cutmix_p=1.0)
"""strong views that only CutMix: each view is the image with its partner pasted inside the box"""


def unlabeled(n=3, size=8, seed=0, ids="u"):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    pad = torch.zeros(n, size, size, dtype=torch.bool)
    pad[:, :, -1] = True
    mask = torch.randint(0, 4, (n, size, size), generator=g)
    return UnlabeledBatch(image, pad, [f"{ids}{i}" for i in range(n)], mask)


def labeled(n=3, size=8):
    return LabeledBatch(torch.zeros(n, 3, size, size, dtype=torch.uint8), torch.zeros(n, size, size, dtype=torch.long))


def test_partners_are_the_rolled_batch_or_the_second_stream():
    u = unlabeled()
    rolled = partners(Batch(labeled(), u))
    assert rolled.rolled and rolled.ids == ["u2", "u0", "u1"]  # image i's partner is image i - 1
    assert torch.equal(rolled.image[1], u.image[0]) and torch.equal(rolled.mask[0], u.mask[2])
    other = unlabeled(seed=1, ids="m")
    stream = partners(Batch(labeled(), u, other))
    assert not stream.rolled and stream.ids == ["m0", "m1", "m2"] and stream.image is other.image


@pytest.mark.parametrize("second_stream", [False, True])
def test_strong_views_paste_the_partner_inside_each_box(second_stream):
    u = unlabeled()
    partner = partners(Batch(labeled(), u, unlabeled(seed=1) if second_stream else None))
    views = strong_views(u, partner, 2, torch.Generator().manual_seed(0), NO_COLOUR)
    assert len(views.images) == len(views.boxes) == 2
    for image, box in zip(views.images, views.boxes):
        assert box.any(dim=(1, 2)).all()  # cutmix_p 1: every image has a box
        inside = box[:, None].expand_as(image)
        assert torch.equal(image[inside], partner.image[inside]) and torch.equal(image[~inside], u.image[~inside])
    assert not torch.equal(views.boxes[0], views.boxes[1])
    shared = strong_views(u, partner, 2, torch.Generator().manual_seed(0), NO_COLOUR, shared_box=True)
    assert torch.equal(shared.boxes[0], shared.boxes[1])


def test_the_same_generator_state_gives_the_same_views():
    u = unlabeled()
    partner = partners(Batch(labeled(), u))
    a = strong_views(u, partner, 2, torch.Generator().manual_seed(3), StrongAugConfig())
    b = strong_views(u, partner, 2, torch.Generator().manual_seed(3), StrongAugConfig())
    assert all(torch.equal(x, y) for x, y in zip(a.images + a.boxes, b.images + b.boxes))


def test_pasted_takes_label_confidence_and_padding_from_the_partner_inside_the_box():
    pl = PseudoLabel(
        torch.zeros(1, 3, 3, dtype=torch.long), torch.full((1, 3, 3), 0.5), torch.zeros(1, 3, 3, dtype=bool)
    )
    other = PseudoLabel(torch.full((1, 3, 3), 2), torch.full((1, 3, 3), 0.75), torch.ones(1, 3, 3, dtype=torch.bool))
    box = torch.zeros(1, 3, 3, dtype=torch.bool)
    box[0, 1:, :2] = True
    out = pl.pasted(other, box)
    assert out.label.tolist() == [[[0, 0, 0], [2, 2, 0], [2, 2, 0]]]
    assert out.conf.tolist() == [[[0.5, 0.5, 0.5], [0.75, 0.75, 0.5], [0.75, 0.75, 0.5]]]
    assert out.pad.tolist() == [[[False, False, False], [True, True, False], [True, True, False]]]


def test_partner_label_rolls_a_per_image_prediction_or_predicts_the_second_stream():
    u = unlabeled()
    logits = torch.randn(3, 4, 8, 8)
    pl = PseudoLabel.of(logits, u.pad)
    rolled = partners(Batch(labeled(), u))
    calls = []
    same = partner_label(pl, rolled, lambda x: calls.append(x) or logits)
    assert calls == [] and torch.equal(same.label, pl.label.roll(1, 0)) and torch.equal(same.pad, rolled.pad)
    stream = partners(Batch(labeled(), u, unlabeled(seed=1)))
    predicted = partner_label(pl, stream, lambda x: calls.append(x) or -logits)
    assert len(calls) == 1 and calls[0] is stream.image and torch.equal(predicted.label, (-logits).argmax(1))


def test_strong_loss_and_label_logs_by_hand():
    # 2 pixels, one padded; the kept one has logits (0, 0): CE = ln 2; divided by 1 non-padded pixel
    logits = torch.zeros(1, 2, 1, 2)
    target = PseudoLabel(torch.tensor([[[1, 0]]]), torch.tensor([[[0.9, 0.9]]]), torch.tensor([[[False, True]]]))
    assert math.isclose(float(strong_loss(logits, target, 0.95)), 0.0)  # below tau: nothing counts
    assert math.isclose(float(strong_loss(logits, target, 0.9)), math.log(2), rel_tol=1e-6)
    logs = label_logs(target, torch.tensor([[[1, 1]]]), 0.9)
    assert float(logs["train/mask_ratio"]) == 1.0 and float(logs["train/pl_acc"]) == 1.0
    assert "train/pl_acc" not in label_logs(target, None, 0.9)

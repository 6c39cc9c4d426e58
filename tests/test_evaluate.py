import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from semiseg.data.info import IGNORE, DatasetInfo
from semiseg.engine.evaluate import (
    dataset_confusion,
    evaluate,
    format_table,
    metrics_from_confusion,
    predict,
    predict_multiscale,
    predict_sliding,
    predict_whole,
)
from semiseg.errors import DataError
from semiseg.ops import confusion_matrix

INFO = DatasetInfo(name="toy", classes=("a", "b", "c", "d"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)))


@dataclass
class Item:
    image: np.ndarray
    mask: np.ndarray
    id: str


class Oracle(nn.Module):
    """Predicts class round(R / 40) from the un-normalised red channel: the ground truth of `toy_set`."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(3)  # gives the model a train/eval flag and a parameter (device)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        red = x[:, 0] * 255  # models take [0, 1] images and normalise them themselves
        k = (red / 40).round().long().clamp(0, self.num_classes - 1)
        return F.one_hot(k, self.num_classes).permute(0, 3, 1, 2).float()


def toy_set(sizes, noise: float = 0.0, seed: int = 0) -> list[Item]:
    """Images whose red channel encodes a class map; masks = that map with ignore pixels and `noise` relabels."""
    rng = np.random.default_rng(seed)
    items = []
    for i, (h, w) in enumerate(sizes):
        truth = rng.integers(0, 4, (h, w)).astype(np.uint8)
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        image[..., 0] = truth * 40
        mask = truth.copy()
        flip = rng.random((h, w)) < noise
        mask[flip] = rng.integers(0, 4, int(flip.sum()))
        mask[rng.random((h, w)) < 0.1] = IGNORE
        items.append(Item(image, mask, f"img{i}"))
    return items


def test_confusion_matrix_hand_computed():
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE], [2, 2, 0]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0], [0, 2, 0]])
    cm = confusion_matrix(pred, target, 4)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    m = metrics_from_confusion(cm, INFO.classes)
    assert m["iou"]["a"] == 50.0  # TP 2, FP 1, FN 1
    assert m["iou"]["b"] == 66.67  # TP 2, FP 1, FN 0
    assert m["iou"]["c"] == 66.67  # TP 2, FP 0, FN 1
    assert math.isnan(m["iou"]["d"])  # absent from prediction and target: excluded from the mean
    assert m["miou"] == 61.11
    assert m["acc"] == 75.0
    assert m["macc"] == 77.78


def test_confusion_matrix_uint8_inputs_do_not_overflow():
    target = torch.tensor([[2, 1]], dtype=torch.uint8)
    pred = torch.tensor([[1, 1]], dtype=torch.uint8)
    assert confusion_matrix(pred, target, 200)[2, 1] == 1


@pytest.mark.parametrize("bad_label", [3, 4, 254])
def test_confusion_matrix_rejects_out_of_range_labels(bad_label):
    target = torch.tensor([[0, bad_label]])
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.tensor([[0, 0]]), target, 3)


def test_miou_matches_numpy_reference():
    rng = np.random.default_rng(1)
    present = np.array([0, 1, 2, 4, 5])  # class 3 absent from prediction and target
    target = present[rng.integers(0, 5, (4, 30, 40))]
    pred = np.where(rng.random(target.shape) < 0.6, target, present[rng.integers(0, 5, target.shape)])
    target[rng.random(target.shape) < 0.15] = IGNORE
    names = [f"k{i}" for i in range(6)]
    m = metrics_from_confusion(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 6), names)

    valid = target != IGNORE
    ious = []
    for k in range(6):
        inter = np.sum((pred == k) & (target == k) & valid)
        union = np.sum(((pred == k) | (target == k)) & valid)
        ious.append(inter / union if union else np.nan)
    assert math.isnan(m["iou"]["k3"])
    np.testing.assert_allclose([m["iou"][n] for n in names], np.round(np.array(ious) * 100, 2))
    assert m["miou"] == round(float(np.nanmean(ious)) * 100, 2)
    assert m["acc"] == round(float(np.sum((pred == target) & valid) / valid.sum()) * 100, 2)


def test_format_table_lists_classes_aligned():
    m = metrics_from_confusion(torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]]), ("sky", "traffic light", "x"))
    table = format_table(m)
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert any(line.startswith("traffic light") and line.endswith("80.00") for line in lines)
    assert any(line.startswith("x ") and line.endswith("n/a") for line in lines)
    assert lines[-2].startswith("mIoU") and lines[-2].endswith("77.50")
    assert lines[-1].endswith("87.50")


def pixelwise_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 1), nn.Tanh(), nn.Conv2d(5, 5, 1))


@pytest.mark.parametrize("window", [16, (12, 20), 64])
def test_sliding_equals_whole_for_pixelwise_model(window):
    model = pixelwise_model()
    x = torch.randn(2, 3, 37, 53)
    whole = predict_whole(model, x).softmax(1)
    slid = predict_sliding(model, x, window, num_classes=5, window_batch=3)
    assert slid.shape == (2, 5, 37, 53)
    torch.testing.assert_close(slid, whole, atol=1e-6, rtol=1e-5)


def test_sliding_window_positions_and_batching():
    model = Oracle()
    x = torch.zeros(1, 3, 20, 30)
    predict_sliding(model, x, 12, num_classes=4, window_batch=4)
    # stride 8: rows 0, 8 (snapped to 20 - 12 = 8), columns 0, 8, 16, 18 -> 8 windows, 4 per call
    assert model.seen == [(4, 3, 12, 12), (4, 3, 12, 12)]


def test_multiscale_single_scale_equals_whole():
    model = pixelwise_model()
    x = torch.randn(1, 3, 21, 34)
    whole = predict_whole(model, x).softmax(1)
    torch.testing.assert_close(predict_multiscale(model, x, (1.0,), flip=False), whole)
    # a pixelwise model commutes with flips, so flip averaging leaves the result unchanged
    torch.testing.assert_close(predict_multiscale(model, x, (1.0,), flip=True), whole)
    two = predict_multiscale(model, x, (0.5, 1.5), flip=True)
    assert two.shape == whole.shape
    torch.testing.assert_close(two.sum(1), torch.ones(1, 21, 34))


def test_predict_dispatch_and_train_state_restored():
    model = pixelwise_model()
    model.train()
    model[1].eval()
    x = torch.randn(1, 3, 9, 9)
    out = predict(model, x, "sliding", num_classes=5, window=4)
    assert out.shape == (1, 5, 9, 9) and not out.requires_grad
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(ValueError, match="unknown inference mode"):
        predict(model, x, "tiles")


@pytest.mark.parametrize("mode", ["whole", "sliding", "multiscale"])
def test_evaluate_oracle_gives_100(mode):
    data = toy_set([(12, 16), (9, 13), (12, 16)])
    model = Oracle()
    model.train()
    m = evaluate(model, data, INFO, mode=mode, window=8, scales=(1.0,), flip=True)
    assert m["miou"] == 100.0 and m["acc"] == 100.0
    assert m["images"] == 3 and m["mode"] == mode
    assert set(m["iou"]) == set(INFO.classes)
    assert model.training


def test_evaluate_center_crop_counts_only_the_crop():
    data = toy_set([(12, 16)])
    cm, images = dataset_confusion(Oracle(), data, INFO, mode="center_crop", window=6)
    crop = data[0].mask[3:9, 5:11]
    assert images == 1
    assert int(cm.sum()) == int((crop != IGNORE).sum())
    assert int(cm.trace()) == int(cm.sum())


def test_batched_evaluation_counts_the_same_as_batch_one():
    data = toy_set([(12, 16), (9, 13), (12, 16), (12, 16), (9, 13), (7, 7), (12, 16)], noise=0.3)
    model = Oracle()
    one, n1 = dataset_confusion(model, data, INFO, batch_size=1)
    model.seen.clear()
    three, n3 = dataset_confusion(model, data, INFO, batch_size=3)
    assert n1 == n3 == 7
    assert torch.equal(one, three)
    assert sorted(s[0] for s in model.seen) == [1, 1, 2, 3]  # 4 images of 12x16 -> 3 + 1, 2 of 9x13, 1 of 7x7
    expected = np.zeros((4, 4), np.int64)
    for item in data:
        valid = item.mask != IGNORE
        np.add.at(expected, (item.mask[valid], item.image[..., 0][valid] // 40), 1)
    assert one.tolist() == expected.tolist()
    assert 0 < evaluate(model, data, INFO)["miou"] < 100


def test_evaluate_max_images_and_bad_mask():
    data = toy_set([(5, 5)] * 4)
    assert evaluate(Oracle(), data, INFO, max_images=2)["images"] == 2
    data[1].mask[0, 0] = 7
    with pytest.raises(DataError, match="img1"):
        evaluate(Oracle(), data, INFO)

"""Weak labels: box proxy masks, derivation from masks, readers and writers, tag-restricted proxies, the CLI."""

import json

import numpy as np
import pytest
import torch

from semiseg.cli import main
from semiseg.data.datasets import Sample, build_dataset, resolve_train_split
from semiseg.data.info import IGNORE
from semiseg.data.weak import (
    Box,
    BoxProxyDataset,
    background_index,
    box_proxy_mask,
    boxes_from_mask,
    component_boxes,
    format_boxes,
    format_tags,
    read_boxes,
    read_tags,
    select_ids,
    tag_matrix,
    tag_proxy,
    tags_from_mask,
)
from semiseg.errors import DataError
from semiseg.methods import load_config

CLASSES = ("background", "cat", "dog", "traffic light")
X = IGNORE


def test_box_proxy_mask_hand_made():
    # A: 10x10 at the corner, band 0.4 x half-size 5 = 2 px; B: 5x5, smaller, on top, band 1 px; C crosses the border.
    boxes = [Box(1, 0, 0, 10, 10), Box(2, 6, 4, 11, 9), Box(3, 13, 9, 20, 12)]
    out = box_proxy_mask(boxes, 12, 16, background=0, band=0.4)
    want = np.zeros((12, 16), np.uint8)
    want[0:10, 0:10] = X
    want[2:8, 2:8] = 1
    want[4:9, 6:11] = X
    want[5:8, 7:10] = 2
    # C: 7x3, band 1.4 x 0.6 px: full rows 9..11 cols 13..15 (clipped); core x in [14.4, 18.6), y in [9.6, 11.4)
    want[9:12, 13:16] = X
    want[10:11, 14:16] = 3
    np.testing.assert_array_equal(out, want)


def test_box_proxy_mask_order_band_zero_and_no_background():
    big, small = Box(1, 0, 0, 4, 4), Box(2, 1, 1, 3, 3)
    for order in ([big, small], [small, big]):
        out = box_proxy_mask(order, 5, 5, background=None, band=0.0)
        want = np.full((5, 5), X, np.uint8)
        want[0:4, 0:4] = 1
        want[1:3, 1:3] = 2
        np.testing.assert_array_equal(out, want)


def test_component_boxes_eight_connected():
    b = np.zeros((6, 8), bool)
    b[0, 0:3] = True  # run, then a diagonal step down-right joins it
    b[1, 3] = True
    b[2, 3:5] = True
    b[4:6, 6:8] = True  # separate 2x2 block
    b[5, 0] = True  # single pixel
    comps = component_boxes(b)
    assert comps == [(0, 0, 5, 3, 6), (6, 4, 8, 6, 4), (0, 5, 1, 6, 1)]
    assert component_boxes(np.zeros((3, 3), bool)) == []


def test_component_boxes_u_shape_merges_late():
    b = np.zeros((4, 5), bool)
    b[0:3, 0] = True
    b[0:3, 4] = True
    b[3, 0:5] = True
    assert component_boxes(b) == [(0, 0, 5, 4, 11)]


def test_boxes_and_tags_from_mask():
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:3] = 1  # cat, 6 px
    mask[5:8, 5:8] = 1  # cat, 9 px
    mask[3, 3] = 2  # dog, 1 px: below min_area 2
    mask[7, 0] = X
    mask[6, 0] = 9  # out of range: no box, no tag
    boxes = boxes_from_mask(mask, 4, min_area=2, exclude=0)
    assert boxes == (Box(1, 0, 0, 3, 2), Box(1, 5, 5, 8, 8))
    assert boxes_from_mask(mask, 4, min_area=1, exclude=None)[-1] == Box(2, 3, 3, 4, 4)
    assert Box(0, 0, 0, 8, 8) in boxes_from_mask(mask, 4, min_area=1, exclude=None)
    assert tags_from_mask(mask, 4, exclude=0) == frozenset({1, 2})
    assert tags_from_mask(mask, 4) == frozenset({0, 1, 2})
    assert tags_from_mask(mask, 4, exclude=0, min_pixels=2) == frozenset({1})


def test_read_tags_text_json_and_errors(tmp_path):
    text = tmp_path / "tags.txt"
    text.write_text("# comment\nimg1 cat traffic_light\nimg2\nimg3 dog cat  # trailing\n")
    assert read_tags(text, CLASSES) == {"img1": {1, 3}, "img2": frozenset(), "img3": {1, 2}}
    js = tmp_path / "tags.json"
    js.write_text(json.dumps({"a": ["cat", "traffic light"], "b": []}))
    assert read_tags(js, CLASSES) == {"a": {1, 3}, "b": frozenset()}
    bad = tmp_path / "bad.txt"
    bad.write_text("img1 cat\nimg2 horse\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: unknown class 'horse'"):
        read_tags(bad, CLASSES)
    dup = tmp_path / "dup.txt"
    dup.write_text("img1 cat\nimg1 dog\n")
    with pytest.raises(DataError, match=r"dup\.txt:2: image 'img1' is listed again \(first at .*dup\.txt:1\)"):
        read_tags(dup, CLASSES)
    numbers = tmp_path / "boxes_as_tags.txt"
    numbers.write_text("img1 cat 0 0 4 4\n")
    with pytest.raises(DataError, match="unknown class '0'"):
        read_tags(numbers, CLASSES)


def test_read_boxes_text_json_folder_voc_and_errors(tmp_path):
    text = tmp_path / "boxes.txt"
    text.write_text("img1 cat 0 0 4 5\nimg1 dog 1.5 2 3 4\nimg2\n")
    assert read_boxes(text, CLASSES) == {"img1": (Box(1, 0, 0, 4, 5), Box(2, 1.5, 2, 3, 4)), "img2": ()}
    js = tmp_path / "boxes.json"
    js.write_text(json.dumps({"a": [["traffic_light", 1, 2, 3, 4]]}))
    assert read_boxes(js, CLASSES) == {"a": (Box(3, 1, 2, 3, 4),)}
    folder = tmp_path / "ann"
    folder.mkdir()
    (folder / "p1.txt").write_text("cat 0 0 2 2\n")
    (folder / "p2.xml").write_text(
        "<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax>"
        "</bndbox></object><object><name>cat</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>6</xmax><ymax>6</ymax>"
        "</bndbox></object></annotation>"
    )
    voc = {"p1": (Box(1, 0, 0, 2, 2),), "p2": (Box(2, 0, 1, 10, 20), Box(1, 4, 4, 6, 6))}
    assert read_boxes(folder, CLASSES) == voc
    assert read_boxes(folder, CLASSES, ids=["p2", "nope"]) == {"p2": voc["p2"]}
    assert read_tags(folder, CLASSES) == {"p1": {1}, "p2": {1, 2}}
    for line, match in [
        ("img1 cat 4 0 2 5", r"bad\.txt:1: expected 0 <= x0 < x1"),
        ("img1 cat 0 0 4", r"bad\.txt:1: expected 'image_id class x0 y0 x1 y1', got 5 fields"),
        ("img1 cat 0 0 4 x", r"bad\.txt:1: box coordinates must be numbers"),
        ("img1 cow 0 0 4 4", r"bad\.txt:1: unknown class 'cow'"),
    ]:
        (tmp_path / "bad.txt").write_text(line + "\n")
        with pytest.raises(DataError, match=match):
            read_boxes(tmp_path / "bad.txt", CLASSES)
    with pytest.raises(DataError, match=r"missing\.txt: file not found"):
        read_boxes(tmp_path / "missing.txt", CLASSES)


def test_write_read_roundtrip(tmp_path):
    boxes = {"a": (Box(1, 0, 0, 4, 5), Box(3, 1.5, 2, 3, 4)), "b": ()}
    (tmp_path / "b.txt").write_text(format_boxes(boxes, CLASSES, header="made by a test"))
    assert read_boxes(tmp_path / "b.txt", CLASSES) == boxes
    tags = {"a": frozenset({3, 1}), "b": frozenset()}
    (tmp_path / "t.txt").write_text(format_tags(tags, CLASSES))
    assert (tmp_path / "t.txt").read_text() == "a cat traffic_light\nb\n"
    assert read_tags(tmp_path / "t.txt", CLASSES) == tags


def test_background_index():
    assert background_index("auto", CLASSES) == 0
    assert background_index("auto", ("sky", "road")) is None
    assert background_index("", CLASSES) is None
    assert background_index("dog", CLASSES) == 2
    with pytest.raises(DataError, match="method.background: unknown class 'cow'"):
        background_index("cow", CLASSES)


def test_tag_proxy_restricts_and_renormalises():
    logits = torch.zeros(2, 4, 1, 2)
    logits[0, :, 0, 0] = torch.tensor([0.0, 1.0, 3.0, 0.0])  # dog is best overall but image 0 is not tagged dog
    logits[0, :, 0, 1] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    allowed = tag_matrix(["a", "b"], {"a": {1}, "b": set()}, 4, background=None)
    allowed[1] = False  # an image with no allowed class at all
    conf, label = tag_proxy(logits, allowed)
    assert label[0].tolist() == [[1, 1]] and conf[0].tolist() == [[1.0, 1.0]]
    assert conf[1].tolist() == [[0.0, 0.0]]
    with_bg = tag_matrix(["a"], {"a": {1}}, 4, background=0)
    assert with_bg.tolist() == [[True, True, False, False]]
    conf, label = tag_proxy(logits[:1], with_bg)
    e = torch.exp(torch.tensor(1.0))
    assert label.tolist() == [[[1, 0]]]
    torch.testing.assert_close(conf[0, 0], torch.stack([e / (1 + e), e**2 / (e**2 + 1)]))
    with pytest.raises(DataError, match="'c' has no tags"):
        tag_matrix(["c"], {"a": {1}}, 4)


def test_select_ids(tmp_path):
    ids = [f"i{k}" for k in range(10)]
    assert select_ids("", ids) == ids
    picked = select_ids("3", ids, seed=1)
    assert len(picked) == 3 and picked == [i for i in ids if i in picked] and picked == select_ids("3", ids, seed=1)
    assert len(select_ids("1/2", ids)) == 5
    (tmp_path / "ids.txt").write_text("images/i7.png masks/i7.png\ni2\n")
    assert select_ids(str(tmp_path / "ids.txt"), ids) == ["i2", "i7"]
    (tmp_path / "ids.txt").write_text("i2\nx9\n")
    with pytest.raises(DataError, match=r"ids\.txt:2: .*'x9' is not among the 10"):
        select_ids(str(tmp_path / "ids.txt"), ids)


class FakeBase:
    resize = 0.5
    ids = ["a"]

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return Sample(np.zeros((5, 8, 3), np.uint8), np.zeros((5, 8), np.uint8), "a")


def test_box_proxy_dataset_scales_boxes_with_the_image():
    ds = BoxProxyDataset(FakeBase(), {"a": (Box(2, 4, 2, 12, 8),)}, background=0, band=0.0)
    mask = ds[0].mask
    want = np.zeros((5, 8), np.uint8)
    want[1:4, 2:6] = 2
    np.testing.assert_array_equal(mask, want)
    with pytest.raises(DataError, match="'a' has no boxes"):
        BoxProxyDataset(FakeBase(), {}, background=0)


def test_cli_weak_derive_matches_the_masks(tmp_path, tiny_overrides, capsys):
    cfg = load_config(None, tiny_overrides)
    out = tmp_path / "boxes.txt"
    args = ["weak", "derive", "synthetic", "--kind", "boxes", "--ids", "5", "--out", str(out), "--min-area", "4"]
    assert main(args + ["--set", *tiny_overrides]) == 0
    assert "boxes of 5 images" in capsys.readouterr().out
    _, unlabeled = resolve_train_split(cfg.data)
    boxes = read_boxes(out, unlabeled.info.classes)
    assert len(boxes) == 5 and set(boxes) <= set(unlabeled.ids)
    for image_id, got in boxes.items():
        mask = unlabeled.subset([image_id]).load(0).mask
        assert got == boxes_from_mask(mask, unlabeled.info.num_classes, 4, exclude=0)
    assert sum(len(b) for b in boxes.values()) > 0

    tags_out = tmp_path / "tags.txt"
    assert main(["weak", "derive", "synthetic", "--kind", "tags", "--ids", "all", "--out", str(tags_out), "--set"]
                + tiny_overrides) == 0  # fmt: skip
    tags = read_tags(tags_out, unlabeled.info.classes)
    train = build_dataset(cfg.data, "train")
    assert list(tags) == train.ids
    assert tags[train.ids[0]] == tags_from_mask(train.load(0).mask, train.info.num_classes, exclude=0)
    assert main(["weak", "derive", "synthetic", "--kind", "tags", "--ids", str(tmp_path / "none.txt"), "--out",
                 str(tags_out), "--set"] + tiny_overrides) == 2  # fmt: skip
    assert "none.txt: file not found" in capsys.readouterr().err

"""The embedded synthetic dataset: determinism, class coverage, colour not a class cue, export, speed."""

from __future__ import annotations

import numpy as np
import pytest

from semiseg.config import DataConfig
from semiseg.data.datasets import SyntheticDataset, build_dataset, dataset_info
from semiseg.data.synthetic import CLASSES, SYNTHETIC, describe, parse_name, render, sample_name, write_folder
from semiseg.errors import DataError
from semiseg.methods import load_config


def test_same_seed_gives_identical_arrays():
    a_img, a_mask = render(64, 3, "train", 7)
    b_img, b_mask = render(64, 3, "train", 7)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert a_img.dtype == np.uint8 and a_img.shape == (64, 64, 3) and a_mask.shape == (64, 64)


def test_index_split_and_seed_change_the_scene():
    base_img, base_mask = render(64, 3, "train", 7)
    for other in (render(64, 3, "train", 8), render(64, 3, "val", 7), render(64, 4, "train", 7)):
        assert not np.array_equal(base_img, other[0])
        assert not np.array_equal(base_mask, other[1])


def test_every_class_appears_and_labels_are_in_range():
    seen = np.zeros(len(CLASSES), int)
    for i in range(30):
        _, mask = render(48, 0, "train", i)
        assert mask.max() < len(CLASSES)
        seen += np.bincount(mask.ravel(), minlength=len(CLASSES)) > 0
    assert (seen >= 5).all(), seen
    assert seen[0] == 30


def test_colour_alone_does_not_identify_a_class():
    """The mean RGB colour of one class varies widely across images (hue is a cue, saturation, value and
    lighting are random, neighbouring class hues overlap)."""
    means = {c: [] for c in range(1, len(CLASSES))}
    for i in range(40):
        img, mask = render(48, 0, "train", i)
        for c in np.unique(mask[mask > 0]).tolist():
            means[c].append(img[mask == c].mean(0))
    for c, m in means.items():
        assert len(m) >= 5, CLASSES[c]
        assert np.asarray(m).std(0).mean() > 30, CLASSES[c]


def test_scene_is_the_same_at_any_size():
    _, big = render(96, 0, "val", 2)
    _, small = render(48, 0, "val", 2)
    agree = (big[::2, ::2] == small).mean()
    assert agree > 0.9, agree


def test_dataset_matches_render_and_has_info():
    cfg = DataConfig(synthetic_train=5, synthetic_val=3, synthetic_size=32, synthetic_seed=1)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert isinstance(train, SyntheticDataset) and (len(train), len(val)) == (5, 3)
    assert train.ids == [f"train_{i:05d}" for i in range(5)]
    sample = val[2]
    img, mask = render(32, 1, "val", 2)
    np.testing.assert_array_equal(sample.image, img)
    np.testing.assert_array_equal(sample.mask, mask)
    assert dataset_info(cfg) is SYNTHETIC and SYNTHETIC.classes == CLASSES
    assert len(set(SYNTHETIC.palette)) == len(CLASSES)
    assert train.subset(["train_00003"])[0].id == "train_00003"
    with pytest.raises(DataError, match="unknown split"):
        build_dataset(cfg, "extra")


def test_names_round_trip():
    assert sample_name("test", 12) == "test_00012" and parse_name("test_00012") == ("test", 12)
    assert parse_name("cat_00012") is None and parse_name("train_x") is None


def test_write_folder_is_a_readable_folder_dataset(tmp_path):
    dest = write_folder(tmp_path / "syn", size=24, seed=2, n_train=3, n_val=2)
    cfg = load_config(dest / "data.yaml").data
    assert cfg.dataset == "folder" and cfg.classes == CLASSES
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (3, 2)
    img, mask = render(24, 2, "val", 1)
    np.testing.assert_array_equal(val[1].image, img)
    np.testing.assert_array_equal(val[1].mask, mask)
    # a split list written for the exported folder also drives the in-memory dataset
    synth = build_dataset(DataConfig(synthetic_size=24, synthetic_seed=2), str(dest / "val.txt"))
    np.testing.assert_array_equal(synth[1].mask, mask)


def test_list_with_foreign_ids_is_rejected(tmp_path):
    (tmp_path / "l.txt").write_text("images/train_00001.png masks/train_00001.png\nimages/cat.png masks/cat.png\n")
    with pytest.raises(DataError, match=r"l\.txt:2: 'cat'"):
        build_dataset(DataConfig(), str(tmp_path / "l.txt"))


def test_describe_names_every_class():
    text = describe(96, 400, 100)
    assert all(c in text for c in CLASSES) and "400 train" in text

"""Every reader on a tiny fixture in its dataset's real on-disk layout, plus the bad inputs users meet."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data.datasets import READERS, SegDataset, build_dataset, dataset_info, resolve_train_split
from semiseg.data.info import IGNORE, voc_palette
from semiseg.errors import DataError

CAMVID_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def write_image(path: Path, h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=100) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return arr


def write_mask(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        img.putpalette([c for rgb in voc_palette(256) for c in rgb])
    img.save(path)


def labels(h: int = 6, w: int = 8, values=(0, 1, 2)) -> np.ndarray:
    return np.resize(np.array(values, np.uint8), h * w).reshape(h, w)


def error_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_an_unknown_dataset_is_one_line_naming_the_readers():
    with pytest.raises(DataError, match="data.dataset: unknown dataset 'kitti'; choose from synthetic, ") as e:
        build_dataset(DataConfig(dataset="kitti"), "train")
    assert all(name in str(e.value) for name in READERS)


def camvid_fixture(root: Path) -> list[np.ndarray]:
    masks = []
    lines = []
    for i, name in enumerate(["a", "b", "c"]):
        write_image(root / "train" / f"{name}.png", seed=i)
        mask = labels(values=(0, 10, 11, i))
        write_mask(root / "trainannot" / f"{name}.png", mask)
        masks.append(mask)
        lines.append(f"/SegNet/CamVid/train/{name}.png /SegNet/CamVid/trainannot/{name}.png\n")
    (root / "train.txt").write_text("".join(lines))
    return masks


def test_camvid_segnet_list_with_prefix_and_void_to_ignore(tmp_path):
    masks = camvid_fixture(tmp_path)
    ds = build_dataset(DataConfig(dataset="camvid", root=str(tmp_path)), "train")
    assert len(ds) == 3 and ds.ids == ["a", "b", "c"]
    assert ds.items[0].image == tmp_path / "train" / "a.png"
    assert ds.items[0].mask == tmp_path / "trainannot" / "a.png"
    sample = ds[1]
    expected = masks[1].copy()
    expected[expected == 11] = IGNORE
    np.testing.assert_array_equal(sample.mask, expected)
    assert sample.image.shape == (6, 8, 3) and sample.image.dtype == np.uint8
    assert ds.info.num_classes == 11


def test_camvid_split_from_folders_without_list(tmp_path):
    write_image(tmp_path / "test" / "x.png")
    write_mask(tmp_path / "testannot" / "x.png", labels())
    ds = build_dataset(DataConfig(dataset="camvid", root=str(tmp_path)), "test")
    assert ds.ids == ["x"]
    np.testing.assert_array_equal(ds[0].mask, labels())


def test_pascal_palette_masks_load_as_indices(tmp_path):
    mask = labels(values=(0, 15, 20, IGNORE))
    for name in ["2007_000032", "2007_000039"]:
        write_image(tmp_path / "JPEGImages" / f"{name}.jpg")
        write_mask(tmp_path / "SegmentationClass" / f"{name}.png", mask, palette=True)
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000039\n")
    cfg = DataConfig(dataset="pascal", root=str(tmp_path))
    ds = build_dataset(cfg, "train")
    assert ds.ids == ["2007_000032", "2007_000039"]
    assert Image.open(ds.items[0].mask).mode == "P"
    np.testing.assert_array_equal(ds[0].mask, mask)
    # a UniMatch-style list of 'image mask' lines
    (tmp_path / "labeled.txt").write_text("JPEGImages/2007_000039.jpg SegmentationClass/2007_000039.png\n")
    listed = build_dataset(cfg, str(tmp_path / "labeled.txt"))
    assert listed.ids == ["2007_000039"]
    np.testing.assert_array_equal(listed[0].mask, mask)
    assert dataset_info(cfg).num_classes == 21


def test_cityscapes_label_ids_converted_and_train_ids_read(tmp_path):
    city = "aachen_000000_000019"
    write_image(tmp_path / "leftImg8bit" / "train" / "aachen" / f"{city}_leftImg8bit.png")
    label_ids = labels(values=(7, 8, 26, 0, 33, 1, 6, 24))
    write_mask(tmp_path / "gtFine" / "train" / "aachen" / f"{city}_gtFine_labelIds.png", label_ids)
    bonn = "bonn_000001_000019"
    write_image(tmp_path / "leftImg8bit" / "train" / "bonn" / f"{bonn}_leftImg8bit.png")
    train_ids = labels(values=(0, 18, IGNORE))
    write_mask(tmp_path / "gtFine" / "train" / "bonn" / f"{bonn}_gtFine_labelTrainIds.png", train_ids)
    cfg = DataConfig(dataset="cityscapes", root=str(tmp_path))
    ds = build_dataset(cfg, "train")
    assert ds.ids == [city, bonn]
    np.testing.assert_array_equal(ds[0].mask, labels(values=(0, 1, 13, IGNORE, 18, IGNORE, IGNORE, 11)))
    np.testing.assert_array_equal(ds[1].mask, train_ids)
    assert dataset_info(cfg).eval_mode == "sliding" and dataset_info(cfg).num_classes == 19
    # UniMatch lists name labelTrainIds; the labelIds file stands in when only it exists
    (tmp_path / "list.txt").write_text(
        f"leftImg8bit/train/aachen/{city}_leftImg8bit.png gtFine/train/aachen/{city}_gtFine_labelTrainIds.png\n"
    )
    listed = build_dataset(cfg, str(tmp_path / "list.txt"))
    np.testing.assert_array_equal(listed[0].mask, ds[0].mask)


def test_coco_named_split_and_list(tmp_path):
    for i, name in enumerate(["000000000139", "000000000285"]):
        write_image(tmp_path / "val2017" / f"{name}.jpg", seed=i)
        write_mask(tmp_path / "masks" / f"{name}.png", labels(values=(0, 80, i)))
    cfg = DataConfig(dataset="coco", root=str(tmp_path))
    ds = build_dataset(cfg, "val")
    assert ds.ids == ["000000000139", "000000000285"]
    np.testing.assert_array_equal(ds[1].mask, labels(values=(0, 80, 1)))
    (tmp_path / "l.txt").write_text("val2017/000000000285.jpg masks/000000000285.png\n")
    assert build_dataset(cfg, str(tmp_path / "l.txt")).ids == ["000000000285"]
    assert dataset_info(cfg).num_classes == 81


def folder_cfg(root: Path, **kw) -> DataConfig:
    colors = ((0, 0, 0), (255, 0, 0), (0, 255, 0))
    return DataConfig(dataset="folder", root=str(root), classes=("bg", "a", "b"), colors=colors, **kw)


def test_folder_index_palette_rgb_and_unlabeled(tmp_path):
    mask = labels(values=(0, 1, 2, IGNORE))
    write_image(tmp_path / "images" / "a.png")
    write_mask(tmp_path / "masks" / "a.png", mask)
    write_image(tmp_path / "images" / "b.jpg")
    write_mask(tmp_path / "masks" / "b.png", mask, palette=True)
    write_image(tmp_path / "images" / "c.png")
    rgb = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0)], np.uint8)[labels(values=(0, 1, 2))]
    Image.fromarray(rgb).save(tmp_path / "masks" / "c.png")
    write_image(tmp_path / "images" / "d.png")
    ds = build_dataset(folder_cfg(tmp_path), "train")
    assert ds.ids == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(ds[0].mask, mask)
    np.testing.assert_array_equal(ds[1].mask, mask)
    np.testing.assert_array_equal(ds[2].mask, labels(values=(0, 1, 2)))
    assert ds[3].mask is None and ds.items[3].mask is None
    assert ds.info.palette[1] == (255, 0, 0)


def test_folder_unknown_colour_names_file_and_colour(tmp_path):
    write_image(tmp_path / "images" / "c.png")
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    (tmp_path / "masks").mkdir()
    Image.fromarray(rgb).save(tmp_path / "masks" / "c.png")
    ds = build_dataset(folder_cfg(tmp_path), "train")
    with pytest.raises(DataError) as excinfo:
        ds[0]
    msg = error_line(excinfo)
    assert str(tmp_path / "masks" / "c.png") in msg and "(1, 2, 3)" in msg


def test_folder_needs_class_names_and_a_list_for_other_splits(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match="data.classes"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path)), "train")
    with pytest.raises(DataError, match="val.txt"):
        build_dataset(folder_cfg(tmp_path), "val")
    (tmp_path / "val.txt").write_text("images/a.png\n")
    assert build_dataset(folder_cfg(tmp_path), "val").ids == ["a"]


def test_resize_factor_applies_bilinear_image_nearest_mask(tmp_path):
    write_image(tmp_path / "images" / "a.png", h=8, w=12)
    mask = np.zeros((8, 12), np.uint8)
    mask[:, 6:] = 2
    write_mask(tmp_path / "masks" / "a.png", mask)
    sample = build_dataset(folder_cfg(tmp_path, resize=0.5), "train")[0]
    assert sample.image.shape == (4, 6, 3) and sample.mask.shape == (4, 6)
    np.testing.assert_array_equal(sample.mask, np.repeat([[0, 0, 0, 2, 2, 2]], 4, 0))


def test_missing_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError) as excinfo:
        build_dataset(DataConfig(dataset="camvid", root=str(tmp_path / "nowhere")), "train")
    msg = error_line(excinfo)
    assert "nowhere" in msg and "semiseg data get camvid" in msg
    with pytest.raises(DataError, match="unknown dataset"):
        build_dataset(DataConfig(dataset="imagenet"), "train")


def test_bad_input_missing_file_listed_in_split(tmp_path):
    camvid_fixture(tmp_path)
    (tmp_path / "trainannot" / "b.png").unlink()
    with pytest.raises(DataError) as excinfo:
        build_dataset(DataConfig(dataset="camvid", root=str(tmp_path)), "train")
    msg = error_line(excinfo)
    assert f"{tmp_path / 'train.txt'}:2" in msg and str(tmp_path / "trainannot" / "b.png") in msg


def test_bad_input_unreadable_image(tmp_path):
    camvid_fixture(tmp_path)
    (tmp_path / "train" / "c.png").write_bytes(b"not a png")
    ds = build_dataset(DataConfig(dataset="camvid", root=str(tmp_path)), "train")
    with pytest.raises(DataError) as excinfo:
        ds[2]
    msg = error_line(excinfo)
    assert msg.startswith(str(tmp_path / "train" / "c.png")) and "unreadable image" in msg


def test_bad_input_mask_size_differs_from_image(tmp_path):
    camvid_fixture(tmp_path)
    write_mask(tmp_path / "trainannot" / "a.png", labels(h=5, w=8))
    ds = build_dataset(DataConfig(dataset="camvid", root=str(tmp_path)), "train")
    with pytest.raises(DataError) as excinfo:
        ds[0]
    msg = error_line(excinfo)
    assert str(tmp_path / "trainannot" / "a.png") in msg and "8x5" in msg and "8x6" in msg


def test_bad_input_label_value_out_of_range(tmp_path):
    camvid_fixture(tmp_path)
    write_mask(tmp_path / "trainannot" / "b.png", labels(values=(0, 3, 12)))
    ds = build_dataset(DataConfig(dataset="camvid", root=str(tmp_path)), "train")
    with pytest.raises(DataError) as excinfo:
        ds[1]
    msg = error_line(excinfo)
    assert str(tmp_path / "trainannot" / "b.png") in msg and "label value 12" in msg and "0..10" in msg


def test_bad_input_empty_split(tmp_path):
    camvid_fixture(tmp_path)
    (tmp_path / "val.txt").write_text("\n")
    with pytest.raises(DataError) as excinfo:
        build_dataset(DataConfig(dataset="camvid", root=str(tmp_path)), str(tmp_path / "val.txt"))
    msg = error_line(excinfo)
    assert str(tmp_path / "val.txt") in msg and "empty" in msg


def test_resolve_train_split_count_list_and_all(tmp_path):
    for i in range(6):
        write_image(tmp_path / "images" / f"im{i}.png", seed=i)
        write_mask(tmp_path / "masks" / f"im{i}.png", labels())
    cfg = folder_cfg(tmp_path)
    labeled, unlabeled = resolve_train_split(cfg)
    assert len(labeled) == 6 and len(unlabeled) == 0
    labeled, unlabeled = resolve_train_split(dataclasses.replace(cfg, labeled="2", split_seed=3))
    assert len(labeled) == 2 and len(unlabeled) == 4
    assert sorted(labeled.ids + unlabeled.ids) == [f"im{i}" for i in range(6)]
    again, _ = resolve_train_split(dataclasses.replace(cfg, labeled="2", split_seed=3))
    assert again.ids == labeled.ids
    (tmp_path / "labeled.txt").write_text("images/im4.png masks/im4.png\n")
    labeled, unlabeled = resolve_train_split(dataclasses.replace(cfg, labeled=str(tmp_path / "labeled.txt")))
    assert labeled.ids == ["im4"] and unlabeled.ids == ["im0", "im1", "im2", "im3", "im5"]
    assert isinstance(unlabeled, SegDataset)


@pytest.mark.skipif(not CAMVID_ROOT.is_dir(), reason="real CamVid not present")
def test_real_camvid_counts_and_label_values():
    cfg = DataConfig(dataset="camvid", root=str(CAMVID_ROOT))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val)) == (367, 101)
    for ds in (train, val):
        for i in (0, len(ds) // 2, len(ds) - 1):
            sample = ds[i]
            assert sample.image.shape == (360, 480, 3) and sample.mask.shape == (360, 480)
            values = set(np.unique(sample.mask).tolist())
            assert values <= set(range(11)) | {IGNORE}, values

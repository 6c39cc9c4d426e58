"""The data check: statistics by hand on a tiny folder dataset, and planted problems reported with their files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data.check import check_dataset, format_report, run_check
from semiseg.data.datasets import build_dataset


def write_pair(root: Path, name: str, mask: np.ndarray | None, image_hw: tuple[int, int] = (4, 4)) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*image_hw, 3), 128, np.uint8)).save(root / "images" / f"{name}.png")
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "masks" / f"{name}.png")


def cfg(root: Path) -> DataConfig:
    return DataConfig(dataset="folder", root=str(root), classes=("bg", "fg", "edge"))


def test_clean_dataset_statistics_by_hand(tmp_path, capsys):
    write_pair(tmp_path, "a", np.zeros((4, 4)))
    half = np.zeros((4, 4))
    half[:2] = 1
    half[3, 3] = 255
    write_pair(tmp_path, "b", half)
    write_pair(tmp_path, "c", None)
    report = check_dataset(build_dataset(cfg(tmp_path), "train"))
    assert (report.images, report.masks, report.without_mask) == (3, 2, 1)
    # 32 mask pixels: 1 ignore, 8 'fg', 23 'bg'
    assert report.class_pixels.tolist() == [23, 8, 0] and report.ignore_pixels == 1 and report.mask_pixels == 32
    assert report.errors == []
    text = format_report(report)
    assert "74.19" in text and "25.81" in text and "3.12% of mask pixels" in text and "errors: none" in text
    assert run_check(cfg(tmp_path), ["train"]) == 0
    assert "folder:train: 3 images, 2 masks, 1 without mask" in capsys.readouterr().out


def test_planted_bad_label_size_mismatch_and_missing_file(tmp_path, capsys):
    write_pair(tmp_path, "good", np.zeros((4, 4)))
    bad = np.zeros((4, 4))
    bad[0, 0] = 7
    write_pair(tmp_path, "badlabel", bad)
    write_pair(tmp_path, "mismatch", np.zeros((3, 4)))
    (tmp_path / "train.txt").write_text(
        "images/good.png masks/good.png\nimages/badlabel.png masks/badlabel.png\n"
        "images/mismatch.png masks/mismatch.png\nimages/gone.png masks/gone.png\n"
    )
    report = check_dataset(build_dataset(cfg(tmp_path), "train", check_files=False))
    assert report.bad_labels == {7: [str(tmp_path / "masks" / "badlabel.png")]}
    assert report.size_mismatch == [f"{tmp_path / 'masks' / 'mismatch.png'}: mask 4x3, image 4x4"]
    assert len(report.unreadable) == 1 and "gone.png" in report.unreadable[0]
    errors = report.errors
    assert len(errors) == 3
    assert any("label value 7" in e and "badlabel.png" in e for e in errors)
    assert run_check(cfg(tmp_path), ["train"]) == 1
    out = capsys.readouterr().out
    assert "error: " in out and "mismatch.png" in out and "badlabel.png" in out and "gone.png" in out


def test_run_check_reports_a_split_that_cannot_be_built(tmp_path, capsys):
    assert run_check(DataConfig(dataset="camvid", root=str(tmp_path / "nowhere")), ["train"]) == 1
    assert "semiseg data get camvid" in capsys.readouterr().out

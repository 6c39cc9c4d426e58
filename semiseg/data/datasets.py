"""Dataset readers: files on disk (or the synthetic generator) -> Sample(image uint8 HxWx3, mask uint8 HxW | None, id).

Every reader turns a split (a name such as 'train', or a list file of 'image [mask]' lines) into a list of
`Item`s and a `MaskDecoder`; `SegDataset` reads them. Listed files must exist when the dataset is built;
mask sizes and label values are checked when a sample is read, which costs nothing extra.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data import synthetic
from semiseg.data.info import CAMVID, CITYSCAPES, COCO, IGNORE, PASCAL, DatasetInfo, voc_palette
from semiseg.data.splits import Item, is_count_or_fraction, make_split, read_split_file, sample_id
from semiseg.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
"""official Cityscapes labelId -> trainId table (cityscapesScripts labels.py); every other id -> 255"""


@dataclass
class Sample:
    image: np.ndarray
    """uint8 (H, W, 3) RGB"""
    mask: np.ndarray | None
    """uint8 (H, W) class indices, IGNORE = 255; None for an unlabeled image"""
    id: str
    """sample id (file stem)"""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; DataError naming the file when missing or unreadable."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable image ({_one_line(err)})") from None


def _lut(table: dict[int, int], default: int | None) -> tuple[int, ...]:
    """A 256-entry value table: `table` entries, others -> `default` (None = unchanged)."""
    return tuple(table.get(v, v if default is None else default) for v in range(256))


def index_image(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """Palette ('P') PIL image whose pixel values are the class indices of uint8 (H, W) `mask`."""
    im = Image.fromarray(mask)
    flat = [c for rgb in palette[:256] for c in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    return im


@dataclass(frozen=True)
class MaskDecoder:
    """Turns a mask file into class indices uint8 (H, W).

    Palette ('P') and gray PNGs load as indices; RGB masks are mapped through `colors` (or, when all three
    channels are equal, read as gray). An optional 256-entry `lut` then remaps values, only for files whose
    name ends with `lut_suffix` when that is set (Cityscapes labelIds next to labelTrainIds).
    """

    lut: tuple[int, ...] = ()
    lut_suffix: str = ""
    colors: tuple[tuple[int, int, int], ...] = ()

    def __call__(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                mode = img.mode
                arr = np.array(img)
        except FileNotFoundError:
            raise DataError(f"{path}: mask file not found") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: unreadable mask ({_one_line(err)})") from None
        if arr.ndim == 3:
            arr = self._from_rgb(arr, path)
        elif mode == "LA":
            arr = arr[..., 0]
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise DataError(f"{path}: label value {int(arr.max())} out of range (masks hold values 0..255)")
            arr = arr.astype(np.uint8)
        if self.lut and (not self.lut_suffix or path.name.endswith(self.lut_suffix)):
            arr = np.asarray(self.lut, np.uint8)[arr]
        return arr

    def _from_rgb(self, arr: np.ndarray, path: Path) -> np.ndarray:
        rgb = arr[..., :3].astype(np.int32)
        if not self.colors:
            if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
                return rgb[..., 0].astype(np.uint8)
            raise DataError(f"{path}: RGB mask, but no colour table: set data.colors to map colours to classes")
        keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(self.colors)}
        uniq, inverse = np.unique(keys, return_inverse=True)
        values = np.empty(len(uniq), np.uint8)
        for j, key in enumerate(uniq.tolist()):
            if key not in table:
                colour = (key >> 16, (key >> 8) & 255, key & 255)
                raise DataError(f"{path}: colour {colour} is not in data.colors")
            values[j] = table[key]
        return values[inverse.reshape(keys.shape)]


def bad_label_values(mask: np.ndarray, num_classes: int) -> list[int]:
    """Label values of `mask` outside 0..num_classes-1 that are not IGNORE, ascending."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return [v for v in np.flatnonzero(counts).tolist() if v >= num_classes and v != IGNORE]


def validate(sample: Sample, item: Item, num_classes: int) -> None:
    """Raise one DataError line when the mask's size differs from the image's or a label is out of range."""
    if sample.mask is None:
        return
    (h, w), (mh, mw) = sample.image.shape[:2], sample.mask.shape
    if (mh, mw) != (h, w):
        raise DataError(f"{item.mask}: mask size {mw}x{mh} differs from image size {w}x{h} ({item.image})")
    bad = bad_label_values(sample.mask, num_classes)
    if bad:
        values = ", ".join(map(str, bad[:5]))
        raise DataError(
            f"{item.mask}: label value {values} out of range (classes 0..{num_classes - 1}, {IGNORE} = ignore)"
        )


def resize_sample(sample: Sample, factor: float) -> Sample:
    """Rescale image (bilinear) and mask (nearest) by `factor`; sizes are rounded, at least 1 pixel."""
    if factor == 1.0:
        return sample
    h, w = sample.image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    image = np.asarray(Image.fromarray(sample.image).resize(size, Image.BILINEAR))
    mask = None
    if sample.mask is not None:
        mask = np.asarray(Image.fromarray(sample.mask).resize(size, Image.NEAREST))
    return Sample(image, mask, sample.id)


class SegDataset(torch.utils.data.Dataset):
    """Items read from disk: `ds[i]` is a validated, optionally rescaled Sample."""

    def __init__(
        self,
        items: Sequence[Item],
        info: DatasetInfo,
        decoder: MaskDecoder = MaskDecoder(),
        resize: float = 1.0,
        name: str = "",
        root: str | Path = ".",
    ):
        self.items = list(items)
        self.info = info
        self.decoder = decoder
        self.resize = resize
        self.name = name or info.name
        self.root = Path(root)

    @property
    def ids(self) -> list[str]:
        return [item.id for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> Sample:
        """Sample i as stored: no size or label checks, no rescaling (the data check reads this)."""
        item = self.items[i]
        image = read_image(item.image)
        mask = self.decoder(item.mask) if item.mask is not None else None
        return Sample(image, mask, item.id)

    def __getitem__(self, i: int) -> Sample:
        sample = self.load(i)
        validate(sample, self.items[i], self.info.num_classes)
        return resize_sample(sample, self.resize)

    def subset(self, ids: Sequence[str]) -> SegDataset:
        """A dataset of the items with these ids, in this order."""
        by_id = {item.id: item for item in self.items}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{self.name}: unknown id {missing[0]!r}")
        out = copy.copy(self)
        out.items = [by_id[i] for i in ids]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {len(self)} items)"


class SyntheticDataset(SegDataset):
    """The embedded procedural dataset (semiseg.data.synthetic) behind the same interface as the readers."""

    def __init__(
        self,
        items: Sequence[Item],
        size: int,
        seed: int,
        resize: float = 1.0,
        name: str = "synthetic",
        clutter: float = 1.0,
    ):
        super().__init__(items, synthetic.SYNTHETIC, MaskDecoder(), resize, name)
        self.size = size
        self.seed = seed
        self.clutter = clutter

    def load(self, i: int) -> Sample:
        item = self.items[i]
        split, index = synthetic.parse_name(item.id)
        image, mask = synthetic.render(self.size, self.seed, split, index, self.clutter)
        return Sample(image, mask, item.id)


def synthetic_items(split: str, count: int) -> list[Item]:
    """Items of a synthetic split, with the paths `synthetic.write_folder` gives their files."""
    names = [synthetic.sample_name(split, i) for i in range(count)]
    return [Item(Path(f"images/{n}.png"), Path(f"masks/{n}.png"), n) for n in names]


def is_list_file(split: str) -> bool:
    """True when `split` names a list file rather than a split name."""
    return split.endswith(".txt") or "/" in split or os.sep in split


def _build_synthetic(cfg: DataConfig, split: str, check_files: bool = True) -> SegDataset:
    counts = {"train": cfg.synthetic_train, "val": cfg.synthetic_val, "test": cfg.synthetic_val}
    if is_list_file(split):
        items = read_split_file(split, cfg.root)
        for item in items:
            if synthetic.parse_name(item.id) is None:
                raise DataError(f"{item.source}: {item.id!r} is not a synthetic sample id (e.g. train_00012)")
    elif split in counts:
        items = synthetic_items(split, counts[split])
    else:
        raise DataError(f"synthetic: unknown split {split!r}; choose from {', '.join(counts)} or a list file")
    if not items:
        raise DataError(f"synthetic: split {split!r} is empty")
    return SyntheticDataset(
        items, cfg.synthetic_size, cfg.synthetic_seed, cfg.resize, f"synthetic:{split}", cfg.synthetic_clutter
    )


def _require_root(cfg: DataConfig, hint: str) -> Path:
    root = Path(cfg.root)
    if not cfg.root or not root.is_dir():
        raise DataError(f"{cfg.root or 'data.root'}: {cfg.dataset} dataset root not found; {hint}")
    return root


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def check_files_exist(items: Sequence[Item]) -> None:
    """Raise one DataError line for the first listed image or mask that does not exist."""
    for item in items:
        for path in (item.image, item.mask):
            if path is not None and not path.is_file():
                where = f"{item.source}: " if item.source else ""
                raise DataError(f"{where}{path}: file not found")


def _build_files(
    cfg: DataConfig,
    split: str,
    check_files: bool,
    info: DatasetInfo,
    named: Callable[[Path, str, DataConfig], list[Item]],
    decoder: MaskDecoder,
    hint: str,
    fix: Callable[[list[Item]], list[Item]] | None = None,
) -> SegDataset:
    """The shared path of every file reader: root check, items of a name or list, existence, emptiness."""
    root = _require_root(cfg, hint)
    items = read_split_file(split, root) if is_list_file(split) else named(root, split, cfg)
    if fix is not None:
        items = fix(items)
    if not items:
        raise DataError(f"{split}: split list is empty" if is_list_file(split) else f"{root}: split {split!r} is empty")
    if check_files:
        check_files_exist(items)
    return SegDataset(items, info, decoder, cfg.resize, f"{info.name}:{Path(split).name}", root)


def _split_names(root: Path, pattern: str) -> str:
    names = sorted(p.name.removesuffix(".txt") for p in root.glob(pattern))
    return ", ".join(names) or "none"


def _camvid_named(root: Path, split: str, cfg: DataConfig) -> list[Item]:
    if (root / f"{split}.txt").is_file():
        return read_split_file(root / f"{split}.txt", root)
    if (root / split).is_dir():
        annot = root / f"{split}annot"
        return [
            Item(p, annot / p.relative_to(root / split) if annot.is_dir() else None, sample_id(p))
            for p in _list_images(root / split)
        ]
    found = _split_names(root, "*.txt")
    raise DataError(f"{root}: no camvid split {split!r} ({split}.txt or {split}/); found: {found}")


def _pascal_named(root: Path, split: str, cfg: DataConfig) -> list[Item]:
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        found = _split_names(path.parent, "*.txt") if path.parent.is_dir() else "none"
        raise DataError(f"{path}: pascal split list not found; found: {found}")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            name = line.split()[0]
            image = root / "JPEGImages" / f"{name}.jpg"
            items.append(Item(image, root / "SegmentationClass" / f"{name}.png", name, f"{path}:{n}"))
    return items


def _cityscapes_named(root: Path, split: str, cfg: DataConfig) -> list[Item]:
    folder = root / "leftImg8bit" / split
    if not folder.is_dir():
        raise DataError(f"{folder}: cityscapes split folder not found")
    items = []
    for image in sorted(folder.glob("*/*_leftImg8bit.png")):
        base = image.name.removesuffix("_leftImg8bit.png")
        mask = root / "gtFine" / split / image.parent.name / f"{base}_gtFine_labelTrainIds.png"
        items.append(Item(image, mask, base))
    return items


def _cityscapes_fix(items: list[Item]) -> list[Item]:
    """Use *_gtFine_labelIds.png (converted on the fly) where *_labelTrainIds.png was not generated."""
    out = []
    for item in items:
        mask = item.mask
        if mask is not None and mask.name.endswith("_labelTrainIds.png") and not mask.is_file():
            ids = mask.with_name(mask.name.replace("_labelTrainIds.png", "_labelIds.png"))
            if ids.is_file():
                mask = ids
        out.append(Item(item.image, mask, item.id, item.source))
    return out


def _coco_named(root: Path, split: str, cfg: DataConfig) -> list[Item]:
    folder = root / (split if split.endswith("2017") else f"{split}2017")
    if not folder.is_dir():
        raise DataError(f"{folder}: coco image folder not found")
    return [Item(p, root / "masks" / f"{p.stem}.png", p.stem) for p in sorted(folder.glob("*.jpg"))]


def _folder_named(root: Path, split: str, cfg: DataConfig) -> list[Item]:
    if (root / f"{split}.txt").is_file():
        return read_split_file(root / f"{split}.txt", root)
    if split != "train":
        raise DataError(
            f"{root / f'{split}.txt'}: folder split list not found (only 'train', all images, needs no list)"
        )
    images_dir, masks_dir = root / cfg.images_dir, root / cfg.masks_dir
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: images folder not found (data.images_dir)")
    masks: dict[str, Path] = {}
    if masks_dir.is_dir():
        # one listing instead of a stat per image and extension; .png wins over other formats
        for p in sorted(_list_images(masks_dir), key=lambda p: p.suffix.lower() != ".png", reverse=True):
            masks[p.relative_to(masks_dir).with_suffix("").as_posix()] = p
    items, seen = [], {}
    for p in _list_images(images_dir):
        item = Item(p, masks.get(p.relative_to(images_dir).with_suffix("").as_posix()), sample_id(p))
        if item.id in seen:
            raise DataError(f"{p}: id {item.id!r} is also the id of {seen[item.id]}; image names must be unique")
        seen[item.id] = p
        items.append(item)
    return items


def folder_info(cfg: DataConfig) -> DatasetInfo:
    """DatasetInfo of a folder dataset: names from data.classes, colours from data.colors or the VOC palette."""
    if not cfg.classes:
        raise DataError("data.classes: a folder dataset needs its class names, e.g. classes: [background, cat]")
    if cfg.colors and len(cfg.colors) != len(cfg.classes):
        raise DataError(f"data.colors: {len(cfg.colors)} colours for {len(cfg.classes)} classes")
    palette = tuple(tuple(c) for c in cfg.colors) or voc_palette(len(cfg.classes))
    return DatasetInfo(name="folder", classes=tuple(cfg.classes), palette=palette)


CAMVID_MASK = MaskDecoder(lut=_lut({11: IGNORE}, None))
CITYSCAPES_MASK = MaskDecoder(lut=_lut(CITYSCAPES_TRAIN_IDS, IGNORE), lut_suffix="_gtFine_labelIds.png")

CAMVID_HINT = "run `semiseg data get camvid`, or set data.root to a SegNet-layout CamVid folder"
PASCAL_HINT = "download VOC2012 (JPEGImages) and the SBD-augmented SegmentationClass masks, then set data.root"
CITYSCAPES_HINT = "download leftImg8bit and gtFine from cityscapes-dataset.com (login needed), then set data.root"
COCO_HINT = "download train2017/ and val2017/ from cocodataset.org and UniMatch's masks/, then set data.root"
FOLDER_HINT = "point data.root at a folder holding images/ (and masks/); `semiseg demo` writes an example"


def _build_camvid(cfg: DataConfig, split: str, check_files: bool = True) -> SegDataset:
    return _build_files(cfg, split, check_files, CAMVID, _camvid_named, CAMVID_MASK, CAMVID_HINT)


def _build_pascal(cfg: DataConfig, split: str, check_files: bool = True) -> SegDataset:
    return _build_files(cfg, split, check_files, PASCAL, _pascal_named, MaskDecoder(), PASCAL_HINT)


def _build_cityscapes(cfg: DataConfig, split: str, check_files: bool = True) -> SegDataset:
    return _build_files(
        cfg, split, check_files, CITYSCAPES, _cityscapes_named, CITYSCAPES_MASK, CITYSCAPES_HINT, _cityscapes_fix
    )


def _build_coco(cfg: DataConfig, split: str, check_files: bool = True) -> SegDataset:
    return _build_files(cfg, split, check_files, COCO, _coco_named, MaskDecoder(), COCO_HINT)


def _build_folder(cfg: DataConfig, split: str, check_files: bool = True) -> SegDataset:
    decoder = MaskDecoder(colors=tuple(tuple(c) for c in cfg.colors))
    return _build_files(cfg, split, check_files, folder_info(cfg), _folder_named, decoder, FOLDER_HINT)


@dataclass(frozen=True)
class Reader:
    info: Callable[[DataConfig], DatasetInfo]
    """class names, palette, evaluation mode (needs no files)"""
    build: Callable[[DataConfig, str, bool], SegDataset]
    """(cfg, split name or list path, check that listed files exist) -> dataset"""


READERS: dict[str, Reader] = {
    "synthetic": Reader(lambda cfg: synthetic.SYNTHETIC, _build_synthetic),
    "camvid": Reader(lambda cfg: CAMVID, _build_camvid),
    "pascal": Reader(lambda cfg: PASCAL, _build_pascal),
    "cityscapes": Reader(lambda cfg: CITYSCAPES, _build_cityscapes),
    "coco": Reader(lambda cfg: COCO, _build_coco),
    "folder": Reader(folder_info, _build_folder),
}


def _reader(cfg: DataConfig) -> Reader:
    if cfg.dataset not in READERS:
        raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}; choose from {', '.join(READERS)}")
    return READERS[cfg.dataset]


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """The DatasetInfo of the configured dataset, without reading any file."""
    return _reader(cfg).info(cfg)


def build_dataset(cfg: DataConfig, split: str, check_files: bool = True) -> SegDataset:
    """The dataset of a split name ('train', 'val', …) or a list file of 'image [mask]' lines under data.root."""
    return _reader(cfg).build(cfg, split, check_files)


def resolve_train_split(cfg: DataConfig) -> tuple[SegDataset, SegDataset]:
    """(labeled, unlabeled) training sets from data.labeled / data.unlabeled (see DataConfig)."""
    if not cfg.labeled:
        train = build_dataset(cfg, cfg.train_split)
        return train, train.subset([])
    if is_count_or_fraction(cfg.labeled):
        train = build_dataset(cfg, cfg.train_split)
        labeled_ids, unlabeled_ids = make_split(train.ids, cfg.labeled, cfg.split_seed)
        labeled = train.subset(labeled_ids)
        unlabeled = build_dataset(cfg, cfg.unlabeled) if cfg.unlabeled else train.subset(unlabeled_ids)
        return labeled, unlabeled
    labeled = build_dataset(cfg, cfg.labeled)
    if cfg.unlabeled:
        return labeled, build_dataset(cfg, cfg.unlabeled)
    train = build_dataset(cfg, cfg.train_split)
    taken = set(labeled.ids)
    return labeled, train.subset([i for i in train.ids if i not in taken])

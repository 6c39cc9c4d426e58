"""`semiseg data-check`: read every sample of a split and report counts, class frequencies and every problem.

Training stops at the first bad sample it meets; the check reads them all, so one run lists every missing
or unreadable file, every image/mask size mismatch and every out-of-range label value (with example files).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from semiseg.config import DataConfig
from semiseg.data.datasets import SegDataset, bad_label_values, build_dataset
from semiseg.data.info import IGNORE
from semiseg.errors import DataError

EXAMPLES = 3
"""example files listed per kind of problem"""


@dataclass
class CheckReport:
    name: str
    """dataset and split, e.g. 'camvid:train'"""
    classes: tuple[str, ...]
    """class names in index order"""
    images: int = 0
    """samples in the split"""
    masks: int = 0
    """samples with a readable mask"""
    without_mask: int = 0
    """images listed without a mask (unlabeled)"""
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """pixel count per class (C,)"""
    ignore_pixels: int = 0
    """pixels labeled IGNORE"""
    mask_pixels: int = 0
    """all pixels of all readable masks"""
    unreadable: list[str] = field(default_factory=list)
    """one message per missing or unreadable file"""
    size_mismatch: list[str] = field(default_factory=list)
    """one message per mask whose size differs from its image's"""
    bad_labels: dict[int, list[str]] = field(default_factory=dict)
    """out-of-range label value -> the mask files holding it"""

    @property
    def labeled_pixels(self) -> int:
        return int(self.class_pixels.sum())

    @property
    def errors(self) -> list[str]:
        """One line per problem kind and example: empty when the split is fit for training."""
        out = _listed(self.unreadable, "unreadable or missing files")
        out += _listed(self.size_mismatch, "masks whose size differs from their image")
        for value, files in sorted(self.bad_labels.items()):
            examples = ", ".join(files[:EXAMPLES]) + (", …" if len(files) > EXAMPLES else "")
            out.append(
                f"label value {value} (classes 0..{len(self.classes) - 1}, {IGNORE} = ignore) "
                f"in {len(files)} mask(s): {examples}"
            )
        if self.images == 0:
            out.append(f"{self.name}: the split is empty")
        return out


def _listed(messages: list[str], what: str) -> list[str]:
    out = messages[:EXAMPLES]
    if len(messages) > EXAMPLES:
        out.append(f"… {len(messages) - EXAMPLES} more {what}")
    return out


def check_dataset(ds: SegDataset) -> CheckReport:
    """Read every sample of `ds` (as stored, before any rescaling) and collect statistics and problems."""
    classes = ds.info.classes
    report = CheckReport(ds.name, classes, images=len(ds))
    counts = np.zeros(256, np.int64)
    for i, item in enumerate(ds.items):
        try:
            sample = ds.load(i)
        except DataError as err:
            report.unreadable.append(str(err))
            continue
        if sample.mask is None:
            report.without_mask += 1
            continue
        report.masks += 1
        (h, w), (mh, mw) = sample.image.shape[:2], sample.mask.shape
        if (mh, mw) != (h, w):
            report.size_mismatch.append(f"{item.mask}: mask {mw}x{mh}, image {w}x{h}")
        counts += np.bincount(sample.mask.ravel(), minlength=256)
        for value in bad_label_values(sample.mask, len(classes)):
            report.bad_labels.setdefault(value, []).append(str(item.mask))
    report.class_pixels = counts[: len(classes)].copy()
    report.ignore_pixels = int(counts[IGNORE])
    report.mask_pixels = int(counts.sum())
    return report


def format_report(report: CheckReport) -> str:
    """A readable text report: counts, a class-frequency table, the ignore share, then errors."""
    lines = [
        f"{report.name}: {report.images} images, {report.masks} masks, {report.without_mask} without mask",
    ]
    labeled = report.labeled_pixels
    if labeled:
        width = max(len(c) for c in report.classes)
        lines.append(f"  {'class':<{width}}  % of labeled pixels")
        for name, n in zip(report.classes, report.class_pixels.tolist()):
            lines.append(f"  {name:<{width}}  {100 * n / labeled:6.2f}")
        lines.append(f"  ignore ({IGNORE}): {100 * report.ignore_pixels / report.mask_pixels:.2f}% of mask pixels")
    errors = report.errors
    lines.append(f"  errors: {len(errors)}" if errors else "  errors: none")
    lines += [f"  error: {e}" for e in errors]
    return "\n".join(lines)


def run_check(cfg: DataConfig, splits: list[str]) -> int:
    """Check each split (default: train and val splits), print the reports; 1 when any problem was found."""
    status = 0
    for split in splits or [cfg.train_split, cfg.val_split]:
        try:
            ds = build_dataset(cfg, split, check_files=False)
        except DataError as err:
            print(f"error: {err}")
            status = 1
            continue
        report = check_dataset(ds)
        print(format_report(report))
        status |= bool(report.errors)
    return status

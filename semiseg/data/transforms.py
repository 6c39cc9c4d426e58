"""Weak joint (image, mask) transforms, per sample on the CPU (numpy + PIL).

Every op takes and returns the triple (image uint8 (H, W, 3), mask uint8 (H, W), pad bool (H, W)), so the
mask and the padding map stay aligned with the image pixel for pixel. Randomness comes only from the
`np.random.Generator` argument: a sampler that passes a per-sample generator gets exactly the same crop
again on resume. Strong (photometric) augmentation is not here: it runs batched on the device
(`semiseg.data.augment`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from semiseg.data.info import IGNORE
from semiseg.errors import DataError

Triple = tuple[np.ndarray, np.ndarray, np.ndarray]


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.array(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.array(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


def resize(image: np.ndarray, mask: np.ndarray, pad: np.ndarray, size: tuple[int, int]) -> Triple:
    """Resize to size=(h, w): image bilinear, mask and pad nearest."""
    pad = _resize_labels(pad.astype(np.uint8), size).astype(bool)
    return _resize_image(image, size), _resize_labels(mask, size), pad


def rescale(
    image: np.ndarray,
    mask: np.ndarray,
    pad: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: int = 0,
) -> Triple:
    """Random rescale: the new long side is an integer in [lo, hi] x base (base_size, or the image's own long side)."""
    h, w = mask.shape
    base = base_size or max(h, w)
    long_side = int(rng.integers(int(base * scale_range[0]), int(base * scale_range[1]), endpoint=True))
    long_side = max(long_side, 1)
    # the +0.5 rounding of the short side follows UniMatch/ST++ so crops match theirs
    if h > w:
        size = (long_side, max(int(w * long_side / h + 0.5), 1))
    else:
        size = (max(int(h * long_side / w + 0.5), 1), long_side)
    return resize(image, mask, pad, size)


def pad_to(image: np.ndarray, mask: np.ndarray, pad: np.ndarray, size: int | tuple[int, int]) -> Triple:
    """Pad bottom/right up to at least size=(h, w): image with 0, mask with IGNORE, pad map with True."""
    ch, cw = _size_hw(size)
    h, w = mask.shape
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph == 0 and pw == 0:
        return image, mask, pad
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE)
    pad = np.pad(pad, ((0, ph), (0, pw)), constant_values=True)
    return image, mask, pad


def random_crop(
    image: np.ndarray, mask: np.ndarray, pad: np.ndarray, rng: np.random.Generator, size: int | tuple[int, int]
) -> Triple:
    """Random crop of size=(h, w), padding first where the image is smaller."""
    image, mask, pad = pad_to(image, mask, pad, size)
    ch, cw = _size_hw(size)
    h, w = mask.shape
    y = int(rng.integers(0, h - ch, endpoint=True))
    x = int(rng.integers(0, w - cw, endpoint=True))
    return image[y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw], pad[y : y + ch, x : x + cw]


def hflip(image: np.ndarray, mask: np.ndarray, pad: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> Triple:
    """Horizontal flip of all three with probability p."""
    if rng.random() < p:
        return image[:, ::-1], mask[:, ::-1], pad[:, ::-1]
    return image, mask, pad


def weak_transform(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    crop: int | tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: int = 0,
) -> Triple:
    """Rescale, pad, crop, flip -> image uint8 (h, w, 3), mask uint8 (h, w) (IGNORE on padding), pad bool (h, w)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
    if mask is None:
        mask = np.full(image.shape[:2], IGNORE, dtype=np.uint8)
    elif mask.shape != image.shape[:2] or mask.dtype != np.uint8:
        raise DataError(f"expected a uint8 mask of shape {image.shape[:2]}, got {mask.dtype} {mask.shape}")
    pad = np.zeros(image.shape[:2], dtype=bool)
    image, mask, pad = rescale(image, mask, pad, rng, scale_range, base_size)
    image, mask, pad = random_crop(image, mask, pad, rng, crop)
    image, mask, pad = hflip(image, mask, pad, rng)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask), np.ascontiguousarray(pad)

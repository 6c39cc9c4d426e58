"""Predictions on new images: an index mask, a colour mask and an overlay per image, each written atomically.

For every input `<stem>.<ext>` the output folder receives `<stem>.png` (palette PNG whose pixel values are
class indices), `<stem>_color.png` (RGB in the dataset's palette) and `<stem>_overlay.jpg` (the image
blended with the colour mask). Large images go through sliding windows in mode 'auto'.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from semiseg import atomic
from semiseg.data.datasets import index_image
from semiseg.data.info import DatasetInfo
from semiseg.engine.evaluate import predict, to_unit
from semiseg.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str | Path) -> list[Path]:
    """[path] for an image file; the images directly inside a folder, sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such image file or folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return images


def read_image(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB pixels of an image file; DataError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot read image ({reason})") from None


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """uint8 (H, W) class indices -> uint8 (H, W, 3) palette colours; indices without a colour are black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    return lut[mask]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) image blended with a colour mask of the same size: (1 - alpha) * image + alpha * color."""
    if image.shape != color.shape:
        raise ValueError(f"image {image.shape} and colour mask {color.shape} differ in shape")
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _save(im: Image.Image, path: Path) -> None:
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}[path.suffix.lower()]
    atomic.write_bytes(path, lambda tmp: im.save(tmp, format=fmt, **({"quality": 90} if fmt == "JPEG" else {})))


def _outputs(path: Path, out_dir: Path, overlay_ext: str) -> tuple[Path, Path, Path]:
    """(index, colour, overlay) output paths of one input image."""
    return (
        out_dir / f"{path.stem}.png",
        out_dir / f"{path.stem}_color.png",
        out_dir / f"{path.stem}_overlay{overlay_ext}",
    )


def _progress(done: int, total: int, start: float) -> None:
    """'predict 12/100  3.4 img/s' on stderr: rewritten in place on a terminal, every 10% in a log file."""
    rate = done / max(time.perf_counter() - start, 1e-9)
    line = f"predict {done}/{total}  {rate:.2f} img/s"
    if sys.stderr.isatty():
        print(f"\r{line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(line, file=sys.stderr, flush=True)


def predict_images(
    model: nn.Module,
    paths: Sequence[str | Path],
    info: DatasetInfo,
    out_dir: str | Path,
    mode: str = "auto",
    window: int = 512,
    stride: float = 2 / 3,
    max_whole: int = 1024,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    alpha: float = 0.5,
    overlay_ext: str = ".jpg",
    skip_existing: bool = False,
) -> list[Path]:
    """Write index, colour and overlay images for each input; return the index-mask paths.

    mode 'auto': sliding windows of `window` when the dataset evaluates that way or an image's long side
    exceeds `max_whole`, else the whole image. `skip_existing` resumes an interrupted run.
    """
    paths = [Path(p) for p in paths]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise DataError(f"{p}: same name as {stems[p.stem]}; outputs would overwrite each other")
        if p.resolve() in {o.resolve() for o in _outputs(p, out_dir, overlay_ext)}:
            raise DataError(f"{p}: the output folder would overwrite this input image; choose another --out")
        stems[p.stem] = p
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    written = []
    start = time.perf_counter()
    for done, path in enumerate(paths, 1):
        index_path, color_path, overlay_path = _outputs(path, out_dir, overlay_ext)
        if not (skip_existing and index_path.exists() and color_path.exists() and overlay_path.exists()):
            image = read_image(path)
            h, w = image.shape[:2]
            chosen = mode
            if mode == "auto":
                chosen = "sliding" if info.eval_mode == "sliding" or max(h, w) > max_whole else "whole"
            x = to_unit(torch.from_numpy(image).to(device).permute(2, 0, 1)[None])
            scores = predict(
                model,
                x,
                chosen,
                num_classes=info.num_classes,
                window=window,
                stride=stride,
                scales=scales,
                flip=flip,
                amp_dtype=amp_dtype,
            )
            mask = scores[0].argmax(0).to(torch.uint8).cpu().numpy()
            color = colorize(mask, info.palette)
            _save(index_image(mask, info.palette), index_path)
            _save(Image.fromarray(color), color_path)
            _save(Image.fromarray(overlay(image, color, alpha)), overlay_path)
        written.append(index_path)
        _progress(done, len(paths), start)
    return written

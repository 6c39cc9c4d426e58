"""Strong augmentation speed: batched torch ops (semiseg.data.augment) vs per-sample PIL, as the reference repos do.

The work per batch is the UniMatch strong view: colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5),
then a CutMix box (p 0.5) pasted from a partner image. Prints the median milliseconds per batch of each.

    python benchmarks/augment_speed.py [--batch 16] [--size 321] [--runs 7] [--threads 2] [--device cpu|cuda]

OMP_WAIT_POLICY defaults to PASSIVE here; run with OMP_WAIT_POLICY=ACTIVE to see OpenMP's default.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# on shared cores, OpenMP's default busy-waiting makes every 2-thread torch op wait for a descheduled spinner
# (measured: a 1.6M-element add takes 12 ms instead of 0.5 ms); must be set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from semiseg.data import augment  # noqa: E402


def pil_hue(img: Image.Image, shift: float) -> Image.Image:
    """torchvision's PIL adjust_hue: shift the H channel of HSV with uint8 wrap-around."""
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.uint8(int(shift * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def pil_strong(img: Image.Image, partner: Image.Image, rng: random.Random) -> Image.Image:
    """One sample of the reference pipeline: ColorJitter(0.5, 0.5, 0.5, 0.25) p 0.8, grayscale, blur, box paste."""
    if rng.random() < 0.8:
        ops = [
            lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.5, 1.5)),
            lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.5, 1.5)),
            lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.5, 1.5)),
            lambda im: pil_hue(im, rng.uniform(-0.25, 0.25)),
        ]
        rng.shuffle(ops)
        for op in ops:
            img = op(img)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < 0.5:
        w, h = img.size
        while True:
            size = rng.uniform(0.02, 0.4) * w * h
            ratio = rng.uniform(0.3, 1 / 0.3)
            bw, bh = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
            x, y = rng.randrange(w), rng.randrange(h)
            if x + bw <= w and y + bh <= h:
                break
        img = img.copy()
        img.paste(partner.crop((x, y, x + bw, y + bh)), (x, y))
    return img


def run_pil(batch: np.ndarray, seed: int) -> list[Image.Image]:
    rng = random.Random(seed)
    pils = [Image.fromarray(a) for a in batch]
    return [pil_strong(im, pils[(i + 1) % len(pils)], rng) for i, im in enumerate(pils)]


def run_torch(x: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = augment.strong_view(x, gen)
    box = augment.cutmix_box(x.shape[0], x.shape[2], x.shape[3], gen, device=x.device)
    out = augment.mix(s, s.roll(1, 0), box)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def median_ms(fn, runs: int) -> float:
    fn(0)  # warm-up: allocator, kernels, PIL filter tables
    times = []
    for i in range(runs):
        start = time.perf_counter()
        fn(i + 1)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(args.device)
    pil_ms = median_ms(lambda seed: run_pil(batch, seed), args.runs)
    torch_ms = median_ms(lambda seed: run_torch(x, seed), args.runs)
    where = f"{args.device}, threads={args.threads}"
    print(f"strong view + CutMix, {args.batch} crops {args.size}x{args.size}, median of {args.runs} runs", end="")
    print(f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"  {'PIL per sample (1 process)':32s} {pil_ms:8.1f} ms/batch")
    print(f"  {f'torch batched ({where})':32s} {torch_ms:8.1f} ms/batch   (PIL / torch = {pil_ms / torch_ms:.2f})")


if __name__ == "__main__":
    main()

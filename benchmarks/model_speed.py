"""Forward+backward throughput (images/s) of every backbone x head, and of the small CPU configurations.

    .venv/bin/python benchmarks/model_speed.py                 # full table (several minutes on 2 cores)
    .venv/bin/python benchmarks/model_speed.py --small-only    # only the CPU-sized candidates

Training-mode BatchNorm, cross-entropy against random labels, no optimizer step; the fastest iteration of each
measurement counts. Figures depend on what else runs on the machine: compare rows of one run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from torch.nn import functional as F

from semiseg.config import ModelConfig
from semiseg.models import BACKBONES, HEADS, build_model

NUM_CLASSES = 21
SMALL_CANDIDATES = {
    "r18-w16-os16": ModelConfig(
        backbone="resnet18", width=16, output_stride=16, head_channels=64, low_level_channels=16
    ),
    "r18-w32-os16": ModelConfig(
        backbone="resnet18", width=32, output_stride=16, head_channels=64, low_level_channels=16
    ),
    "r18-w16-os8": ModelConfig(backbone="resnet18", width=16, output_stride=8, head_channels=64, low_level_channels=16),
    "r18-w32-os8": ModelConfig(backbone="resnet18", width=32, output_stride=8, head_channels=64, low_level_channels=16),
}


def images_per_second(cfg: ModelConfig, batch: int, height: int, width: int, warmup: int, iters: int) -> float:
    """Training-mode forward+backward images/s of build_model(cfg) on random (batch, 3, height, width) input.

    The fastest iteration counts: on a shared machine it is the one least slowed down by other processes.
    """
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).train()
    x = torch.randn(batch, 3, height, width)
    y = torch.randint(0, NUM_CLASSES, (batch, height, width))
    seconds = []
    for _ in range(warmup + iters):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        seconds.append(time.perf_counter() - start)
    return batch / min(seconds[warmup:])


def parameters_m(cfg: ModelConfig) -> float:
    """Millions of parameters of build_model(cfg)."""
    return sum(p.numel() for p in build_model(cfg, NUM_CLASSES).parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=321, help="square input of the full-size table")
    parser.add_argument("--batch", type=int, default=2, help="batch of the full-size table")
    parser.add_argument("--small-batch", type=int, default=4, help="batch of the small-config table")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--small-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, training-mode forward+backward")

    if not args.small_only:
        print(f"\nfull width, output stride 16, {args.size}x{args.size}, batch {args.batch}")
        print(f"{'backbone':<12} {'head':<15} {'params (M)':>10} {'img/s':>8}")
        for backbone in BACKBONES:
            for head in HEADS:
                cfg = ModelConfig(backbone=backbone, head=head, output_stride=16)
                ips = images_per_second(cfg, args.batch, args.size, args.size, args.warmup, args.iters)
                print(f"{backbone:<12} {head:<15} {parameters_m(cfg):>10.1f} {ips:>8.2f}", flush=True)

    print(f"\nsmall CPU candidates (resnet18, deeplabv3plus, head 64, low-level 16), batch {args.small_batch}")
    print(f"{'config':<14} {'stem':<12} {'params (M)':>10} {'96x96 img/s':>12} {'240x180 img/s':>14}")
    for name, cfg in SMALL_CANDIDATES.items():
        for stem in ("deep", "torchvision"):
            cfg_stem = replace(cfg, stem=stem)
            small = images_per_second(cfg_stem, args.small_batch, 96, 96, 2, 5)
            large = images_per_second(cfg_stem, args.small_batch, 180, 240, 1, 3)
            print(f"{name:<14} {stem:<12} {parameters_m(cfg_stem):>10.2f} {small:>12.1f} {large:>14.1f}", flush=True)


if __name__ == "__main__":
    main()

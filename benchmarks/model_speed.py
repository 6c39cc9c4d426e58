"""Forward+backward throughput (images/s) of every backbone x head, and of the small CPU configurations.

    .venv/bin/python benchmarks/model_speed.py                 # full table (several minutes on 2 cores)
    .venv/bin/python benchmarks/model_speed.py --small-only    # only the CPU-sized candidates

Training-mode BatchNorm, cross-entropy against random labels, no optimizer step. The fastest step of each
measurement counts, and the small configs take turns step by step, because the figures depend on what else
runs on the machine: compare rows of one run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from torch.nn import functional as F

from semiseg.config import ModelConfig
from semiseg.models import BACKBONES, HEADS, build_model
from semiseg.models.resnet import STEMS

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


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Wall-clock seconds of one training-mode forward+backward."""
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


def images_per_second(
    cfgs: dict[str, ModelConfig], batch: int, height: int, width: int, warmup: int, iters: int
) -> dict[str, float]:
    """Forward+backward images/s of build_model(cfg) for each cfg, on random (batch, 3, height, width) input.

    The models take turns, one step each per round, and each one's fastest step counts: on a shared machine,
    other processes then slow every model alike and the minimum is the least disturbed measurement.
    """
    torch.manual_seed(0)
    models = {name: build_model(cfg, NUM_CLASSES).train() for name, cfg in cfgs.items()}
    x = torch.randn(batch, 3, height, width)
    y = torch.randint(0, NUM_CLASSES, (batch, height, width))
    best = dict.fromkeys(models, float("inf"))
    for i in range(warmup + iters):
        for name, model in models.items():
            seconds = step_seconds(model, x, y)
            if i >= warmup:
                best[name] = min(best[name], seconds)
    return {name: batch / s for name, s in best.items()}


def conv_gmacs(cfg: ModelConfig, height: int, width: int) -> float:
    """Forward multiply-accumulates of the convolutions per image, in billions (independent of machine load)."""
    model = build_model(cfg, NUM_CLASSES).eval()
    macs = []

    def count(conv: torch.nn.Conv2d, inputs, out: torch.Tensor) -> None:
        macs.append(out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1])

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, height, width))
    return sum(macs) / 1e9


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
    parser.add_argument("--small-rounds", type=int, default=8, help="timed steps of each small config")
    parser.add_argument("--small-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, training-mode forward+backward")

    if not args.small_only:
        print(f"\nfull width, output stride 16, {args.size}x{args.size}, batch {args.batch}")
        print(f"{'backbone':<12} {'head':<15} {'params (M)':>10} {'GMAC/img':>9} {'img/s':>8}")
        for backbone in BACKBONES:
            for head in HEADS:
                cfg = ModelConfig(backbone=backbone, head=head, output_stride=16)
                ips = images_per_second({"": cfg}, args.batch, args.size, args.size, args.warmup, args.iters)[""]
                gmacs = conv_gmacs(cfg, args.size, args.size)
                print(f"{backbone:<12} {head:<15} {parameters_m(cfg):>10.1f} {gmacs:>9.1f} {ips:>8.2f}", flush=True)

    candidates = {(name, stem): replace(cfg, stem=stem) for name, cfg in SMALL_CANDIDATES.items() for stem in STEMS}
    print(f"\nsmall CPU candidates (resnet18, deeplabv3plus, head 64, low-level 16), batch {args.small_batch}")
    small = images_per_second(candidates, args.small_batch, 96, 96, 1, args.small_rounds)
    large = images_per_second(candidates, args.small_batch, 180, 240, 1, args.small_rounds)
    print(
        f"{'config':<14} {'stem':<12} {'params (M)':>10} {'GMAC 96/240':>12} {'96x96 img/s':>12} {'240x180 img/s':>14}"
    )
    for (name, stem), cfg in candidates.items():
        gmacs = f"{conv_gmacs(cfg, 96, 96):.2f}/{conv_gmacs(cfg, 180, 240):.2f}"
        row = f"{name:<14} {stem:<12} {parameters_m(cfg):>10.2f} {gmacs:>12}"
        print(f"{row} {small[name, stem]:>12.1f} {large[name, stem]:>14.1f}", flush=True)


if __name__ == "__main__":
    main()

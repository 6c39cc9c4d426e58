"""Run under torchrun by tests/test_distributed.py: a train-mode teacher's BatchNorm statistics under 2 processes.

argv: output path, then --set overrides. Every rank builds the method's networks the way fit does (engine.loop
build_nets), feeds its half of a fixed 4-image batch through the teacher in train mode, and rank 0 saves every
BatchNorm's running mean and variance and its class name.
"""

import os
import sys

import torch

from semiseg.data.datasets import dataset_info
from semiseg.engine import dist
from semiseg.engine.loop import build_nets
from semiseg.methods import METHODS, load_config


def fixed_batch() -> torch.Tensor:
    """4 uint8 images (4, 3, 32, 32) from a fixed seed: the whole batch both processes share."""
    return torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def bn_stats(net: torch.nn.Module) -> dict:
    """{module name: (class name, running_mean, running_var)} of every BatchNorm of `net`."""
    return {
        name: (type(m).__name__, m.running_mean.clone(), m.running_var.clone())
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    method = METHODS[cfg.method.name]
    device = dist.init("cpu")
    nets = build_nets(cfg, method, dataset_info(cfg.data), device)
    teacher = nets[method.TRAIN_MODE_TEACHERS[0]].train()
    share = fixed_batch().chunk(dist.world_size())[dist.rank()]
    with torch.no_grad():
        teacher(share)
    if dist.is_main():
        torch.save(bn_stats(teacher), out)
    dist.barrier()
    # Leave without tearing the Gloo group down: in 1 of ~27 runs (2026-12-04) a rank aborted inside that teardown
    # ("terminate called without an active exception") after the statistics were saved. What this script measures
    # is done at the barrier; the product's own teardown (engine.dist.cleanup) is exercised by the torchrun
    # training tests in tests/test_distributed.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

"""Shared set-up of the per-method test files: random batches, built networks, a step's Context."""

import torch

from semiseg.data.batch import Batch, LabeledBatch, UnlabeledBatch
from semiseg.data.datasets import dataset_info
from semiseg.engine.loop import Context
from semiseg.methods import load_config


def random_batch(num_classes, n=2, size=32, seed=0, ignore_rows=0):
    """n labeled + n unlabeled uint8 crops; the top `ignore_rows` mask rows are 255; the last 4 unlabeled columns
    are padding; the unlabeled part carries its ground truth (for pl_acc)."""
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)  # noqa: E731
    mask = torch.randint(0, num_classes, (n, size, size), generator=g)
    mask[:, :ignore_rows] = 255
    pad = torch.zeros(n, size, size, dtype=torch.bool)
    pad[:, -4:] = True
    return Batch(LabeledBatch(img(), mask), UnlabeledBatch(img(), pad, mask=mask.clone()))


def method_nets(module, tiny, *sets):
    """(cfg, info, nets in train mode) of a method module on the tiny overrides, seeded."""
    cfg = load_config(None, tiny + [f"method.name={module.Config.name}", *sets])
    info = dataset_info(cfg.data)
    torch.manual_seed(0)
    nets = module.build(cfg, info)
    for net in nets.values():
        net.train()
    return cfg, info, nets


def ctx_at(cfg, info, step, seed=0):
    return Context(step, 100, torch.Generator().manual_seed(seed), info, torch.device("cpu"), cfg)

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = [
    "data.dataset=synthetic",
    "data.synthetic_train=24",
    "data.synthetic_val=6",
    "data.synthetic_size=32",
    "data.labeled=8",
    "data.crop=32",
    "data.batch_size=2",
    "data.batch_size_u=2",
    "data.workers=0",
    "model.backbone=resnet18",
    "model.width=8",
    "model.head_channels=16",
    "model.low_level_channels=8",
    "model.output_stride=8",
    "optim.lr=0.01",
    "train.log_every=1",
    "eval.max_images=4",
]


@pytest.fixture
def tiny_overrides():
    """Overrides that make any preset a seconds-long CPU run on the synthetic dataset."""
    return list(TINY)

"""ST and ST++: offline self-training. A supervised teacher pseudo-labels the unlabeled images (TTA, no threshold) and a
fresh student retrains on labeled + pseudo-labeled crops, strongly augmented where pseudo-labeled; ST++ first ranks
the unlabeled images by how stable the teacher's predictions are across K checkpoints, retrains on the reliable half,
re-labels the unreliable half with that student and retrains on everything.

Paper: Yang et al., "ST++: Make Self-training Work Better for Semi-supervised Semantic Segmentation", CVPR 2022
(official code `LiheYoung/ST-PlusPlus`, `main.py`; METHODS.md 1.1).
Loss: plain cross-entropy (or OHEM, method.criterion) averaged over the non-ignored pixels of the mixed batch; padded
and Cutout pixels are ignored. Strong augmentation (colour jitter, grayscale, blur, Cutout) touches only the crops
whose mask is a pseudo-label (batch.l.pseudo), on the device.
Stages (semiseg.methods.selftrain, run by semiseg.engine.run): ST = 1_teacher, 2_label, 3_student; ST++ =
1_teacher (K snapshots), 2_select, 3_label, 4_student1, 5_relabel, 6_student2, each in its own folder under the run;
rerunning resumes at the first unfinished stage. Budget: every training stage trains a fresh network for the preset's
train.iters (or train.epochs over its own list), so ST costs two trainings and ST++ three. ST keeps the K teacher
snapshots too (`semiseg suggest` reads them; method.snapshots=0 skips them).
Names: "st" and "stpp" are both this module. The name alone selects the pipeline (`Config.plus` is derived from it),
so a config cannot say "st" and run ST++, and one Config class documents both.
Command: `torchrun --nproc_per_node 2 -m semiseg train configs/pascal/stpp_r101_732.yaml`; expected 77.3 mIoU on
VOC-732 (ST++, DeepLabV3+ R101, UniMatch README).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from semiseg.engine.evaluate import predict_multiscale, predict_whole
from semiseg.engine.loop import StepOut
from semiseg.losses import supervised_loss
from semiseg.methods import selftrain
from semiseg.methods.selftrain import SelfTrainConfig, augment_pseudo
from semiseg.models import build_model


@dataclass(frozen=True)
class Config(SelfTrainConfig):
    name: str = "st"
    """st (ST: 3 stages) | stpp (ST++: 6 stages); both names select this module"""

    @property
    def plus(self) -> bool:
        """ST++ is the method name stpp."""
        return self.name == "stpp"

    def __post_init__(self):
        super().__post_init__()
        if self.name not in ("st", "stpp"):
            raise ValueError(f"name must be st or stpp for this module, got {self.name!r}")
        if self.plus and self.snapshots < 2:
            raise ValueError(f"snapshots: ST++ ranks images across at least 2 teacher snapshots, got {self.snapshots}")


TRAINED = ("model",)
EVAL_NETS = ("model",)
USES_UNLABELED = False
"""pseudo-labeled images reach the loop as labeled parts (pseudo=True) of one shuffled list"""


def build(cfg, info):
    return {"model": build_model(cfg.model, info.num_classes)}


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    l = batch.l  # noqa: E741
    image, mask = augment_pseudo(l.image, l.mask, l.pseudo, ctx.gen, cfg.strong)
    logits = nets["model"](image)
    loss = supervised_loss(logits, mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    logs = {"train/loss_x": loss.detach()}
    if l.pseudo is not None:
        logs["train/pseudo_share"] = l.pseudo.float().mean()
    return StepOut(loss, logs)


def label(net, x: torch.Tensor, gen: torch.Generator, cfg: Config) -> torch.Tensor:
    """Pseudo-label long (B, H, W): argmax of the softmax summed over tta_scales x {identity, flip}; no threshold."""
    return predict_multiscale(net, x, cfg.tta_scales, cfg.tta_flip).argmax(1)


def predict(net, x: torch.Tensor) -> torch.Tensor:
    """Plain argmax long (B, H, W), one forward: what the stability score compares."""
    return predict_whole(net, x).argmax(1)


def stages(cfg):
    """ST's three stages, or ST++'s six (method.name stpp)."""
    return selftrain.stages(cfg, partial(label, cfg=cfg.method), predict)


summarize = selftrain.summarize

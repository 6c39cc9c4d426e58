"""Supervised baseline: cross-entropy (or OHEM) on the labeled crops only.

The reference point of every semi-supervised table ("SupBaseline"): same model, crops and schedule, no
unlabeled images. UniMatch's protocol doubles the labeled batch for it (set data.batch_size accordingly).
Command: `semiseg train configs/demo.yaml`; UniMatch's R101 VOC-92 SupBaseline reaches 45.1 mIoU.
"""

from dataclasses import dataclass

from semiseg.config import MethodConfig
from semiseg.engine.loop import StepOut
from semiseg.losses import supervised_loss
from semiseg.models import build_model


@dataclass(frozen=True)
class Config(MethodConfig):
    name: str = "supervised"
    """method name"""


TRAINED = ("model",)
EVAL_NETS = ("model",)
USES_UNLABELED = False


def build(cfg, info):
    return {"model": build_model(cfg.model, info.num_classes)}


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    logits = nets["model"](batch.l.image)
    loss = supervised_loss(logits, batch.l.mask, cfg.criterion, cfg.ohem_thresh, cfg.ohem_min_kept)
    return StepOut(loss, {"train/loss_x": loss.detach()})

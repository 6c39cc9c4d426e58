"""BST: branch network self-training. ST++'s stages with a multi-branch network: B decoder branches of different
semantic emphasis (context: DeepLabV3 ASPP; detail: DeepLabV3+ decoder; optional pyramid: PSP pooling) on a shared
encoder, fused by a branch attention fusion module (BAFM) whose output is the prediction; the branches' pseudo-labels
are fused per pixel by their certainty and perturbed with pixel-level noise.

Paper: "Branch network self-training" (Chinese journal; no public text or code). Everything here is the design of
METHODS.md section 2, built from the abstract: 2(a) stages, 2(b) loss, 2(d) fused noisy pseudo-labels, 2(g) BAFM,
2(h) the shared/separate switch; the network (BranchNet, BAFM) is semiseg.models.branch.
Loss: L = (1/B) sum_b CE(z_b, y) + w_fused CE(z_fused, y) (+ w_diversity x mean cosine similarity between branch
features, off by default), y = ground truth or the fused pseudo-label, CE over non-ignored pixels. Each branch loss
reaches its branch and the encoder only; the fused loss reaches BAFM, every branch and the encoder.
Pseudo-labels: per branch the TTA softmax p_b; weights w_b = softmax_b(-H(p_b) / T) per pixel (fusion weighted) or
1/B (mean); P = sum_b w_b p_b; noise gauss (argmax of P + N(0, noise_std^2)), flip (flip_rate of the pixels set to
255), input (N(0, input_std^2) on the normalised pseudo-labeled crops while training) or none. The ST++ stability
score compares the snapshots' fused (noise-free, single-scale) argmax maps.
Architecture knobs: model.* describes the encoder and the branch widths (model.head is not used: `branches` lists the
branch kinds); branch_mode shared = one encoder, separate = one full network (encoder + branch) per branch, whose
decoder features BAFM fuses. Budget and stage folders as ST++ (semiseg.methods.selftrain): three trainings when plus.
Command: `torchrun --nproc_per_node 2 -m semiseg train configs/pascal/bst_r101_732.yaml`; no published result: compare
with ST++ (77.3 mIoU on VOC-732, METHODS.md 1.1(f)) and the SupOnly teacher of the same run (1_teacher).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from semiseg.engine.checkpoint import unwrap
from semiseg.engine.evaluate import predict_multiscale
from semiseg.engine.loop import StepOut
from semiseg.losses import feature_cosine, supervised_loss
from semiseg.methods import selftrain
from semiseg.methods.selftrain import SelfTrainConfig, augment_pseudo
from semiseg.models import BRANCH_KINDS, BranchNet, build_branch_net
from semiseg.models.branch import LabelSources
from semiseg.ops import drop_pixels, entropy_weights, fuse_branches, input_noise, noisy_argmax

NOISES = ("none", "gauss", "flip", "input")
FUSIONS = ("weighted", "mean")


@dataclass(frozen=True)
class Config(SelfTrainConfig):
    name: str = "bst"
    """method name"""
    plus: bool = True
    """ST++'s six stages (reliable-image selection, two retrainings); False = ST's three"""
    branches: tuple[str, ...] = ("context", "detail")
    """kind of every decoder branch (their number is B): context | detail | pyramid"""
    branch_mode: str = "shared"
    """shared: one encoder under every branch | separate: a full network per branch, BAFM fuses their decoders"""
    attention_reduction: int = 4
    """BAFM channel attention: hidden width = head_channels / this (256 -> 64)"""
    w_fused: float = 1.0
    """weight of the fused (BAFM) cross-entropy, lambda_f"""
    w_diversity: float = 0.0
    """weight of the branch-diversity penalty (mean cosine similarity between branch features); 0 = off"""
    fusion: str = "weighted"
    """pseudo-label fusion of the branches: weighted (softmax of -entropy / temperature per pixel) | mean"""
    temperature: float = 1.0
    """temperature T of the entropy weights"""
    label_sources: str = "branches"
    """what the pseudo-label fuses: branches (the B branch heads, as designed) | all (the BAFM output too)"""
    pl_noise: str = "gauss"
    """pixel-level noise: none | gauss (on the fused probabilities) | flip (pixels set to 255) | input (images)"""
    noise_std: float = 0.05
    """gauss: sigma of the noise added to the fused probabilities before the argmax"""
    flip_rate: float = 0.05
    """flip: share of the pseudo-label pixels set to ignore"""
    input_std: float = 0.1
    """input: sigma of the noise added to the normalised pseudo-labeled crops during training"""

    def __post_init__(self):
        super().__post_init__()
        if not self.branches or any(b not in BRANCH_KINDS for b in self.branches):
            raise ValueError(f"branches must list kinds from {', '.join(BRANCH_KINDS)}, got {self.branches}")
        if self.branch_mode not in ("shared", "separate"):
            raise ValueError(f"branch_mode must be shared or separate, got {self.branch_mode!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.label_sources not in ("branches", "all"):
            raise ValueError(f"label_sources must be branches or all, got {self.label_sources!r}")
        if self.pl_noise not in NOISES:
            raise ValueError(f"pl_noise must be one of {', '.join(NOISES)}, got {self.pl_noise!r}")
        if self.temperature <= 0 or self.attention_reduction < 1:
            raise ValueError("temperature must be > 0 and attention_reduction >= 1")
        if min(self.noise_std, self.input_std, self.w_fused, self.w_diversity) < 0 or not 0 <= self.flip_rate < 1:
            raise ValueError("noise_std, input_std, w_fused, w_diversity must be >= 0 and flip_rate in [0, 1)")
        if self.w_diversity > 0 and len(self.branches) < 2:
            raise ValueError("w_diversity needs at least 2 branches")
        if self.plus and self.snapshots < 2:
            raise ValueError(f"snapshots: plus ranks images across at least 2 teacher snapshots, got {self.snapshots}")


TRAINED = ("model",)
EVAL_NETS = ("model",)
USES_UNLABELED = False
"""pseudo-labeled images reach the loop as labeled parts (pseudo=True) of one shuffled list"""


def build(cfg, info):
    m = cfg.method
    return {"model": build_branch_net(cfg.model, info.num_classes, m.branches, m.branch_mode, m.attention_reduction)}


def train_step(nets, batch, cfg: Config, ctx) -> StepOut:
    l = batch.l  # noqa: E741
    image, mask = augment_pseudo(l.image, l.mask, l.pseudo, ctx.gen, cfg.strong)
    x = image
    if cfg.pl_noise == "input" and l.pseudo is not None:  # sigma in the network's normalised units
        x = input_noise(image.float() / 255, cfg.input_std * unwrap(nets["model"]).input_norm.std, ctx.gen, l.pseudo)
    out = nets["model"].forward_branches(x)
    ce = partial(
        supervised_loss, mask=mask, criterion=cfg.criterion, thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept
    )
    loss_b = torch.stack([ce(z) for z in out.branches]).mean()
    loss_f = ce(out.fused)
    loss = loss_b + cfg.w_fused * loss_f
    logs = {"train/loss_x": loss_b.detach(), "train/loss_fused": loss_f.detach()}
    if cfg.w_diversity > 0:
        loss_d = feature_cosine(out.features)
        loss = loss + cfg.w_diversity * loss_d
        logs["train/loss_diversity"] = loss_d.detach()
    if l.pseudo is not None:
        logs["train/pseudo_share"] = l.pseudo.float().mean()
    return StepOut(loss, logs)


def source_probs(net: BranchNet, x: Tensor, cfg: Config, scales: Sequence[float], flip: bool) -> Tensor:
    """TTA probabilities (S, N, K, H, W) of every label source (the branches, and BAFM with label_sources all)."""
    view = LabelSources(net, cfg.label_sources == "all")
    probs = predict_multiscale(view, x, scales, flip)
    return probs.view(-1, x.shape[0], *probs.shape[1:])


def fuse(probs: Tensor, cfg: Config) -> Tensor:
    """Fused probabilities (N, K, H, W) of the sources (S, N, K, H, W): entropy-weighted or the mean."""
    if cfg.fusion == "mean":
        return probs.mean(0)
    return fuse_branches(probs, entropy_weights(probs, cfg.temperature))


def label(net, x: Tensor, gen: torch.Generator, cfg: Config) -> Tensor:
    """Fused, noisy pseudo-label long (N, H, W) (255 where flip noise drops a pixel)."""
    prob = fuse(source_probs(net, x, cfg, cfg.tta_scales, cfg.tta_flip), cfg)
    if cfg.pl_noise == "gauss":
        return noisy_argmax(prob, cfg.noise_std, gen)
    target = prob.argmax(1)
    if cfg.pl_noise == "flip":
        return drop_pixels(target, cfg.flip_rate, gen)
    return target


def predict(net, x: Tensor, cfg: Config) -> Tensor:
    """Noise-free fused argmax long (N, H, W) at one scale: what the stability score compares."""
    return fuse(source_probs(net, x, cfg, (1.0,), False), cfg).argmax(1)


def stages(cfg):
    """ST++'s six stages (ST's three when plus is false) with the branch network's fused, noisy pseudo-labels."""
    return selftrain.stages(cfg, partial(label, cfg=cfg.method), partial(predict, cfg=cfg.method))


summarize = selftrain.summarize

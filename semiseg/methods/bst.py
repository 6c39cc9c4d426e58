"""BST: branch network self-training. ST++'s stages with a multi-branch network: B decoder branches of different
semantic emphasis (context: DeepLabV3 ASPP; detail: DeepLabV3+ decoder; optional pyramid: PSP pooling) on a shared
encoder, fused by a branch attention fusion module (BAFM) whose output is the prediction; the branches' pseudo-labels
are fused per pixel by their certainty and perturbed with pixel-level noise.

Paper: "Branch network self-training" (Chinese journal; no public text or code). Everything here is the design of
METHODS.md section 2, built from the abstract: 2(a) stages, 2(b) loss, 2(d) fused noisy pseudo-labels, 2(g) BAFM,
2(h) the shared/separate switch.
Loss: L = (1/B) sum_b CE(z_b, y) + w_fused CE(z_fused, y) (+ w_diversity x mean cosine similarity between branch
features, off by default), y = ground truth or the fused pseudo-label, CE over non-ignored pixels. Each branch loss
reaches its branch and the encoder only; the fused loss reaches BAFM, every branch and the encoder.
Pseudo-labels: per branch the TTA softmax p_b; weights w_b = softmax_b(-H(p_b) / T) per pixel (fusion weighted) or
1/B (mean); P = sum_b w_b p_b; noise gauss (argmax of P + N(0, noise_std^2)), flip (flip_rate of the pixels set to
255), input (N(0, input_std^2) on the normalised pseudo-labeled crops while training) or none. The ST++ stability
score compares the snapshots' fused (noise-free, single-scale) argmax maps.
Architecture knobs: model.* describes the encoder and the branch widths (model.head is not used: `branches` lists the
branch kinds); branch_mode shared = one encoder, separate = one full network (encoder + branch) per branch, whose
decoder features BAFM fuses. Budget and stage folders as ST++ (semiseg.selftrain): three trainings when plus.
Command: `torchrun --nproc_per_node 2 -m semiseg train configs/pascal/bst_r101_732.yaml`; no published result: compare
with ST++ (77.3 mIoU on VOC-732, METHODS.md 1.1(f)) and the SupOnly teacher of the same run (1_teacher).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from semiseg.config import ModelConfig
from semiseg.engine.checkpoint import unwrap
from semiseg.engine.evaluate import predict_multiscale
from semiseg.engine.loop import StepOut
from semiseg.losses import feature_cosine, supervised_loss
from semiseg.models import InputNorm, build_encoder, build_head, upsample
from semiseg.models.deeplab import conv_bn_relu
from semiseg.ops import drop_pixels, entropy_weights, fuse_branches, input_noise, noisy_argmax
from semiseg.selftrain import Recipe, SelfTrainConfig, augment_pseudo, run_stages

log = logging.getLogger(__name__)

BRANCH_KINDS = ("context", "detail", "pyramid")
"""context: DeepLabV3 ASPP head (stride 8); detail: DeepLabV3+ decoder (stride 4); pyramid: PSP pooling (stride 8)"""
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


class PyramidPoolingHead(nn.Module):
    """PSPNet head: c4 average-pooled to bins 1/2/3/6, each reduced by a 1x1 conv and upsampled, concatenated with c4,
    then a 3x3 conv; features at c4's stride."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        head_channels: int = 256,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: bool = False,
    ):
        super().__init__()
        in_ch = channels[-1]
        reduced = max(in_ch // len(bins), 1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(in_ch, reduced, 1)) for b in bins
        )
        bottleneck = [*conv_bn_relu(in_ch + reduced * len(bins), head_channels, 3)]
        if dropout:
            bottleneck.append(nn.Dropout2d(0.1))
        self.bottleneck = nn.Sequential(*bottleneck)
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.out_channels = head_channels

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """[c1..c4] -> (B, head_channels, h4, w4)."""
        x = feats[-1]
        pooled = [F.interpolate(s(x), size=x.shape[-2:], mode="bilinear", align_corners=True) for s in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))


def build_branch(kind: str, cfg: ModelConfig, channels: Sequence[int], num_classes: int) -> nn.Module:
    """A decoder branch of the given kind (BRANCH_KINDS) on a backbone with these feature channels."""
    if kind == "context":
        return build_head(cfg, channels, num_classes, "deeplabv3")
    if kind == "detail":
        return build_head(cfg, channels, num_classes, "deeplabv3plus")
    if kind == "pyramid":
        return PyramidPoolingHead(channels, num_classes, cfg.head_channels, dropout=cfg.dropout)
    raise ValueError(f"unknown branch kind {kind!r}; choose from {', '.join(BRANCH_KINDS)}")


class BranchAttentionFusion(nn.Module):
    """BAFM: selective-kernel channel attention across the branch features (softmax over branches), a spatial gate
    sigmoid(conv7x7([mean_c f; max_c f])), then a 3x3 conv (BN, ReLU) and a 1x1 classifier."""

    def __init__(self, channels: int, num_branches: int, num_classes: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.num_branches, self.channels = num_branches, channels
        self.squeeze = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.excite = nn.Linear(hidden, num_branches * channels)
        self.gate = nn.Conv2d(2, 1, 7, padding=3)
        self.fuse = conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def features(self, feats: Sequence[Tensor]) -> Tensor:
        """S branch maps (N, D, h, w) of one size -> the fused map (N, D, h, w)."""
        stack = torch.stack(list(feats), dim=1)
        n, s, d = stack.shape[:3]
        attention = self.excite(self.squeeze(stack.sum(1).mean(dim=(2, 3)))).view(n, s, d).softmax(dim=1)
        f = (stack * attention[..., None, None]).sum(1)
        gate = torch.sigmoid(self.gate(torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], dim=1)))
        return self.fuse(f * gate)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.features(feats))


@dataclass
class BranchOutput:
    fused: Tensor
    """BAFM logits (N, K, H, W): the prediction"""
    branches: list[Tensor]
    """logits (N, K, H, W) of every branch"""
    features: list[Tensor]
    """pre-classifier maps (N, D, h1, w1) of every branch at the stride-4 size BAFM fuses"""


class BranchNet(nn.Module):
    """Encoder(s), B decoder branches and BAFM; forward(x) -> the fused logits (N, K, H, W)."""

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        branches: Sequence[nn.Module],
        fusion: BranchAttentionFusion,
        input_norm: InputNorm | None = None,
    ):
        super().__init__()
        self.input_norm = input_norm or InputNorm()
        if len(encoders) not in (1, len(branches)):
            raise ValueError(f"{len(encoders)} encoders for {len(branches)} branches: give 1 (shared) or one each")
        self.encoders = nn.ModuleList(encoders)
        self.branches = nn.ModuleList(branches)
        self.fusion = fusion

    def forward_branches(self, x: Tensor) -> BranchOutput:
        """x (N, 3, H, W) uint8 or in [0, 1] -> fused logits, branch logits and the branch features BAFM fused."""
        x = self.input_norm(x)
        if len(self.encoders) == 1:
            shared = self.encoders[0](x)
            feats = [shared] * len(self.branches)
        else:
            feats = [encoder(x) for encoder in self.encoders]
        size = feats[0][0].shape[-2:]
        raw = [branch.features(f) for branch, f in zip(self.branches, feats)]
        logits = [upsample(branch.classifier(r), x.shape[-2:]) for branch, r in zip(self.branches, raw)]
        aligned = [upsample(r, size) for r in raw]
        return BranchOutput(upsample(self.fusion(aligned), x.shape[-2:]), logits, aligned)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 3, H, W) -> fused logits (N, K, H, W)."""
        return self.forward_branches(x).fused

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Encoder parameters: the base learning rate."""
        return list(self.encoders.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Branches and BAFM: the learning rate times head_lr_mult."""
        encoder = {id(p) for p in self.encoders.parameters()}
        return [p for p in self.parameters() if id(p) not in encoder]


def build_branch_net(
    model: ModelConfig, num_classes: int, branches: Sequence[str], mode: str = "shared", reduction: int = 4
) -> BranchNet:
    """A BranchNet: one encoder (shared) or one per branch (separate), loading model.pretrained into each."""
    encoders, norms = zip(*[build_encoder(model) for _ in range(1 if mode == "shared" else len(branches))])
    heads = [build_branch(kind, model, encoders[0].channels, num_classes) for kind in branches]
    fusion = BranchAttentionFusion(model.head_channels, len(branches), num_classes, reduction)
    return BranchNet(encoders, heads, fusion, norms[0])


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


class LabelSources(nn.Module):
    """A view of a BranchNet whose forward stacks its label sources along the batch: (S x N, K, H, W), so that
    evaluate.predict_multiscale runs the TTA of every source at once."""

    def __init__(self, net: BranchNet, with_fused: bool):
        super().__init__()
        self.net, self.with_fused = net, with_fused

    def forward(self, x: Tensor) -> Tensor:
        out = self.net.forward_branches(x)
        return torch.cat(out.branches + ([out.fused] if self.with_fused else []))


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


def run(cfg, run_dir):
    """Run (or resume) BST's stages in run_dir; returns the root results.json content."""
    m = cfg.method
    recipe = Recipe(build, train_step, partial(label, cfg=m), partial(predict, cfg=m), plus=m.plus)
    return run_stages(cfg, run_dir, recipe)

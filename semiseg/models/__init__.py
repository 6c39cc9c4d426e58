"""Networks from a ModelConfig: BACKBONES and HEADS are explicit dicts from config names to constructors.

model = build_model(cfg.model, info.num_classes)       # Segmentor; loads cfg.pretrained into the backbone
logits = model(x)                                       # (B, K, H, W)

The networks of methods that need more than a Segmentor are built here too, from their own modules: BST's
branch network (branch.py, build_branch_net) and SWDBN's dual-branch network (dual_branch.py, build_dual_branch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from torch import nn

from semiseg.config import ConfigError, ModelConfig
from semiseg.models.branch import BRANCH_KINDS, BranchAttentionFusion, BranchNet, PyramidPoolingHead
from semiseg.models.deeplab import (
    CTTDeepLabV2Head,
    DeepLabV2Head,
    DeepLabV3Head,
    DeepLabV3PlusCPSHead,
    DeepLabV3PlusHead,
    default_rates,
)
from semiseg.models.dpt import DPTHead, dpt_widths
from semiseg.models.dual_branch import DualBranchNet
from semiseg.models.mobilenetv2 import MobileNetV2, build_mobilenet_v2
from semiseg.models.pretrained import (
    LoadReport,
    load_backbone_weights,
    read_state_dict,
    resolve_weights,
    weights_normalization,
)
from semiseg.models.resnet import STEMS, ResNet, build_resnet
from semiseg.models.segmentor import IMAGENET_MEAN, IMAGENET_STD, InputNorm, Segmentor, upsample
from semiseg.models.vit import build_dinov2
from semiseg.models.xception import Xception, build_xception

log = logging.getLogger(__name__)

BACKBONES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "resnet18": lambda cfg: build_resnet("resnet18", cfg.stem, cfg.width, cfg.output_stride, cfg.multi_grid),
    "resnet34": lambda cfg: build_resnet("resnet34", cfg.stem, cfg.width, cfg.output_stride, cfg.multi_grid),
    "resnet50": lambda cfg: build_resnet("resnet50", cfg.stem, cfg.width, cfg.output_stride, cfg.multi_grid),
    "resnet101": lambda cfg: build_resnet("resnet101", cfg.stem, cfg.width, cfg.output_stride, cfg.multi_grid),
    "xception65": lambda cfg: build_xception(cfg.output_stride),
    "mobilenet_v2": lambda cfg: build_mobilenet_v2(cfg.width_mult, cfg.output_stride, cfg.tf_padding),
    "dinov2_small": lambda cfg: build_dinov2("small"),
    "dinov2_base": lambda cfg: build_dinov2("base"),
    "dinov2_large": lambda cfg: build_dinov2("large"),
}

HEADS: dict[str, Callable[[ModelConfig, Sequence[int], int, tuple[int, ...]], nn.Module]] = {
    "deeplabv3plus": lambda cfg, ch, k, rates: DeepLabV3PlusHead(
        ch, k, rates, cfg.head_channels, cfg.low_level_channels, cfg.dropout
    ),
    "deeplabv3plus_cps": lambda cfg, ch, k, rates: DeepLabV3PlusCPSHead(
        ch, k, rates, cfg.head_channels, cfg.low_level_channels
    ),
    "deeplabv3": lambda cfg, ch, k, rates: DeepLabV3Head(ch, k, rates, cfg.head_channels, cfg.dropout),
    "deeplabv2": lambda cfg, ch, k, rates: DeepLabV2Head(ch, k, rates),
    "deeplabv2_ctt": lambda cfg, ch, k, rates: CTTDeepLabV2Head(ch, k, rates, cfg.head_channels),
    "dpt": lambda cfg, ch, k, rates: DPTHead(ch, k, *dpt_widths(ch, cfg.head_channels)),
}


def check_model_config(cfg: ModelConfig) -> None:
    """Raises ConfigError (a ValueError) naming the first invalid model.* field."""
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown {cfg.backbone!r}; valid: {', '.join(BACKBONES)}")
    if cfg.head not in HEADS:
        raise ConfigError(f"model.head: unknown {cfg.head!r}; valid: {', '.join(HEADS)}")
    if cfg.backbone.startswith("resnet"):
        if cfg.stem not in STEMS:
            raise ConfigError(f"model.stem: unknown {cfg.stem!r}; valid: {', '.join(STEMS)}")
        if cfg.output_stride not in (8, 16, 32):
            raise ConfigError(f"model.output_stride: {cfg.output_stride} is not one of 8, 16, 32")
        if cfg.width < 1:
            raise ConfigError(f"model.width: must be positive, got {cfg.width}")
        if cfg.multi_grid and (cfg.output_stride == 32 or len(cfg.multi_grid) != 3 or min(cfg.multi_grid) < 1):
            raise ConfigError(
                f"model.multi_grid: 3 positive multipliers of layer4's dilation at output stride 8 or 16 (CPS: 1,2,4), "
                f"got {list(cfg.multi_grid)} at output stride {cfg.output_stride}"
            )
    elif cfg.backbone == "mobilenet_v2":
        if cfg.output_stride not in (8, 16, 32):
            raise ConfigError(f"model.output_stride: {cfg.output_stride} is not one of 8, 16, 32")
        if cfg.width_mult <= 0:
            raise ConfigError(f"model.width_mult: must be positive, got {cfg.width_mult}")
    elif cfg.backbone.startswith("dinov2_"):  # stride 14 (the patch): model.output_stride does not apply
        if cfg.width != 64:
            raise ConfigError(f"model.width: {cfg.backbone} has a fixed width; leave width at 64")
    else:
        if cfg.output_stride not in (8, 16):
            raise ConfigError(f"model.output_stride: {cfg.output_stride} is not one of 8, 16 for {cfg.backbone}")
        if cfg.width != 64:
            raise ConfigError(f"model.width: {cfg.backbone} has a fixed width; leave width at 64")
    if cfg.multi_grid and not cfg.backbone.startswith("resnet"):
        raise ConfigError(f"model.multi_grid: only the ResNets have a multi-grid layer4, not {cfg.backbone}")
    if cfg.tf_padding and cfg.backbone != "mobilenet_v2":
        raise ConfigError(f"model.tf_padding: only mobilenet_v2 offers TF 'SAME' padding, not {cfg.backbone}")
    for key in ("input_mean", "input_std"):
        values = getattr(cfg, key)
        if values and (len(values) != 3 or (key == "input_std" and min(values) <= 0)):
            raise ConfigError(f"model.{key}: give 3 RGB values for [0, 1] images (std > 0), got {list(values)}")
    if bool(cfg.input_mean) != bool(cfg.input_std):
        raise ConfigError("model.input_mean and model.input_std: set both or neither")
    if cfg.head_channels < 1 or cfg.low_level_channels < 1:
        raise ConfigError("model.head_channels and model.low_level_channels must be positive")
    if not 0.0 <= cfg.fp_dropout < 1.0:
        raise ConfigError(f"model.fp_dropout: must be in [0, 1), got {cfg.fp_dropout}")


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The randomly initialised encoder named by cfg.backbone; forward(x) -> [c1..c4], `channels` declared."""
    check_model_config(cfg)
    return BACKBONES[cfg.backbone](cfg)


def build_encoder(cfg: ModelConfig) -> tuple[nn.Module, InputNorm]:
    """(backbone with cfg.pretrained loaded, the input normalisation it expects).

    Normalisation, first that applies: model.input_mean/std; the weights' own (safetensors metadata); the
    backbone's default (ImageNet's for every backbone here). A `model.pretrained` name (`imagenet`) resolves to the
    backbone's public checkpoint URL.
    """
    backbone = build_backbone(cfg)
    mean = getattr(backbone, "input_mean", IMAGENET_MEAN)
    std = getattr(backbone, "input_std", IMAGENET_STD)
    source = "the backbone's default"
    if cfg.pretrained:
        weights = resolve_weights(cfg.pretrained, cfg.backbone)
        report = load_backbone_weights(backbone, weights)
        (log.warning if report.missing else log.info)("pretrained backbone: %s", report.summary())
        declared = weights_normalization(weights)
        if declared:
            (mean, std), source = declared, "the weights' metadata"
    if cfg.input_mean:
        mean, std, source = cfg.input_mean, cfg.input_std, "model.input_mean/input_std"
    log.info("input normalisation: mean %s std %s (%s)", tuple(mean), tuple(std), source)
    return backbone, InputNorm(mean, std)


def build_head(cfg: ModelConfig, channels: Sequence[int], num_classes: int, head: str = "") -> nn.Module:
    """Head `head` (default cfg.head) for a backbone with feature channels `channels`."""
    name = head or cfg.head
    if name not in HEADS:
        raise ConfigError(f"model.head: unknown {name!r}; valid: {', '.join(HEADS)}")
    rates = tuple(cfg.aspp_rates) or default_rates(name, cfg.output_stride)
    return HEADS[name](cfg, tuple(channels), num_classes, rates)


def build_model(cfg: ModelConfig, num_classes: int) -> Segmentor:
    """Backbone + cfg.head; loads cfg.pretrained."""
    backbone, input_norm = build_encoder(cfg)
    head = build_head(cfg, backbone.channels, num_classes)
    return Segmentor(backbone, head, cfg.fp_dropout, cfg.proj_dim, input_norm)


def build_branch(kind: str, cfg: ModelConfig, channels: Sequence[int], num_classes: int) -> nn.Module:
    """A BST decoder branch of the given kind (BRANCH_KINDS) on a backbone with these feature channels."""
    if kind == "context":
        return build_head(cfg, channels, num_classes, "deeplabv3")
    if kind == "detail":
        return build_head(cfg, channels, num_classes, "deeplabv3plus")
    if kind == "pyramid":
        return PyramidPoolingHead(channels, num_classes, cfg.head_channels, dropout=cfg.dropout)
    raise ValueError(f"unknown branch kind {kind!r}; choose from {', '.join(BRANCH_KINDS)}")


def build_branch_net(
    cfg: ModelConfig, num_classes: int, branches: Sequence[str], mode: str = "shared", reduction: int = 4
) -> BranchNet:
    """BST's BranchNet: one encoder (shared) or one per branch (separate), loading cfg.pretrained into each."""
    encoders, norms = zip(*[build_encoder(cfg) for _ in range(1 if mode == "shared" else len(branches))])
    heads = [build_branch(kind, cfg, encoders[0].channels, num_classes) for kind in branches]
    fusion = BranchAttentionFusion(cfg.head_channels, len(branches), num_classes, reduction)
    return BranchNet(encoders, heads, fusion, norms[0])


def build_dual_branch(
    cfg: ModelConfig, num_classes: int, neck_depth: int, branch_depth: int, dual: bool = True
) -> DualBranchNet:
    """SWDBN's network on cfg.backbone (pretrained loaded); neck and branches cfg.head_channels wide."""
    backbone, input_norm = build_encoder(cfg)
    return DualBranchNet(backbone, num_classes, cfg.head_channels, neck_depth, branch_depth, dual, input_norm)


__all__ = [
    "BACKBONES",
    "BRANCH_KINDS",
    "HEADS",
    "BranchNet",
    "DualBranchNet",
    "InputNorm",
    "LoadReport",
    "MobileNetV2",
    "ResNet",
    "Segmentor",
    "Xception",
    "build_backbone",
    "build_branch_net",
    "build_dual_branch",
    "build_encoder",
    "build_head",
    "build_model",
    "check_model_config",
    "load_backbone_weights",
    "read_state_dict",
    "upsample",
]

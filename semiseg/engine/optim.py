"""Optimizers with backbone / head parameter groups, and the poly schedule as a pure function of the step."""

from __future__ import annotations

import torch
from torch import nn

from semiseg.config import OptimConfig


def poly_lr(base_lr: float, step: int, iters: int, power: float = 0.9, warmup: int = 0) -> float:
    """Learning rate at `step` (0-based) of `iters`: linear warm-up, then base * (1 - step/iters) ** power."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * max(0.0, 1.0 - step / max(iters, 1)) ** power


def _is_no_decay(name: str, p: torch.Tensor) -> bool:
    # Norm weights and all biases are 1-d; CPS-style groups exclude them from weight decay.
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(net: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups for one network: backbone at lr x1, everything else at lr x head_lr_mult.

    A network exposes `backbone_parameters()`; when it does not, all its parameters count as head.
    """
    backbone_ids = set()
    if hasattr(net, "backbone_parameters"):
        backbone_ids = {id(p) for p in net.backbone_parameters()}
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in backbone_ids, cfg.no_decay_norm_bias and _is_no_decay(name, p))
        groups.setdefault(key, []).append(p)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        out.append(
            {
                "params": params,
                "lr_mult": 1.0 if is_backbone else cfg.head_lr_mult,
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "name": ("backbone" if is_backbone else "head") + ("_no_decay" if no_decay else ""),
            }
        )
    return out


def build_optimizer(net: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov off), AdamW or Adam over the network's parameter groups."""
    groups = param_groups(net, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; choose from sgd, adamw, adam")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, cfg: OptimConfig) -> None:
    """Set the groups' learning rates for the scheduled `lr` (optim.schedule).

    poly: every group at lr x its multiplier. poly_backbone_only, CTT's DeepLabV3+ script as run (its lr helper
    updates param_groups[0] and [1] only): the backbone group at lr, the backbone's no-decay group at lr x
    head_lr_mult (the script's literal x10), every head group at a constant optim.lr.
    """
    for g in optimizer.param_groups:
        if cfg.schedule == "poly_backbone_only":
            g["lr"] = {"backbone": lr, "backbone_no_decay": lr * cfg.head_lr_mult}.get(g.get("name"), cfg.lr)
        else:
            g["lr"] = lr * g.get("lr_mult", 1.0)

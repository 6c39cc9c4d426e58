"""DINOv2 ViT-S/14, ViT-B/14 and ViT-L/14 (Oquab et al. 2023) as segmentation backbones, in pure PyTorch.

Parameter names and shapes are those of the official checkpoints `dinov2_vit{s,b,l}14_pretrain.pth`
(facebookresearch/dinov2 `dinov2/models/vision_transformer.py`; UniMatch V2 vendors the same code), so they load
with zero missing and zero unexpected keys: patch 14, a 37 x 37 + 1 position table (learnt at 518 px), MLP ratio 4
with exact GELU, LayerScale, LayerNorm eps 1e-6, biases everywhere, no register tokens, no drop-path.

forward(x) returns the patch tokens of four blocks (UniMatch V2's choice per size, METHODS.md 8(g1)), each after the
shared final LayerNorm and without the class token, as maps (B, D, H/14, W/14); `channels` = (D, D, D, D).
Attention is F.scaled_dot_product_attention (no xformers). The position table is interpolated to the input's patch
grid exactly as the reference does (`interpolate_pos_embed`). An input whose sides are not multiples of 14 is first
resized bilinearly to the nearest multiples (UniMatch V2's evaluation protocol), so any image size works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

PATCH = 14
GRID = 37
"""side of the checkpoints' position table: 518 px / 14"""


@dataclass(frozen=True)
class ViTSize:
    embed_dim: int
    depth: int
    num_heads: int
    layers: tuple[int, ...]
    """0-based blocks whose tokens the backbone returns (UniMatch V2 `dpt.py` intermediate_layer_idx)"""
    letter: str
    """the checkpoint's size letter (s, b, l)"""


VIT_SIZES = {
    "small": ViTSize(384, 12, 6, (2, 5, 8, 11), "s"),
    "base": ViTSize(768, 12, 12, (2, 5, 8, 11), "b"),
    "large": ViTSize(1024, 24, 16, (4, 11, 17, 23), "l"),
}


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], offset: float = 0.1) -> Tensor:
    """pos_embed (1, 1 + M*M, D) -> (1, 1 + h*w, D) for a patch grid (h, w); the class entry stays first.

    DINOv2's rule: the table itself when (h, w) = (M, M); otherwise a bicubic resampling (align_corners False, no
    antialias) in float32 with scale_factor ((h + offset) / M, (w + offset) / M). The scale factor, not the output
    size, sets the sampling positions (passing size= samples elsewhere); the offset keeps floor(M * scale) at h.
    """
    m = math.isqrt(pos_embed.shape[1] - 1)
    h, w = grid
    if (h, w) == (m, m):
        return pos_embed
    table = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    scale = ((h + offset) / m, (w + offset) / m)
    table = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    if tuple(table.shape[-2:]) != (h, w):
        raise ValueError(f"position table resampled to {tuple(table.shape[-2:])}, expected {(h, w)}")
    table = table.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([pos_embed[:, :1].float(), table], dim=1).to(pos_embed.dtype)


def to_patch_multiple(x: Tensor, patch: int = PATCH) -> Tensor:
    """x (B, C, H, W) resized bilinearly (align_corners True) to sides round(H / patch) * patch, at least one patch."""
    h, w = x.shape[-2:]
    size = (max(int(h / patch + 0.5), 1) * patch, max(int(w / patch + 0.5), 1) * patch)
    if size == (h, w):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class PatchEmbed(nn.Module):
    """x (B, 3, H, W) -> tokens (B, H/p * W/p, D), row-major over the patch grid."""

    def __init__(self, embed_dim: int, patch: int = PATCH):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; qkv rows are q, then k, then v, heads contiguous within each (DINOv2's layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    """x * gamma, per channel."""

    def __init__(self, dim: int, init: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1, exact GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2 ViT: x (B, 3, H, W), normalised with ImageNet's statistics -> [f1..f4], each (B, D, H/14, W/14)."""

    input_mean = (0.485, 0.456, 0.406)
    input_std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        layers: Sequence[int],
        mlp_ratio: float = 4.0,
        grid: int = GRID,
        patch: int = PATCH,
    ):
        super().__init__()
        if not layers or min(layers) < 0 or max(layers) >= depth or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be increasing block indices below depth {depth}, got {tuple(layers)}")
        self.patch = patch
        self.layers = tuple(layers)
        self.channels = (embed_dim,) * len(layers)
        self.patch_embed = PatchEmbed(embed_dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        # DINOv2's masked-image-modelling token: never used here, kept (frozen) so the checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINOv2's initialisation (timm ViT): truncated normal 0.02 on Linear weights and the position table."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
        """x (B, 3, h*p, w*p) -> ([tokens (B, 1 + h*w, D) after each block of `layers`, before the norm], (h, w))."""
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + interpolate_pos_embed(self.pos_embed, grid)
        out = []
        for i, block in enumerate(self.blocks[: self.layers[-1] + 1]):
            t = block(t)
            if i in self.layers:
                out.append(t)
        return out, grid

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) -> [f1..f4], each (B, D, h, w): the patch grid of x resized to multiples of 14."""
        out, (h, w) = self.tokens(to_patch_multiple(x, self.patch))
        # The class token joins attention but is never read out.
        return [self.norm(t)[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in out]


def build_dinov2(size: str) -> DinoV2:
    """DINOv2 ViT-{S,B,L}/14 by size name (small | base | large), randomly initialised."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown DINOv2 size {size!r}; valid: {', '.join(VIT_SIZES)}")
    s = VIT_SIZES[size]
    return DinoV2(s.embed_dim, s.depth, s.num_heads, s.layers)

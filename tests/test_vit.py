"""DINOv2 ViT backbones and the DPT head: checkpoint layout, position-table interpolation, attention, shapes, sizes."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from semiseg.config import ModelConfig
from semiseg.models import HEADS, build_backbone, build_head, build_model, check_model_config, load_backbone_weights
from semiseg.models.dpt import DPTHead, FeatureFusionBlock, ResidualConvUnit, dpt_widths
from semiseg.models.segmentor import Segmentor
from semiseg.models.vit import Attention, DinoV2, interpolate_pos_embed, to_patch_multiple

# The published architectures (DINOv2 paper, table 17; `dinov2/hub/backbones.py`): width, depth, heads.
PUBLISHED = {"dinov2_small": (384, 12, 6), "dinov2_base": (768, 12, 12), "dinov2_large": (1024, 24, 16)}


def official_layout(dim: int, depth: int, mlp_ratio: int = 4, grid: int = 37, patch: int = 14) -> dict:
    """Key -> shape of `dinov2_vit*14_pretrain.pth`: 37x37 + 1 positions, LayerScale, no register tokens."""
    hidden = dim * mlp_ratio
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        for name, shape in {
            "norm1.weight": (dim,),
            "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim),
            "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim),
            "attn.proj.bias": (dim,),
            "ls1.gamma": (dim,),
            "norm2.weight": (dim,),
            "norm2.bias": (dim,),
            "mlp.fc1.weight": (hidden, dim),
            "mlp.fc1.bias": (hidden,),
            "mlp.fc2.weight": (dim, hidden),
            "mlp.fc2.bias": (dim,),
            "ls2.gamma": (dim,),
        }.items():
            shapes[f"blocks.{i}.{name}"] = shape
    shapes["norm.weight"] = (dim,)
    shapes["norm.bias"] = (dim,)
    return shapes


def vit_cfg(backbone: str = "dinov2_small", **kw) -> ModelConfig:
    return ModelConfig(backbone=backbone, head="dpt", **kw)


def test_small_checkpoint_file_loads_with_no_missing_or_unexpected_key(tmp_path):
    dim, depth, heads = PUBLISHED["dinov2_small"]
    layout = official_layout(dim, depth)
    assert len(layout) == 175
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) for k, shape in layout.items()}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    backbone = build_backbone(vit_cfg())
    report = load_backbone_weights(backbone, path)
    assert report.missing == () and report.unexpected == () and len(report.loaded) == 175
    loaded = backbone.state_dict()
    for key in ("pos_embed", "blocks.11.ls2.gamma", "blocks.3.attn.qkv.weight", "norm.bias"):
        assert torch.equal(loaded[key], state[key]), key
    assert all(block.attn.num_heads == heads for block in backbone.blocks)
    assert not list(backbone.buffers())


@pytest.mark.parametrize("name", ["dinov2_base", "dinov2_large"])
def test_base_and_large_load_the_official_layout_strictly(name):
    dim, depth, heads = PUBLISHED[name]
    layout = official_layout(dim, depth)
    assert len(layout) == {"dinov2_base": 175, "dinov2_large": 343}[name]
    with torch.device("meta"):
        backbone = build_backbone(vit_cfg(name))
        state = {k: torch.empty(shape) for k, shape in layout.items()}
    result = backbone.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(block.attn.num_heads == heads for block in backbone.blocks)
    assert backbone.channels == (dim,) * 4


@pytest.mark.parametrize(
    "name,encoder,decoder",
    [("dinov2_small", 22.1, 2.7), ("dinov2_base", 86.6, 10.9), ("dinov2_large", 304.4, 31.2)],
)
def test_parameter_counts_match_the_reference_logs(name, encoder, decoder):
    # UniMatch V2's logs print "Encoder params" / "Decoder params" in millions for 21 classes (VOC).
    with torch.device("meta"):
        model = build_model(vit_cfg(name), 21)
    assert round(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 1) == encoder
    assert round(sum(p.numel() for p in model.head.parameters()) / 1e6, 1) == decoder


def keys_cubic(x: float, a: float = -0.75) -> float:
    """The bicubic convolution kernel (Keys, a = -0.75, as PyTorch and PIL use)."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0


def resampling_weights(dst: int, n_src: int, scale: float) -> list[float]:
    """Weights of the n_src source rows in output row dst: half-pixel centres, taps clamped at the border."""
    src = (dst + 0.5) / scale - 0.5
    i0 = math.floor(src)
    t = src - i0
    w = [0.0] * n_src
    for offset, weight in zip((-1, 0, 1, 2), (keys_cubic(1 + t), keys_cubic(t), keys_cubic(1 - t), keys_cubic(2 - t))):
        w[min(max(i0 + offset, 0), n_src - 1)] += weight
    return w


def test_pos_embed_interpolation_matches_a_hand_computed_case():
    # A 4x4 table (one channel, separable: row factor a, column factor b) resampled to a 3x2 patch grid.
    # DINOv2 passes scale_factor ((3 + 0.1) / 4, (2 + 0.1) / 4): output row 0 samples source row
    # 0.5 / 0.775 - 0.5 = 0.1452, i.e. weights (k(1.1452) + k(0.1452), k(0.8548), k(1.8548)) on rows 0, 1, 2.
    a = torch.tensor([1.0, 2.0, 4.0, 8.0])
    b = torch.tensor([1.0, -1.0, 3.0, 0.5])
    table = torch.cat([torch.tensor([[7.0]]), (a[:, None] * b[None, :]).reshape(16, 1)])[None]
    out = interpolate_pos_embed(table, (3, 2))
    assert out.shape == (1, 1 + 6, 1) and out[0, 0, 0] == 7.0
    assert resampling_weights(0, 4, 3.1 / 4) == pytest.approx([0.876855, 0.136655, -0.013510, 0.0], abs=1e-6)
    rows = torch.tensor([resampling_weights(i, 4, 3.1 / 4) for i in range(3)]) @ a
    cols = torch.tensor([resampling_weights(j, 4, 2.1 / 4) for j in range(2)]) @ b
    torch.testing.assert_close(out[0, 1:, 0], (rows[:, None] * cols[None, :]).reshape(6), atol=1e-5, rtol=1e-5)
    # Resampling to the output size instead of by the offset scale factor samples elsewhere.
    by_size = F.interpolate(table[:, 1:].reshape(1, 4, 4, 1).permute(0, 3, 1, 2), size=(3, 2), mode="bicubic")
    assert (by_size.flatten() - out[0, 1:, 0]).abs().max() > 0.1


def transpose_grid(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Position table (1, 1 + h*w, D) over an h x w grid -> the same table over the transposed w x h grid."""
    grid = t[:, 1:].reshape(1, h, w, -1).transpose(1, 2).reshape(1, h * w, -1)
    return torch.cat([t[:, :1], grid], dim=1)


def test_pos_embed_is_the_table_itself_at_the_training_grid_and_rows_follow_height():
    table = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed(table, (37, 37)) is table
    small = torch.randn(1, 1 + 16, 3)
    tall = interpolate_pos_embed(small, (5, 3))
    wide = interpolate_pos_embed(transpose_grid(small, 4, 4), (3, 5))
    torch.testing.assert_close(transpose_grid(wide, 3, 5), tall)


def test_sdpa_attention_equals_explicit_softmax_attention_with_dinov2_qkv_layout():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2)
    x = torch.randn(2, 5, 8)
    wq, wk, wv = attn.qkv.weight.split(8)  # rows: q, then k, then v; within each, head 0's 4 dims, then head 1's
    bq, bk, bv = attn.qkv.bias.split(8)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        q, k, v = x @ wq[sl].T + bq[sl], x @ wk[sl].T + bk[sl], x @ wv[sl].T + bv[sl]
        heads.append(((q @ k.transpose(1, 2)) / 2.0).softmax(-1) @ v)  # scale 1/sqrt(head dim 4)
    expected = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def tiny_vit(layers=(1, 3)) -> DinoV2:
    torch.manual_seed(0)
    return DinoV2(embed_dim=16, depth=4, num_heads=2, layers=layers, grid=4)


def test_forward_returns_the_normed_patch_tokens_of_the_chosen_blocks_as_maps():
    vit = tiny_vit()
    x = torch.randn(2, 3, 42, 28)  # a 3x2 patch grid
    seen = {}
    for i, block in enumerate(vit.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out))
    feats = vit(x)
    assert vit.channels == (16, 16) and [tuple(f.shape) for f in feats] == [(2, 16, 3, 2)] * 2
    for f, i in zip(feats, (1, 3)):
        tokens = vit.norm(seen[i])[:, 1:]  # class token dropped, shared final norm
        torch.testing.assert_close(f, tokens.transpose(1, 2).reshape(2, 16, 3, 2))
    # The first map's patch (row 1, col 0) is token 1 + 1 * 2 + 0 of the sequence: row-major over the grid.
    torch.testing.assert_close(feats[0][:, :, 1, 0], vit.norm(seen[1])[:, 3])


def test_forward_stops_after_the_last_returned_block():
    vit = tiny_vit(layers=(0, 1))
    vit(torch.randn(1, 3, 28, 28))[-1].sum().backward()
    assert vit.blocks[1].mlp.fc2.weight.grad is not None and vit.blocks[3].mlp.fc2.weight.grad is None


def test_inputs_are_resized_to_the_nearest_multiple_of_the_patch():
    x = torch.rand(1, 3, 100, 105)
    assert to_patch_multiple(x).shape[-2:] == (98, 112)  # 100/14 = 7.1 -> 7; 105/14 = 7.5 -> 8
    assert to_patch_multiple(torch.rand(1, 3, 5, 6)).shape[-2:] == (14, 14)
    same = torch.rand(1, 3, 28, 42)
    assert to_patch_multiple(same) is same
    vit = tiny_vit()
    assert vit(x)[0].shape[-2:] == (7, 8)


def test_dpt_pyramid_and_output_resolution():
    channels = (384,) * 4
    features, widths = dpt_widths(channels, 256)
    assert (features, widths) == (64, (48, 96, 192, 384))  # UniMatch V2's DINOv2-S decoder
    head = DPTHead(channels, 5, features, widths)
    sizes = {}
    for i in range(1, 5):
        conv = getattr(head.scratch, f"layer{i}_rn")
        conv.register_forward_hook(lambda m, inp, out, i=i: sizes.__setitem__(i, tuple(out.shape[-2:])))
    feats = [torch.randn(2, 384, 7, 7) for _ in range(4)]
    feat = head.features(feats)
    assert sizes == {1: (28, 28), 2: (14, 14), 3: (7, 7), 4: (4, 4)}  # 4p, 2p, p, ceil(p / 2)
    assert feat.shape == (2, 64, 56, 56) and head.out_channels == 64  # 8p
    assert head(feats).shape == (2, 5, 56, 56)
    assert head.classifier is head.scratch.output_conv
    assert not any(k.startswith("classifier") for k in head.state_dict())
    assert head.fp_features(feats, 2, 0.5).shape == (6, 64, 56, 56)


def test_residual_conv_unit_keeps_negative_inputs_on_its_skip():
    rcu = ResidualConvUnit(1)
    with torch.no_grad():
        for conv in (rcu.conv1, rcu.conv2):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0  # identity 3x3
            conv.bias.zero_()
    x = torch.tensor([-1.0, 2.0]).view(1, 1, 1, 2)
    # x + relu(relu(x)): an in-place ReLU would also clip the skip and give (0, 4).
    assert rcu(x).flatten().tolist() == [-1.0, 4.0]


def test_fusion_block_adds_the_skip_then_resizes():
    block = FeatureFusionBlock(1)
    with torch.no_grad():
        for p in block.parameters():
            p.zero_()
        block.out_conv.weight.fill_(1.0)  # 1x1 identity; both residual units become identities
    x, skip = torch.zeros(1, 1, 2, 2), torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    out = block(x, skip, size=(3, 3))
    expected = F.interpolate(x + skip, size=(3, 3), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, expected)
    assert out[0, 0, 1, 1].item() == pytest.approx(1.5)  # the centre of the corners' bilinear surface
    assert block(skip).shape[-2:] == (4, 4)  # no size: x2


def test_segmentor_on_vit_small():
    torch.manual_seed(0)
    cfg = vit_cfg()
    check_model_config(cfg)  # output_stride does not apply to a ViT
    model = build_model(cfg, 3)
    assert model.input_norm.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert model.input_norm.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    x = torch.randint(0, 256, (2, 3, 98, 98), dtype=torch.uint8)
    logits, fps = model.forward_fp(x, 1)
    assert logits.shape == (2, 3, 98, 98) and fps[0].shape == (2, 3, 98, 98)
    (logits.square().mean() + fps[0].square().mean()).backward()
    frozen = {"backbone.mask_token"} | {
        f"head.{k}" for k, _ in model.head.named_parameters() if ".refinenet4.resConfUnit1." in f".{k}"
    }
    assert len(frozen) == 5
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in frozen) and p.requires_grad == (name not in frozen), name
    with torch.no_grad():
        assert model(torch.rand(1, 3, 90, 120)).shape == (1, 3, 90, 120)  # resized to 84 x 126 inside


def test_dpt_widths_fall_back_to_the_channels_for_other_encoders():
    assert dpt_widths((1024,) * 4, 32) == (256, (256, 512, 1024, 1024))
    assert dpt_widths((8, 16, 32, 64), 32) == (32, (8, 16, 32, 64))
    head = build_head(ModelConfig(backbone="resnet18", head="dpt", head_channels=16), (8, 16, 32, 64), 3)
    feats = [torch.randn(1, c, s, s) for c, s in zip((8, 16, 32, 64), (8, 4, 2, 2))]
    assert head(feats).shape[1] == 3 and isinstance(head.classifier, nn.Sequential)


@pytest.mark.parametrize("head", list(HEADS))
def test_every_head_on_a_tiny_vit(head):
    # The backbone x head contract of test_models.py, on a ViT: one stride (the patch), maps of one width.
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="dinov2_small", head=head, head_channels=16, low_level_channels=8)
    vit = DinoV2(embed_dim=16, depth=4, num_heads=2, layers=(0, 1, 2, 3), grid=4)
    model = Segmentor(vit, build_head(cfg, vit.channels, 3))
    x = torch.rand(2, 3, 42, 56)  # a 3x4 patch grid
    logits, feat = model.forward_with_features(x)
    assert logits.shape == (2, 3, 42, 56)
    assert feat.shape == (2, model.head.out_channels, *((24, 32) if head == "dpt" else (3, 4)))
    clean, fps = model.forward_fp(x, 2)
    assert clean.shape == (2, 3, 42, 56) and [f.shape for f in fps] == [clean.shape] * 2
    (logits.square().mean() + sum(f.square().mean() for f in fps)).backward()
    trained = [p for p in [*vit.parameters(), *model.head.parameters()] if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    with torch.no_grad():
        logits_eval, _ = model.eval().forward_with_features(x)
        torch.testing.assert_close(logits_eval, model(x))


def test_dpt_head_on_a_cnn_backbone():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", head="dpt", width=8, head_channels=16, stem="torchvision")
    model = build_model(cfg, 3)
    x = torch.rand(1, 3, 33, 47)
    logits, feat = model.forward_with_features(x)
    assert logits.shape == (1, 3, 33, 47) and feat.shape == (1, 16, 8 * 9, 8 * 12)  # 8x the stride-4 map

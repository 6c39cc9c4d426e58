"""Contract tests for every backbone x head x output stride, plus the pieces with hand-computable behaviour."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from semiseg.config import ModelConfig
from semiseg.models import BACKBONES, HEADS, build_backbone, build_head, build_model
from semiseg.models.deeplab import DeepLabV2Head, default_rates, perturb
from semiseg.models.resnet import build_resnet

NUM_CLASSES = 3
# Which backbone feature (c1..c4 -> 0..3) sets the resolution of each head's features().
FEATURE_LEVEL = {"deeplabv3plus": 0, "deeplabv3plus_cps": 0, "deeplabv3": 3, "deeplabv2": 3, "deeplabv2_ctt": 3}
# Xception-65 has a fixed width (38M parameters): every head at OS 16, and OS 8 once, to keep the suite fast.
# DINOv2 backbones (one stride, the patch) and the DPT head (a fused map at 8x its finest input) have their own
# contract in test_vit.py: every head on a tiny ViT, DPT on a ResNet.
VIT = tuple(b for b in BACKBONES if b.startswith("dinov2_"))
CASES = [
    (backbone, head, os)
    for backbone in BACKBONES
    if backbone not in VIT
    for head in HEADS
    if head != "dpt"
    for os in ((16,) if backbone == "xception65" else (8, 16, 32))
] + [("xception65", "deeplabv3plus", 8)]


def small_cfg(backbone: str = "resnet18", head: str = "deeplabv3plus", output_stride: int = 16, **kw) -> ModelConfig:
    """Tiny widths so that every combination runs in well under a second on a CPU."""
    width = 64 if backbone == "xception65" else 8
    base = dict(width=width, head_channels=16, low_level_channels=8, stem="torchvision")
    return ModelConfig(backbone=backbone, head=head, output_stride=output_stride, **{**base, **kw})


def strides(output_stride: int) -> tuple[int, int, int, int]:
    """Strides of c1..c4: only the last stages are dilated."""
    return (4, 8, min(16, output_stride), output_stride)


@pytest.mark.parametrize("backbone,head,output_stride", CASES)
def test_contract(backbone, head, output_stride):
    torch.manual_seed(0)
    stem = "deep" if backbone in ("resnet34", "resnet101") else "torchvision"
    cfg = small_cfg(backbone, head, output_stride, stem=stem)
    model = build_model(cfg, NUM_CLASSES)
    h, w = (17, 23) if backbone == "xception65" else (33, 47)
    x = torch.randn(2, 3, h, w)
    feats = model.encode(x)
    assert [f.shape[1] for f in feats] == list(model.backbone.channels)
    expected = [(math.ceil(h / s), math.ceil(w / s)) for s in strides(output_stride)]
    assert [tuple(f.shape[-2:]) for f in feats] == expected

    logits, feat = model.forward_with_features(x)
    assert logits.shape == (2, NUM_CLASSES, h, w)
    assert feat.shape == (2, model.head.out_channels, *expected[FEATURE_LEVEL[head]])
    clean, fps = model.forward_fp(x, n=2)
    assert clean.shape == (2, NUM_CLASSES, h, w)
    assert len(fps) == 2 and all(f.shape == (2, NUM_CLASSES, h, w) for f in fps)

    (logits.square().mean() + sum(f.square().mean() for f in fps)).backward()
    trained = model.backbone_parameters() + list(model.head.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in model.backbone_parameters())

    model.eval()
    x_even = torch.randn(2, 3, h + 1, w + 1)
    with torch.no_grad():
        logits_even, feat_even = model.forward_with_features(x_even)
        assert logits_even.shape == (2, NUM_CLASSES, h + 1, w + 1)
        torch.testing.assert_close(model(x_even), logits_even)
        torch.testing.assert_close(model.features(x_even), feat_even)


@pytest.mark.parametrize("stem", ["deep", "torchvision"])
@pytest.mark.parametrize("depth,expansion", [("resnet18", 1), ("resnet50", 4)])
@pytest.mark.parametrize("width", [8, 16])
def test_resnet_width_scales_every_channel(stem, depth, expansion, width):
    net = build_resnet(depth, stem, width, 16)
    feats = net(torch.randn(2, 3, 32, 32))
    assert net.channels == tuple(m * width * expansion for m in (1, 2, 4, 8))
    assert [f.shape[1] for f in feats] == list(net.channels)
    assert net.bn1.num_features == (2 * width if stem == "deep" else width)


def test_deep_stem_key_layout_matches_v1c_checkpoints():
    keys = [k for k in build_resnet("resnet50", "deep", 64, 16).state_dict() if k.startswith(("conv1.", "bn1."))]
    params = [k for k in keys if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert params == [
        "conv1.0.weight",
        "conv1.1.weight",
        "conv1.1.bias",
        "conv1.3.weight",
        "conv1.4.weight",
        "conv1.4.bias",
        "conv1.6.weight",
        "bn1.weight",
        "bn1.bias",
    ]
    net = build_resnet("resnet50", "deep", 64, 16)
    assert net.conv1[0].weight.shape == (64, 3, 3, 3) and net.conv1[0].stride == (2, 2)
    assert net.conv1[6].weight.shape == (128, 64, 3, 3)
    assert net.layer1[0].downsample[0].weight.shape == (256, 128, 1, 1)


def test_torchvision_key_names():
    keys = set(build_resnet("resnet50", "torchvision", 16, 16).state_dict())
    expected = {
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.running_mean",
    }
    assert expected <= keys


def test_xception_key_layout_matches_reference_checkpoint():
    net = build_backbone(small_cfg("xception65"))
    keys = set(net.state_dict())
    expected = {
        "conv1.weight",
        "bn2.running_var",
        "block1.skip.weight",
        "block1.skipbn.bias",
        "block2.sepconv1.depthwise.weight",
        "block4.sepconv3.pointwise.weight",
        "block19.sepconv2.bn1.weight",
        "block20.skip.weight",
        "block20.sepconv2.bn2.weight",
        "conv5.pointwise.weight",
        "conv5.bn2.bias",
    }
    assert expected <= keys
    assert "block4.skip.weight" not in keys and "block21.sepconv1.depthwise.weight" not in keys
    assert net.block20.sepconv1.pointwise.out_channels == 728 and net.block20.sepconv2.pointwise.out_channels == 1024
    assert net.block2.sepconv3.depthwise.stride == (2, 2) and net.block3.sepconv3.depthwise.stride == (2, 2)


@pytest.mark.parametrize(
    "depth,published",
    [("resnet50", 25_557_032), ("resnet101", 44_549_160)],
)
def test_parameter_count_matches_torchvision(depth, published):
    # torchvision's published counts include the 2048 -> 1000 ImageNet classifier (weights + biases).
    net = build_resnet(depth, "torchvision", 64, 32)
    assert sum(p.numel() for p in net.parameters()) + 2048 * 1000 + 1000 == published


def conv2_dilations(layer: nn.Sequential) -> list[tuple[int, int]]:
    """(stride, dilation) of the 3x3 conv of each block of a Bottleneck stage."""
    return [(b.conv2.stride[0], b.conv2.dilation[0]) for b in layer]


def test_output_stride_8_dilation_follows_torchvision():
    net = build_resnet("resnet50", "torchvision", 8, 8)
    assert conv2_dilations(net.layer2)[0] == (2, 1)
    assert conv2_dilations(net.layer3) == [(1, 1)] + [(1, 2)] * 5
    assert conv2_dilations(net.layer4) == [(1, 2), (1, 4), (1, 4)]
    assert net.layer3[0].downsample[0].stride == (1, 1)


def test_output_stride_16_dilates_layer4_only():
    net = build_resnet("resnet101", "deep", 8, 16)
    assert net.layer3[0].conv2.stride == (2, 2)
    assert [b.conv2.dilation[0] for b in net.layer4] == [1, 2, 2]
    basic = build_resnet("resnet18", "deep", 8, 16)
    assert (basic.layer4[0].conv1.dilation[0], basic.layer4[0].conv2.dilation[0]) == (1, 2)
    assert (basic.layer4[1].conv1.dilation[0], basic.layer4[1].conv2.dilation[0]) == (2, 2)


def test_default_rates():
    assert default_rates("deeplabv3plus", 16) == (6, 12, 18)
    assert default_rates("deeplabv3plus", 8) == (12, 24, 36)
    assert default_rates("deeplabv2", 8) == (6, 12, 18, 24)
    head = build_head(small_cfg(output_stride=8), (8, 16, 32, 64), NUM_CLASSES)
    assert [head.aspp.b1[0].dilation[0], head.aspp.b2[0].dilation[0], head.aspp.b3[0].dilation[0]] == [12, 24, 36]
    head = build_head(small_cfg(aspp_rates=(2, 3)), (8, 16, 32, 64), NUM_CLASSES)
    assert head.aspp.num_branches == 4


def test_stpp_dropout_flag_adds_the_two_dropouts():
    head = build_head(small_cfg(dropout=True), (8, 16, 32, 64), NUM_CLASSES)
    assert isinstance(head.aspp.project[-1], nn.Dropout2d) and head.aspp.project[-1].p == 0.5
    assert isinstance(head.fuse[-1], nn.Dropout) and head.fuse[-1].p == 0.1
    plain = build_head(small_cfg(), (8, 16, 32, 64), NUM_CLASSES)
    assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in plain.modules())


def test_deeplabv2_sums_its_four_atrous_classifiers():
    head = DeepLabV2Head((4, 4, 4, 4), NUM_CLASSES)
    assert [b.dilation[0] for b in head.classifier.branches] == [6, 12, 18, 24]
    with torch.no_grad():
        for i, branch in enumerate(head.classifier.branches):
            branch.weight.zero_()
            branch.bias.fill_(float(i + 1))
    out = head([torch.zeros(1, 4, 5, 5)] * 4)
    torch.testing.assert_close(out, torch.full((1, NUM_CLASSES, 5, 5), 1.0 + 2 + 3 + 4))


def test_ctt_head_layout():
    head = build_head(small_cfg(head="deeplabv2_ctt", head_channels=64), (8, 16, 32, 64), NUM_CLASSES)
    assert len(head.branches) == 5 and head.classifier.bias is None
    assert all(isinstance(b[1], nn.GroupNorm) and b[1].num_groups == 32 for b in head.branches)
    assert head.bottleneck[0].se[0].out_features == 5 * 64 // 16
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1


def test_perturb_is_channel_dropout_on_copies():
    torch.manual_seed(0)
    f = torch.rand(2, 64, 3, 4) + 0.5
    out = perturb(f, n=2, p=0.5)
    assert out.shape == (6, 64, 3, 4)
    assert torch.equal(out[:2], f)
    ratio = out[2:] / f.repeat(2, 1, 1, 1)
    per_channel = ratio.flatten(2)
    # Each channel of each copy is either dropped entirely or kept and scaled by 1 / (1 - p) = 2.
    assert torch.all((per_channel == 0).all(-1) | (per_channel == 2).all(-1))
    dropped = (per_channel == 0).all(-1).float().mean()
    assert 0.3 < dropped < 0.7
    assert not torch.equal(out[2:4], out[4:6])


@pytest.mark.parametrize("head", ["deeplabv3plus", "deeplabv2"])
def test_forward_fp_streams(head):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 48)
    model = build_model(small_cfg(head=head, fp_dropout=0.0), NUM_CLASSES).eval()
    with torch.no_grad():
        clean, fps = model.forward_fp(x, n=2)
        torch.testing.assert_close(clean, model(x))
        for fp in fps:  # p = 0: the perturbed streams are clean copies
            torch.testing.assert_close(fp, clean)
        model.fp_dropout = 0.5
        clean, fps = model.forward_fp(x, n=2)
        torch.testing.assert_close(clean, model(x))
        assert not torch.allclose(fps[0], clean) and not torch.allclose(fps[0], fps[1])


def test_forward_fp_runs_encoder_once_and_decodes_one_batch():
    model = build_model(small_cfg(), NUM_CLASSES)
    calls = {"backbone": [], "classifier": []}
    model.backbone.register_forward_hook(lambda m, i, o: calls["backbone"].append(i[0].shape[0]))
    model.head.classifier.register_forward_hook(lambda m, i, o: calls["classifier"].append(i[0].shape[0]))
    model.forward_fp(torch.randn(2, 3, 32, 32), n=2)
    assert calls == {"backbone": [2], "classifier": [6]}


def test_logits_are_upsampled_with_aligned_corners():
    model = build_model(small_cfg(head="deeplabv2"), NUM_CLASSES).eval()
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        low = model.head(model.encode(x))
        logits, feat = model.forward_with_features(x)
    assert torch.equal(feat, model.encode(x)[-1])
    # align_corners=True maps corner pixels exactly onto the low-resolution corners.
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        torch.testing.assert_close(logits[..., i, j], low[..., i, j])


def test_projection_head():
    model = build_model(small_cfg(proj_dim=5), NUM_CLASSES)
    feat = model.features(torch.randn(2, 3, 32, 32))
    assert model.project(feat).shape == (2, 5, *feat.shape[-2:])
    with pytest.raises(ValueError, match="proj_dim"):
        build_model(small_cfg(), NUM_CLASSES).project(feat)


def test_parameter_groups_partition_the_model():
    model = build_model(small_cfg(proj_dim=4), NUM_CLASSES)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.projector.parameters()} <= head


def test_fp_features_are_the_decoded_clean_and_perturbed_streams():
    # forward_fp_features returns forward_fp's logits plus the features they were classified from
    model = build_model(small_cfg(), NUM_CLASSES)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    clean, fps = model.forward_fp(x, 2)
    torch.manual_seed(0)
    clean2, fps2, feat = model.forward_fp_features(x, 2)
    assert feat.shape == (6, model.head.out_channels, 8, 8)
    torch.testing.assert_close(clean2, clean)
    torch.testing.assert_close(fps2, fps)
    logits = F.interpolate(model.head.classifier(feat), size=(32, 32), mode="bilinear", align_corners=True)
    torch.testing.assert_close(logits[:2], clean)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            {"backbone": "resnet152"},
            "model.backbone: unknown 'resnet152'; valid: resnet18, resnet34, resnet50, resnet101",
        ),
        (
            {"head": "pspnet"},
            "model.head: unknown 'pspnet'; valid: deeplabv3plus, deeplabv3plus_cps, deeplabv3, deeplabv2",
        ),
        ({"stem": "v1d"}, "model.stem: unknown 'v1d'; valid: deep, torchvision"),
        ({"output_stride": 4}, "model.output_stride: 4"),
        ({"backbone": "xception65", "output_stride": 32}, "model.output_stride: 32"),
        ({"backbone": "xception65", "width": 32}, "model.width"),
    ],
)
def test_invalid_config_is_one_line_value_error(override, message):
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig(**override), NUM_CLASSES)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_multi_grid_dilates_layer4_block_by_block(depth):
    # DeepLabV3's Multi-Grid as CPS / CTT use it: at OS 16 layer4's rate is 2, so (1, 2, 4) gives dilations 2, 4, 8
    net = build_resnet(depth, "deep", 8, 16, (1, 2, 4) if depth == "resnet50" else (1, 2))
    convs = [b.conv2 if depth == "resnet50" else b.conv1 for b in net.layer4]
    assert [c.dilation[0] for c in convs] == ([2, 4, 8] if depth == "resnet50" else [2, 4])
    assert all(c.stride == (1, 1) for c in convs) and [c.padding[0] for c in convs] == [c.dilation[0] for c in convs]
    feats = net(torch.randn(1, 3, 64, 64))
    assert feats[-1].shape[-2:] == (4, 4) and feats[2].shape[-2:] == (4, 4)  # layer3 strided, layer4 not: OS 16
    plain = build_resnet(depth, "deep", 8, 16)
    first = plain.layer4[0].conv2 if depth == "resnet50" else plain.layer4[0].conv1
    assert first.dilation == (1, 1)  # torchvision's scheme: the first block keeps the previous dilation


@pytest.mark.parametrize(
    "override,message",
    [
        ({"multi_grid": (1, 2, 4), "output_stride": 32}, "multi_grid"),
        ({"multi_grid": (1, 2)}, "multi_grid"),
        ({"multi_grid": (1, 2, 4), "backbone": "mobilenet_v2"}, "only the ResNets"),
    ],
)
def test_bad_multi_grid_is_a_config_error(override, message):
    from dataclasses import replace

    from semiseg.config import ConfigError
    from semiseg.models import check_model_config

    with pytest.raises(ConfigError, match=message):
        check_model_config(replace(small_cfg(), **override))

"""MobileNetV2: torchvision's key layout, strides and channels, TF "SAME" padding, the shared ImageNet file."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from semiseg.config import ModelConfig
from semiseg.errors import CheckpointError
from semiseg.models import build_model
from semiseg.models.mobilenetv2 import MobileNetV2, same_pads
from semiseg.models.pretrained import NAMED_WEIGHTS, load_backbone_weights, resolve_weights, weights_normalization

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrained" / "mobilenet_v2_imagenet.safetensors"


def torchvision_layout() -> dict[str, tuple[int, ...]]:
    """Names and shapes of torchvision's mobilenet_v2() state dict (width 1.0, 1000 classes), from the paper's table."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(prefix: str, out_ch: int, in_ch: int, k: int) -> None:
        shapes[f"{prefix}.0.weight"] = (out_ch, in_ch, k, k)
        bn(f"{prefix}.1", out_ch)

    def bn(prefix: str, ch: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (ch,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    conv_bn("features.0", 32, 3, 3)
    index, in_ch = 1, 32
    for t, c, n, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)) + (
        (6, 320, 1, 1),
    ):
        for _ in range(n):
            hidden, p = in_ch * t, f"features.{index}.conv"
            if t == 1:
                shapes[f"{p}.0.0.weight"] = (hidden, 1, 3, 3)
                bn(f"{p}.0.1", hidden)
                shapes[f"{p}.1.weight"] = (c, hidden, 1, 1)
                bn(f"{p}.2", c)
            else:
                conv_bn(f"{p}.0", hidden, in_ch, 1)
                shapes[f"{p}.1.0.weight"] = (hidden, 1, 3, 3)
                bn(f"{p}.1.1", hidden)
                shapes[f"{p}.2.weight"] = (c, hidden, 1, 1)
                bn(f"{p}.3", c)
            index, in_ch = index + 1, c
    conv_bn("features.18", 1280, 320, 1)
    shapes["classifier.1.weight"] = (1000, 1280)
    shapes["classifier.1.bias"] = (1000,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        k: torch.tensor(3) if k.endswith("num_batches_tracked") else torch.rand(s, generator=g) + 0.5
        for k, s in shapes.items()
    }


def test_torchvision_layout_loads_with_no_missing_or_unexpected_key(tmp_path):
    shapes = torchvision_layout()
    assert len(shapes) == 314  # torchvision's mobilenet_v2 state dict
    state = random_state(shapes)
    torch.save(state, tmp_path / "mobilenet_v2.pth")
    net = MobileNetV2()
    report = load_backbone_weights(net, tmp_path / "mobilenet_v2.pth")
    assert report.missing == () and report.unexpected == ()
    backbone_keys = [k for k in shapes if not k.startswith(("features.18.", "classifier."))]
    assert sorted(report.loaded) == sorted(backbone_keys)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    ("output_stride", "sizes"), [(32, (32, 16, 8, 4)), (16, (32, 16, 8, 8)), (8, (32, 16, 16, 16))]
)
def test_features_strides_and_channels(output_stride, sizes):
    net = MobileNetV2(output_stride=output_stride).eval()
    feats = net(torch.rand(1, 3, 128, 128))
    assert net.channels == (24, 32, 96, 320)
    assert [f.shape[1] for f in feats] == [24, 32, 96, 320]
    assert [f.shape[-1] for f in feats] == list(sizes)


def test_dilation_keeps_the_receptive_field():
    # The 160-channel stage's first depthwise conv still sees stride-16 input at OS16 (dilation 1), the rest dilate 2.
    net = MobileNetV2(output_stride=16)
    assert net.features[14].conv[1][0].stride == (1, 1) and net.features[14].conv[1][0].dilation == (1, 1)
    assert net.features[15].conv[1][0].dilation == (2, 2) and net.features[15].conv[1][0].padding == (2, 2)


def test_width_multiplier_rounds_channels_to_multiples_of_8():
    net = MobileNetV2(width_mult=0.5)
    # torchvision's _make_divisible: 24*0.5=12 -> 16, 32*0.5=16, 96*0.5=48, 320*0.5=160; stem 32*0.5=16
    assert net.channels == (16, 16, 48, 160)
    assert net.features[0][0].out_channels == 16


@pytest.mark.parametrize(("n", "pads"), [(128, (0, 1)), (127, (1, 1)), (7, (1, 1)), (8, (0, 1))])
def test_same_padding_by_hand(n, pads):
    # out = ceil(n / 2); total = (out - 1) * 2 + 3 - n; TF puts the odd pixel after.
    assert same_pads(n, 3, 2, 1) == pads


def test_tf_padding_changes_only_the_stride_2_grid():
    torch.manual_seed(0)
    torch_pad = MobileNetV2(output_stride=32).eval()
    tf_pad = MobileNetV2(output_stride=32, tf_padding=True).eval()
    tf_pad.load_state_dict(torch_pad.state_dict())  # same names: padding is not a parameter
    x = torch.rand(1, 3, 64, 64)
    a, b = torch_pad(x), tf_pad(x)
    assert [t.shape for t in a] == [t.shape for t in b]
    assert not torch.allclose(a[0], b[0])
    # By hand: a stride-2 3x3 conv with TF padding on an even input equals torch's conv on the input padded (0, 1).
    conv = tf_pad.features[0][0]
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)


def test_depthwise_convs_stay_fp32_under_cpu_autocast():
    torch.manual_seed(0)
    block = MobileNetV2(width_mult=0.25).features[2].conv  # expand 1x1, depthwise 3x3, project 1x1
    expand, depthwise, project = block[0][0], block[1][0], block[2]
    assert depthwise.depthwise and not expand.depthwise and depthwise.groups == depthwise.in_channels
    x = torch.randn(2, expand.in_channels, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = expand(x)
        out = depthwise(hidden)
        projected = project(out)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32 and projected.dtype == torch.bfloat16
    # the depthwise output is the fp32 convolution of its (bf16) input, exactly
    torch.testing.assert_close(out, depthwise(hidden.float()), rtol=0, atol=0)
    assert depthwise(x[:, :1].expand(-1, depthwise.in_channels, -1, -1)).dtype == torch.float32  # no autocast: as is


def test_imagenet_name_resolves_to_the_torchvision_url():
    assert resolve_weights("imagenet", "mobilenet_v2").endswith("/mobilenet_v2-b0353104.pth")
    assert resolve_weights("imagenet_v2", "resnet50").startswith("https://download.pytorch.org/models/")
    assert resolve_weights("/some/file.pth", "mobilenet_v2") == "/some/file.pth"
    with pytest.raises(CheckpointError, match="xception65"):
        resolve_weights("imagenet", "xception65")
    assert set(NAMED_WEIGHTS["imagenet"]) >= {"resnet18", "resnet50", "resnet101", "mobilenet_v2"}


def test_imagenet_name_downloads_once_into_the_cache(tmp_path, monkeypatch):
    # The real download path, served from a file:// URL instead of download.pytorch.org.
    from semiseg.models import pretrained as pt

    state = random_state(torchvision_layout())
    src = tmp_path / "src" / "mobilenet_v2-b0353104.pth"
    src.parent.mkdir()
    torch.save(state, src)
    monkeypatch.setitem(pt.NAMED_WEIGHTS["imagenet"], "mobilenet_v2", src.as_uri())
    monkeypatch.setattr(pt, "CACHE_DIR", tmp_path / "cache")
    cfg = ModelConfig(backbone="mobilenet_v2", head_channels=16, low_level_channels=8, pretrained="imagenet")
    model = build_model(cfg, 3)
    assert (tmp_path / "cache" / src.name).is_file()
    assert torch.equal(model.backbone.features[1].conv[1].weight, state["features.1.conv.1.weight"])
    # torchvision's checkpoints carry no normalisation: ImageNet's
    torch.testing.assert_close(model.input_norm.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_normalisation_declared_in_safetensors_metadata(tmp_path):
    state = random_state(torchvision_layout())
    path = tmp_path / "converted.safetensors"
    save_file(state, str(path), metadata={"input_normalization": "RGB [0,1], mean=(0.5,0.5,0.5) std=(0.5,0.5,0.5)"})
    assert weights_normalization(path) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    cfg = ModelConfig(backbone="mobilenet_v2", head_channels=16, low_level_channels=8, pretrained=str(path))
    model = build_model(cfg, 3).eval()
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    # [-1, 1] inputs: the first conv sees 2 * x / 255 - 1
    torch.testing.assert_close(model.input_norm(x), x.float() / 255 * 2 - 1)
    # an explicit config wins over the metadata
    cfg2 = ModelConfig(**{**cfg.__dict__, "input_mean": (0.1, 0.2, 0.3), "input_std": (1.0, 1.0, 1.0)})
    torch.testing.assert_close(build_model(cfg2, 3).input_norm.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))


@pytest.mark.skipif(not SHARED.is_file(), reason="the shared ImageNet MobileNetV2 file is not on this machine")
def test_shared_imagenet_file_loads_every_backbone_key():
    net = MobileNetV2(output_stride=16, tf_padding=True)
    report = load_backbone_weights(net, SHARED)
    assert report.missing == () and report.unexpected == ()
    assert len(report.loaded) == 314 - 6 - 2  # minus features.18 (conv weight + 5 BN entries) and the classifier
    assert weights_normalization(SHARED) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

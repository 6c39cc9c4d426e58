"""Pretrained-weight import: torchvision and deep-stem layouts, containers, prefixes, safety, clear errors."""

import pytest
import torch
from safetensors.torch import save_file

from semiseg.config import ModelConfig
from semiseg.errors import CheckpointError
from semiseg.models import build_model
from semiseg.models import pretrained as pt
from semiseg.models.pretrained import load_backbone_weights, read_state_dict
from semiseg.models.resnet import build_resnet


class NotATensor:
    """Pickled by reference: loading it would import and run code, which weights_only refuses."""


def trained_like_state(stem: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A ResNet-18 (width 8) state dict with random values everywhere, BN buffers included."""
    torch.manual_seed(seed)
    state = build_resnet("resnet18", stem, 8, 16).state_dict()
    return {k: (torch.randn_like(v) if v.is_floating_point() else v + 7) for k, v in state.items()}


def assert_landed(net: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_torchvision_layout_with_fc(tmp_path):
    state = trained_like_state("torchvision")
    path = tmp_path / "resnet18.pth"
    torch.save({**state, "fc.weight": torch.randn(1000, 64), "fc.bias": torch.randn(1000)}, path)
    net = build_resnet("resnet18", "torchvision", 8, 16)
    report = load_backbone_weights(net, path)
    assert_landed(net, state)
    assert report.missing == () and report.unexpected == ()
    assert len(report.loaded) == len(state)
    assert report.summary() == f"{path}: loaded {len(state)} tensors"


def test_deep_stem_layout_safetensors(tmp_path):
    state = trained_like_state("deep")
    assert "conv1.6.weight" in state and state["bn1.weight"].shape == (16,)
    path = tmp_path / "resnet18_v1c.safetensors"
    save_file(state, str(path))
    net = build_resnet("resnet18", "deep", 8, 16)
    report = load_backbone_weights(net, path)
    assert_landed(net, state)
    assert report.missing == () and report.unexpected == ()


def test_containers_and_prefixes_are_unwrapped(tmp_path):
    state = trained_like_state("deep")
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    assert read_state_dict(path).keys() == state.keys()
    net = build_resnet("resnet18", "deep", 8, 16)
    load_backbone_weights(net, path)
    assert_landed(net, state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_own_segmentor_export_takes_backbone_entries(tmp_path, suffix):
    cfg = ModelConfig(backbone="resnet18", stem="deep", width=8, head_channels=16, low_level_channels=8)
    torch.manual_seed(2)
    exported = build_model(cfg, 3)
    path = tmp_path / f"export{suffix}"
    if suffix == ".pth":
        torch.save({"model": exported.state_dict()}, path)
    else:
        save_file({k: v.contiguous() for k, v in exported.state_dict().items()}, str(path))
    torch.manual_seed(3)
    model = build_model(ModelConfig(**{**cfg.__dict__, "pretrained": str(path)}), 3)
    assert_landed(model.backbone, exported.backbone.state_dict())
    assert not torch.equal(model.head.classifier.weight, exported.head.classifier.weight)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    state = trained_like_state("torchvision")
    state.pop("layer4.1.bn2.weight")
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    net = build_resnet("resnet18", "torchvision", 8, 16)
    report = load_backbone_weights(net, path)
    assert report.missing == ("layer4.1.bn2.weight",)
    assert report.unexpected == ("layer9.0.conv1.weight",)
    assert "1 missing (layer4.1.bn2.weight)" in report.summary()
    assert "1 unexpected (layer9.0.conv1.weight)" in report.summary()
    assert torch.equal(net.layer4[1].bn1.weight, state["layer4.1.bn1.weight"])


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    state = trained_like_state("torchvision")
    state["layer2.0.conv1.weight"] = torch.zeros(16, 8, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(build_resnet("resnet18", "torchvision", 8, 16), path)
    message = str(err.value)
    assert "layer2.0.conv1.weight" in message and "(16, 8, 5, 5)" in message and "(16, 8, 3, 3)" in message
    assert str(path) in message and "\n" not in message


def test_width_mismatch_is_a_shape_error(tmp_path):
    path = tmp_path / "w8.pth"
    torch.save(trained_like_state("torchvision"), path)
    with pytest.raises(CheckpointError, match=r"conv1.weight has shape \(8, 3, 7, 7\) .* \(16, 3, 7, 7\)"):
        load_backbone_weights(build_resnet("resnet18", "torchvision", 16, 16), path)


def test_stem_mismatch_suggests_the_right_stem(tmp_path):
    path = tmp_path / "v1c.pth"
    torch.save(trained_like_state("deep"), path)
    with pytest.raises(CheckpointError, match="set model.stem: deep"):
        load_backbone_weights(build_resnet("resnet18", "torchvision", 8, 16), path)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=f"{path}: weight file not found"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="nope.pth"):
        build_model(ModelConfig(backbone="resnet18", width=8, pretrained=str(path)), 3)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_state_dict(path)


def test_no_matching_key_is_an_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="no key matches the backbone"):
        load_backbone_weights(build_resnet("resnet18", "deep", 8, 16), path)


def test_url_uses_cache_without_downloading(tmp_path, monkeypatch):
    cached = tmp_path / "resnet18_v1c.pth"
    torch.save(trained_like_state("deep"), cached)

    def no_download(*args, **kwargs):
        raise AssertionError("tests never download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(pt, "CACHE_DIR", tmp_path)
    assert pt.is_url("https://example.org/w/resnet18_v1c.pth") and not pt.is_url(str(cached))
    assert pt.fetch("https://example.org/w/resnet18_v1c.pth") == cached
    net = build_resnet("resnet18", "deep", 8, 16)
    assert load_backbone_weights(net, "https://example.org/w/resnet18_v1c.pth").missing == ()

"""BST: entropy-weighted fusion, pixel-level noise, gradient routing of the branch network, labels and a tiny run."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from semiseg import config as C
from semiseg.data.batch import Batch, LabeledBatch
from semiseg.data.datasets import dataset_info
from semiseg.data.info import IGNORE
from semiseg.engine.checkpoint import load_export
from semiseg.engine.loop import Context
from semiseg.engine.run import train
from semiseg.losses import ce
from semiseg.methods import METHODS, bst, load_config
from semiseg.models import BranchNet
from semiseg.ops import drop_pixels, entropy_weights, fuse_branches, input_noise, noisy_argmax


def test_entropy_weights_hand_computed():
    # pixel 0: branch 1 uncertain (0.5, 0.5), branch 2 confident (0.9, 0.1); pixel 1: both (0.7, 0.3)
    probs = torch.tensor([[[0.5, 0.7], [0.5, 0.3]], [[0.9, 0.7], [0.1, 0.3]]]).view(2, 1, 2, 1, 2)
    w = entropy_weights(probs, temperature=1.0)
    # H1 = ln 2 = 0.693147, H2 = -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.325083; w = softmax(-H) over the two branches
    assert w.shape == (2, 1, 1, 2)
    assert w[:, 0, 0, 0].tolist() == pytest.approx([0.409009, 0.590991], abs=1e-5)
    assert w[:, 0, 0, 1].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    fused = fuse_branches(probs, w)
    assert fused[0, :, 0, 0].tolist() == pytest.approx([0.736396, 0.263604], abs=1e-5)
    assert fused[0, :, 0, 1].tolist() == pytest.approx([0.7, 0.3], abs=1e-6)
    # a high temperature flattens the weights towards the mean
    assert entropy_weights(probs, temperature=1e6)[:, 0, 0, 0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_gauss_noise_changes_only_near_tie_pixels():
    g = torch.Generator().manual_seed(0)
    prob = torch.empty(1, 2, 64, 64)
    prob[:, 0, :32], prob[:, 1, :32] = 0.9, 0.1  # clear margin
    prob[:, 0, 32:], prob[:, 1, 32:] = 0.501, 0.499  # near tie
    label = noisy_argmax(prob, 0.05, g)
    assert (label[:, :32] == 0).all()
    flipped = (label[:, 32:] == 1).float().mean()
    assert 0.3 < flipped < 0.7
    assert torch.equal(noisy_argmax(prob, 0.0, g), prob.argmax(1))


def test_flip_noise_drops_about_rho_of_the_pixels():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (2, 100, 100), generator=g)
    out = drop_pixels(label, 0.05, g)
    dropped = out == IGNORE
    assert 0.04 < dropped.float().mean() < 0.06
    assert torch.equal(out[~dropped], label[~dropped])


def test_input_noise_changes_selected_images_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g)
    out = input_noise(x, 0.1, g, torch.tensor([True, False, True, False]))
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])
    assert 0.08 < float((out[[0, 2]] - x[[0, 2]]).std()) < 0.12


def _tiny(tiny, *extra):
    return load_config(None, tiny + ["method.name=bst", "train.iters=2", "method.tta_scales=[1.0,0.5]", *extra])


def _grads(module):
    return [p.grad for p in module.parameters() if p.grad is not None and p.grad.abs().sum() > 0]


@pytest.mark.parametrize("mode", ["shared", "separate"])
def test_branch_loss_reaches_only_its_branch_and_encoder(tiny_overrides, mode):
    cfg = _tiny(tiny_overrides, f"method.branch_mode={mode}", "method.branches=[context,detail,pyramid]")
    torch.manual_seed(0)
    net = bst.build(cfg, dataset_info(cfg.data))["model"]
    net.train()
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 7, (2, 32, 32))
    out = net.forward_branches(x)
    assert len(out.branches) == 3 and out.fused.shape == (2, 7, 32, 32)
    ce(out.branches[0], target).backward()
    assert _grads(net.branches[0]) and _grads(net.encoders[0])
    assert not _grads(net.branches[1]) and not _grads(net.branches[2]) and not _grads(net.fusion)
    if mode == "separate":
        assert len(net.encoders) == 3 and not _grads(net.encoders[1]) and not _grads(net.encoders[2])
    net.zero_grad(set_to_none=True)
    ce(net.forward_branches(x).fused, target).backward()
    assert _grads(net.fusion) and all(_grads(b) for b in net.branches) and all(_grads(e) for e in net.encoders)
    assert {id(p) for p in net.backbone_parameters()} == {id(p) for p in net.encoders.parameters()}
    assert len(net.head_parameters()) + len(net.backbone_parameters()) == len(list(net.parameters()))


def test_forward_is_the_fused_prediction_and_labels_fuse_the_branches(tiny_overrides):
    cfg = _tiny(tiny_overrides, "method.pl_noise=none", "method.fusion=mean")
    torch.manual_seed(0)
    net = bst.build(cfg, dataset_info(cfg.data))["model"].eval()
    x = torch.randn(1, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = net.forward_branches(x)
        assert torch.equal(net(x), out.fused)
        mean = torch.stack([z.softmax(1) for z in out.branches]).mean(0)
    plain = load_config(
        None, ["method.name=bst", "method.fusion=mean", "method.pl_noise=none", "method.tta_scales=[1]"]
    )
    plain = dataclasses.replace(plain.method, tta_flip=False)
    assert torch.equal(bst.label(net, x, g, plain), mean.argmax(1))
    assert torch.equal(bst.predict(net, x, plain), mean.argmax(1))
    # input noise perturbs training images only: the labels are the noise-free ones
    as_input = dataclasses.replace(plain, pl_noise="input")
    assert torch.equal(bst.label(net, x, g, as_input), mean.argmax(1))


def test_input_noise_in_the_step_touches_only_pseudo_labeled_crops(tiny_overrides, monkeypatch):
    cfg = _tiny(tiny_overrides, "method.pl_noise=input")
    seen = {}
    real = bst.input_noise

    def spy(x, std, gen, select):
        seen["select"] = select.clone()
        return real(x, std, gen, select)

    monkeypatch.setattr(bst, "input_noise", spy)
    torch.manual_seed(0)
    nets = bst.build(cfg, dataset_info(cfg.data))
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    batch = Batch(
        LabeledBatch(image, torch.zeros(2, 32, 32, dtype=torch.long), ["a", "b"], torch.tensor([True, False]))
    )
    ctx = Context(0, 2, torch.Generator().manual_seed(0), dataset_info(cfg.data), torch.device("cpu"), cfg)
    out = bst.train_step(nets, batch, cfg.method, ctx)
    assert torch.equal(seen["select"], torch.tensor([True, False]))
    assert {"train/loss_x", "train/loss_fused"} <= set(out.logs)


def test_bst_run_with_flip_noise_and_separate_networks(tiny_overrides, tmp_path):
    cfg = _tiny(
        tiny_overrides,
        "method.plus=false",
        "method.pl_noise=flip",
        "method.flip_rate=0.2",
        "method.branch_mode=separate",
        "method.w_diversity=0.1",
    )
    results = train(cfg, tmp_path / "run", bst)
    assert list(results["stages"]) == ["1_teacher", "2_label", "3_student"]
    labels = np.stack(
        [np.array(Image.open(p)) for p in sorted((tmp_path / "run" / "2_label" / "pseudo").glob("*.png"))]
    )
    assert labels.shape == (16, 32, 32)
    assert 0.15 < (labels == IGNORE).mean() < 0.25
    assert labels[labels != IGNORE].max() < 7
    _, net, _ = load_export(tmp_path / "run" / "best.safetensors", METHODS)
    assert isinstance(net, BranchNet) and len(net.encoders) == 2
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 7, 32, 32)


def test_bad_bst_settings_are_one_line_errors():
    with pytest.raises(C.ConfigError, match="branches"):
        load_config(None, ["method.name=bst", "method.branches=[context,edges]"])
    with pytest.raises(C.ConfigError, match="pl_noise"):
        load_config(None, ["method.name=bst", "method.pl_noise=salt"])
    with pytest.raises(C.ConfigError, match="branch_mode"):
        load_config(None, ["method.name=bst", "method.branch_mode=twin"])

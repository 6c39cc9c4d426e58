"""SWDBN: branch isolation of gradients, strong-only inference, single-branch mode, weak sources, run and export."""

import pytest
import torch

from semiseg import config as C
from semiseg.data.batch import Batch, LabeledBatch, UnlabeledBatch
from semiseg.data.datasets import dataset_info
from semiseg.data.info import IGNORE
from semiseg.data.weak import read_boxes
from semiseg.engine.checkpoint import load_export
from semiseg.engine.loop import Context
from semiseg.engine.run import train
from semiseg.losses import ce
from semiseg.methods import METHODS, load_config, swdbn
from semiseg.models import DualBranchNet


def load(overrides, *extra):
    cfg = load_config(None, [*overrides, "method.name=swdbn", *extra])
    return cfg, dataset_info(cfg.data)


def context(cfg, info, step=0, tags=None):
    return Context(step, 10, torch.Generator().manual_seed(0), info, torch.device("cpu"), cfg, tags)


def batch(info, n=2, size=32, proxy=None):
    g = torch.Generator().manual_seed(1)
    img = lambda: torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)  # noqa: E731
    mask = torch.randint(0, info.num_classes, (n, size, size), generator=g)
    pad = torch.zeros(n, size, size, dtype=torch.bool)
    pad[:, -4:] = True
    u_mask = proxy if proxy is not None else mask.clone()
    return Batch(LabeledBatch(img(), mask, ["l0", "l1"][:n]), UnlabeledBatch(img(), pad, ["u0", "u1"][:n], u_mask))


def test_each_loss_reaches_only_its_branch(tiny_overrides):
    cfg, info = load(tiny_overrides)
    model = swdbn.build(cfg, info)["model"]
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, info.num_classes, (2, 32, 32))
    logits_s, logits_w = model.forward_branches(x, 2)
    assert logits_s.shape == logits_w.shape == (2, info.num_classes, 32, 32)
    groups = {name: list(getattr(model, name).parameters()) for name in ("backbone", "neck", "strong", "weak")}
    params = [p for ps in groups.values() for p in ps]
    for loss, mine, other in [(ce(logits_s, y), "strong", "weak"), (ce(logits_w, y), "weak", "strong")]:
        grads = dict(zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)))
        assert all(grads[p] is None for p in groups[other]), f"the {mine} loss reached the {other} branch"
        for shared in ("backbone", "neck", mine):
            assert any(grads[p] is not None and grads[p].abs().sum() > 0 for p in groups[shared]), shared


def test_inference_uses_only_the_strong_branch(tiny_overrides):
    cfg, info = load(tiny_overrides)
    model = swdbn.build(cfg, info)["model"].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for p in model.weak.parameters():
            p.add_(torch.randn_like(p))
        after = model(x)
        strong, _ = model.forward_branches(torch.cat([x, x]), 2)
        for p in model.strong.classifier.parameters():
            p.add_(1.0)
        changed = model(x)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    torch.testing.assert_close(before, strong)
    assert not torch.allclose(before, changed)


def test_single_branch_has_no_weak_branch_and_trains_the_strong_one(tiny_overrides):
    cfg, info = load(tiny_overrides, "method.single_branch=true")
    nets = swdbn.build(cfg, info)
    model = nets["model"]
    assert model.weak is None and not any(k.startswith("weak.") for k in model.state_dict())
    for net in nets.values():
        net.train()
    out = swdbn.train_step(nets, batch(info), cfg.method, context(cfg, info))
    out.loss.backward()
    strong = list(model.strong.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in strong)
    # the weak images' term alone reaches the strong branch in single-branch mode
    x = torch.randn(4, 3, 32, 32)
    _, logits_w = model.forward_branches(x, 2)
    assert logits_w.shape[0] == 2
    grads = torch.autograd.grad(ce(logits_w, torch.zeros(2, 32, 32, dtype=torch.long)), strong)
    assert any(g.abs().sum() > 0 for g in grads)


def test_boxes_step_trains_the_weak_branch_on_the_proxy(tiny_overrides):
    cfg, info = load(tiny_overrides, "method.weak_source=boxes", "method.lam=2.0")
    nets = swdbn.build(cfg, info)
    assert set(nets) == {"model"}  # boxes need no teacher
    proxy = torch.full((2, 32, 32), IGNORE)
    proxy[:, 4:12, 4:20] = 1
    b = batch(info, proxy=proxy)
    torch.manual_seed(0)
    out = swdbn.train_step(nets, b, cfg.method, context(cfg, info))
    assert float(out.logs["train/mask_ratio"]) == pytest.approx(8 * 16 / (28 * 32))
    assert "train/pl_acc" not in out.logs
    torch.testing.assert_close(out.loss, out.logs["train/loss_x"] + 2.0 * out.logs["train/loss_w"])
    out.loss.backward()
    assert all(p.grad is not None for p in nets["model"].weak.parameters())


def test_tags_step_labels_only_tagged_classes(tiny_overrides, monkeypatch):
    cfg, info = load(tiny_overrides, "method.weak_source=tags", "method.tau=0", "method.teacher=self")
    nets = swdbn.build(cfg, info)
    assert set(nets) == {"model"}
    tags = {"u0": frozenset({2}), "u1": frozenset({3, 4})}
    b = batch(info)
    with pytest.raises(C.ConfigError, match="weak_source=tags: this fit has no tags"):
        swdbn.train_step(nets, b, cfg.method, context(cfg, info))
    seen = {}

    def spy(logits, target):
        seen["target"] = target
        return ce(logits, target)

    monkeypatch.setattr(swdbn, "ce", spy)
    out = swdbn.train_step(nets, b, cfg.method, context(cfg, info, tags=tags))
    target = seen["target"]
    assert set(target[0].unique().tolist()) <= {0, 2, IGNORE} and set(target[1].unique().tolist()) <= {0, 3, 4, IGNORE}
    assert (target[:, -4:] == IGNORE).all() and (target[:, :-4] != IGNORE).all()  # tau 0: only padding ignored
    assert float(out.logs["train/mask_ratio"]) == pytest.approx(1.0)
    assert "train/pl_acc" in out.logs


def test_ema_teacher_follows_the_model(tiny_overrides):
    cfg, info = load(tiny_overrides, "method.ema_keep=0.5")
    nets = swdbn.build(cfg, info)
    teacher, model = nets["teacher"], nets["model"]
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    t0 = next(teacher.parameters()).clone()
    swdbn.after_step(nets, cfg.method, context(cfg, info, step=5))
    torch.testing.assert_close(next(teacher.parameters()), t0 + 0.5)


@pytest.mark.parametrize(
    "bad", ["method.weak_source=scribbles", "method.teacher=peer", "method.box_band=1.0", "method.neck_depth=-1"]
)
def test_config_rejects_bad_values(tiny_overrides, bad):
    with pytest.raises(C.ConfigError, match="method"):
        load(tiny_overrides, bad)


def test_run_with_derived_boxes_exports_a_strong_branch_model(tmp_path, tiny_overrides):
    cfg, info = load(
        tiny_overrides, "method.weak_source=boxes", "method.weak_ids=6", "method.min_box_area=4", "train.iters=2"
    )
    run_dir = tmp_path / "run"
    train(cfg, run_dir, swdbn)
    for name in ("results.json", "config.yaml", "best.safetensors", "last.safetensors", "weak_boxes.txt"):
        assert (run_dir / name).is_file(), name
    boxes = read_boxes(run_dir / "weak_boxes.txt", info.classes)
    assert len(boxes) == 6
    stamp = (run_dir / "weak_boxes.txt").stat().st_mtime_ns
    cfg2, model, _ = load_export(run_dir / "best.safetensors", METHODS)
    assert isinstance(model, DualBranchNet) and model.weak is not None and cfg2.method.weak_source == "boxes"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (1, info.num_classes, 32, 32)
    result = train(cfg, run_dir, swdbn)  # finished: nothing retrained, the derived boxes reused
    assert result["last"]["step"] == 2 and (run_dir / "weak_boxes.txt").stat().st_mtime_ns == stamp


def test_run_with_a_tags_file_keeps_only_tagged_images(tmp_path, tiny_overrides, capsys):
    cfg, info = load(tiny_overrides)
    from semiseg.data.datasets import resolve_train_split

    _, unlabeled = resolve_train_split(cfg.data)
    tags = tmp_path / "tags.txt"
    tags.write_text("".join(f"{i} disc\n" for i in unlabeled.ids[:3]))
    cfg, info = load(tiny_overrides, "method.weak_source=tags", f"method.tags_file={tags}", "train.iters=1")
    data = swdbn.prepare(cfg, tmp_path / "run", info)
    weak = data.unlabeled[0].dataset
    assert weak.ids == unlabeled.ids[:3] and data.tags == {i: {1} for i in weak.ids}
    assert data.labeled[0].dataset.ids == resolve_train_split(cfg.data)[0].ids
    train(cfg, tmp_path / "run", swdbn)
    assert "8 strong images, 3 weak images (tags)" in capsys.readouterr().out

"""UniMatch V2: complementary channel masks, the loss by hand, the EMA teacher, a step on ViT-S, the presets."""

import math
from pathlib import Path

import pytest
import torch
from method_helpers import ctx_at, method_nets, random_batch
from torch import nn

from semiseg.data.batch import Batch, UnlabeledBatch
from semiseg.data.datasets import dataset_info
from semiseg.engine.loop import StepOut
from semiseg.engine.optim import build_optimizer
from semiseg.methods import load_config, unimatch_v2
from semiseg.methods.unimatch_v2 import complementary_masks, forward_complementary, scale_channels
from semiseg.models import build_model
from semiseg.models.segmentor import Segmentor
from semiseg.ops import pseudo_label

ROOT = Path(__file__).resolve().parents[1]
VIT_S = ["model.backbone=dinov2_small", "model.head=dpt", "model.width=64", "model.pretrained=", "data.crop=98"]


def test_complementary_masks_partition_the_channels_of_each_perturbed_pair():
    n, dim = 4, 64
    m = complementary_masks(n, dim, 0.5, torch.Generator().manual_seed(0))
    assert m.shape == (2 * n, dim)
    m1, m2 = m[:n], m[n:]
    torch.testing.assert_close(m1 + m2, torch.full((n, dim), 2.0))  # keep-masks m/2 sum to all-ones
    clean = (m1 == 1).all(1)
    assert clean.sum() == 2 and torch.equal(clean, (m2 == 1).all(1))  # int(4 * 0.5) images clean in both views
    perturbed = m1[~clean]
    assert ((perturbed == 0) | (perturbed == 2)).all()  # dropout's rescaling at p = 0.5: kept channels x2
    assert 0 < (perturbed == 2).sum() < perturbed.numel()
    again = complementary_masks(n, dim, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(m, again)


@pytest.mark.parametrize(
    "n,frac,clean", [(2, 0.5, 1), (3, 0.5, 1), (1, 0.5, 0), (4, 1.0, 0), (4, 0.0, 4), (4, 0.25, 3)]
)
def test_complementary_masks_clean_count_is_int_n_times_one_minus_frac(n, frac, clean):
    m = complementary_masks(n, 256, frac, torch.Generator().manual_seed(1))
    assert int((m[:n] == 1).all(1).sum()) == clean


def test_complementary_masks_keep_each_channel_with_probability_one_half():
    m = complementary_masks(2, 20000, 1.0, torch.Generator().manual_seed(2))
    assert abs(float((m[:2] == 2).float().mean()) - 0.5) < 0.01


def test_scale_channels_uses_one_draw_for_every_map():
    scales = torch.tensor([[2.0, 0.0, 2.0], [0.0, 2.0, 0.0]])
    wide, narrow = torch.ones(2, 3, 2, 2), torch.ones(2, 2, 1, 1)
    out_wide, out_narrow = scale_channels([wide, narrow], scales)
    assert out_wide[:, :, 0, 0].tolist() == [[2.0, 0.0, 2.0], [0.0, 2.0, 0.0]]
    assert out_narrow[:, :, 0, 0].tolist() == [[2.0, 0.0], [0.0, 2.0]]


class Identity4(nn.Module):
    """A stand-in encoder: the (normalised) image itself, four times."""

    channels = (3, 3, 3, 3)

    def forward(self, x):
        return [x] * 4


class ZeroHead(nn.Module):
    """A stand-in head whose logits are 0 everywhere: every pixel's CE is log K, whatever its target."""

    def __init__(self, num_classes):
        super().__init__()
        self.classifier = nn.Conv2d(3, num_classes, 1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.out_channels = 3

    def features(self, feats):
        return feats[-1]

    def forward(self, feats):
        return self.classifier(self.features(feats))


class BottomRowsTeacher(nn.Module):
    """A stand-in teacher: logits with `margin` on class 0 in the last `rows` rows, 0 (uniform) elsewhere."""

    def __init__(self, num_classes, rows, margin):
        super().__init__()
        self.num_classes, self.rows, self.margin = num_classes, rows, margin

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, 0, -self.rows :] = self.margin
        return logits


def test_loss_is_half_labeled_plus_a_quarter_per_strong_view_by_hand(tiny_overrides):
    k, size, rows, margin = 4, 32, 8, 5.0
    teacher = BottomRowsTeacher(k, rows, margin)
    batch = random_batch(k, n=2, size=size, ignore_rows=3)  # the last 4 unlabeled rows are padding
    confs = pseudo_label(teacher(batch.u.image))[0][:, -rows:]
    conf = confs.max()  # e^5 / (e^5 + 3) = 0.980, the same float at every pixel of the teacher's rows
    assert conf == confs.min() and float(conf) == pytest.approx(math.exp(5) / (math.exp(5) + 3))
    cfg = load_config(None, tiny_overrides + ["method.name=unimatch_v2", f"method.tau={float(conf)}"])
    nets = {"student": Segmentor(Identity4(), ZeroHead(k)), "teacher": teacher}
    info = dataset_info(cfg.data)
    out = unimatch_v2.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 0))
    # Uniform student logits: every pixel's CE is log 4. The teacher's confidence (position only, so CutMix keeps it)
    # passes tau (inclusive: it equals tau) in its 8 bottom rows, 4 of them padding: the sum runs over 4 of the 28
    # non-padded rows and is divided by all 28, so L_s1 = L_s2 = log 4 * 4 / 28.
    loss_x, loss_s = math.log(k), math.log(k) * 4 / 28
    assert float(out.logs["train/loss_x"]) == pytest.approx(loss_x, rel=1e-6)
    assert float(out.logs["train/loss_s"]) == pytest.approx(loss_s, rel=1e-6)
    assert float(out.loss.detach()) == pytest.approx(0.5 * loss_x + 0.25 * loss_s + 0.25 * loss_s, rel=1e-6)
    assert float(out.logs["train/mask_ratio"]) == pytest.approx(4 / 28)
    above = load_config(None, tiny_overrides + ["method.name=unimatch_v2", f"method.tau={float(conf) + 1e-6}"])
    out = unimatch_v2.train_step(nets, batch, above.method, ctx_at(above, info, 0))
    assert float(out.logs["train/loss_s"]) == 0.0 and float(out.loss.detach()) == pytest.approx(0.5 * loss_x, rel=1e-6)


def test_strong_views_take_the_teachers_labels_and_the_students_perturbed_forward(tiny_overrides):
    # With every channel kept (perturb_frac 0), the strong forward is the plain forward.
    cfg, info, nets = method_nets(unimatch_v2, tiny_overrides, "method.perturb_frac=0.0")
    student = nets["student"]
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ones = complementary_masks(2, 64, 0.0, torch.Generator())
    torch.testing.assert_close(forward_complementary(student, x, ones), student(x))
    scales = complementary_masks(2, 64, 1.0, torch.Generator().manual_seed(0))
    assert (forward_complementary(student, x, scales) - student(x)).abs().max() > 1e-3


def test_ema_teacher_copies_at_step_0_halves_at_step_1_and_caps_at_0_996(tiny_overrides):
    cfg, info, nets = method_nets(unimatch_v2, tiny_overrides)
    student, teacher = nets["student"], nets["teacher"]
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    params = [name for name, p in teacher.named_parameters()]
    start = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    unimatch_v2.after_step(nets, cfg.method, ctx_at(cfg, info, step=1))  # keep 1 - 1/2
    t = dict(teacher.named_parameters())
    assert all(torch.allclose(t[n], start[n] + 0.5) for n in params)
    unimatch_v2.after_step(nets, cfg.method, ctx_at(cfg, info, step=999))  # 1 - 1/1000 > 0.996: capped
    assert all(torch.allclose(t[n], start[n] + 0.5 + 0.5 * 0.004, atol=1e-6) for n in params)
    unimatch_v2.after_step(nets, cfg.method, ctx_at(cfg, info, step=0))  # keep 0: a copy
    s = dict(student.named_parameters())
    assert all(torch.equal(t[n], s[n]) for n in params)


def test_one_step_on_vit_small_at_98_pixels(tiny_overrides):
    cfg, info, nets = method_nets(unimatch_v2, tiny_overrides, *VIT_S)
    batch = random_batch(info.num_classes, n=2, size=98, ignore_rows=3)
    out = unimatch_v2.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 0))
    assert isinstance(out, StepOut) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert {"train/loss_x", "train/loss_s", "train/mask_ratio", "train/pl_acc"} <= set(out.logs)
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for v in out.logs.values())
    out.loss.backward()
    assert not any(p.grad is not None for p in nets["teacher"].parameters())
    student = nets["student"]
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["backbone.blocks.11.mlp.fc2.weight"].abs().sum() > 0 and student.backbone.mask_token.grad is None
    unimatch_v2.after_step(nets, cfg.method, ctx_at(cfg, info, 0))
    assert torch.equal(nets["teacher"].backbone.pos_embed, student.backbone.pos_embed)


def test_stream_partners_get_their_own_teacher_pass(tiny_overrides):
    cfg, info, nets = method_nets(unimatch_v2, tiny_overrides, "train.mix_partner=stream")
    b = random_batch(info.num_classes)
    g = torch.Generator().manual_seed(5)
    u_mix = UnlabeledBatch(torch.randint(0, 256, b.u.image.shape, generator=g, dtype=torch.uint8), b.u.pad.clone())
    calls = []
    nets["teacher"].register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    unimatch_v2.train_step(nets, Batch(b.l, b.u, u_mix), cfg.method, ctx_at(cfg, info, 0))
    assert calls == [2, 2]
    calls.clear()
    unimatch_v2.train_step(nets, b, cfg.method, ctx_at(cfg, info, 0))
    assert calls == [2]  # rolled partners reuse the rolled teacher output


PRESETS = sorted((ROOT / "configs").glob("*/*_dinov2*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_presets_follow_the_reference_recipe(path):
    cfg = load_config(path)
    m = cfg.model
    assert m.backbone in ("dinov2_small", "dinov2_base") and m.head == "dpt"
    assert m.pretrained == "dinov2"  # resolves to the official checkpoint of m.backbone
    o = cfg.optim
    assert (o.name, o.lr, o.lr * o.head_lr_mult, o.weight_decay, o.warmup_iters) == ("adamw", 5e-6, 2e-4, 0.01, 0)
    assert not o.no_decay_norm_bias and cfg.train.amp == "off"
    assert cfg.data.crop % 14 == 0 and cfg.data.crop == {"pascal": 518, "cityscapes": 798}[cfg.data.dataset]
    if cfg.method.name == "unimatch_v2":
        assert cfg.method.tau == 0.95 and cfg.data.batch_size == cfg.data.batch_size_u
    else:
        assert cfg.method.name == "supervised" and cfg.train.iters > 0
    assert cfg.method.criterion == ("ohem" if cfg.data.dataset == "cityscapes" else "ce")
    text = path.read_text()
    assert "Command:" in text and "Expected:" in text


def test_preset_optimizer_groups_on_vit_small():
    # AdamW with weight decay on every trained parameter; the frozen ones are in no group.
    cfg = load_config(ROOT / "configs/pascal/unimatch_v2_dinov2s_92.yaml", ["model.pretrained="])
    torch.manual_seed(0)
    model = build_model(cfg.model, 21)
    opt = build_optimizer(model, cfg.optim)
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs == {"backbone": (5e-6, 0.01), "head": (2e-4, 0.01)}
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.backbone.mask_token) not in in_groups
    assert len(in_groups) == sum(p.requires_grad for p in model.parameters()) == len(list(model.parameters())) - 5

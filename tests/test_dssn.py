"""DSSN: class-aware selection, standardised-logit alignment, EMA teacher with BN buffers, warm-up, options."""

import math

import pytest
import torch
from method_helpers import ctx_at, method_nets, random_batch

from semiseg import config as C
from semiseg.data.datasets import dataset_info
from semiseg.losses import standardized_mse
from semiseg.methods import dssn, load_config
from semiseg.ops import class_aware_selection


def make_batch(num_classes, n=2, size=32, seed=0):
    return random_batch(num_classes, n, size, seed)


def setup(tiny, *sets):
    return method_nets(dssn, tiny, *sets)


def prob_map(rows):
    """rows[c] = the W probabilities of class c on a 1-pixel-high image -> (1, C, 1, W)."""
    return torch.tensor(rows, dtype=torch.float32)[None, :, None, :]


def test_class_aware_selection_keeps_pixels_near_each_confident_class_peak():
    prob = prob_map(
        [
            [0.95, 0.93, 0.90, 0.04, 0.03],  # class 0: peak 0.95 > 0.92 -> threshold 0.912
            [0.03, 0.05, 0.06, 0.91, 0.02],  # class 1: peak 0.91 <= 0.92 -> contributes nothing
            [0.02, 0.02, 0.04, 0.05, 0.95],  # class 2: peak 0.95 -> its own pixel passes
        ]
    )
    sel = class_aware_selection(prob)
    assert sel.tolist() == [[[True, True, False, False, True]]]


def test_class_aware_selection_is_per_image():
    a = prob_map([[0.99, 0.94], [0.01, 0.06]])  # peak 0.99 -> 0.9504: 0.94 fails
    b = prob_map([[0.95, 0.94], [0.05, 0.06]])  # peak 0.95 -> 0.912: 0.94 passes
    assert class_aware_selection(torch.cat([a, b])).tolist() == [[[True, False]], [[True, True]]]


def test_class_aware_selection_comparisons_are_strict():
    # exactly representable numbers: ratio 0.5, thresh 0.75
    peak_at_thresh = prob_map([[0.75, 0.5], [0.25, 0.5]])  # class 0 peak == thresh: t = peak, nothing is above it
    assert class_aware_selection(peak_at_thresh, ratio=0.5, thresh=0.75).tolist() == [[[False, False]]]
    at_threshold = prob_map([[1.0, 0.5, 0.625], [0.0, 0.5, 0.375]])  # t_0 = 0.5: the pixel at 0.5 is out
    assert class_aware_selection(at_threshold, ratio=0.5, thresh=0.75).tolist() == [[[True, False, True]]]


def test_standardized_mse_is_a_pearson_distance_and_trains_both_sides():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 3, 4, generator=g, requires_grad=True)
    b = torch.randn(2, 5, 3, 4, generator=g, requires_grad=True)
    loss = standardized_mse(a, b)
    c = a.shape[1]
    xa, xb = a.detach() - a.detach().mean(1, keepdim=True), b.detach() - b.detach().mean(1, keepdim=True)
    pearson = (xa * xb).sum(1) / (xa.norm(dim=1) * xb.norm(dim=1))
    expected = (2 * (c - 1) / c * (1 - pearson)).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # invariant to per-pixel shift and positive scale; a weight restricts the mean to some pixels
    same = standardized_mse(a.detach() * 3 + 1, a.detach())
    assert same.item() < 1e-10
    w = torch.zeros(2, 3, 4)
    w[0, 0, 0] = 1
    one = standardized_mse(a.detach(), b.detach(), w)
    assert math.isclose(one.item(), (2 * (c - 1) / c * (1 - pearson[0, 0, 0])).item(), rel_tol=1e-5)


def test_teacher_is_a_copy_without_gradients_and_ema_covers_bn_buffers(tiny_overrides):
    cfg, info, nets = setup(tiny_overrides, "method.warmup_steps=1")
    student, teacher = nets["student"], nets["teacher"]
    assert all(torch.equal(p, q) for p, q in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        for name, buf in student.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(2.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dssn.after_step(nets, cfg.method, ctx_at(cfg, info, step=5))
    after, s = teacher.state_dict(), student.state_dict()
    keep = cfg.method.ema_keep
    for key in after:
        if before[key].dtype.is_floating_point:
            assert torch.allclose(after[key], keep * before[key] + (1 - keep) * s[key], atol=1e-6), key
    rm = [k for k in after if k.endswith("running_mean")]
    assert rm and all(torch.allclose(after[k], before[k] + (1 - keep) * 2.0, atol=1e-6) for k in rm)
    # warm-up steps copy the student outright
    dssn.after_step(nets, cfg.method, ctx_at(cfg, info, step=0))
    assert all(torch.equal(teacher.state_dict()[k], s[k]) for k in s)


def test_strong_view_losses_are_off_during_warmup(tiny_overrides):
    cfg, info, nets = setup(tiny_overrides, "method.warmup_steps=3", "method.strong.cutmix_p=1.0")
    batch = make_batch(info.num_classes)
    losses = {}
    for step in (2, 3):
        torch.manual_seed(1)
        out = dssn.train_step(nets, batch, cfg.method, ctx_at(cfg, info, step))
        losses[step] = out
    m = cfg.method
    assert torch.equal(losses[2].logs["train/loss_s"], losses[3].logs["train/loss_s"])
    gap = losses[3].loss - losses[2].loss
    assert math.isclose(gap.item(), (m.w_s1 + m.w_s2) * losses[3].logs["train/loss_s"].item(), rel_tol=1e-4)


class FixedLogits(torch.nn.Module):
    """A stand-in teacher: logits with `margin` on class `cls` everywhere."""

    def __init__(self, num_classes, cls, margin):
        super().__init__()
        self.num_classes, self.cls, self.margin = num_classes, cls, margin

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, self.cls] = self.margin
        return logits


def test_strong_targets_come_from_the_teacher_and_pass_class_aware_selection(tiny_overrides, monkeypatch):
    cfg, info, nets = setup(tiny_overrides, "method.warmup_steps=0")
    calls = []
    real = dssn.masked_ce

    def spy(logits, target, weight, valid):
        calls.append((target.clone(), weight.clone()))
        return real(logits, target, weight, valid)

    monkeypatch.setattr(dssn, "masked_ce", spy)
    batch = make_batch(info.num_classes)
    nets["teacher"] = FixedLogits(info.num_classes, cls=3, margin=10.0)  # confident: peak > 0.92 everywhere
    dssn.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 0))
    (t1, w1), (t2, w2) = calls[0], calls[1]
    assert (t1 == 3).all() and (t2 == 3).all() and (w1 == 1).all() and (w2 == 1).all()
    calls.clear()
    nets["teacher"] = FixedLogits(info.num_classes, cls=3, margin=1.0)  # peak 0.31 <= 0.92: nothing selected
    dssn.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 0))
    assert (calls[0][1] == 0).all() and (calls[1][1] == 0).all()


@pytest.mark.parametrize(
    "sets",
    [
        ["method.align=none"],
        ["method.align=mse", "method.shared_box=true", "method.align_same_box=true"],
        ["method.selection=threshold", "method.tau=0.0", "method.criterion=ohem", "method.ohem_min_kept=100"],
        ["method.align=infonce", "model.proj_dim=8", "method.nce_pixels=16"],
    ],
)
def test_options_train_the_student_only(tiny_overrides, sets):
    cfg, info, nets = setup(tiny_overrides, *sets)
    out = dssn.train_step(nets, make_batch(info.num_classes), cfg.method, ctx_at(cfg, info, 5))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in nets["teacher"].parameters())
    grads = [p.grad for p in nets["student"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if cfg.method.align == "none":
        assert out.logs["train/loss_img"] == 0 and out.logs["train/loss_feat"] == 0
    else:
        assert out.logs["train/loss_img"] > 0 and out.logs["train/loss_feat"] > 0
    if cfg.method.align == "infonce":
        assert nets["student"].projector is not None and nets["student"].projector[0].weight.grad.abs().sum() > 0


def test_infonce_needs_a_projection_head_and_mse_drops_it(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["method.name=dssn", "method.align=infonce"])
    with pytest.raises(C.ConfigError, match="proj_dim"):
        dssn.build(cfg, dataset_info(cfg.data))
    cfg = load_config(None, tiny_overrides + ["method.name=dssn", "model.proj_dim=8"])
    assert dssn.build(cfg, dataset_info(cfg.data))["student"].projector is None
    with pytest.raises(C.ConfigError, match="align"):
        load_config(None, tiny_overrides + ["method.name=dssn", "method.align=cosine"])

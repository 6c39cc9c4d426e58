"""Mean Teacher: the consistency loss by hand, its ramp-up, a zero loss when the student sees the teacher's view,
the EMA teacher."""

import math

import pytest
import torch
from method_helpers import ctx_at, method_nets, random_batch

from semiseg.engine.ema import sigmoid_rampup
from semiseg.losses import softmax_mse
from semiseg.methods import mean_teacher

NO_AUG = ["method.strong.jitter_p=0", "method.strong.grayscale_p=0", "method.strong.blur_p=0"]


def test_softmax_mse_by_hand():
    # pixel 0: logits (0, 0) -> (0.5, 0.5) vs target (1, 0): 0.25 + 0.25; pixel 1 is padded and does not count
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[[1.0, 0.3]], [[0.0, 0.7]]]])
    valid = torch.tensor([[[True, False]]])
    assert math.isclose(float(softmax_mse(logits, target, valid)), 0.5, rel_tol=1e-6)
    assert float(softmax_mse(logits, target, torch.zeros_like(valid))) == 0.0


def test_sigmoid_rampup_by_hand():
    assert math.isclose(sigmoid_rampup(0, 100), math.exp(-5))
    assert math.isclose(sigmoid_rampup(50, 100), math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == sigmoid_rampup(1000, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0


def test_consistency_is_zero_when_the_student_sees_the_teachers_view(tiny_overrides):
    cfg, info, nets = method_nets(mean_teacher, tiny_overrides, "method.rampup=0", *NO_AUG)
    out = mean_teacher.train_step(nets, random_batch(info.num_classes), cfg.method, ctx_at(cfg, info, 0))
    assert float(out.logs["train/loss_u"]) == pytest.approx(0.0, abs=1e-10)
    assert float(out.logs["train/agree"]) == 1.0 and out.logs["train/w_u"] == 1.0
    torch.testing.assert_close(out.loss, out.logs["train/loss_x"])


def test_the_strong_view_makes_a_ramped_consistency_term(tiny_overrides):
    cfg, info, nets = method_nets(mean_teacher, tiny_overrides, "method.rampup=0.1", "method.w_u=3")
    out = mean_teacher.train_step(nets, random_batch(info.num_classes), cfg.method, ctx_at(cfg, info, 5))  # of 100
    w = 3 * math.exp(-5 * 0.25)
    assert out.logs["train/w_u"] == pytest.approx(w) and float(out.logs["train/loss_u"]) > 0
    torch.testing.assert_close(out.loss, out.logs["train/loss_x"] + w * out.logs["train/loss_u"])
    out.loss.backward()
    assert all(p.grad is None for p in nets["teacher"].parameters())


def test_teacher_is_the_ema_of_the_student(tiny_overrides):
    cfg, info, nets = method_nets(mean_teacher, tiny_overrides, "method.ema_keep=0.5")
    with torch.no_grad():
        for p in nets["student"].parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in nets["teacher"].parameters()]
    mean_teacher.after_step(nets, cfg.method, ctx_at(cfg, info, 9))  # min(1 - 1/10, 0.5) = 0.5
    for t, before, s in zip(nets["teacher"].parameters(), t0, nets["student"].parameters()):
        torch.testing.assert_close(t, 0.5 * before + 0.5 * s)
    mean_teacher.after_step(nets, cfg.method, ctx_at(cfg, info, 0))  # keep 0: a copy
    assert all(torch.equal(t, s) for t, s in zip(nets["teacher"].parameters(), nets["student"].parameters()))

"""CTT: FIFO memory banks, contrastive losses by hand, cross-teacher wiring, shared mix, gradient isolation."""

import copy
import math

import pytest
import torch
from method_helpers import ctx_at, method_nets, random_batch

from semiseg import config as C
from semiseg.losses import bank_info_nce, paired_info_nce, peer_info_nce
from semiseg.methods import ctt
from semiseg.models.memory_bank import MemoryBank
from semiseg.ops import fifo_push


def make_batch(num_classes, n=2, size=32, seed=0):
    return random_batch(num_classes, n, size, seed, ignore_rows=3)


def setup(tiny, *sets):
    return method_nets(ctt, tiny, *sets)


def fill_banks(nets, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bank in ("bank_a", "bank_b"):
        c, n, d = nets[bank].feats.shape
        for cls in range(c):
            nets[bank].push(cls, torch.randn(n, d, generator=g))


def nll(logits, k):
    return -math.log(math.exp(logits[k]) / sum(math.exp(v) for v in logits))


def test_fifo_push_evicts_the_oldest_and_wraps_the_pointer():
    bank, ptr = torch.zeros(4, 1), torch.tensor(0)
    bank, ptr = fifo_push(bank, ptr, torch.tensor([[1.0], [2.0], [3.0]]))
    assert bank.flatten().tolist() == [1, 2, 3, 0] and ptr.item() == 3
    before = bank.clone()
    new, ptr = fifo_push(bank, ptr, torch.tensor([[4.0], [5.0], [6.0]]))
    assert new.flatten().tolist() == [5, 6, 3, 4] and ptr.item() == 2  # 1 and 2 evicted, 3 is now the oldest
    assert torch.equal(bank, before)  # pure: the input is untouched
    # more items than slots: the last N survive, in the slots a one-by-one push would have used
    new2, ptr2 = fifo_push(new, ptr, torch.arange(7.0, 12.0)[:, None])
    assert new2.flatten().tolist() == [9, 10, 11, 8] and ptr2.item() == 3
    same, p = fifo_push(new2, ptr2, torch.zeros(0, 1))
    assert torch.equal(same, new2) and p.item() == 3


def test_memory_bank_counts_fill_and_normalises():
    bank = MemoryBank(num_classes=3, size=4, dim=2)
    bank.push(1, torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert bank.count.tolist() == [0, 2, 0] and bank.valid()[1].tolist() == [True, True, False, False]
    assert torch.allclose(bank.feats[1, 0], torch.tensor([0.6, 0.8]))
    bank.push(1, torch.ones(5, 2))
    assert bank.count.tolist() == [0, 4, 0] and bank.ptr.tolist() == [0, 3, 0]
    assert set(bank.state_dict()) == {"feats", "ptr", "count"}


def test_bank_info_nce_by_hand():
    tau = 0.5
    bank = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [-5.0, 3.0]]])  # (C=2, N=2, D=2)
    valid = torch.tensor([[True, True], [True, False]])  # class 1's second slot is empty: it must not count
    anchor = torch.tensor([[2.0, 0.0], [0.6, 0.8], [1.0, 1.0]])
    label = torch.tensor([0, 1, 1])
    got = bank_info_nce(anchor, label, bank, valid, tau)

    def term(pos, negs):
        return -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + sum(math.exp(s / tau) for s in negs)))

    a0 = (term(1.0, [0.0]) + term(0.6, [0.0])) / 2  # two positives (class 0 entries), negative: class 1's entry
    r = 1 / math.sqrt(2)
    a1 = term(0.8, [0.6, 1.0])  # one positive; negatives: both class-0 entries
    a2 = term(r, [r, r * 1.4])
    expected = (a0 + (a1 + a2) / 2) / 2  # mean over anchors within a class, then over classes
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    # an anchor of a class with no bank entry is skipped; no anchor at all gives 0
    none = torch.tensor([[False, False], [True, False]])
    only_class1 = bank_info_nce(anchor, label, bank, none, tau)
    assert math.isclose(only_class1.item(), (term(0.8, []) + term(r, [])) / 2, abs_tol=1e-6)
    assert bank_info_nce(anchor[:0], label[:0], bank, valid, tau).item() == 0


def test_peer_info_nce_by_hand():
    tau = 0.5
    bank = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]])  # C=3, N=1
    valid = torch.ones(3, 1, dtype=torch.bool)
    anchor = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[0.8, 0.6]])
    label = torch.tensor([2])  # the peer says class 2: its entry is not a negative
    got = peer_info_nce(anchor, positive, label, bank, valid, tau)
    pos, negs = 0.8 / tau, [1.0 / tau, 0.0 / tau]
    expected = -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(s) for s in negs)))
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    assert peer_info_nce(anchor[:0], positive[:0], label[:0], bank, valid, tau).item() == 0


def test_paired_info_nce_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    b = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 2.0]]])
    valid = torch.tensor([[True, True, False]])  # the third pixel takes part neither as anchor nor as negative
    got = paired_info_nce(a, b, valid, tau=1.0)
    assert math.isclose(got.item(), math.log(1 + math.e) - 1, rel_tol=1e-6)
    assert paired_info_nce(a, b, torch.zeros(1, 3, dtype=torch.bool)).item() == 0


class FixedLogits(torch.nn.Module):
    """A stand-in teacher predicting class `cls` with a wide margin everywhere."""

    def __init__(self, num_classes, cls):
        super().__init__()
        self.num_classes, self.cls = num_classes, cls

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, self.cls] = 20.0
        return logits


def spy_on(monkeypatch, name):
    calls, real = [], getattr(ctt, name)

    def spy(*args, **kwargs):
        calls.append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        return real(*args, **kwargs)

    monkeypatch.setattr(ctt, name, spy)
    return calls


def test_each_student_learns_from_the_peer_teacher(tiny_overrides, monkeypatch):
    cfg, info, nets = setup(tiny_overrides)
    nets["teacher_a"], nets["teacher_b"] = FixedLogits(info.num_classes, 1), FixedLogits(info.num_classes, 2)
    calls = spy_on(monkeypatch, "masked_ce")
    out = ctt.train_step(nets, make_batch(info.num_classes), cfg.method, ctx_at(cfg, info, 0))
    (_, target_a, weight_a, _), (_, target_b, weight_b, _) = calls
    assert (target_a == 2).all(), "student_a must be taught by teacher_b"
    assert (target_b == 1).all(), "student_b must be taught by teacher_a"
    assert torch.allclose(weight_a, torch.ones_like(weight_a)) and out.logs["train/mask_ratio"] == 1.0


class HalfSure(torch.nn.Module):
    """A stand-in teacher: sure of class 0 on the left half of the image, unsure (uniform) on the right half."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, 0, :, : x.shape[-1] // 2] = 20.0
        return logits


def test_omega_is_the_share_of_confident_non_padded_pixels(tiny_overrides, monkeypatch):
    cfg, info, nets = setup(tiny_overrides, "method.mix=none")
    nets["teacher_b"] = HalfSure(info.num_classes)
    calls = spy_on(monkeypatch, "masked_ce")
    out = ctt.train_step(nets, make_batch(info.num_classes), cfg.method, ctx_at(cfg, info, 0))
    weight_a, valid_a = calls[0][2], calls[0][3]
    assert torch.allclose(weight_a, torch.full_like(weight_a, 0.5))  # every valid row is half sure
    assert valid_a[:, -4:].logical_not().all() and valid_a[:, :-4].all()
    omega_b = calls[1][2][0, 0, 0]  # student_b's teacher (teacher_a) is random: far from sure
    assert math.isclose(out.logs["train/mask_ratio"].item(), (0.5 + omega_b.item()) / 2, rel_tol=1e-6)


@pytest.mark.parametrize("mix", ["classmix", "cutmix"])
def test_both_students_see_the_same_mix(tiny_overrides, monkeypatch, mix):
    cfg, info, nets = setup(tiny_overrides, f"method.mix={mix}")
    views = spy_on(monkeypatch, "strong_view")
    ce_calls = spy_on(monkeypatch, "masked_ce")
    batch = make_batch(info.num_classes)
    ctt.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 0))
    assert len(views) == 2 and torch.equal(views[0][0], views[1][0])
    assert not torch.equal(views[0][0], batch.u.image), "the partner must show through somewhere"
    assert torch.equal(ce_calls[0][3], ce_calls[1][3])  # same padding map, i.e. the same mix mask


def test_contrastive_terms_train_only_their_student(tiny_overrides, monkeypatch):
    cfg, info, nets = setup(tiny_overrides, "method.gamma=0.75")
    fill_banks(nets)
    batch = make_batch(info.num_classes)

    # student_b is sure (0.9) and student_a unsure everywhere: a learns from b at the pixels its target is unsure
    def probs(model, feat):
        p = torch.full((feat.shape[0], info.num_classes, *feat.shape[-2:]), 0.1 / (info.num_classes - 1))
        if model is nets_now["student_b"]:
            p[:, 1] = 0.9
        else:
            p[:] = 1.0 / info.num_classes
        return p

    monkeypatch.setattr(ctt, "_feature_probs", probs)
    grads = {}
    for w_low in (0.0, 10.0):
        nets_now = copy.deepcopy(nets)
        m = C.replace(cfg, method={"w_low": w_low}).method
        out = ctt.train_step(nets_now, batch, m, ctx_at(cfg, info, 0))
        assert out.logs["train/contrast_on"] == 1 and out.logs["train/loss_high"] > 0
        assert (out.logs["train/loss_low"] > 0) == (w_low > 0)
        out.loss.backward()
        for name in ("teacher_a", "teacher_b", "bank_a", "bank_b"):
            assert all(p.grad is None for p in nets_now[name].parameters()), name
            assert not any(b.requires_grad for b in nets_now[name].buffers()), name
        grads[w_low] = {s: [p.grad.clone() for p in nets_now[s].parameters()] for s in ("student_a", "student_b")}
    # the peer positive is detached: the low-level term of a does not move b
    assert all(torch.equal(x, y) for x, y in zip(grads[0.0]["student_b"], grads[10.0]["student_b"]))
    assert not all(torch.equal(x, y) for x, y in zip(grads[0.0]["student_a"], grads[10.0]["student_a"]))


def test_contrast_waits_for_every_class_or_the_warmup_step(tiny_overrides):
    cfg, info, nets = setup(tiny_overrides, "method.bank_warmup_steps=3")
    batch = make_batch(info.num_classes)
    out = ctt.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 2))
    assert out.logs["train/contrast_on"] == 0 and out.logs["train/loss_high"] == 0
    out = ctt.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 3))
    assert out.logs["train/contrast_on"] == 1
    no_warmup = C.replace(cfg, method={"bank_warmup_steps": 0}).method
    for cls in range(info.num_classes - 1):
        nets["bank_a"].push(cls, torch.ones(1, nets["bank_a"].feats.shape[2]))
        nets["bank_b"].push(cls, torch.ones(1, nets["bank_b"].feats.shape[2]))
    out = ctt.train_step(copy.deepcopy(nets), batch, no_warmup, ctx_at(cfg, info, 0))
    assert out.logs["train/contrast_on"] == 0  # one class still empty
    nets["bank_a"].push(info.num_classes - 1, torch.ones(1, nets["bank_a"].feats.shape[2]))
    assert not nets["bank_b"].filled() and nets["bank_a"].filled()
    nets["bank_b"].push(info.num_classes - 1, torch.ones(1, nets["bank_b"].feats.shape[2]))
    out = ctt.train_step(copy.deepcopy(nets), batch, no_warmup, ctx_at(cfg, info, 0))
    assert out.logs["train/contrast_on"] == 1


def test_after_step_ema_and_bank_feed(tiny_overrides):
    cfg, info, nets = setup(tiny_overrides, "method.bank_gate=0.0", "method.bank_push=3")
    batch = make_batch(info.num_classes)
    ctt.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 0))
    assert nets["bank_a"].pending is not None
    with torch.no_grad():
        for p in nets["student_a"].parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in nets["teacher_a"].parameters()]
    ctt.after_step(nets, cfg.method, ctx_at(cfg, info, 4))  # keep = min(1 - 1/5, 0.99) = 0.8
    for t, t0, s in zip(nets["teacher_a"].parameters(), teacher_before, nets["student_a"].parameters()):
        assert torch.allclose(t, 0.8 * t0 + 0.2 * s, atol=1e-6)
    for bank in ("bank_a", "bank_b"):
        b = nets[bank]
        assert b.pending is None and 0 < b.count.sum() and (b.count <= 3).all()
        filled = b.feats[b.valid()]
        assert torch.allclose(filled.norm(dim=1), torch.ones(filled.shape[0]), atol=1e-5)
    # contrast off: no bank traffic at all
    cfg, info, nets = setup(tiny_overrides, "method.contrast=false")
    ctt.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 0))
    ctt.after_step(nets, cfg.method, ctx_at(cfg, info, 0))
    assert nets["bank_a"].pending is None and nets["bank_a"].count.sum() == 0


def test_students_differ_by_seed_offset_only(tiny_overrides):
    _, _, nets = setup(tiny_overrides, "method.seed_offset=0")
    assert all(torch.equal(p, q) for p, q in zip(nets["student_a"].parameters(), nets["student_b"].parameters()))
    _, _, nets = setup(tiny_overrides)
    assert not all(torch.equal(p, q) for p, q in zip(nets["student_a"].parameters(), nets["student_b"].parameters()))
    for s, t in (("student_a", "teacher_a"), ("student_b", "teacher_b")):
        assert all(torch.equal(p, q) for p, q in zip(nets[s].parameters(), nets[t].parameters()))
        assert not any(p.requires_grad for p in nets[t].parameters())


def test_deeplabv2_ctt_head_runs(tiny_overrides):
    cfg, info, nets = setup(tiny_overrides, "model.head=deeplabv2_ctt", "method.bank_size=4")
    fill_banks(nets)
    out = ctt.train_step(nets, make_batch(info.num_classes), cfg.method, ctx_at(cfg, info, 0))
    assert torch.isfinite(out.loss) and out.logs["train/loss_high"] > 0
    out.loss.backward()
    ctt.after_step(nets, cfg.method, ctx_at(cfg, info, 0))


def test_runs_without_unlabeled_ground_truth(tiny_overrides):
    cfg, info, nets = setup(tiny_overrides)
    batch = make_batch(info.num_classes)
    batch.u.mask = None
    out = ctt.train_step(nets, batch, cfg.method, ctx_at(cfg, info, 0))
    assert torch.isfinite(out.loss) and "train/pl_acc" not in out.logs


def test_the_vocs_preset_network_has_the_references_shapes():
    # cross_teacher_deeplabv3+.py builds CPS's SingleNetwork: a v1c ResNet-101 whose layer4 blocks alone are dilated
    # (2, 4, 8: output stride 16) and CPS's Head with ASPP(2048, 256, [6, 12, 18]) (deeplabv3plus/network.py)
    from pathlib import Path

    from semiseg.methods import load_config
    from semiseg.models import build_model

    preset = Path(__file__).resolve().parents[1] / "configs" / "pascal" / "ctt_r101_92.yaml"
    cfg = load_config(preset, ["model.pretrained="])
    model = build_model(cfg.model, 21)
    layer4 = model.backbone.layer4
    assert [b.conv2.dilation for b in layer4] == [(2, 2), (4, 4), (8, 8)]
    assert [b.conv2.stride for b in layer4] == [(1, 1)] * 3 and layer4[0].downsample[0].stride == (1, 1)
    assert model.backbone.layer3[0].conv2.stride == (2, 2) and model.backbone.layer3[1].conv2.dilation == (1, 1)
    with torch.no_grad():
        c1, _, _, c4 = model.eval().encode(torch.zeros(1, 3, 64, 64))
    assert c1.shape == (1, 256, 16, 16) and c4.shape == (1, 2048, 4, 4)
    conv = lambda o, i, k: (o, i, k, k)  # noqa: E731
    bn = lambda c, name: {f"{name}.weight": (c,), f"{name}.bias": (c,)}  # noqa: E731
    reference = {
        "aspp.map_convs.0.weight": conv(256, 2048, 1),
        **{f"aspp.map_convs.{i}.weight": conv(256, 2048, 3) for i in (1, 2, 3)},
        **bn(1024, "aspp.map_bn"),  # BN over the concatenated 1x1 + 3 atrous branches
        "aspp.global_pooling_conv.weight": conv(256, 2048, 1),
        **bn(256, "aspp.global_pooling_bn"),
        "aspp.red_conv.weight": conv(256, 1024, 1),  # 4 x 256 in: the pooled branch is added, not concatenated
        "aspp.pool_red_conv.weight": conv(256, 256, 1),
        **bn(256, "aspp.red_bn"),
        "reduce.0.weight": conv(48, 256, 1),
        **bn(48, "reduce.1"),
        "last_conv.0.weight": conv(256, 304, 3),
        **bn(256, "last_conv.1"),
        "last_conv.3.weight": conv(256, 256, 3),
        **bn(256, "last_conv.4"),
        "classifier.weight": conv(21, 256, 1),
        "classifier.bias": (21,),
    }
    assert {k: tuple(p.shape) for k, p in model.head.named_parameters()} == reference
    assert [m.dilation for m in model.head.aspp.map_convs] == [(1, 1), (6, 6), (12, 12), (18, 18)]
    assert isinstance(model.head.aspp.leak_relu, torch.nn.LeakyReLU) and model.head.out_channels == 256

import json
import math

import pytest
import torch
from torch import nn

from semiseg import config as C
from semiseg.engine import checkpoint
from semiseg.engine.ema import ema_update, mean_teacher_keep
from semiseg.engine.loop import StepOut, fit
from semiseg.engine.optim import build_optimizer, param_groups, poly_lr
from semiseg.errors import CheckpointError, TrainingError
from semiseg.methods import supervised


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_poly_lr_hand_values():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert math.isclose(poly_lr(0.01, 50, 100, 0.9), 0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0
    assert math.isclose(poly_lr(0.01, 0, 100, 0.9, warmup=10), 0.001)
    assert math.isclose(poly_lr(0.01, 9, 100, 0.9, warmup=10), 0.01)


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)

    def backbone_parameters(self):
        return self.backbone.parameters()


def test_param_groups_lr_multiplier_and_no_decay():
    net = TwoPart()
    cfg = C.OptimConfig(lr=0.1, head_lr_mult=10, weight_decay=1e-4, no_decay_norm_bias=True)
    groups = {g["name"]: g for g in param_groups(net, cfg)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["backbone"]["lr_mult"] == 1 and groups["head"]["lr_mult"] == 10
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["head"]["weight_decay"] == 1e-4
    assert len(groups["backbone_no_decay"]["params"]) == 3  # conv bias, bn weight, bn bias
    opt = build_optimizer(net, cfg)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [0.1, 1.0]


def test_ema_update_params_and_buffers():
    torch.manual_seed(0)
    s, t = TwoPart(), TwoPart()
    s.backbone[1].running_mean.fill_(2.0)
    s.backbone[1].num_batches_tracked.fill_(7)
    t.backbone[1].running_mean.fill_(0.0)
    t_w = t.head.weight.detach().clone()
    ema_update(t, s, keep=0.75)
    assert torch.allclose(t.head.weight, 0.75 * t_w + 0.25 * s.head.weight)
    assert torch.allclose(t.backbone[1].running_mean, torch.full((4,), 0.5))
    assert int(t.backbone[1].num_batches_tracked) == 7
    ema_update(t, s, keep=0.0)
    assert torch.equal(t.head.weight, s.head.weight)
    assert mean_teacher_keep(0, 0.99) == 0.0 and mean_teacher_keep(1000, 0.99) == 0.99


def test_atomic_checkpoint_survives_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the crafted file is protocol 4 on purpose
def test_load_refuses_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        checkpoint.load(p)


@pytest.mark.parametrize("name", ["supervised", "unimatch"])
def test_resume_equals_uninterrupted(tmp_path, tiny_overrides, name):
    from semiseg.methods import METHODS

    method = METHODS[name]
    cfg = C.load(None, tiny_overrides + ["train.iters=6", "train.ckpt_every=3", "eval.every=0", f"method.name={name}"])
    full = fit(cfg, tmp_path / "full", method, quiet=True)
    fit(cfg, tmp_path / "cut", method, quiet=True, stop_after=4)  # killed one step after the checkpoint
    assert (tmp_path / "cut" / "last.pt").is_file() and not (tmp_path / "cut" / "results.json").exists()
    resumed = fit(cfg, tmp_path / "cut", method, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "train/loss" in r]
    assert logged == sorted(set(logged)), "a resumed run must not log a step twice"
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(a) == list(range(1, 7)) and sorted(b) == list(range(1, 7))
    for step in range(4, 7):
        assert a[step] == b[step], (step, a[step], b[step])
    assert resumed.last["miou"] == full.last["miou"]
    # A finished run is not trained again.
    again = fit(cfg, tmp_path / "cut", method, quiet=True)
    assert again.last["miou"] == full.last["miou"]


class NanMethod:
    Config = supervised.Config
    TRAINED = ("model",)
    EVAL_NETS = ("model",)
    USES_UNLABELED = False
    build = staticmethod(supervised.build)

    @staticmethod
    def train_step(nets, batch, cfg, ctx):
        out = supervised.train_step(nets, batch, cfg, ctx)
        if ctx.step == 2:
            return StepOut(out.loss * float("nan"), {**out.logs, "train/extra": torch.tensor(1.5)})
        return out


def test_non_finite_loss_stops_with_loss_dict_and_keeps_checkpoint(tmp_path, tiny_overrides):
    cfg = C.load(None, tiny_overrides + ["train.iters=5", "train.ckpt_every=1"])
    with pytest.raises(TrainingError) as e:
        fit(cfg, tmp_path / "run", NanMethod, quiet=True)
    msg = str(e.value)
    assert "step 2" in msg and "train/loss_x" in msg and "train/extra" in msg and "last.pt" in msg
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["nets"]["model"].values() if v.is_floating_point())


def test_normalisation_travels_with_the_export(tmp_path, tiny_overrides):
    # A model trained with a non-ImageNet mean/std, exported and reloaded (the reload starts from no weights and no
    # normalisation setting) normalises exactly as the trained one: eval, predict and reload agree.
    from semiseg.methods import METHODS

    sets = ["train.iters=2", "model.input_mean=[0.2,0.3,0.4]", "model.input_std=[0.5,0.25,0.125]"]
    cfg = C.load(None, tiny_overrides + sets)
    fit(cfg, tmp_path / "run", METHODS["supervised"], quiet=True)
    reloaded_cfg, model, _ = checkpoint.load_export(
        tmp_path / "run" / "best.safetensors", ["model.input_mean=[]", "model.input_std=[]"]
    )
    assert reloaded_cfg.model.input_mean == ()
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    by_hand = (x.float() / 255 - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 0.125]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(model.input_norm(x), by_hand)
    # uint8 and [0, 1] inputs are the same image
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.float() / 255))


def test_background_saver_writes_the_state_as_it_was_and_reraises_errors(tmp_path):
    saver = checkpoint.BackgroundSaver()
    w = torch.zeros(3)
    saver.save(tmp_path / "last.pt", {"nets": {"model": {"w": w}}, "step": 5})
    w.add_(1)  # training goes on while the file is written
    saver.wait()
    assert torch.equal(checkpoint.load(tmp_path / "last.pt")["nets"]["model"]["w"], torch.zeros(3))
    (tmp_path / "blocker").write_text("a file where a folder should be")
    saver.save(tmp_path / "blocker" / "last.pt", {"step": 1})
    with pytest.raises(OSError):
        saver.wait()
    saver.wait()  # the error is reported once


@pytest.mark.parametrize(
    ("amp", "native", "expected"),
    [("auto", True, torch.bfloat16), ("auto", False, None), ("bf16", False, torch.bfloat16), ("off", True, None)],
)
def test_cpu_mixed_precision_follows_the_processor(monkeypatch, amp, native, expected):
    from semiseg.engine import loop

    monkeypatch.setattr(loop, "cpu_native_bf16", lambda: native)
    cfg = C.load(None, [f"train.amp={amp}"])
    assert loop.amp_dtype(cfg, torch.device("cpu")) == expected


def test_cpu_fp16_is_refused_and_yaml_off_means_off():
    from semiseg.engine import loop

    with pytest.raises(C.ConfigError, match="fp16"):
        loop.amp_dtype(C.load(None, ["train.amp=fp16"]), torch.device("cpu"))
    assert C.load(None, ["train.amp=off", "train.channels_last=off"]).train.amp == "off"  # YAML reads `off` as false
    with pytest.raises(C.ConfigError, match="channels_last"):
        C.load(None, ["train.channels_last=sometimes"])


def test_channels_last_auto_is_cuda_only():
    from semiseg.engine.loop import channels_last

    cfg = C.load(None, [])
    assert cfg.train.channels_last == "auto"
    assert channels_last(cfg, torch.device("cuda")) and not channels_last(cfg, torch.device("cpu"))
    assert channels_last(C.load(None, ["train.channels_last=on"]), torch.device("cpu"))

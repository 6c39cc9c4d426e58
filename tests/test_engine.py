import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from semiseg import config as C
from semiseg.engine import checkpoint
from semiseg.engine.ema import ema_update, mean_teacher_keep
from semiseg.engine.loop import StepOut, TrainData, compile_encoders, fit, snapshot_name, snapshot_steps
from semiseg.engine.optim import build_optimizer, param_groups, poly_lr, set_lr
from semiseg.engine.run import TrainStage, WorkStage, train
from semiseg.errors import CheckpointError, TrainingError
from semiseg.methods import load_config, supervised


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
    cfg = load_config(
        None, tiny_overrides + ["train.iters=6", "train.ckpt_every=3", "eval.every=0", f"method.name={name}"]
    )
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


def test_non_finite_loss_stops_with_loss_dict_and_keeps_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    cfg = load_config(None, tiny_overrides + ["train.iters=5", "train.ckpt_every=1"])
    real_save = checkpoint.save

    def slow_save(path, state):  # a slow disk: the error must not leave fit() before the last good save is on disk
        time.sleep(0.5)
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", slow_save)
    with pytest.raises(TrainingError) as e:
        fit(cfg, tmp_path / "run", NanMethod, quiet=True)
    msg = str(e.value)
    assert "step 2" in msg and "train/loss_x" in msg and "train/extra" in msg and "last.pt" in msg
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["nets"]["model"].values() if v.is_floating_point())
    # the run's log says why it stopped, and the failed run's log handler is gone: a next fit in this process (a
    # bench's next run) does not write into the failed run's log
    failed_log = (tmp_path / "run" / "log.txt").read_text()
    assert "stopped at step 2: TrainingError: non-finite loss" in failed_log
    fit(load_config(None, tiny_overrides + ["train.iters=1"]), tmp_path / "next", supervised, quiet=True)
    assert (tmp_path / "run" / "log.txt").read_text() == failed_log


def test_normalisation_travels_with_the_export(tmp_path, tiny_overrides):
    # A model trained with a non-ImageNet mean/std, exported and reloaded (the reload starts from no weights and no
    # normalisation setting) normalises exactly as the trained one: eval, predict and reload agree.
    from semiseg.methods import METHODS

    sets = ["train.iters=2", "model.input_mean=[0.2,0.3,0.4]", "model.input_std=[0.5,0.25,0.125]"]
    cfg = load_config(None, tiny_overrides + sets)
    fit(cfg, tmp_path / "run", METHODS["supervised"], quiet=True)
    reloaded_cfg, model, _ = checkpoint.load_export(
        tmp_path / "run" / "best.safetensors", METHODS, ["model.input_mean=[]", "model.input_std=[]"]
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
    cfg = load_config(None, [f"train.amp={amp}"])
    assert loop.amp_dtype(cfg, torch.device("cpu")) == expected


def test_cpu_fp16_is_refused_and_yaml_off_means_off():
    from semiseg.engine import loop

    with pytest.raises(C.ConfigError, match="fp16"):
        loop.amp_dtype(load_config(None, ["train.amp=fp16"]), torch.device("cpu"))
    assert load_config(None, ["train.amp=off", "train.channels_last=off"]).train.amp == "off"  # YAML: off = false
    with pytest.raises(C.ConfigError, match="channels_last"):
        load_config(None, ["train.channels_last=sometimes"])


def test_channels_last_auto_is_cuda_only():
    from semiseg.engine.loop import channels_last

    cfg = load_config(None, [])
    assert cfg.train.channels_last == "auto"
    assert channels_last(cfg, torch.device("cuda")) and not channels_last(cfg, torch.device("cpu"))
    assert channels_last(load_config(None, ["train.channels_last=on"]), torch.device("cpu"))


def test_snapshot_steps_by_hand():
    assert snapshot_steps(9, 3) == [3, 6, 9]
    assert snapshot_steps(10, 3) == [3, 6, 10]
    assert snapshot_steps(2, 3) == [1, 1, 2]  # fewer steps than snapshots: two exports after step 1


def test_fit_exports_snapshots_at_their_steps(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.iters=2", "eval.every=0"])
    fit(cfg, tmp_path / "run", supervised, quiet=True, snapshots=3)
    steps = [checkpoint.read_export(tmp_path / "run" / snapshot_name(k))[1]["step"] for k in (1, 2, 3)]
    assert steps == [1, 1, 2]
    _, last_meta = checkpoint.read_export(tmp_path / "run" / "last.safetensors")
    sd3, meta3 = checkpoint.read_export(tmp_path / "run" / snapshot_name(3))
    assert meta3["snapshot"] == 3 and meta3["config"] == last_meta["config"]
    last_sd, _ = checkpoint.read_export(tmp_path / "run" / "last.safetensors")
    assert all(torch.equal(sd3[k], last_sd[k]) for k in last_sd)  # snapshot 3 is the final network


class Prepared:
    """supervised, trained on what its prepare() returns: the first 2 labeled images, each 3 times."""

    Config = supervised.Config
    TRAINED, EVAL_NETS, USES_UNLABELED = ("model",), ("model",), False
    build, train_step = staticmethod(supervised.build), staticmethod(supervised.train_step)
    seen: list = []

    @staticmethod
    def prepare(cfg, run_dir, info):
        from semiseg.data.datasets import resolve_train_split
        from semiseg.data.loader import Part

        Prepared.seen.append(Path(run_dir).name)
        labeled, _ = resolve_train_split(cfg.data)
        return TrainData([Part(labeled.subset(labeled.ids[:2]), repeat=3)], tags={"x": frozenset({1})})


def test_fit_trains_on_what_prepare_returns(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.iters=3", "eval.every=0", "train.log_every=1"])
    seen_ids, seen_tags = [], []

    def spy(nets, batch, cfg, ctx):
        seen_ids.extend(batch.l.ids)
        seen_tags.append(ctx.tags)
        return supervised.train_step(nets, batch, cfg, ctx)

    Prepared.train_step = staticmethod(spy)
    result = train(cfg, tmp_path / "run", Prepared)
    from semiseg.data.datasets import resolve_train_split

    first_two = set(resolve_train_split(cfg.data)[0].ids[:2])
    assert Prepared.seen == ["run"] and set(seen_ids) == first_two and len(seen_ids) == 6
    assert seen_tags == [{"x": frozenset({1})}] * 3
    assert result["steps"] == 3 and result == json.loads((tmp_path / "run" / "results.json").read_text())


class TwoStages:
    """A method run as a teacher fit, a work stage that writes a file, and a student fit on half the list."""

    Config = supervised.Config
    TRAINED, EVAL_NETS, USES_UNLABELED = ("model",), ("model",), False
    build, train_step = staticmethod(supervised.build), staticmethod(supervised.train_step)

    @staticmethod
    def stages(cfg):
        from semiseg.data.datasets import resolve_train_split
        from semiseg.data.loader import Part

        labeled, _ = resolve_train_split(cfg.data)

        def note(env, folder):
            net, source = env.load("1_teacher")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "note.txt").write_text(source)
            return {"kind": "note", "classes": net.head.classifier.out_channels}

        half = lambda env: TrainData([Part(labeled.subset(labeled.ids[:4]))])  # noqa: E731
        return [
            TrainStage("1_teacher", lambda env: TrainData([Part(labeled)]), snapshots=2),
            WorkStage("2_note", note),
            TrainStage("3_student", half),
        ]

    @staticmethod
    def summarize(env, summaries):
        return {"extra": sorted(summaries)}


def test_stages_run_in_order_resume_and_the_last_training_stage_is_the_run(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.iters=2", "eval.every=0"])
    run = tmp_path / "run"
    results = train(cfg, run, TwoStages)
    assert list(results["stages"]) == ["1_teacher", "2_note", "3_student"] and results["final_stage"] == "3_student"
    assert results["steps"] == 4 and results["extra"] == ["1_teacher", "2_note", "3_student"]
    assert results["stages"]["2_note"] == {
        "kind": "note",
        "classes": 7,
        "seconds": results["stages"]["2_note"]["seconds"],
    }
    assert results["stages"]["3_student"]["list"] == {"labeled": 4, "pseudo": 0}
    assert (run / "2_note" / "note.txt").read_text() == "1_teacher/best.safetensors"
    assert (run / "1_teacher" / snapshot_name(2)).is_file() and not (run / "3_student" / snapshot_name(1)).exists()
    assert (run / "last.safetensors").read_bytes() == (run / "3_student" / "last.safetensors").read_bytes()
    # rerunning a finished run trains nothing; a lost root result is rebuilt from the stage markers
    (run / "results.json").unlink()
    stamp = (run / "3_student" / "last.safetensors").stat().st_mtime_ns
    again = train(cfg, run, TwoStages)
    assert again["best"] == results["best"] and (run / "3_student" / "last.safetensors").stat().st_mtime_ns == stamp


def test_as_run_schedule_moves_only_the_backbone_groups():
    # CTT's DeepLabV3+ script updates param_groups[0] (lr) and [1] (lr x 10) only; heads stay at the base lr
    net = TwoPart()
    poly = C.OptimConfig(lr=0.1, head_lr_mult=10, no_decay_norm_bias=True)
    as_run = C.OptimConfig(lr=0.1, head_lr_mult=10, no_decay_norm_bias=True, schedule="poly_backbone_only")
    for cfg, expected in (
        (poly, {"backbone": 0.05, "backbone_no_decay": 0.05, "head": 0.5, "head_no_decay": 0.5}),
        (as_run, {"backbone": 0.05, "backbone_no_decay": 0.5, "head": 0.1, "head_no_decay": 0.1}),
    ):
        opt = build_optimizer(net, cfg)
        set_lr(opt, 0.05, cfg)
        assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(expected)
    with pytest.raises(ValueError, match="no_decay_norm_bias"):
        C.OptimConfig(schedule="poly_backbone_only")


def test_per_epoch_evaluation_follows_the_fits_own_list(tmp_path, tiny_overrides):
    # 8 labeled ids, batch 2: 4 steps per epoch; 2 epochs -> evaluations after steps 4 and 8
    cfg = load_config(None, tiny_overrides + ["train.epochs=2", "eval.per_epoch=true", "eval.max_images=2"])
    fit(cfg, tmp_path / "run", supervised, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val/model/miou" in r] == [4, 8]
    with pytest.raises(C.ConfigError, match="per_epoch"):
        load_config(None, ["eval.per_epoch=true", "eval.every=100"])


def test_compile_encoders_compiles_the_backbone_in_place(tiny_overrides):
    """train.compile: the encoder every forward path uses, in place (keys unchanged); a net without one, whole."""
    from semiseg.data.datasets import dataset_info
    from semiseg.methods import METHODS

    cfg = load_config("configs/demo.yaml", tiny_overrides + ["model.pretrained=", "method.name=unimatch"])
    nets = METHODS["unimatch"].build(cfg, dataset_info(cfg.data))
    nets["plain"] = nn.Sequential(nn.Conv2d(3, 4, 1))
    keys = {k: list(v.state_dict()) for k, v in nets.items()}
    compile_encoders(nets, ("model", "plain"))
    model = nets["model"]
    assert model.backbone._compiled_call_impl is not None and model._compiled_call_impl is None
    assert model.head._compiled_call_impl is None and nets["plain"]._compiled_call_impl is not None
    assert {k: list(v.state_dict()) for k, v in nets.items()} == keys

"""ST / ST++: stability score, reliable split, TTA, SDA on pseudo-labeled crops only, the stage pipeline and resume."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semiseg import config as C
from semiseg.data.augment import StrongAugConfig
from semiseg.data.datasets import resolve_train_split
from semiseg.data.info import IGNORE
from semiseg.engine import run as engine_run
from semiseg.engine.checkpoint import load_export
from semiseg.engine.evaluate import predict_multiscale, predict_whole
from semiseg.engine.run import DONE, train
from semiseg.methods import METHODS, load_config, selftrain, st
from semiseg.ops import map_miou, stability_score


def test_map_miou_hand_computed():
    pred = torch.tensor([[0, 3]])
    ref = torch.tensor([[0, 0]])
    # class 0: I 1, U 2 -> 0.5; class 3 only predicted: 0; classes 1, 2 absent from both: not counted
    assert float(map_miou(pred, ref, 4)) == pytest.approx(0.25)
    assert float(map_miou(torch.full((3, 3), 2), torch.zeros(3, 3, dtype=torch.long), 4)) == 0.0


def test_stability_score_hand_computed():
    p3 = torch.tensor([[0, 0, 1], [1, 2, 2]])
    p1 = p3.clone()
    p2 = torch.tensor([[0, 1, 1], [1, 1, 2]])
    # mIoU(P1, P3) = 1; mIoU(P2, P3): class 0 1/2, class 1 2/4, class 2 1/2, class 3 absent -> 0.5
    assert float(stability_score(torch.stack([p1, p2, p3]), 4)) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        stability_score(p3[None], 4)


def test_reliable_split_is_the_top_share_with_deterministic_ties():
    ids = ["a", "b", "c", "d", "e"]
    scores = {"a": 0.5, "b": 0.9, "c": 0.5, "d": 0.9, "e": math.nan}
    assert selftrain.split_reliable(ids, scores, 0.5) == (["b", "d"], ["a", "c", "e"])
    tied = {"a": 0.7, "b": 0.5, "c": 0.7, "d": 0.7}
    assert selftrain.split_reliable(["a", "b", "c", "d"], tied, 0.5) == (["a", "c"], ["d", "b"])
    assert selftrain.split_reliable(["d", "c", "b", "a"], tied, 0.5) == (["d", "c"], ["a", "b"])


def test_stpp_is_the_name_stpp():
    assert load_config(None, ["method.name=stpp"]).method.plus
    assert not load_config(None, ["method.name=st"]).method.plus
    with pytest.raises(C.ConfigError, match="snapshots"):
        load_config(None, ["method.name=stpp", "method.snapshots=0"])


def test_tta_equals_plain_inference_for_a_pixelwise_model():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 1)
    gen = torch.Generator().manual_seed(0)
    # a 1x1 conv commutes with flips, so flip TTA at scale 1 is the plain prediction on any image
    x = torch.randn(2, 3, 9, 7)
    flip_only = st.Config(tta_scales=(1.0,), tta_flip=True)
    assert torch.allclose(predict_multiscale(net, x, (1.0,), True), net(x).softmax(1), atol=1e-6)
    assert torch.equal(st.label(net, x, gen, flip_only), st.predict(net, x))
    # rescaling a constant image keeps it constant, so every scale agrees too
    const = torch.randn(1, 3, 1, 1).expand(1, 3, 12, 10).contiguous()
    full = st.Config()
    assert full.tta_scales == (0.5, 0.75, 1.0, 1.5, 2.0) and full.tta_flip
    probs = predict_multiscale(net, const, full.tta_scales, True)
    assert torch.allclose(probs, predict_whole(net, const).softmax(1), atol=1e-5)
    assert torch.equal(st.label(net, const, gen, full), st.predict(net, const))


def test_strong_augmentation_touches_only_pseudo_labeled_crops():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (4, 3, 24, 24), generator=g, dtype=torch.uint8)
    mask = torch.randint(0, 5, (4, 24, 24), generator=g)
    pseudo = torch.tensor([True, False, True, False])
    always = StrongAugConfig(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0, cutmix_p=1.0)
    out, out_mask = selftrain.augment_pseudo(image, mask, pseudo, torch.Generator().manual_seed(1), always)
    for i in (1, 3):
        assert torch.equal(out[i], image[i]) and torch.equal(out_mask[i], mask[i])
    for i in (0, 2):
        assert not torch.equal(out[i], image[i])
        erased = out_mask[i] == IGNORE
        assert 0 < erased.sum() < erased.numel()
        assert torch.equal(out_mask[i][~erased], mask[i][~erased])
    same, same_mask = selftrain.augment_pseudo(image, mask, None, g, always)
    assert same is image and same_mask is mask
    none = torch.zeros(4, dtype=torch.bool)
    kept, kept_mask = selftrain.augment_pseudo(image, mask, none, g, always)
    assert torch.equal(kept, image) and torch.equal(kept_mask, mask)


def _cfg(tiny, name, *extra):
    return load_config(None, tiny + [f"method.name={name}", "train.iters=2", "method.tta_scales=[1.0,0.5]", *extra])


REAL_FIT = engine_run.fit


def _recording_fit(calls, fail_on=()):
    def fit(cfg, run_dir, *args, **kwargs):
        calls.append(run_dir.name)
        if run_dir.name in fail_on:
            raise RuntimeError(f"fit must not run for {run_dir.name}")
        return REAL_FIT(cfg, run_dir, *args, **kwargs)

    return fit


def test_stpp_pipeline_writes_every_stage(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, "stpp")
    run = tmp_path / "run"
    results = train(cfg, run, st)
    stages = ["1_teacher", "2_select", "3_label", "4_student1", "5_relabel", "6_student2"]
    assert list(results["stages"]) == stages and results["final_stage"] == "6_student2"
    assert all((run / s / DONE).is_file() for s in stages)
    assert results["steps"] == 6 and results["method"] == "stpp"
    assert [p.name for p in sorted((run / "1_teacher").glob("snapshot_*"))] == [
        "snapshot_1.safetensors",
        "snapshot_2.safetensors",
        "snapshot_3.safetensors",
    ]
    assert load_export(run / "1_teacher" / "snapshot_1.safetensors", METHODS)[0].method.name == "stpp"

    _, unlabeled = resolve_train_split(cfg.data)
    reliable = (run / "2_select" / "reliable_ids.txt").read_text().split()
    unreliable = (run / "2_select" / "unreliable_ids.txt").read_text().split()
    assert len(reliable) == len(unreliable) == 8 and sorted(reliable + unreliable) == sorted(unlabeled.ids)
    scores = json.loads((run / "2_select" / "scores.json").read_text())
    assert min(scores[i] for i in reliable) >= max(scores[i] for i in unreliable)

    # reliable images keep the teacher's labels (3_label), the rest are labeled by student 1 (5_relabel)
    assert (run / "3_label" / "ids.txt").read_text().split() == reliable
    assert (run / "5_relabel" / "ids.txt").read_text().split() == unreliable
    assert results["stages"]["5_relabel"]["model"].startswith("4_student1/")
    counts = torch.zeros(3, 7, dtype=torch.int64)
    for stage, ids in (("3_label", reliable), ("5_relabel", unreliable)):
        lines = (run / stage / "pseudo_labels.txt").read_text().splitlines()
        assert len(lines) == len(ids) and all(len(line.split()) == 2 for line in lines)
        for line, i in zip(lines, ids):
            png = run / stage / "pseudo" / f"{i}.png"
            assert line.split()[1] == str(png)
            label = np.array(Image.open(png))
            assert label.shape == (32, 32) and label.max() < 7  # no threshold: every pixel carries a class
            gt = unlabeled.subset([i])[0].mask
            counts += selftrain.class_counts(torch.from_numpy(label).long(), torch.from_numpy(gt), 7, IGNORE)
    diag = results["diagnostics"]
    assert "never used" in diag["note"]
    assert diag["reliable"]["images"] == diag["unreliable"]["images"] == 8
    assert diag["all"]["miou"] == selftrain.quality(counts, [str(k) for k in range(7)], 16)["miou"]
    assert set(diag["teacher_on_selection"]) == {"reliable", "unreliable"}

    for name in ("best.safetensors", "last.safetensors", "config.yaml", "results.json"):
        assert (run / name).is_file()
    assert (run / "best.safetensors").read_bytes() == (run / "6_student2" / "best.safetensors").read_bytes()
    assert yaml.safe_load((run / "config.yaml").read_text()) == C.to_dict(cfg)
    assert results["best"] == json.loads((run / "6_student2" / "results.json").read_text())["best"]


def test_st_pipeline_resumes_at_the_first_unfinished_stage(tiny_overrides, tmp_path, monkeypatch):
    cfg = _cfg(tiny_overrides, "st", "method.batch_size=3")
    run = tmp_path / "run"
    calls = []
    monkeypatch.setattr(engine_run, "fit", _recording_fit(calls, fail_on=("3_student",)))
    with pytest.raises(RuntimeError, match="3_student"):
        train(cfg, run, st)
    assert calls == ["1_teacher", "3_student"]
    assert (run / "1_teacher" / "done.json").is_file() and (run / "2_label" / "done.json").is_file()
    assert not (run / "3_student" / "done.json").is_file() and not (run / "results.json").exists()
    labels = sorted((run / "2_label" / "pseudo").glob("*.png"))
    assert len(labels) == 16
    stamps = {p.name: p.stat().st_mtime_ns for p in labels}

    calls.clear()
    monkeypatch.setattr(engine_run, "fit", _recording_fit(calls))
    results = train(cfg, run, st)
    assert calls == ["3_student"], "finished stages must not train again"
    assert list(results["stages"]) == ["1_teacher", "2_label", "3_student"]
    assert {p.name: p.stat().st_mtime_ns for p in (run / "2_label" / "pseudo").glob("*.png")} == stamps
    assert results["diagnostics"]["all"]["images"] == 16 and "reliable" not in results["diagnostics"]
    # method.batch_size applies to the stages; the root keeps the run's own config (what `semiseg bench` compares)
    assert yaml.safe_load((run / "1_teacher" / "config.yaml").read_text())["data"]["batch_size"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["batch_size"] == 2

    # a lost root result is rebuilt from the stage markers without training anything
    (run / "results.json").unlink()
    calls.clear()
    monkeypatch.setattr(engine_run, "fit", _recording_fit(calls, fail_on=("1_teacher", "3_student")))
    again = train(cfg, run, st)
    assert calls == [] and again["best"] == results["best"] and (run / "results.json").is_file()


@pytest.mark.slow
def test_stpp_under_two_processes(tiny_overrides, tmp_path):
    cfg = _cfg(tiny_overrides, "stpp", "train.device=cpu")
    path = tmp_path / "stpp.yaml"
    path.write_text(yaml.safe_dump(C.to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "semiseg", "train", str(path), "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    # each rank labels its shard of the images; scores and quality counts are gathered across ranks
    assert len(json.loads((tmp_path / "ddp" / "2_select" / "scores.json").read_text())) == 16
    assert results["diagnostics"]["reliable"]["images"] == results["diagnostics"]["unreliable"]["images"] == 8
    assert len(list((tmp_path / "ddp" / "3_label" / "pseudo").glob("*.png"))) == 8
    assert len(list((tmp_path / "ddp" / "5_relabel" / "pseudo").glob("*.png"))) == 8
    assert (tmp_path / "ddp" / "log.txt").read_text().count("stage 2_select done") == 1


def test_the_teacher_trains_on_two_copies_of_a_small_labeled_list(tiny_overrides):
    # ST++'s main.py doubles a labeled list under 200 ids for the SupOnly teacher; a student's list is unchanged
    from semiseg.engine.loop import total_iters

    cfg = _cfg(tiny_overrides, "stpp", "train.iters=0", "train.epochs=1")  # 8 labeled ids, batch 2

    def teacher_part(**method):
        stages = st.stages(C.replace(cfg, method=method) if method else cfg)
        (part,) = stages[0].data(None).labeled
        return part

    part = teacher_part()
    assert len(part.dataset) == 8 and part.repeat == 2
    assert total_iters(cfg, len(part.dataset) * part.repeat, 0, 1) == 8  # one epoch of the doubled list: 16 / 2
    assert teacher_part(small_split=8).repeat == 1 and teacher_part(small_split=9).repeat == 2
    assert teacher_part(small_split=0).repeat == 1
    more = C.replace(cfg, data={"repeat_labeled": 3})
    assert st.stages(more)[0].data(None).labeled[0].repeat == 3

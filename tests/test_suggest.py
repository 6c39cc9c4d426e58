"""`semiseg suggest`: ranking by stability (least stable first), export discovery, outputs."""

import json
import math

import pytest
import torch

from semiseg import config as C
from semiseg.cli import main
from semiseg.data.datasets import dataset_info, resolve_train_split
from semiseg.engine.checkpoint import export_model
from semiseg.engine.evaluate import predict_whole
from semiseg.errors import CheckpointError
from semiseg.methods import load_config, st
from semiseg.methods.selftrain import image_tensor, rank_least_stable
from semiseg.ops import stability_score
from semiseg.suggest import find_exports, suggest


def test_rank_least_stable_first_with_deterministic_ties():
    scores = {"a": 0.9, "b": 0.2, "c": math.nan, "d": 0.2, "e": 0.5}
    assert rank_least_stable(["a", "b", "c", "d", "e"], scores)[:4] == [
        ("c", scores["c"]),
        ("b", 0.2),
        ("d", 0.2),
        ("e", 0.5),
    ]
    assert [i for i, _ in rank_least_stable(["d", "b"], scores)] == ["d", "b"]


def _export(cfg, path, seed):
    torch.manual_seed(seed)
    info = dataset_info(cfg.data)
    net = st.build(cfg, info)["model"]
    meta = {"config": C.to_dict(cfg), "classes": list(info.classes), "net": "model", "palette": [], "step": seed}
    export_model(path, net, meta)
    return net.eval()


@pytest.fixture
def snapshot_run(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["method.name=stpp"])
    run = tmp_path / "run"
    nets = [_export(cfg, run / "1_teacher" / f"snapshot_{k}.safetensors", k) for k in (1, 2, 3)]
    return cfg, run, nets


def test_suggest_ranks_the_least_stable_images_first(snapshot_run, tmp_path):
    cfg, run, nets = snapshot_run
    unlabeled = resolve_train_split(cfg.data)[1]
    expected = {}
    for k in range(len(unlabeled)):
        sample = unlabeled[k]
        x = image_tensor(sample, torch.device("cpu"))
        preds = torch.cat([predict_whole(net, x).argmax(1) for net in nets])
        expected[sample.id] = float(stability_score(preds, 7))
    top = suggest(run, 5, tmp_path / "out", device="cpu")
    assert [s for _, s in top] == sorted(expected.values())[:5]
    assert all(expected[i] == pytest.approx(s) for i, s in top)
    lines = (tmp_path / "out" / "suggest.txt").read_text().splitlines()
    assert lines[0].startswith("# stability from 3 snapshots") and len(lines) == 7
    assert [line.split()[0] for line in lines[2:]] == [i for i, _ in top]
    stored = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert len(stored["scores"]) == 16
    page = (tmp_path / "out" / "suggest.html").read_text()
    assert page.count("<tr><td>") == 5 and page.count("data:image/png;base64,") == 10


def test_suggest_reuses_stored_scores_and_the_cli(snapshot_run, tmp_path):
    cfg, run, _ = snapshot_run
    ids = resolve_train_split(cfg.data)[1].ids
    scores = {i: (0.0 if i == ids[7] else 0.5 + k / 100) for k, i in enumerate(ids)}
    (run / "2_select").mkdir()
    (run / "2_select" / "scores.json").write_text(json.dumps(scores))
    assert main(["suggest", str(run), "--budget", "3", "--device", "cpu"]) == 0
    lines = (run / "suggest" / "suggest.txt").read_text().splitlines()
    assert "scores read from" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == [ids[7], ids[0], ids[1]]


def test_find_exports_falls_back_to_best_and_last(tiny_overrides, tmp_path):
    with pytest.raises(CheckpointError, match="no snapshot"):
        find_exports(tmp_path)
    for name in ("best", "last"):
        _export(load_config(None, tiny_overrides + ["method.name=st"]), tmp_path / f"{name}.safetensors", 0)
    paths, source = find_exports(tmp_path)
    assert [p.name for p in paths] == ["best.safetensors", "last.safetensors"]
    assert source.startswith("no snapshot exports")
    assert main(["suggest", str(tmp_path / "missing"), "--budget", "2"]) == 2

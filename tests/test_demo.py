import json

from semiseg.cli import main


def test_demo_quick_writes_table_models_and_gallery(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "UniMatch vs supervised" in out and "supervised" in out and "unimatch" in out
    for name in ("supervised", "unimatch"):
        assert (tmp_path / "demo" / name / "best.safetensors").is_file()
        assert (tmp_path / "demo" / name / "metrics.jsonl").is_file()
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["results"]) == {"supervised", "unimatch"}
    assert (tmp_path / "demo" / "gallery.png").stat().st_size > 1000


def test_demo_trains_unimatch_with_its_demo_overrides_and_the_seed():
    from semiseg.demo import demo_config

    cfg = demo_config("unimatch", quick=True, seed=3)
    assert cfg.method.name == "unimatch" and cfg.train.seed == 3
    assert cfg.method.tau == 0.8
    assert demo_config("supervised").train.seed == 0


def test_demo_refuses_a_run_folder_of_another_setting(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "supervised").mkdir(parents=True)
    (out / "supervised" / "config.yaml").write_text("method:\n  name: supervised\ntrain:\n  seed: 5\n")
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "use another --out" in err


def test_demo_camvid_quick_fetches_the_weights_and_trains_both(tmp_path, capsys, monkeypatch):
    # The real download path of the weights (a file:// URL in place of download.pytorch.org), CamVid from a folder.
    import torch
    from test_fetch import make_camvid

    from semiseg.models import pretrained as pt
    from semiseg.models.mobilenetv2 import MobileNetV2

    root = make_camvid(tmp_path / "camvid", {"train": 64, "val": 2})
    weights = tmp_path / "mobilenet_v2.pth"
    torch.save(MobileNetV2().state_dict(), weights)
    monkeypatch.setattr(pt, "CACHE_DIR", tmp_path / "cache")
    out = tmp_path / "demo"
    argv = ["demo", "camvid", "--quick", "--data-root", str(root), "--pretrained", weights.as_uri(), "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "labeled: 1 images; unlabeled: the other 63; val: 2" in text
    assert "loaded 306 tensors" in text and "UniMatch vs supervised" in text
    assert (tmp_path / "cache" / weights.name).is_file()
    assert set(json.loads((out / "summary.json").read_text())["results"]) == {"supervised", "unimatch"}


def test_demo_synthetic_refuses_camvid_options(tmp_path, capsys):
    assert main(["demo", "--data-root", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert "semiseg demo camvid" in capsys.readouterr().err

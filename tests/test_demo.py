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
    from semiseg.demo import METHODS, demo_config

    cfg = demo_config("unimatch", quick=True, seed=3)
    assert cfg.method.name == "unimatch" and cfg.train.seed == 3
    assert cfg.method.tau == 0.8 and METHODS["unimatch"] == ["method.tau=0.8"]
    assert demo_config("supervised").train.seed == 0


def test_demo_refuses_a_run_folder_of_another_setting(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "supervised").mkdir(parents=True)
    (out / "supervised" / "config.yaml").write_text("method:\n  name: supervised\ntrain:\n  seed: 5\n")
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "use another --out" in err

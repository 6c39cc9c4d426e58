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

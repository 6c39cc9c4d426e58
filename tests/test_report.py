import base64
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bench import TINY_BENCH
from test_fetch import make_camvid

from semiseg import report
from semiseg.bench import run_bench
from semiseg.cli import main
from semiseg.results import read_results

PNG_SRC = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """A finished tiny bench (supervised, fixmatch, full; one seed) evaluated on a 4-image val split."""
    root = make_camvid(tmp_path_factory.mktemp("camvid"), {"train": 10, "val": 4})
    out = tmp_path_factory.mktemp("bench") / "b"
    run_bench("camvid", ["fixmatch"], out, [0], "1/5", str(root), None, TINY_BENCH, quiet=True, report=False)
    return out


def _images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in PNG_SRC.findall(page)]


def test_report_has_table_plots_and_gallery(bench_dir):
    path = report.write_report(bench_dir, n_images=2)
    page = path.read_text()
    assert path == bench_dir / "report.html"
    assert "<table class='results'>" in page and "mIoU best" in page and "gap closed %" in page
    for name in ("supervised", "fixmatch", "full"):
        assert f"<tr class='reference'><td>{name}</td>" in page or f"<tr><td>{name}</td>" in page
    assert "<tr class='reference'><td>full</td>" in page
    images = _images(page)
    assert len(images) == 2 + 2 * (2 + 3)  # curves + class bars, then 2 rows of input, truth and 3 predictions
    assert images[0].size[0] > 800 and images[1].size[0] > 800
    assert all(im.size == (32, 24) for im in images[2:])
    assert "val_000" in page and "val_003" in page and "val_001" not in page  # fixed ids: first and last
    assert "evaluation on val (4 images, whole)" in page and "pixel acc" in page
    assert report.PLOTS_HINT not in page and 'src="http' not in page  # self-contained


def test_report_without_matplotlib_keeps_tables_and_gallery(bench_dir, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "b"
    shutil.copytree(bench_dir, out)
    (out / "runs" / "fixmatch" / "seed0" / "best.safetensors").unlink()
    page = report.write_report(out, n_images=1).read_text()
    assert report.PLOTS_HINT in page and "<table class='results'>" in page
    assert len(_images(page)) == 1 * (2 + 2)  # the run without an export drops out of the gallery
    assert "fixmatch: no " in page


def test_gallery_splits_many_methods_into_tables(bench_dir, monkeypatch):
    """More methods than GALLERY_METHODS: several tables, each repeating image and ground truth, none left out."""
    monkeypatch.setattr(report, "GALLERY_METHODS", 2)
    page = report.write_report(bench_dir, n_images=1).read_text()
    tables = re.findall(r"<table class='gallery'.*?</table>", page)
    heads = [re.findall(r"<th>([^<]*)</th>", t) for t in tables]
    assert heads == [["image", "ground truth", "supervised", "fixmatch"], ["image", "ground truth", "full"]]
    assert len(_images(page)) == 2 + (2 + 2) + (2 + 1)


def test_gallery_ground_truth_matches_the_fixture(bench_dir):
    page = report.write_report(bench_dir, n_images=1).read_text()
    truth = np.asarray(_images(page)[3].convert("RGB"))
    root = Path(read_results(bench_dir)["protocol"]["data_root"])
    mask = np.asarray(Image.open(root / "valannot" / "val_000.png"))
    assert (truth[mask == 11] == 0).all()  # void drawn black
    assert (truth[mask == 0] == (128, 128, 128)).all() and (truth[mask == 1] == (128, 0, 0)).all()


def test_read_metrics_later_lines_win(tmp_path):
    lines = [
        '{"step": 1, "time": 0, "train/loss": 2.0}',
        '{"step": 2, "time": 0, "train/loss": 1.5, "val/model/miou": 10.0}',
        '{"step": 2, "time": 0, "train/loss": 1.4}',
        '{"step": 3, "train/lo',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    curves = report.read_metrics(tmp_path)
    assert curves == {"train/loss": {1: 2.0, 2: 1.4}, "val/model/miou": {2: 10.0}}
    assert report.read_metrics(tmp_path / "none") == {}


def test_gallery_indices_are_fixed_and_spread():
    assert report.gallery_indices(10, 4) == [0, 3, 6, 9]
    assert report.gallery_indices(101, 4) == [0, 33, 67, 100]
    assert report.gallery_indices(3, 5) == [0, 1, 2]
    assert report.gallery_indices(5, 1) == [0] and report.gallery_indices(0, 4) == []


def test_report_only_cli(bench_dir, tmp_path, capsys):
    (bench_dir / "report.html").unlink(missing_ok=True)
    assert main(["bench", "--report-only", "--out", str(bench_dir)]) == 0
    assert (bench_dir / "report.html").is_file()
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.json: not found" in err and err.count("\n") == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (Debian package: chromium)")
def test_report_renders_in_headless_chromium(bench_dir, tmp_path):
    page = report.write_report(bench_dir, n_images=2)
    png = tmp_path / "shot.png"
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1280,2000", page.as_uri(),
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert png.is_file(), "chromium wrote no screenshot"
    shot = np.asarray(Image.open(png).convert("RGB")).astype(np.float32)
    assert shot.shape == (2000, 1280, 3)
    assert shot.std() > 20  # text, tables, plots and pictures: far from a blank page
    assert (shot.min(-1) < 200).mean() > 0.05  # a good share of the page is not white
    # the plots made it onto the page: pixels of matplotlib's first colour (tab10 blue, the supervised lines and bars)
    assert (np.abs(shot - (31, 119, 180)).max(-1) <= 3).sum() > 200


def test_pseudo_label_table_in_html_matches_markdown_rows():
    runs = {"stpp": {"0": {"pseudo_labels": {"reliable": {"miou": 61.2}, "unreliable": {"miou": 48.5}, "all": None}}}}
    page = report.pseudo_label_html({"methods": ["stpp"], "runs": runs})
    assert "<th>teacher, reliable</th>" in page
    assert "<tr><td>stpp</td><td>0</td><td>-</td><td>-</td><td>61.20</td><td>48.50</td><td>-</td></tr>" in page
    assert report.pseudo_label_html({"methods": ["stpp"], "runs": {"stpp": {"0": {}}}}) == ""

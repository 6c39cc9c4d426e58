import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from test_fetch import make_camvid

from semiseg import bench, results
from semiseg import config as config_mod
from semiseg.bench import method_section
from semiseg.cli import main
from semiseg.config import ConfigError
from semiseg.methods import METHODS, load_config
from semiseg.results import format_markdown, gap_closed, mean_std, merge_previous, summarize

TINY_BENCH = [
    "data.resize=1.0",
    "data.crop=24",
    "data.scale_range=[1.0,1.0]",
    "data.batch_size=2",
    "data.batch_size_u=2",
    "data.workers=0",
    "model.width=8",
    "model.width_mult=0.25",
    "model.pretrained=",
    "model.head_channels=16",
    "model.low_level_channels=8",
    "optim.lr=0.01",
    "train.iters=4",
    "train.full_iters=6",
    "train.log_every=1",
    "train.device=cpu",
    "eval.every=2",
    "eval.batch_size=4",
]
"""overrides that turn configs/camvid/bench.yaml into a seconds-long run on the 32x24 fixture"""


def test_gap_closed_fixed_numbers():
    assert gap_closed(55.0, 50.0, 60.0) == 50.0
    assert gap_closed(50.0, 50.0, 60.0) == 0.0
    assert gap_closed(60.0, 50.0, 60.0) == 100.0
    assert gap_closed(45.0, 50.0, 60.0) == -50.0
    assert gap_closed(62.5, 50.0, 60.0) == 125.0
    assert math.isnan(gap_closed(55.0, 50.0, 50.0))  # no gap
    assert math.isnan(gap_closed(55.0, 60.0, 50.0))  # full below supervised
    assert math.isnan(gap_closed(math.nan, 50.0, 60.0))
    assert math.isnan(gap_closed(55.0, None, 60.0))


def test_mean_std_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    m, s = mean_std([1.0, math.nan, 3.0, None])
    assert m == 2.0 and math.isclose(s, math.sqrt(2))
    m, s = mean_std([5.0])
    assert m == 5.0 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_std([]))
    assert results.format_mean_std(62.3149, 0.456) == "62.31 ± 0.46"
    assert results.format_mean_std(62.3149, math.nan) == "62.31"
    assert results.format_mean_std(None, None) == "n/a"


def _record(miou_best, miou_last, seconds, ips):
    return {
        "miou_best": miou_best,
        "miou_last": miou_last,
        "iou_best": {"sky": miou_best + 10, "road": miou_best - 10},
        "train_seconds": seconds,
        "images_per_second": ips,
        "peak_memory_mb": 0.0,
        "steps": 100,
    }


def _protocol():
    return {
        "command": "semiseg bench camvid --methods fixmatch",
        "preset": "configs/camvid/bench.yaml",
        "dataset": "camvid",
        "data_root": "data/camvid",
        "train_split": "train",
        "labeled": "1/8",
        "seeds": [0, 1],
        "train_count": 367,
        "labeled_count": 46,
        "unlabeled_count": 321,
        "val_split": "val",
        "eval_split": "val",
        "eval_images": 101,
        "eval_mode": "whole",
        "eval_every": 250,
        "resolution": [240, 180],
        "resize": 0.5,
        "crop": 160,
        "iters": 100,
        "batch_size": 8,
        "batch_size_u": 8,
        "model": "resnet18",
        "versions": {"torch": "2.13.0"},
    }


def test_summary_and_markdown_table_on_fixed_numbers():
    runs = {
        "supervised": {"0": _record(40.0, 39.0, 60, 10.0), "1": _record(42.0, 41.0, 80, 12.0)},
        "fixmatch": {"0": _record(45.0, 44.0, 125, 20.0), "1": _record(47.0, 44.0, 135, 22.0)},
        "full": {"0": _record(52.0, 50.0, 3600, 10.0), "1": _record(50.0, 50.0, 3700, 12.0)},
    }
    order = ["supervised", "fixmatch", "full"]
    summary = summarize(runs, order)
    fm = summary["fixmatch"]
    assert fm["seeds"] == 2 and fm["miou_best"]["mean"] == 46.0
    assert math.isclose(fm["miou_best"]["std"], math.sqrt(2))
    assert fm["miou_last"] == {"mean": 44.0, "std": 0.0}
    assert fm["gap_closed_best"] == 50.0  # (46 - 41) / (51 - 41)
    assert fm["gap_closed_last"] == 40.0  # (44 - 40) / (50 - 40)
    assert summary["supervised"]["gap_closed_best"] == 0.0 and summary["full"]["gap_closed_best"] == 100.0
    assert fm["iou_best"] == {"sky": 56.0, "road": 36.0}
    assert fm["train_seconds"] == 130.0 and fm["images_per_second"] == 21.0

    text = format_markdown({"protocol": _protocol(), "methods": order, "runs": runs, "summary": summary})
    lines = text.splitlines()
    assert lines[0] == (
        "| method | seeds | mIoU best | mIoU last | Δ best vs supervised | gap closed % | train time | images/s |"
    )
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| supervised | 2 | 41.00 ± 1.41 | 40.00 ± 1.41 | - | 0.0 | 01:10 | 11.0 |"
    assert lines[3] == "| fixmatch | 2 | 46.00 ± 1.41 | 44.00 ± 0.00 | +5.00 ± 0.00 | 50.0 | 02:10 | 21.0 |"
    assert lines[4] == "| full | 2 | 51.00 ± 1.41 | 50.00 ± 0.00 | +10.00 ± 2.83 | 100.0 | 1:00:50 | 11.0 |"
    i = lines.index("Per split seed, best mIoU (step of the best) / last mIoU:")
    assert lines[i + 2 : i + 5] == [
        "| method | seed 0 | seed 1 |",
        "|---|---:|---:|",
        "| supervised | 40.00 / 39.00 | 42.00 / 41.00 |",
    ]
    assert "labeled 1/8 of train (46 labeled / 321 unlabeled of 367), seeds 0,1" in text
    assert "evaluation on val (101 images, whole)" in text


def test_a_method_short_of_seeds_is_compared_on_the_seeds_it_ran():
    # seed 1's split is far easier for every method: comparing means over different seeds would credit unimatch
    runs = {
        "supervised": {"0": _record(40.0, 40.0, 60, 10.0), "1": _record(50.0, 50.0, 60, 10.0)},
        "unimatch": {"1": _record(51.0, 50.0, 60, 10.0)},
        "full": {"0": _record(60.0, 60.0, 60, 10.0), "1": _record(70.0, 70.0, 60, 10.0)},
    }
    summary = summarize(runs, ["supervised", "unimatch", "full"])
    runs["unimatch"]["1"]["best_step"] = 300
    _, per_seed = results.seed_rows(
        {"protocol": _protocol(), "methods": ["supervised", "unimatch", "full"], "runs": runs}
    )
    assert per_seed[1] == ["unimatch", "-", "51.00 (300) / 50.00"]  # seed 0 not run yet
    assert summary["unimatch"]["miou_best"]["mean"] == 51.0  # its own mean: seed 1 only
    assert summary["unimatch"]["delta_best"]["mean"] == 1.0  # paired: 51 - 50, not 51 - 45
    assert summary["unimatch"]["gap_closed_best"] == 5.0  # (51 - 50) / (70 - 50), not (51 - 45) / (65 - 45) = 30
    assert summary["full"]["delta_best"] == {"mean": 20.0, "std": 0.0}


def test_a_second_bench_into_one_folder_joins_its_table():
    def results(methods, runs, seeds, command, **protocol):
        p = {**_protocol(), "seeds": seeds, "command": command, **protocol}
        return {"protocol": p, "methods": methods, "runs": runs, "summary": {}}

    first = results(
        ["supervised", "unimatch", "full"],
        {n: {str(s): _record(40.0 + s, 39.0, 60, 10.0) for s in (0, 1, 2)} for n in ("supervised", "unimatch", "full")},
        [0, 1, 2],
        "bench A",
    )
    second = results(
        ["supervised", "st", "full"],
        {"supervised": {"0": _record(50.0, 49.0, 60, 10.0)}, "st": {"0": _record(45.0, 44.0, 60, 10.0)}},
        [0],
        "bench B",
    )
    assert merge_previous(second, first) is None
    assert second["methods"] == ["supervised", "unimatch", "st", "full"]
    assert second["protocol"]["seeds"] == [0, 1, 2] and second["protocol"]["commands"] == ["bench A", "bench B"]
    assert second["runs"]["supervised"]["0"]["miou_best"] == 50.0  # the new record of a run both hold
    assert second["runs"]["supervised"]["2"]["miou_best"] == 42.0 and len(second["runs"]["unimatch"]) == 3
    summary = second["summary"]
    assert summary["unimatch"]["seeds"] == 3 and summary["st"]["seeds"] == 1 and summary["full"]["seeds"] == 3
    text = format_markdown(second)
    assert "| st | 1 | 45.00 |" in text and "Command: `bench A`" in text and "Command: `bench B`" in text
    third = results(["supervised", "full"], {}, [0], "bench C", iters=200)
    assert merge_previous(third, second) == "iters" and third["runs"] == {}  # another protocol: nothing joins


def test_benches_sharing_a_folder_keep_each_others_rows(tmp_path):
    """Bench A read the folder's table before bench B finished BST; A's next write must not drop B's row."""

    def results(methods, runs, command):
        p = {**_protocol(), "seeds": [0], "command": command}
        return {"protocol": p, "methods": methods, "runs": runs, "summary": summarize(runs, methods)}

    sup = {"0": _record(50.0, 49.0, 60, 10.0)}
    a = results(
        ["supervised", "unimatch", "full"], {"supervised": sup, "unimatch": {"0": _record(52.0, 51.0, 60, 9.0)}}, "A"
    )
    b = results(["supervised", "bst", "full"], {"supervised": sup, "bst": {"0": _record(54.0, 53.0, 60, 8.0)}}, "B")
    bench.write_tables(tmp_path, b)  # B finishes BST after A started
    bench.write_tables(tmp_path, a)  # A writes after its next run
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["runs"]) == {"supervised", "unimatch", "bst"}
    assert on_disk["methods"] == ["supervised", "bst", "unimatch", "full"]
    assert on_disk["protocol"]["commands"] == ["B", "A"] and a["runs"]["bst"]["0"]["miou_best"] == 54.0
    assert "| bst | 1 | 54.00 |" in (tmp_path / "results.md").read_text()


def test_pseudo_label_table_of_self_training_runs():
    runs = {"supervised": {"0": _record(40.0, 39.0, 60, 10.0)}, "stpp": {"0": _record(45.0, 44.0, 125, 20.0)}}
    teacher = {"reliable": {"miou": 60.0}, "unreliable": {"miou": 41.0}}
    runs["stpp"]["0"]["pseudo_labels"] = {
        "reliable": {"miou": 61.234},
        "unreliable": {"miou": 48.5},
        "all": None,
        "teacher_on_selection": teacher,
    }
    order = ["supervised", "stpp"]
    text = format_markdown({"protocol": _protocol(), "methods": order, "runs": runs, "summary": summarize(runs, order)})
    assert "| stpp | 0 | 60.00 | 41.00 | 61.23 | 48.50 | - |" in text.splitlines()
    assert "| supervised | 0 |" not in text  # only runs that pseudo-label get a row
    del runs["stpp"]["0"]["pseudo_labels"]
    assert "Pseudo-labels" not in format_markdown(
        {"protocol": _protocol(), "methods": order, "runs": runs, "summary": summarize(runs, order)}
    )


def test_method_section_merge_order(tmp_path):
    method_file = tmp_path / "unimatch.yaml"
    method_file.write_text("method:\n  tau: 0.8\n  w_fp: 0.5\n")
    preset_method = {"criterion": "ce", "tau": 0.9}
    got = method_section("unimatch", preset_method, method_file, ["method.w_fp=0.3", "method.strong.cutmix_p=1"], "")
    assert got["name"] == "unimatch" and got["tau"] == 0.8 and got["w_fp"] == 0.3
    assert got["strong"] == {"cutmix_p": 1} and got["criterion"] == "ce"
    sup = method_section("supervised", preset_method, tmp_path / "supervised.yaml", ["method.w_fp=0.3"], "")
    assert sup == {"name": "supervised", "criterion": "ce"}  # tau and w_fp are not supervised fields
    config_mod.from_dict({"method": got}, METHODS)  # valid for unimatch.Config
    method_file.write_text("method:\n  tau: 0.8\ntrain:\n  iters: 5\n")
    with pytest.raises(ConfigError, match="holds only a method: section"):
        method_section("unimatch", {}, method_file, [], "")


def test_method_keys_must_belong_to_a_benched_method():
    bench._check_method_keys(["tau", "criterion"], ["supervised", "fixmatch"], "--set")
    with pytest.raises(ConfigError, match=r"--set method.w_fp: no benched method \(supervised, fixmatch\)"):
        bench._check_method_keys(["w_fp"], ["supervised", "fixmatch"], "--set")
    with pytest.raises(ConfigError, match="use --methods"):
        bench._check_method_keys(["name"], ["supervised"], "--set")


def test_resolve_preset_names(tmp_path, monkeypatch):
    assert bench.resolve_preset("camvid") == bench.PRESETS_DIR / "camvid" / "bench.yaml"
    with pytest.raises(ConfigError, match="named bench presets: .*camvid"):
        bench.resolve_preset("nosuch")
    with pytest.raises(ConfigError, match="preset file not found"):
        bench.resolve_preset(str(tmp_path / "x.yaml"))
    monkeypatch.setattr(bench, "PRESETS_DIR", tmp_path / "gone")
    with pytest.raises(ConfigError, match="installed package lacks"):
        bench.resolve_preset("camvid")


@pytest.mark.parametrize("preset", ["camvid", "stanford_background"])
def test_bench_presets_and_their_method_files_are_valid(preset):
    from semiseg.methods import METHODS

    path = bench.resolve_preset(preset)
    raw = config_mod.read_yaml(path)
    cfg = config_mod.from_dict(raw, METHODS, f"{path}: ")
    assert cfg.data.val_split and cfg.train.iters > 0 and cfg.train.full_iters >= cfg.train.iters
    assert cfg.model.pretrained == "imagenet"  # the benchmarks are about fine-tuning a pretrained encoder
    files = sorted(p.stem for p in path.parent.glob("*.yaml") if p.name != "bench.yaml")
    assert files and set(files) <= set(METHODS)
    for name in files:
        section = method_section(name, raw.get("method") or {}, path.parent / f"{name}.yaml", [], "")
        assert config_mod.from_dict({**raw, "method": section}, METHODS).method.name == name


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One CLI bench on the fixture: supervised + fixmatch + full, 1 seed, 4 steps, measured on a test split."""
    root = make_camvid(tmp_path_factory.mktemp("camvid"), {"train": 10, "val": 4, "test": 3})
    out = tmp_path_factory.mktemp("bench") / "b"
    argv = ["bench", "camvid", "--methods", "fixmatch", "--seeds", "0", "--labeled", "1/5", "--data-root", str(root)]
    argv += ["--eval-split", "test", "--out", str(out), "--set", *TINY_BENCH]
    assert main(argv) == 0
    return root, out, argv


def test_bench_end_to_end_on_another_split(tiny_bench):
    root, out, _ = tiny_bench
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["supervised", "fixmatch", "full"]
    p = results["protocol"]
    assert (p["labeled_count"], p["unlabeled_count"], p["train_count"]) == (2, 8, 10)
    assert (p["eval_split"], p["val_split"], p["eval_images"], p["resolution"]) == ("test", "val", 3, [32, 24])
    assert (
        p["iters"] == 4
        and p["full_iters"] == 6
        and p["preset"].endswith("configs/camvid/bench.yaml")
        and p["eval_mode"] == "whole"
    )
    assert "--eval-split test" in p["command"] and p["versions"]["torch"]
    assert p["config"]["data"]["crop"] == 24 and p["method_configs"]["fixmatch"]["tau"] == 0.95
    for name in results["methods"]:
        run = results["runs"][name]["0"]
        assert (
            run["steps"] == (6 if name == "full" else 4)
            and 0 <= run["miou_best"] <= 100
            and 0 <= run["miou_last"] <= 100
        )
        assert run["selection"]["split"] == "val" and run["train_seconds"] > 0 and run["images_per_second"] > 0
        assert set(run["iou_best"]) == set(p["classes"])
        evaluated = json.loads((out / "runs" / name / "seed0" / "eval_test.json").read_text())
        assert evaluated["best"]["images"] == 3 and evaluated["last"]["images"] == 3
        assert run["miou_best"] == evaluated["best"]["miou"] and run["miou_last"] == evaluated["last"]["miou"]
    summary = results["summary"]
    assert summary["supervised"]["seeds"] == 1 and math.isnan(summary["supervised"]["miou_best"]["std"] or math.nan)

    lab = (out / "splits" / "seed0" / "labeled.txt").read_text().splitlines()
    unl = (out / "splits" / "seed0" / "unlabeled.txt").read_text().splitlines()
    assert len(lab) == 2 and len(unl) == 8 and not set(lab) & set(unl)
    assert all(line.startswith("train/") and " trainannot/" in line for line in lab)

    configs = {n: yaml.safe_load((out / "runs" / n / "seed0" / "config.yaml").read_text()) for n in results["methods"]}
    assert configs["supervised"]["data"]["labeled"].endswith("splits/seed0/labeled.txt")
    assert configs["full"]["data"]["labeled"] == "" and configs["full"]["data"]["unlabeled"] == ""
    for name in ("fixmatch", "full"):
        differ = {s for s in configs[name] if configs[name][s] != configs["supervised"][s]}
        assert differ == ({"method"} if name == "fixmatch" else {"data", "train"})
    assert configs["full"]["train"] == dict(configs["supervised"]["train"], iters=6)
    full_data = dict(configs["full"]["data"], labeled=configs["supervised"]["data"]["labeled"])
    full_data["unlabeled"] = configs["supervised"]["data"]["unlabeled"]
    assert full_data == configs["supervised"]["data"]

    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| method | seeds | mIoU best") and [r.split(" | ")[0] for r in md[2:5]] == [
        "| supervised",
        "| fixmatch",
        "| full",
    ]
    assert "evaluation on test (3 images, whole)" in (out / "results.md").read_text()
    assert (out / "report.html").is_file()


def test_pseudo_label_classes_script_on_a_bench(tiny_bench, capsys, monkeypatch):
    """benchmarks/pseudo_label_classes.py reads a bench's runs and splits; coverage cannot fall as tau falls."""
    root, out, _ = tiny_bench
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pseudo_label_classes.py"
    argv = [str(script), str(out), "--methods", "supervised,fixmatch", "--tau", "0.95,0.0,class_aware", "--every", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--data-root", str(root)])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[1].split("|")[1:]]
    assert header == [f"{m} s0 {r}" for m in ("supervised", "fixmatch") for r in ("0.95", "0.0", "class_aware")]
    rows = lines[2:-1]
    assert len(rows) == 11 and [r.split()[0] for r in rows[:3]] == ["sky", "building", "pole"]
    assert abs(sum(float(r.split()[1]) for r in rows) - 100) < 0.5  # pixel shares
    for row in rows:
        cells = [tuple(map(float, c.split("/"))) for c in row.split("|")[1:]]
        for run in range(2):
            high, zero, _ = cells[3 * run : 3 * run + 3]
            assert zero[0] >= high[0] and all(0 <= v <= 100 for c in cells for v in c)
    totals = [float(c) for c in lines[-1].split("|")[1:]]
    assert len(totals) == 6 and totals[1] >= totals[0] and totals[4] >= totals[3]


def test_bench_rerun_skips_finished_runs_and_refuses_changed_config(tiny_bench, capsys):
    _, out, argv = tiny_bench
    before = json.loads((out / "results.json").read_text())
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished; skipped") == 3
    after = json.loads((out / "results.json").read_text())
    assert after["runs"] == before["runs"]
    assert main([*argv, "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "supervised/seed0/config.yaml: this run was trained with optim.lr=0.01" in err


def test_bench_fails_fast_on_a_missing_eval_split(tiny_bench, tmp_path, capsys):
    root, _, _ = tiny_bench
    out = tmp_path / "b"
    argv = ["bench", "camvid", "--methods", "fixmatch", "--data-root", str(root), "--eval-split", "nosuch"]
    assert main([*argv, "--out", str(out), "--set", *TINY_BENCH]) == 2
    assert "no camvid split 'nosuch'" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_bench_usage_errors(tmp_path, capsys):
    assert main(["bench", "camvid", "--out", str(tmp_path)]) == 2
    assert "give a PRESET and --methods" in capsys.readouterr().err
    assert main(["bench", "camvid", "--methods", "nosuch", "--out", str(tmp_path)]) == 2
    assert "--methods nosuch: unknown method" in capsys.readouterr().err
    assert main(["bench", "camvid", "--methods", "fixmatch", "--seeds", "0,x", "--out", str(tmp_path)]) == 2
    assert "--seeds 0,x" in capsys.readouterr().err


def test_parse_method_variants():
    assert bench.parse_method("dssn") == ("dssn", [])
    assert bench.parse_method("dssn:align=none") == ("dssn", ["method.align=none"])
    assert bench.parse_method("ctt:contrast=false:w_high=0.2") == (
        "ctt",
        ["method.contrast=false", "method.w_high=0.2"],
    )
    assert results.run_folder_name("dssn:align=none") == "dssn+align=none"
    assert bench.parse_method("unimatch:train.mix_partner=stream") == ("unimatch", ["train.mix_partner=stream"])
    with pytest.raises(ConfigError, match="the data is the bench's"):
        bench.parse_method("unimatch:data.crop=64")
    with pytest.raises(ConfigError, match="dssn has no method field 'nosuch'"):
        bench.parse_method("dssn:nosuch=1")
    with pytest.raises(ConfigError, match="expected METHOD:KEY=VALUE"):
        bench.parse_method("dssn:align")
    with pytest.raises(ConfigError, match="unknown method 'nosuch'"):
        bench.parse_method("nosuch:tau=1")


def test_bench_variant_shares_the_references(tiny_bench, tmp_path, capsys):
    import shutil

    root, out, argv = tiny_bench
    copy = tmp_path / "bench"
    shutil.copytree(out, copy)
    argv = [a if a != str(out) else str(copy) for a in argv]
    at = argv.index("--methods") + 1
    argv[at] = "fixmatch,fixmatch:tau=0.5"
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished; skipped") == 3  # both references and plain fixmatch
    results = json.loads((copy / "results.json").read_text())
    assert results["methods"] == ["supervised", "fixmatch", "fixmatch:tau=0.5", "full"]
    assert results["protocol"]["method_configs"]["fixmatch:tau=0.5"]["tau"] == 0.5
    cfg = yaml.safe_load((copy / "runs" / "fixmatch+tau=0.5" / "seed0" / "config.yaml").read_text())
    assert cfg["method"]["name"] == "fixmatch" and cfg["method"]["tau"] == 0.5
    assert "| fixmatch:tau=0.5 |" in (copy / "results.md").read_text()


def test_run_lock_makes_a_second_bench_wait(tmp_path):
    """While one bench trains a run, another one sharing the folder blocks on the lock instead of training it too."""
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "runs" / "supervised" / "seed0"
    code = (
        "import sys, time; from pathlib import Path; from semiseg.bench import _run_lock\n"
        "with _run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(float(sys.argv[2]))\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir), "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with bench._run_lock(run_dir, wait=False) as locked:  # a bench first takes up the runs nobody trains
        assert locked is False
    t = time.perf_counter()
    with bench._run_lock(run_dir) as locked:
        waited = time.perf_counter() - t
        assert locked is True
    holder.wait(timeout=30)
    assert waited > 0.5  # it waited for the holder, which kept the lock 1.5 s
    with bench._run_lock(run_dir):  # released: taken at once
        pass


def test_check_run_config_accepts_a_field_added_since_at_its_default(tmp_path):
    cfg = load_config(None, ["method.name=unimatch"])
    old = config_mod.to_dict(cfg)
    del old["method"]["joint_forward"]  # the run was trained before this field existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    bench.check_run_config(tmp_path, cfg)
    changed = load_config(None, ["method.name=unimatch", "method.joint_forward=false"])
    with pytest.raises(ConfigError, match="method.joint_forward=None, this command now asks False"):
        bench.check_run_config(tmp_path, changed)


def test_check_run_config_reads_the_old_file_as_typed_values(tmp_path):
    # A run saved `channels_last: true` before the field took auto/on/off: the same setting as "on".
    cfg = load_config(None, ["train.channels_last=on"])
    old = config_mod.to_dict(cfg)
    old["train"]["channels_last"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    bench.check_run_config(tmp_path, cfg)
    with pytest.raises(ConfigError, match="channels_last"):
        bench.check_run_config(tmp_path, load_config(None, ["train.channels_last=off"]))

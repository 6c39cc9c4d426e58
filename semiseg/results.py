"""Bench results: what `semiseg bench` writes and reads (results.json), their summary over seeds and their text.

bench.py trains and fills the results; report.py draws them; both read and format them through this module, which
imports neither (and nothing that trains).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from semiseg.engine.log import format_duration
from semiseg.errors import DataError

REFERENCES = ("supervised", "full")
"""bench names of the two references: the labeled subset only, and every train label"""


def gap_closed(miou: float, sup: float, full: float) -> float:
    """Share in % of the supervised -> full gap that `miou` closes: (m - sup) / (full - sup) * 100; NaN if gap <= 0."""
    values = (miou, sup, full)
    if any(v is None or math.isnan(v) for v in values) or full - sup <= 0:
        return math.nan
    return (miou - sup) / (full - sup) * 100


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of finite values; std NaN below two values, both NaN for none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


def _is_nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def format_mean_std(mean: float | None, std: float | None, signed: bool = False) -> str:
    """'62.31 ± 0.45' ('+1.20 ± 0.45' signed: a difference); no std for one seed; 'n/a' without a mean."""
    if _is_nan(mean):
        return "n/a"
    value = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return value if _is_nan(std) else f"{value} ± {std:.2f}"


def paired_delta(runs: dict[str, dict], name: str, key: str = "miou_best") -> tuple[float, float]:
    """Mean ± std over the seeds both `name` and supervised ran of (name - supervised): the split's luck cancels."""
    own, sup = runs.get(name, {}), runs.get("supervised", {})
    return mean_std([own[seed][key] - sup[seed][key] for seed in own if seed in sup])


def _format_duration(seconds: float | None) -> str:

    return "n/a" if _is_nan(seconds) else format_duration(seconds)


TABLE_HEADER = (
    "method", "seeds", "mIoU best", "mIoU last", "Δ best vs supervised", "gap closed %", "train time", "images/s"
)  # fmt: skip


def table_rows(results: dict) -> list[tuple[str, ...]]:
    """One formatted row per method of results['summary'], in results['methods'] order (see TABLE_HEADER)."""
    rows = []
    for name in results["methods"]:
        s = results["summary"].get(name, {})
        best, last = s.get("miou_best", {}), s.get("miou_last", {})
        gap = s.get("gap_closed_best")
        ips = s.get("images_per_second")
        delta = s.get("delta_best") or {}
        rows.append(
            (
                name,
                str(s.get("seeds", 0)),
                format_mean_std(best.get("mean"), best.get("std")),
                format_mean_std(last.get("mean"), last.get("std")),
                "-" if name == "supervised" else format_mean_std(delta.get("mean"), delta.get("std"), signed=True),
                "n/a" if _is_nan(gap) else f"{gap:.1f}",
                _format_duration(s.get("train_seconds")),
                "n/a" if _is_nan(ips) else f"{ips:.1f}",
            )
        )
    return rows


def protocol_lines(results: dict) -> list[str]:
    """The protocol in a few human-readable lines (results.md, report.html)."""
    p = results["protocol"]
    seeds = ",".join(str(s) for s in p["seeds"])
    res = p.get("resolution") or [0, 0]
    every = f"evaluated every {p['eval_every']} steps" if p["eval_every"] else "evaluated at the end only"
    lines = [
        f"preset `{p['preset']}`: {p['dataset']} at `{p['data_root']}`",
        f"labeled {p['labeled']} of {p['train_split']} ({p['labeled_count']} labeled / {p['unlabeled_count']} "
        f"unlabeled of {p['train_count']}), seeds {seeds} (split and training seed); "
        f"`full` uses all {p['train_count']} labels"
        + (f" and trains {p['full_iters']} iterations" if p.get("full_iters", p["iters"]) != p["iters"] else ""),
        f"model {p['model']}; images {res[0]}x{res[1]} (resize {p['resize']:g}), crop {p['crop']}, "
        f"{p['iters']} iterations, batch {p['batch_size']} labeled + {p['batch_size_u']} unlabeled",
        f"evaluation on {p['eval_split']} ({p['eval_images']} images, {p['eval_mode']}); best = the checkpoint with "
        f"the best {p['val_split']} mIoU ({every}), last = the final model; mean ± sample std over seeds",
        "Δ best vs supervised = mean ± std over seeds of (method - supervised) best mIoU on the same split (paired: "
        "the luck of a split cancels); gap closed % = (method - supervised) / (full - supervised) x 100 on the mean "
        "best mIoU over the seeds all three ran",
        "machine: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()),
    ]
    return lines


def seed_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The per-seed table: header [method, seed 0, ...] over the protocol's seeds, and one row per method whose cells
    read `best (step of the best) / last`, or `-` for a seed the method has not (yet) run."""
    seeds = [str(s) for s in results["protocol"]["seeds"]]
    rows = []
    for name in results["methods"]:
        runs = results["runs"].get(name, {})
        cells = []
        for seed in seeds:
            r = runs.get(seed)
            step = "" if r is None or r.get("best_step") is None else f" ({r['best_step']})"
            cells.append("-" if r is None else f"{r['miou_best']:.2f}{step} / {r['miou_last']:.2f}")
        rows.append([name, *cells])
    return ["method", *(f"seed {s}" for s in seeds)], rows


def format_markdown(results: dict) -> str:
    """results.md: the comparison table, the per-seed table, the pseudo-label table when any, and the protocol."""
    rows = table_rows(results)
    out = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TABLE_HEADER) - 1)) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    header, per_seed = seed_rows(results)
    out += ["", "Per split seed, best mIoU (step of the best) / last mIoU:", ""]
    out += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(row) + " |" for row in per_seed]
    out += pseudo_label_lines(results)
    out += ["", "Protocol:", ""] + [f"- {line}" for line in protocol_lines(results)]
    commands = command_list(results["protocol"])
    out += [""] + [f"Command: `{c}`" for c in commands]
    return "\n".join(out) + "\n"


def command_list(protocol: dict) -> list[str]:
    """Every bench command whose runs the results hold, oldest first (one for a folder benched once)."""
    return list(protocol.get("commands") or [protocol["command"]])


MERGE_KEYS = (
    "preset", "dataset", "data_root", "train_split", "labeled", "eval_split", "val_split", "iters", "full_iters",
    "resize", "crop", "batch_size", "batch_size_u", "eval_mode", "eval_every",
)  # fmt: skip
"""protocol fields two benches into one folder must share for their runs to form one table"""


def merge_previous(results: dict, previous: dict) -> str | None:
    """Carry the runs of an earlier bench into the same folder over into `results` (in place), or say why not.

    Benches into one folder with different --methods / --seeds (say, three seeds of the baselines, then one seed of
    the rest) make one table: methods in the order first benched (supervised first, full last), seeds and commands
    united; a run both hold keeps the new record. Returns None when merged, else the protocol field that differs
    (nothing is carried over then).
    """
    p, q = results["protocol"], previous.get("protocol") or {}
    for key in MERGE_KEYS:
        if q.get(key) != p.get(key):
            return key
    for name, seeds in previous.get("runs", {}).items():
        for seed, record in seeds.items():
            results["runs"].setdefault(name, {}).setdefault(seed, record)
    middle = [m for m in [*previous.get("methods", []), *results["methods"]] if m not in REFERENCES]
    results["methods"] = ["supervised", *dict.fromkeys(middle), "full"]
    p["seeds"] = sorted({*q.get("seeds", []), *p["seeds"]})
    p["commands"] = list(dict.fromkeys([*command_list(q), p["command"]]))
    results["summary"] = summarize(results["runs"], results["methods"])
    return None


def _pl_miou(diag: dict | None, key: str) -> str:
    miou = ((diag or {}).get(key) or {}).get("miou")
    return "-" if miou is None else f"{miou:.2f}"


PSEUDO_LABEL_CAPTION = (
    "Pseudo-labels of the unlabeled images against their ground truth, mIoU % (a diagnostic, never used to "
    "train). ST++/BST rank the images by stability: the teacher's labels of the reliable (stable) half vs the "
    "unreliable half test ST++'s premise; training used the teacher's labels of the reliable half and the "
    "first student's re-labels of the unreliable half; ST labels all images once with the teacher:"
)
PSEUDO_LABEL_HEADER = (
    "method", "seed", "teacher, reliable", "teacher, unreliable", "used, reliable", "used, unreliable", "used, all"
)  # fmt: skip


def pseudo_label_rows(results: dict) -> list[list[str]]:
    """Rows of PSEUDO_LABEL_HEADER: one per self-training run with pseudo-label diagnostics, in method order."""
    rows = []
    for name in results["methods"]:
        for seed, run in sorted(results["runs"].get(name, {}).items(), key=lambda kv: int(kv[0])):
            diag = run.get("pseudo_labels")
            if not diag:
                continue
            teacher = diag.get("teacher_on_selection")
            cells = [_pl_miou(teacher, "reliable"), _pl_miou(teacher, "unreliable")]
            cells += [_pl_miou(diag, "reliable"), _pl_miou(diag, "unreliable"), _pl_miou(diag, "all")]
            rows.append([name, str(seed), *cells])
    return rows


def pseudo_label_lines(results: dict) -> list[str]:
    """The pseudo-label table in markdown (results.md), or nothing when no run pseudo-labels."""
    rows = pseudo_label_rows(results)
    if not rows:
        return []
    return [
        "",
        PSEUDO_LABEL_CAPTION,
        "",
        "| " + " | ".join(PSEUDO_LABEL_HEADER) + " |",
        "|---|" + "---:|" * (len(PSEUDO_LABEL_HEADER) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def summarize(runs: dict[str, dict[str, dict]], order: Sequence[str]) -> dict[str, dict]:
    """Per method: mean/std of best and last mIoU over seeds, gap closed, mean time/throughput, mean class IoU."""
    summary: dict[str, dict] = {}
    for name in order:
        records = list(runs.get(name, {}).values())
        best, last = mean_std([r["miou_best"] for r in records]), mean_std([r["miou_last"] for r in records])
        classes = list(dict.fromkeys(c for r in records for c in r["iou_best"]))
        summary[name] = {
            "seeds": len(records),
            "miou_best": {"mean": best[0], "std": best[1]},
            "miou_last": {"mean": last[0], "std": last[1]},
            "train_seconds": mean_std([r["train_seconds"] for r in records])[0],
            "images_per_second": mean_std([r["images_per_second"] for r in records])[0],
            "peak_memory_mb": max((r["peak_memory_mb"] for r in records), default=math.nan),
            "steps": records[0]["steps"] if records else None,
            "iou_best": {c: mean_std([r["iou_best"].get(c) for r in records])[0] for c in classes},
        }
        delta = paired_delta(runs, name)
        summary[name]["delta_best"] = {"mean": delta[0], "std": delta[1]}
    for name in order:
        # on the seeds the method and both references ran, so that a bench still running compares like with like
        trio = [runs.get(n, {}) for n in (name, *REFERENCES)]
        seeds = [seed for seed in trio[0] if all(seed in r for r in trio[1:])]
        for which in ("best", "last"):
            m, s, f = (mean_std([r[seed][f"miou_{which}"] for seed in seeds])[0] for r in trio)
            summary[name][f"gap_closed_{which}"] = gap_closed(m, s, f)
    return summary


def run_folder_name(entry: str) -> str:
    """The run folder of a bench entry: `dssn:align=none` -> `dssn+align=none` (no ':' in paths)."""
    return entry.replace(":", "+").replace("/", "_")


def read_results(bench_dir: str | Path) -> dict:
    """The results.json of a bench folder (NaN numbers are stored as null)."""
    path = Path(bench_dir) / "results.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; run `semiseg bench PRESET --methods ... --out {bench_dir}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err})") from None

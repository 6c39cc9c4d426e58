"""report.html of a bench folder: results table, protocol, training curves, per-class IoU and a prediction gallery.

One self-contained file: plots (matplotlib, Agg backend) and gallery images are embedded as base64 PNGs, so the
page can be attached to an issue or mailed as it is. Without matplotlib the tables and the gallery still render
and the page says how to get the plots. `semiseg bench --report-only --out DIR` rebuilds it from the folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semiseg.errors import CheckpointError, DataError
from semiseg.results import (
    PSEUDO_LABEL_CAPTION,
    PSEUDO_LABEL_HEADER,
    REFERENCES,
    TABLE_HEADER,
    command_list,
    format_mean_std,
    protocol_lines,
    pseudo_label_rows,
    read_results,
    run_folder_name,
    table_rows,
)

PLOTS_HINT = "plots need matplotlib: pip install semiseg[report]"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.reference td { color: #666; } td.top { font-weight: bold; }
code { background: #f3f3f3; padding: 1px 4px; }
.note { color: #a33; }
img.plot { max-width: 100%; }
table.gallery td, table.gallery th { text-align: center; vertical-align: top; font-size: 12px; padding: 4px; }
table.gallery th { max-width: var(--cell); overflow-wrap: anywhere; }
table.gallery img { width: var(--cell); display: block; margin: 0 auto 2px; image-rendering: pixelated; }
.swatch { display: inline-block; width: 14px; height: 14px; vertical-align: middle; margin: 0 4px 0 10px;
          border: 1px solid #999; }
"""


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of a run's metrics.jsonl; a later line wins (a resumed run repeats some steps)."""
    curves: dict[str, dict[int, float]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return curves
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        step = row.get("step")
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and step is not None:
                curves.setdefault(key, {})[int(step)] = float(value)
    return curves


def png_bytes(image: np.ndarray) -> bytes:
    """PNG file bytes of a uint8 (H, W, 3) or (H, W) array."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _img(data: bytes, css: str = "", alt: str = "") -> str:
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    return f'<img class="{css}" alt="{html.escape(alt)}" src="{src}">'


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _figure_png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _run_dir(bench_dir: Path, name: str, seed: int | str) -> Path:

    return bench_dir / "runs" / run_folder_name(name) / f"seed{seed}"


CURVE_PANELS = (
    ("train/loss", "total loss (each method's own objective)"),
    ("train/loss_x", "labeled loss (comparable)"),
)


def plot_curves(plt, results: dict, bench_dir: Path) -> bytes:
    """PNG: losses and val mIoU vs step, one colour per method (first seed solid, other seeds faint)."""
    fig, axes = plt.subplots(1, len(CURVE_PANELS) + 1, figsize=(16, 4.2))
    colors = _colors(plt, len(results["methods"]))
    for i, name in enumerate(results["methods"]):
        for j, seed in enumerate(results["protocol"]["seeds"]):
            curves = read_metrics(_run_dir(bench_dir, name, seed))
            style = {"color": colors(i), "alpha": 1.0 if j == 0 else 0.35, "linewidth": 1.4 if j == 0 else 0.8}
            for ax, (key, _) in zip(axes, CURVE_PANELS):
                steps = sorted(curves.get(key, {}))
                if steps:
                    # short runs log a handful of points: markers keep a one-point curve visible
                    marker = "o" if len(steps) <= 20 else None
                    label = name if j == 0 else None
                    ax.plot(steps, [curves[key][s] for s in steps], marker=marker, markersize=3, label=label, **style)
            nets = sorted(k for k in curves if re.fullmatch(r"val/[^/]+/miou", k))
            for k, key in enumerate(nets):
                steps = sorted(curves[key])
                label = (name if len(nets) == 1 else f"{name} ({key.split('/')[1]})") if j == 0 else None
                axes[-1].plot(
                    steps, [curves[key][s] for s in steps], marker="o", markersize=3, label=label,
                    linestyle=("-", "--", ":")[k % 3], **style,
                )  # fmt: skip
    for ax, (key, title) in zip(axes, CURVE_PANELS):
        ax.set(xlabel="step", ylabel=key, title=title)
    axes[-1].set(xlabel="step", ylabel="mIoU %", title=f"{results['protocol']['val_split']} mIoU during training")
    for ax in axes:
        ax.grid(alpha=0.3)
    # Legends below the panels, never over the curves: the loss panels share one (methods), the mIoU panel has its
    # own (one line per evaluated net).
    for ax in (axes[0], axes[-1]):
        entries = len(ax.get_legend_handles_labels()[1])
        if entries:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2 if entries > 4 else 1)
    return _figure_png(plt, fig)


def _colors(plt, n: int):
    """One distinct colour per method index: tab10 up to 10 methods, tab20 up to 20, then it repeats."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    size = 10 if n <= 10 else 20
    return lambda i: cmap(i % size)


def plot_class_iou(plt, results: dict) -> bytes:
    """PNG: per-class IoU of the best checkpoints (mean over seeds), grouped by class, one bar per method."""
    classes = results["protocol"]["classes"]
    methods = results["methods"]
    fig, ax = plt.subplots(figsize=(13, 4.2))
    width = 0.8 / max(len(methods), 1)
    colors = _colors(plt, len(methods))
    x = np.arange(len(classes))
    for i, name in enumerate(methods):
        iou = results["summary"].get(name, {}).get("iou_best", {})
        values = [math.nan if iou.get(c) is None else iou[c] for c in classes]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=name, color=colors(i))
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set(ylabel="IoU %", title=f"per-class IoU on {results['protocol']['eval_split']} (best checkpoint)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    return _figure_png(plt, fig)


def gallery_indices(n_items: int, n: int) -> list[int]:
    """`n` indices spread evenly over 0..n_items-1 (first and last included), fixed for a given split size."""
    if n_items <= 0 or n <= 0:
        return []
    if n == 1 or n_items == 1:
        return [0]
    return sorted({round(i * (n_items - 1) / (min(n, n_items) - 1)) for i in range(min(n, n_items))})


def predict_mask(model: torch.nn.Module, image: np.ndarray, cfg, info) -> np.ndarray:
    """uint8 (H, W) class indices of uint8 (H, W, 3) `image`, in the run's evaluation mode."""
    from semiseg.engine.evaluate import predict, to_unit

    mode = cfg.eval.mode or info.eval_mode
    x = to_unit(torch.from_numpy(image.copy()).permute(2, 0, 1)[None])
    scores = predict(
        model,
        x,
        "whole" if mode == "center_crop" else mode,
        num_classes=info.num_classes,
        window=cfg.eval.window or cfg.data.crop,
        stride=cfg.eval.stride,
        scales=cfg.eval.scales,
        flip=cfg.eval.flip,
    )
    return scores[0].argmax(0).to(torch.uint8).numpy()


GALLERY_METHODS = 6
"""predictions per gallery table; more methods continue in another table"""


def gallery_html(results: dict, bench_dir: Path, n_images: int, data_root: str | None) -> str:
    """Rows of input | ground truth | each method's prediction (best checkpoint, first seed) on fixed images."""
    import dataclasses

    from semiseg.data.datasets import build_dataset
    from semiseg.engine.checkpoint import load_export
    from semiseg.methods import METHODS
    from semiseg.predict import colorize

    protocol = results["protocol"]
    seed = protocol["seeds"][0]
    models, dataset, problems = {}, None, []
    for name in results["methods"]:
        export = _run_dir(bench_dir, name, seed) / "best.safetensors"
        if not export.is_file():
            problems.append(f"{name}: no {export}")
            continue
        try:
            cfg, model, info = load_export(export, METHODS)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        models[name] = (cfg, model.eval(), info)
        if dataset is None:
            data = dataclasses.replace(cfg.data, root=data_root) if data_root else cfg.data
            try:
                dataset = build_dataset(data, protocol["eval_split"])
            except DataError as err:
                return f'<p class="note">gallery skipped: {html.escape(str(err))}</p>'
    if dataset is None:
        return '<p class="note">gallery skipped: no trained model yet</p>'
    palette = [tuple(c) for c in protocol["palette"]]
    legend = "".join(
        f'<span class="swatch" style="background: rgb{tuple(c)}"></span>{html.escape(name)}'
        for name, c in [*zip(protocol["classes"], palette), ("void (ignored)", (0, 0, 0))]
    )
    # Many methods: several tables of at most GALLERY_METHODS predictions, each repeating image and ground truth,
    # so that every picture keeps a readable width and no table runs off the page.
    names = list(models)
    chunks = [names[i : i + GALLERY_METHODS] for i in range(0, len(names), GALLERY_METHODS)] or [[]]
    width = max(96, min(240, 1100 // (2 + max(len(c) for c in chunks))))
    samples = [dataset[index] for index in gallery_indices(len(dataset), n_images)]
    cells_of: dict[str, list[str]] = {}
    for name, (cfg, model, info) in models.items():
        cells_of[name] = []
        for sample in samples:
            valid = sample.mask != 255
            pred = predict_mask(model, sample.image, cfg, info)
            acc = 100 * float((pred == sample.mask)[valid].mean()) if valid.any() else math.nan
            cells_of[name].append(f"<td>{_img(png_bytes(colorize(pred, palette)), alt=name)}pixel acc {acc:.1f}%</td>")
    fixed = [
        (
            f"<td>{_img(png_bytes(sample.image), alt=sample.id)}{html.escape(sample.id)}</td>"
            f"<td>{_img(png_bytes(colorize(sample.mask, palette)), alt='ground truth')}</td>"
        )
        for sample in samples
    ]
    tables = []
    for chunk in chunks:
        head = "".join(f"<th>{html.escape(n)}</th>" for n in ["image", "ground truth", *chunk])
        rows = ["<tr>" + fixed[r] + "".join(cells_of[n][r] for n in chunk) + "</tr>" for r in range(len(samples))]
        tables.append(f"<table class='gallery' style='--cell: {width}px'><tr>{head}</tr>{''.join(rows)}</table>")
    notes = "".join(f'<p class="note">{html.escape(p)}</p>' for p in problems)
    return (
        f"<p>{legend}</p>{notes}{''.join(tables)}"
        f"<p>best checkpoints of seed {seed}; void pixels are black in the ground truth and excluded from pixel acc</p>"
    )


def _markdown_inline(text: str) -> str:
    """Escape text, then render `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def results_table_html(results: dict) -> str:
    """The comparison table (as in results.md); the best non-reference mean best mIoU in bold."""
    summary = results["summary"]
    candidates = [n for n in results["methods"] if n not in REFERENCES]
    means = {n: summary.get(n, {}).get("miou_best", {}).get("mean") for n in candidates}
    top = max((n for n in candidates if means[n] is not None), key=lambda n: means[n], default=None)
    best_col = TABLE_HEADER.index("mIoU best")
    out = ["<table class='results'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in TABLE_HEADER) + "</tr>"]
    for name, row in zip(results["methods"], table_rows(results)):
        css = " class='reference'" if name in REFERENCES else ""
        marks = ["" if (name, j) != (top, best_col) else " class='top'" for j in range(len(row))]
        cells = [f"<td{mark}>{html.escape(v)}</td>" for mark, v in zip(marks, row)]
        out.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def runs_table_html(results: dict) -> str:
    """Every run: method, seed, best (step), last, time, throughput, peak memory (n/a: only measured on CUDA)."""
    head = ["method", "seed", "mIoU best", "best step", "mIoU last", "train s", "images/s", "peak MB"]
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for name in results["methods"]:
        for seed, r in sorted(results["runs"].get(name, {}).items(), key=lambda kv: int(kv[0])):
            values = [
                name, seed, format_mean_std(r.get("miou_best"), None), r.get("best_step"),
                format_mean_std(r.get("miou_last"), None), r.get("train_seconds"), r.get("images_per_second"),
                r.get("peak_memory_mb") or "n/a",
            ]  # fmt: skip
            out.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>")
    return "".join(out) + "</table>"


def class_table_html(results: dict) -> str:
    """Per-class IoU (best checkpoint, mean over seeds): one row per method, one column per class."""
    classes = results["protocol"]["classes"]
    out = ["<table><tr><th>method</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in classes) + "</tr>"]
    for name in results["methods"]:
        iou = results["summary"].get(name, {}).get("iou_best", {})
        cells = "".join(f"<td>{format_mean_std(iou.get(c), None)}</td>" for c in classes)
        out.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return "".join(out) + "</table>"


def pseudo_label_html(results: dict) -> str:
    """The pseudo-label quality table of self-training runs (results.md's), or nothing when no run has one."""

    rows = pseudo_label_rows(results)
    if not rows:
        return ""
    out = [f"<h2>Pseudo-labels</h2><p>{html.escape(PSEUDO_LABEL_CAPTION)}</p><table>"]
    out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in PSEUDO_LABEL_HEADER) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


def write_report(bench_dir: str | Path, n_images: int = 4, data_root: str | None = None) -> Path:
    """Write bench_dir/report.html from results.json, the runs' metrics.jsonl and best exports; its path."""
    from semiseg import atomic

    bench_dir = Path(bench_dir)
    results = read_results(bench_dir)
    p = results["protocol"]
    plt = _pyplot()
    if plt is None:
        curves = classes_plot = f'<p class="note">{html.escape(PLOTS_HINT)}</p>'
    else:
        curves = _img(plot_curves(plt, results, bench_dir), "plot", "training curves")
        classes_plot = _img(plot_class_iou(plt, results), "plot", "per-class IoU")
    title = f"semiseg bench: {p['dataset']}, {p['labeled']} labeled"
    protocol = "".join(f"<li>{_markdown_inline(line)}</li>" for line in protocol_lines(results))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{"".join(f"<p><code>{html.escape(c)}</code></p>" for c in command_list(p))}
<h2>Results on {html.escape(p["eval_split"])}</h2>
{results_table_html(results)}
<ul>{protocol}</ul>
<h2>Runs</h2>
{runs_table_html(results)}
<h2>Training curves</h2>
{curves}
<h2>Per-class IoU</h2>
{classes_plot}
{class_table_html(results)}
{pseudo_label_html(results)}
<h2>Predictions on {html.escape(p["eval_split"])}</h2>
{gallery_html(results, bench_dir, n_images, data_root)}
</body></html>
"""
    path = bench_dir / "report.html"
    atomic.write_text(path, page)
    return path

"""`semiseg demo`: the supervised baseline and UniMatch on the embedded synthetic dataset, on CPU, in minutes.

Both methods train the same model for the same number of steps on the same 20 labeled images; UniMatch also
sees the other 380 training images without labels. The demo prints a comparison table and leaves a run folder
with both models (safetensors), their metrics, and a gallery of predictions next to the ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from semiseg import config as config_mod
from semiseg.engine.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from semiseg.engine.log import format_duration

METHODS = {"supervised": [], "unimatch": ["method.tau=0.8"]}
"""the demo's methods and the overrides each trains with. UniMatch's confidence threshold is 0.8, not the reference
0.95: the demo trains from scratch for 400 steps, where few object pixels reach 0.95 and the pseudo-labels are mostly
background; over 8 seeds 0.8 gained on every one and 0.95 lost on one (README, demo section)"""
PRESET = Path(__file__).parent / "presets" / "demo.yaml"
QUICK = [
    "train.iters=6",
    "eval.every=0",
    "data.synthetic_train=40",
    "data.synthetic_val=8",
    "data.labeled=8",
    "data.workers=0",
    "train.log_every=3",
]
"""overrides of `semiseg demo --quick`: a seconds-long smoke run"""


def demo_config(name: str, quick: bool = False, seed: int = 0) -> config_mod.Config:
    """The demo preset with `method.name` set to `name`, that method's demo overrides, and `train.seed`."""
    overrides = [f"method.name={name}", *METHODS[name], f"train.seed={seed}"] + (QUICK if quick else [])
    return config_mod.load(PRESET, overrides)


def gallery(runs: dict, cfg: config_mod.Config, out: Path, count: int = 4) -> Path:
    """A PNG grid: one row per val image (input | ground truth | each method's prediction)."""
    from semiseg.data.datasets import build_dataset
    from semiseg.engine.evaluate import predict_whole, to_unit
    from semiseg.predict import colorize, overlay

    val = build_dataset(cfg.data, cfg.data.val_split)
    info = val.info
    rows = []
    for i in range(min(count, len(val))):
        sample = val[i]
        x = to_unit(torch.from_numpy(sample.image).permute(2, 0, 1)[None])
        cells = [sample.image, colorize(sample.mask, info.palette)]
        for name in runs:
            pred = predict_whole(runs[name].nets[runs[name].best.get("net") or "model"], x).argmax(1)[0].numpy()
            cells.append(overlay(sample.image, colorize(pred.astype(np.uint8), info.palette), alpha=0.6))
        rows.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 384 // grid.shape[1] + 1)
    body = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    image = Image.new("RGB", (body.width, body.height + 16), "white")
    image.paste(body, (0, 16))
    draw = ImageDraw.Draw(image)
    cell = body.width // (2 + len(runs))
    for i, title in enumerate(["input", "ground truth", *runs]):
        draw.text((i * cell + 4, 2), title, fill="black")
    path = out / "gallery.png"
    atomic_write_bytes(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def table(results: dict, classes: tuple[str, ...]) -> str:
    """Plain-text comparison: mIoU best/last, training time, per-class IoU."""
    short = [c[:8] for c in classes]
    head = f"{'method':<11} {'best':>6} {'last':>6} {'time':>6}  " + " ".join(f"{c:>8}" for c in short)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        ious = " ".join(f"{r['iou'].get(c, float('nan')):8.1f}" for c in classes)
        lines.append(f"{name:<11} {r['best']:6.2f} {r['last']:6.2f} {format_duration(r['seconds']):>6}  {ious}")
    return "\n".join(lines)


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> int:
    """Train every demo method (resuming finished or interrupted runs), print the table, write the summary."""
    from semiseg.bench import check_run_config
    from semiseg.data.synthetic import describe
    from semiseg.engine.loop import fit
    from semiseg.methods import METHODS as ALL

    out = Path(out)
    base = demo_config("supervised", quick, seed)
    d = base.data
    print(describe(d.synthetic_size, d.synthetic_train, d.synthetic_val, d.synthetic_seed))
    n_unlabeled = d.synthetic_train - int(d.labeled)
    print(f"labeled: {d.labeled} images; unlabeled: the other {n_unlabeled}; val: {d.synthetic_val}")
    model = f"{base.model.backbone} width {base.model.width}, {base.model.head}"
    print(f"model: {model}; {base.train.iters} steps each, seed {seed}")
    print(f"UniMatch overrides: {' '.join(METHODS['unimatch'])} (README: why)\n")
    t0 = time.perf_counter()
    runs, results = {}, {}
    for name in METHODS:
        print(f"== {name} ==")
        cfg = demo_config(name, quick, seed)
        check_run_config(out / name, cfg)  # a run folder of an older demo is refused, not silently resumed
        r = fit(cfg, out / name, ALL[name])
        runs[name] = r
        results[name] = {
            "best": r.best["miou"],
            "best_step": r.best["step"],
            "last": r.last["miou"],
            "iou": r.last["iou"],
            "seconds": r.train_seconds,
            "images_per_second": r.images_per_second,
        }
    classes = tuple(next(iter(results.values()))["iou"])
    text = table(results, classes)
    gain = results["unimatch"]["best"] - results["supervised"]["best"]
    summary = (
        f"{text}\n\nUniMatch vs supervised: {gain:+.2f} mIoU (best of the evaluations during training; "
        f"{base.train.iters} steps each, {d.labeled} labeled images, whole-image val mIoU %)"
    )
    print("\n" + summary)
    path = gallery(runs, base, out)
    print(f"\nrun folder: {out}  (models: */best.safetensors, metrics: */metrics.jsonl, predictions: {path.name})")
    print(f"total time {format_duration(time.perf_counter() - t0)}")
    atomic_write_text(out / "summary.txt", summary + "\n")
    atomic_write_json(out / "summary.json", {"config": config_mod.to_dict(base), "results": results, "gain": gain})
    return 0

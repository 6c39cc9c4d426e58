"""Per-class pseudo-labels of a bench's trained models on their unlabeled images: which classes the unlabeled loss
can train at all. A diagnostic for "why does the semi-supervised method not beat the labeled-only model?".

usage: python benchmarks/pseudo_label_classes.py BENCH_DIR --methods supervised,unimatch [--seeds 0,1,2]
           [--tau 0.95] [--every 3] [--checkpoint last] [--data-root PATH]
e.g.   python benchmarks/pseudo_label_classes.py runs/bench/camvid_pt --methods supervised,unimatch \
           --data-root /work/shared/data/camvid

For each run (BENCH_DIR/runs/<method>/seed<S>/<checkpoint>.safetensors) the model labels every --every-th image of
that seed's unlabeled list (BENCH_DIR/splits/seed<S>/unlabeled.txt, whose masks are used here only, never in
training), whole image, as the weak view is labeled in training. Printed per class: its share of the pixels,
coverage = the share of its pixels that get a confident (>= tau) and correct pseudo-label (the pixels the unlabeled
loss trains towards that class), and the precision of the confident labels of that class; one column per run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from semiseg.data.datasets import build_dataset  # noqa: E402
from semiseg.engine.checkpoint import load_export  # noqa: E402
from semiseg.engine.evaluate import predict_whole, to_unit  # noqa: E402
from semiseg.methods import METHODS  # noqa: E402
from semiseg.ops import confident_class_counts  # noqa: E402


def run_counts(export: Path, unlabeled: Path, tau: float, every: int, overrides: list[str]):
    """(class names, (3, K) counts of ops.confident_class_counts summed over the images) for one run."""
    cfg, model, info = load_export(export, METHODS, overrides)
    data = build_dataset(cfg.data, str(unlabeled))
    counts = torch.zeros(3, info.num_classes, dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(data), every):
            sample = data[i]
            image = torch.from_numpy(sample.image.copy()).permute(2, 0, 1)[None]
            conf, label = predict_whole(model, to_unit(image)).softmax(1)[0].max(0)
            gt = torch.from_numpy(sample.mask.copy())
            counts += confident_class_counts(conf, label, gt, tau, info.num_classes)
    return info.classes, counts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bench_dir", type=Path)
    p.add_argument("--methods", default="supervised,unimatch", help="comma-separated bench entries")
    p.add_argument("--seeds", default="0")
    p.add_argument("--tau", type=float, default=0.95, help="confidence threshold (the methods' tau)")
    p.add_argument("--every", type=int, default=3, help="label every N-th unlabeled image")
    p.add_argument("--checkpoint", default="last", choices=["last", "best"])
    p.add_argument("--data-root", default="", help="the dataset's folder, when not where the runs found it")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = [f"data.root={args.data_root}"] if args.data_root else []

    columns, classes = {}, None
    for seed in args.seeds.split(","):
        for name in args.methods.split(","):
            run = args.bench_dir / "runs" / name.replace(":", "+") / f"seed{seed}"
            unlabeled = args.bench_dir / "splits" / f"seed{seed}" / "unlabeled.txt"
            classes, columns[f"{name} s{seed}"] = run_counts(
                run / f"{args.checkpoint}.safetensors", unlabeled, args.tau, args.every, overrides
            )
    share = next(iter(columns.values()))[0].double()
    share = share / share.sum()
    print(f"{args.bench_dir}: confident (>= {args.tau}) pseudo-labels of the {args.checkpoint} models on 1 in "
          f"{args.every} unlabeled images; coverage % / precision % per class")  # fmt: skip
    print(f"{'class':<12} {'pixels %':>8} | " + " | ".join(f"{c:>17}" for c in columns))
    for k, name in enumerate(classes):
        cells = []
        for c in columns.values():
            cover = 100 * c[1, k].item() / max(c[0, k].item(), 1)
            prec = 100 * c[1, k].item() / max(c[2, k].item(), 1)
            cells.append(f"{cover:7.1f} / {prec:5.1f}")
        print(f"{name[:12]:<12} {100 * share[k].item():8.1f} | " + " | ".join(f"{x:>17}" for x in cells))


if __name__ == "__main__":
    main()

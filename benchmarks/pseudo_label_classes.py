"""Per-class pseudo-labels of a bench's trained models on their unlabeled images: which classes the unlabeled loss
can train at all. A diagnostic for "why does the semi-supervised method not beat the labeled-only model?".

usage: python benchmarks/pseudo_label_classes.py BENCH_DIR --methods supervised,unimatch [--seeds 0,1,2]
           [--tau 0.95[,0.8,class_aware]] [--every 3] [--checkpoint last] [--data-root PATH]
e.g.   python benchmarks/pseudo_label_classes.py runs/bench/camvid_pt --methods supervised,unimatch \
           --data-root /work/shared/data/camvid

For each run (BENCH_DIR/runs/<method>/seed<S>/<checkpoint>.safetensors) the model labels every --every-th image of
that seed's unlabeled list (BENCH_DIR/splits/seed<S>/unlabeled.txt, whose masks are used here only, never in
training), whole image, as the weak view is labeled in training. Printed per class: its share of the pixels,
coverage = the share of its pixels that get a confident (>= tau) and correct pseudo-label (the pixels the unlabeled
loss trains towards that class), and the precision of the confident labels of that class; one column per run and
selection rule. Rules (--tau, comma-separated): a threshold (conf >= tau), or `class_aware` (DSSN's per-image,
per-class cut, ops.class_aware_selection with its defaults 0.96 / 0.92): would another rule give a class pixels
that are confident, correct, and precise enough to train on?
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
from semiseg.ops import class_aware_selection, confident_class_counts  # noqa: E402


def run_counts(export: Path, unlabeled: Path, rules: dict[str, float | None], every: int, overrides: list[str]):
    """(class names, {rule: (3, K) counts of ops.confident_class_counts summed over the images}) for one run;
    rules: name -> threshold, None for class_aware."""
    cfg, model, info = load_export(export, METHODS, overrides)
    data = build_dataset(cfg.data, str(unlabeled))
    counts = {rule: torch.zeros(3, info.num_classes, dtype=torch.int64) for rule in rules}
    with torch.no_grad():
        for i in range(0, len(data), every):
            sample = data[i]
            image = torch.from_numpy(sample.image.copy()).permute(2, 0, 1)[None]
            prob = predict_whole(model, to_unit(image)).softmax(1)
            conf, label = prob[0].max(0)
            gt = torch.from_numpy(sample.mask.copy())
            for rule, tau in rules.items():
                if tau is None:  # class_aware: the selection as a 0/1 confidence, cut at 0.5
                    kept = class_aware_selection(prob)[0].float()
                    counts[rule] += confident_class_counts(kept, label, gt, 0.5, info.num_classes)
                else:
                    counts[rule] += confident_class_counts(conf, label, gt, tau, info.num_classes)
    return info.classes, counts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("bench_dir", type=Path)
    p.add_argument("--methods", default="supervised,unimatch", help="comma-separated bench entries")
    p.add_argument("--seeds", default="0")
    p.add_argument("--tau", default="0.95", help="selection rules: thresholds (the methods' tau) or class_aware")
    p.add_argument("--every", type=int, default=3, help="label every N-th unlabeled image")
    p.add_argument("--checkpoint", default="last", choices=["last", "best"])
    p.add_argument("--data-root", default="", help="the dataset's folder, when not where the runs found it")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = [f"data.root={args.data_root}"] if args.data_root else []
    rules: dict[str, float | None] = {}
    for rule in args.tau.split(","):
        try:
            rules[rule] = None if rule == "class_aware" else float(rule)
        except ValueError:
            p.error(f"--tau: {rule!r} is neither a threshold nor class_aware")

    columns, classes = {}, None
    for seed in args.seeds.split(","):
        for name in args.methods.split(","):
            run = args.bench_dir / "runs" / name.replace(":", "+") / f"seed{seed}"
            unlabeled = args.bench_dir / "splits" / f"seed{seed}" / "unlabeled.txt"
            classes, counts = run_counts(
                run / f"{args.checkpoint}.safetensors", unlabeled, rules, args.every, overrides
            )
            for rule, c in counts.items():
                columns[f"{name} s{seed}" + (f" {rule}" if len(rules) > 1 else "")] = c
    share = next(iter(columns.values()))[0].double()
    share = share / share.sum()
    print(f"{args.bench_dir}: confident ({args.tau}) pseudo-labels of the {args.checkpoint} models on 1 in "
          f"{args.every} unlabeled images; coverage % / precision % per class")  # fmt: skip
    print(f"{'class':<12} {'pixels %':>8} | " + " | ".join(f"{c:>17}" for c in columns))
    total = [100 * c[1].sum().item() / max(c[0].sum().item(), 1) for c in columns.values()]
    for k, name in enumerate(classes):
        cells = []
        for c in columns.values():
            cover = 100 * c[1, k].item() / max(c[0, k].item(), 1)
            prec = 100 * c[1, k].item() / max(c[2, k].item(), 1)
            cells.append(f"{cover:7.1f} / {prec:5.1f}")
        print(f"{name[:12]:<12} {100 * share[k].item():8.1f} | " + " | ".join(f"{x:>17}" for x in cells))
    print(f"{'all pixels':<12} {100.0:8.1f} | " + " | ".join(f"{t:7.1f}{'':>10}" for t in total))


if __name__ == "__main__":
    main()

"""The `semiseg` command: demo, train, eval, predict, split, data-check, data get, bench, weak derive, suggest.

Errors the user can fix (a bad config key, a missing file, a wrong label value) are printed as one line and the
command exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semiseg.errors import SemisegError


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. --set data.crop=321 optim.lr=0.002",
    )


def _default_run_dir(config_path: str | None, cfg) -> Path:
    stem = Path(config_path).stem if config_path else cfg.method.name
    return Path("runs") / stem


def cmd_train(args) -> int:
    from semiseg.engine.run import train
    from semiseg.methods import METHODS, load_config

    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else _default_run_dir(args.config, cfg)
    train(cfg, run_dir, METHODS[cfg.method.name])
    return 0


def _load_run(target: str, overrides: list[str]):
    """(cfg, model, info, export path) of a run folder or a .safetensors export."""
    from semiseg.engine.checkpoint import load_export
    from semiseg.errors import CheckpointError
    from semiseg.methods import METHODS

    path = Path(target)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{target}: no best.safetensors or last.safetensors in this run folder")
    cfg, model, info = load_export(path, METHODS, overrides)
    return cfg, model, info, path


def cmd_eval(args) -> int:
    from semiseg import atomic
    from semiseg.data.datasets import build_dataset
    from semiseg.engine import dist
    from semiseg.engine.evaluate import evaluate_config, format_table

    cfg, model, info, path = _load_run(args.target, args.overrides)
    device = dist.init(cfg.train.device if args.device is None else args.device)
    split = args.split or cfg.data.val_split
    ds = build_dataset(cfg.data, split)
    mode = args.mode or cfg.eval.mode or info.eval_mode
    res = evaluate_config(model.to(device), ds, info, cfg, device, mode=mode)
    if dist.is_main():
        print(format_table(res))
        print(f"mIoU {res['miou']:.2f} on {split} ({mode}, {res['images']} images) — {path}")
        out = Path(args.out) if args.out else path.parent / f"eval_{split}_{mode}.json"
        atomic.write_json(out, {"split": split, "mode": mode, "checkpoint": str(path), **res})
    return 0


def cmd_predict(args) -> int:
    from semiseg.engine import dist
    from semiseg.predict import list_images, predict_images

    cfg, model, info, path = _load_run(args.target, args.overrides)
    device = dist.init(cfg.train.device if args.device is None else args.device)
    paths = list_images(args.images)
    predict_images(model.to(device), paths, info, Path(args.out), mode=args.mode, window=cfg.data.crop, device=device)
    return 0


def _data_config(target: str, root: str | None, overrides: list[str]):
    """A DataConfig from a YAML config or from a dataset name (+ --root)."""
    from semiseg import config as config_mod
    from semiseg.methods import load_config

    if target.endswith((".yaml", ".yml")):
        cfg = load_config(target, overrides)
    else:
        sets = [f"data.dataset={target}"] + ([f"data.root={root}"] if root else []) + list(overrides)
        cfg = load_config(None, sets)
    if root and target.endswith((".yaml", ".yml")):
        cfg = config_mod.replace(cfg, data={"root": root})
    return cfg.data


def cmd_split(args) -> int:
    from semiseg.data.datasets import build_dataset
    from semiseg.data.splits import fetch_split, make_split, write_split

    if args.fetch:
        digests = dict(pair.split("=", 1) for pair in args.sha256) if args.sha256 else None
        fetch_split(args.fetch, Path(args.out), sha256=digests)
        print(f"fetched and verified {args.fetch} -> {args.out}")
        return 0
    data = _data_config(args.dataset, args.root, args.overrides)
    ds = build_dataset(data, args.from_split)
    lab_ids, unl_ids = make_split(ds.ids, args.labeled, args.seed)
    by_id = {it.id: it for it in ds.items}
    write_split(Path(args.out), [by_id[i] for i in lab_ids], [by_id[i] for i in unl_ids], root=data.root)
    print(f"{len(lab_ids)} labeled, {len(unl_ids)} unlabeled ids of {args.from_split} -> {args.out}")
    return 0


def cmd_data_check(args) -> int:
    from semiseg.data.check import run_check

    data = _data_config(args.target, args.root, args.overrides)
    splits = [s for s in args.splits.split(",") if s]
    return run_check(data, splits)


def cmd_bench(args) -> int:
    from semiseg.bench import parse_seeds, run_bench
    from semiseg.config import ConfigError
    from semiseg.report import write_report

    if args.report_only:
        print(write_report(Path(args.out), data_root=args.data_root))
        return 0
    if not args.preset or not args.methods:
        raise ConfigError("bench: give a PRESET and --methods (or --report-only --out DIR)")
    methods = [m for m in args.methods.split(",") if m.strip()]
    run_bench(
        args.preset, methods, Path(args.out), parse_seeds(args.seeds), args.labeled, args.data_root,
        args.eval_split, args.overrides,
    )  # fmt: skip
    return 0


def cmd_data_get(args) -> int:
    from semiseg.data.fetch import fetch_dataset

    fetch_dataset(args.dataset, args.source, args.dest, link=args.link)
    return 0


def cmd_demo(args) -> int:
    from semiseg.config import ConfigError
    from semiseg.demo import run_demo

    name = "demo" if args.dataset == "synthetic" else f"demo_{args.dataset}"
    out = args.out or (f"runs/{name}" if args.seed == 0 else f"runs/{name}_seed{args.seed}")
    if args.dataset == "synthetic" and (args.data_root or args.pretrained):
        raise ConfigError("--data-root and --pretrained belong to `semiseg demo camvid`")
    return run_demo(Path(out), args.quick, args.seed, args.dataset, args.data_root, args.pretrained)


def cmd_weak_derive(args) -> int:
    from semiseg.data.weak import derive_file

    data = _data_config(args.target, args.root, args.overrides)
    images, labels = derive_file(data, args.kind, args.ids, Path(args.out), args.min_area, args.background, args.seed)
    print(f"wrote {labels} {args.kind} of {images} images to {args.out}")
    return 0


def cmd_suggest(args) -> int:
    from semiseg.suggest import suggest

    suggest(Path(args.run), args.budget, args.out, args.overrides, args.device or "")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train supervised vs UniMatch on the synthetic dataset or on CamVid (CPU)")
    p.add_argument(
        "dataset",
        nargs="?",
        default="synthetic",
        choices=["synthetic", "camvid"],
        help="synthetic (default; offline, from scratch) or camvid (real frames, ImageNet-pretrained MobileNetV2)",
    )
    p.add_argument("--out", default=None, help="run folder (default runs/demo[_camvid], runs/demo[_camvid]_seedN)")
    p.add_argument("--data-root", default=None, help="camvid: a SegNet-layout CamVid folder (default: fetch it)")
    p.add_argument(
        "--pretrained", default=None, help="camvid: MobileNetV2 weights, path or URL (default: torchvision's ImageNet)"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed of both methods (the split stays fixed)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a config; rerunning the same command resumes")
    p.add_argument("config", help="YAML preset, e.g. configs/demo.yaml")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder or a .safetensors export")
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--split", help="split name (default: the config's val split)")
    p.add_argument("--mode", choices=["whole", "sliding", "multiscale", "center_crop"], help="inference mode")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: the config's)")
    p.add_argument("--out", help="results JSON (default: beside the checkpoint)")
    _add_set(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="write index, colour and overlay PNGs for images")
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("images", metavar="IMAGES_OR_DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", default="auto", choices=["auto", "whole", "sliding"], help="inference mode")
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    _add_set(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("split", help="write labeled.txt / unlabeled.txt, or fetch a public split list")
    p.add_argument("dataset", nargs="?", default="", metavar="DATASET_OR_CONFIG")
    p.add_argument("--root", help="dataset root")
    p.add_argument("--labeled", default="1/8", help="count (92) or fraction (1/8) of labeled images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-split", default="train", help="split the ids are drawn from")
    p.add_argument("--out", required=True, help="folder for labeled.txt and unlabeled.txt")
    p.add_argument(
        "--fetch",
        help="URL or path of a published split folder (holding labeled.txt and unlabeled.txt) to fetch and verify; "
        "line counts are checked when the folder ends in a known split name such as pascal/92",
    )
    p.add_argument("--sha256", nargs="+", metavar="FILE=HEX", help="with --fetch: expected checksums per file")
    _add_set(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("data-check", help="count images/masks, class frequencies, bad files and labels")
    p.add_argument("target", metavar="DATASET_OR_CONFIG")
    p.add_argument("--root", help="dataset root")
    p.add_argument("--splits", default="train,val", help="comma-separated split names")
    _add_set(p)
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("bench", help="compare methods on one protocol: results.json, results.md, report.html")
    p.add_argument("preset", nargs="?", help="YAML preset or a name: camvid -> configs/camvid/bench.yaml")
    p.add_argument("--methods", help="comma-separated methods; supervised and full references are always added")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the labeled split and training")
    p.add_argument("--labeled", help="labeled fraction or count of the train split (default: the preset's)")
    p.add_argument("--data-root", help="dataset root (default: the preset's data.root)")
    p.add_argument("--eval-split", help="split the results are measured on (default: the preset's val split)")
    p.add_argument("--out", required=True, help="bench folder; rerunning resumes it")
    p.add_argument("--report-only", action="store_true", help="only rebuild report.html of an existing --out")
    _add_set(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    g = data_sub.add_parser("get", help="fetch a dataset in the layout its reader expects")
    g.add_argument("dataset", help="dataset name: camvid")
    g.add_argument("--source", help="URL (zip/tar), folder or file:// path (default: the public SegNet archive)")
    g.add_argument("--dest", help="destination folder (default: data/<dataset>)")
    g.add_argument("--link", action="store_true", help="symlink a local source's folders instead of copying")
    g.set_defaults(func=cmd_data_get)
    p = sub.add_parser("weak", help="weak labels (SWDBN): derive image tags or boxes from full masks")
    weak_sub = p.add_subparsers(dest="weak_command", required=True)
    w = weak_sub.add_parser("derive", help="write the tags or boxes of chosen train images, derived from their masks")
    w.add_argument("target", metavar="DATASET_OR_CONFIG")
    w.add_argument("--root", help="dataset root")
    w.add_argument("--kind", required=True, choices=["tags", "boxes"])
    w.add_argument(
        "--ids",
        default="unlabeled",
        help="unlabeled (the config's unlabeled part), all (the train split), a count or fraction of the unlabeled "
        "part, or a file of ids",
    )
    w.add_argument("--out", required=True, help="text file to write (the format method.tags_file/boxes_file read)")
    w.add_argument("--min-area", type=int, default=32, help="boxes: smallest connected component, in pixels")
    w.add_argument("--background", default="auto", help="class given no box or tag: auto | a class name | ''")
    w.add_argument("--seed", type=int, default=0, help="seed of a count or fraction of --ids")
    _add_set(w)
    w.set_defaults(func=cmd_weak_derive)

    p = sub.add_parser("suggest", help="the unlabeled images whose predictions are least stable: annotate these next")
    p.add_argument("run", metavar="RUN", help="run folder with snapshot exports (ST/ST++/BST) or best/last exports")
    p.add_argument("--budget", type=int, required=True, metavar="N", help="number of images to suggest")
    p.add_argument("--out", help="output folder (default RUN/suggest)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: the run's)")
    _add_set(p)
    p.set_defaults(func=cmd_suggest)
    return parser


def one_line(err: BaseException) -> str:
    """The user-facing line of an error; DataLoader workers re-raise ours wrapped in a multi-line traceback."""
    text = str(err).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(type(err).__module__) and ": " in last else last


def main(argv: list[str] | None = None) -> int:
    from semiseg.engine import dist

    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        # Let every rank finish its work before the process groups go away.
        dist.barrier()
        return status
    except SemisegError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        # A process group left alive at interpreter exit can abort the process (SIGABRT) after the work is done.
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())

"""`semiseg bench`: methods compared on one protocol: same split, model, schedule, budget and evaluation.

For every seed k the labeled subset is drawn from the train split (the given fraction, seed k; the rest of train
is unlabeled) and written to OUT/splits/seed<k>/; every method then trains on those lists in OUT/runs/<method>/
seed<k> with train.seed = k. Two references always run: `supervised` (the labeled subset only) and `full`
(supervised on every train label, the upper reference); each method is scored by the share of the gap between
them that it closes. All runs share one resolved config except `method.*`, the split lists and, for `full`,
data.labeled = "" (all labels) and train.full_iters steps when the preset sets it (the upper reference sees 8x the
images of a 1/8 run and needs more steps to reach its plateau); every other run trains train.iters steps.

Method-specific settings: a file `<method>.yaml` beside the preset holding only a `method:` section (e.g.
configs/camvid/unimatch.yaml with `method: {tau: 0.9}`) and `--set method.KEY=VALUE`, each applied to the methods
whose Config has KEY (preset `method:` keys < per-method file < --set). A variant of a method is benched beside it
by naming its keys in --methods: `dssn,dssn:align=none` or `swdbn:single_branch=true:lam=0.5` (its own row and run
folder, its keys applied last) -- this is how ablations share one bench folder and its references. Rerunning
resumes unfinished runs and skips finished ones; a run folder trained with another config is an error, never
silently mixed in.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from semiseg import config as config_mod
from semiseg.config import Config, ConfigError
from semiseg.errors import CheckpointError, DataError
from semiseg.results import REFERENCES, format_markdown, merge_previous, read_results, run_folder_name, summarize

PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"
"""the repository's configs/ folder (absent from an installed wheel)"""

UNCOMPARED_KEYS = ("data.root", "data.labeled", "data.unlabeled")
"""where the data and split lists live is not protocol: list contents are checked in OUT/splits instead"""


def resolve_preset(name: str | Path) -> Path:
    """A YAML path as given, or a short name: 'camvid' -> configs/camvid/bench.yaml (or configs/camvid.yaml)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{path}: preset file not found")
        return path
    candidates = [PRESETS_DIR / str(name) / "bench.yaml", PRESETS_DIR / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if not PRESETS_DIR.is_dir():
        raise ConfigError(
            f"{name}: named presets live in the repository's configs/ folder, which this installed package lacks; "
            "pass a YAML path (e.g. a checkout's configs/camvid/bench.yaml)"
        )
    known = sorted(p.parent.name for p in PRESETS_DIR.glob("*/bench.yaml"))
    raise ConfigError(f"{name}: no preset {candidates[0]}; named bench presets: {', '.join(known) or 'none'}")


def _shown(path: Path) -> Path:
    """`path` relative to the working directory where it lies below it (results name the preset as typed)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def describe_model(m) -> str:
    """The protocol's one-line model description: backbone with the fields that shape it, head, weights."""
    if m.backbone.startswith("resnet"):
        shape = f"width {m.width}, {m.stem} stem, OS{m.output_stride}"
    elif m.backbone.startswith("mobilenet"):
        shape = f"width x{m.width_mult:g}, OS{m.output_stride}" + (", TF padding" if m.tf_padding else "")
    else:
        shape = f"OS{m.output_stride}"
    head = f"{m.head} ({m.head_channels} channels, low-level {m.low_level_channels})"
    from semiseg.models.pretrained import is_url

    shown = _shown(Path(m.pretrained)) if "/" in m.pretrained and not is_url(m.pretrained) else m.pretrained
    weights = f"; weights {shown}" if m.pretrained else ""
    return f"{m.backbone} ({shape}) {head}{weights}"


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; ConfigError on anything else or duplicates."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: expected distinct comma-separated integers, e.g. 0,1,2")
    return seeds


def evaluate_export(path: Path, split: str) -> dict:
    """Metrics of an export on `split`, with the evaluation settings of its own config."""
    from semiseg.data.datasets import build_dataset
    from semiseg.engine import dist
    from semiseg.engine.checkpoint import load_export
    from semiseg.engine.evaluate import evaluate_config
    from semiseg.methods import METHODS

    cfg, model, info = load_export(path, METHODS)
    device = dist.init(cfg.train.device)
    return evaluate_config(model.to(device), build_dataset(cfg.data, split), info, cfg, device)


def _method_fields(method: str) -> set[str]:
    from semiseg.methods import METHODS

    return {f.name for f in dataclasses.fields(config_mod.method_config_class(method, METHODS))}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def method_section(
    method: str, preset_method: dict, method_file: Path | None, method_sets: Sequence[str], where: str
) -> dict:
    """The raw `method:` mapping of one method: preset keys it declares < its method file < its --set keys."""
    fields = _method_fields(method)
    raw = {"name": method, **{k: v for k, v in preset_method.items() if k in fields and k != "name"}}
    if method_file is not None and method_file.is_file():
        extra = config_mod.read_yaml(method_file)
        if set(extra) - {"method"}:
            raise ConfigError(f"{method_file}: a per-method file holds only a method: section, found {sorted(extra)}")
        section = extra.get("method") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{method_file}: method: expected a mapping")
        if section.get("name", method) != method:
            raise ConfigError(f"{method_file}: method.name {section['name']!r} differs from the file name")
        raw = _merge(raw, section)
    mine = [s for s in method_sets if config_mod.parse_override(s)[0][1] in fields]
    return config_mod.apply_overrides({"method": raw}, mine)["method"]


def parse_method(entry: str) -> tuple[str, list[str]]:
    """A --methods entry -> (method, its own overrides).

    `dssn` -> ("dssn", []); `dssn:align=none:beta=0.5` -> ("dssn", ["method.align=none", "method.beta=0.5"]);
    a dotted key names any config field: `unimatch:train.mix_partner=stream` -> ["train.mix_partner=stream"].
    """
    from semiseg.methods import METHODS

    name, *keys = [part.strip() for part in entry.split(":")]
    if name not in METHODS:
        raise ConfigError(f"--methods {entry}: unknown method {name!r}; choose from {', '.join(METHODS)}")
    fields = _method_fields(name)
    sets = []
    for key in keys:
        field, eq, value = key.partition("=")
        if not eq or not field:
            raise ConfigError(f"--methods {entry}: expected METHOD:KEY=VALUE[:KEY=VALUE...], got {key!r}")
        if "." in field:
            if field.split(".")[0] == "method" or field.split(".")[0] == "data":
                raise ConfigError(
                    f"--methods {entry}: {field}: a variant changes method keys (no prefix) or train.*, "
                    "model.*, optim.*, eval.*; the data is the bench's"
                )
            sets.append(f"{field}={value}")
        elif field == "name" or field not in fields:
            raise ConfigError(f"--methods {entry}: {name} has no method field {field!r}")
        else:
            sets.append(f"method.{field}={value}")
    return name, sets


def _check_method_keys(keys: Sequence[str], methods: Sequence[str], what: str) -> None:
    """Every method-specific key must belong to at least one benched method, else it is a typo."""
    declared = set().union(*(_method_fields(m) for m in methods))
    for key in keys:
        if key == "name":
            raise ConfigError(f"{what} method.name: bench chooses the methods; use --methods")
        if key not in declared:
            raise ConfigError(f"{what} method.{key}: no benched method ({', '.join(methods)}) has this field")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def check_run_config(run_dir: Path, cfg: Config) -> None:
    """Refuse a run folder whose config.yaml differs from `cfg` in anything but UNCOMPARED_KEYS.

    A key the old config.yaml lacks is accepted at its default value (a field added since that run was trained).
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    from semiseg.methods import METHODS

    raw = yaml.safe_load(path.read_text()) or {}
    try:  # read as typed values, so that a bool saved before a field became a string (true -> "on") compares equal
        old = _flat(config_mod.to_dict(config_mod.from_dict(raw, METHODS)))
        old = {k: v for k, v in old.items() if k in _flat(raw)}  # keep "absent from the old file" visible
    except ConfigError:  # a field removed since: compare the file as written
        old = _flat(raw)
    new = _flat(config_mod.to_dict(cfg))
    from semiseg.methods import load_config

    defaults = _flat(config_mod.to_dict(load_config(None, [f"method.name={cfg.method.name}"])))
    for key in sorted(set(old) | set(new)):
        if key not in old and key in defaults and new[key] == defaults[key]:
            continue  # a field added after that run, at its default: new fields default to the old behaviour
        if key not in UNCOMPARED_KEYS and old.get(key) != new.get(key):
            raise ConfigError(
                f"{path}: this run was trained with {key}={old.get(key)!r}, this command now asks {new.get(key)!r}; "
                "use another --out (or delete the run folder to retrain it)"
            )


def write_split_lists(folder: Path, labeled: list, unlabeled: list, root: str) -> tuple[Path, Path]:
    """Write labeled.txt / unlabeled.txt, or check that existing ones hold exactly these lists."""
    from semiseg.data.splits import SPLIT_FILES, format_items, write_split

    paths = (folder / SPLIT_FILES[0], folder / SPLIT_FILES[1])
    if all(p.is_file() for p in paths):
        for path, items in zip(paths, (labeled, unlabeled)):
            if path.read_text() != format_items(items, root):
                raise DataError(f"{path}: differs from the split this bench draws now (another dataset or fraction?)")
        return paths
    return write_split(folder, labeled, unlabeled, root)


def train_run(name: str, cfg: Config, run_dir: Path, quiet: bool = False, wait: bool = True) -> dict | None:
    """Train (or resume, or skip when finished) one run; its results.json. With wait=False a run that another
    bench is training is left to it: None."""
    from semiseg.engine.run import run_results, train
    from semiseg.methods import METHODS

    check_run_config(run_dir, cfg)
    if (run_dir / "results.json").is_file():
        print(f"bench: {run_dir} finished; skipped")
        return run_results(run_dir)
    # Two benches sharing a folder (e.g. `--methods dssn` and `--methods ctt` side by side) both need the
    # references: the second waits for the first to finish a run instead of training it twice.
    with _run_lock(run_dir, wait) as locked:
        if not locked:
            return None
        check_run_config(run_dir, cfg)
        if (run_dir / "results.json").is_file():
            print(f"bench: {run_dir} finished by another bench; skipped")
            return run_results(run_dir)
        return train(cfg, run_dir, METHODS[cfg.method.name], quiet)


def write_tables(out: Path, results: dict) -> None:
    """Write out/results.json and results.md from `results`, first merging (in place, under a lock on the folder)
    what another bench sharing the folder wrote since this one read it: without that, the last bench to write
    would drop the other's finished runs from the table."""
    from semiseg import atomic
    from semiseg.engine.checkpoint import json_safe

    with _run_lock(out, lock_name=".results.lock", busy=""):
        if (out / "results.json").is_file():
            merge_previous(results, read_results(out))
        atomic.write_json(out / "results.json", json_safe(results))
        atomic.write_text(out / "results.md", format_markdown(results))


@contextlib.contextmanager
def _run_lock(run_dir: Path, wait: bool = True, lock_name: str = ".bench.lock", busy: str = "being trained"):
    """An exclusive lock on run_dir/lock_name (released by the OS if the process dies); yields whether it is
    held: when another bench holds it, waits for it (wait=True; says so unless `busy` is empty) or yields False."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / lock_name, "a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; benches sharing a folder must not run at once there
            yield True
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if busy:
                print(f"bench: {run_dir} is {busy} by another bench; waiting for it", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def eval_on_split(run_dir: Path, split: str) -> dict:
    """{'best': metrics, 'last': metrics} of the run's two exports on `split`, cached in run_dir/eval_<split>.json."""
    from semiseg import atomic
    from semiseg.engine.checkpoint import json_safe

    cache = run_dir / f"eval_{split}.json"
    exports = [run_dir / "best.safetensors", run_dir / "last.safetensors"]
    for export in exports:
        if not export.is_file():
            raise CheckpointError(f"{export}: not found; cannot evaluate this run on {split}")
    newest = max(e.stat().st_mtime for e in exports)
    if cache.is_file() and cache.stat().st_mtime >= newest:
        return json.loads(cache.read_text())
    out = {"split": split, "best": evaluate_export(exports[0], split), "last": evaluate_export(exports[1], split)}
    atomic.write_json(cache, json_safe(out))
    return out


def run_record(name: str, seed: int, run_dir: Path, result: dict, evaluated: dict | None, val_split: str) -> dict:
    """One run's line of results.json: mIoU best/last and per-class IoU on the eval split, cost, steps."""
    best, last = result.get("best") or {}, result.get("last") or {}
    record = {
        "method": name,
        "seed": seed,
        "run_dir": str(run_dir),
        "miou_best": best.get("miou", math.nan),
        "miou_last": last.get("miou", math.nan),
        "best_step": best.get("step"),
        "net": best.get("net"),
        "iou_best": best.get("iou", {}),
        "iou_last": last.get("iou", {}),
        "train_seconds": result.get("train_seconds", math.nan),
        "images_per_second": result.get("images_per_second", math.nan),
        "peak_memory_mb": result.get("peak_memory_mb", math.nan),
        "steps": result.get("steps"),
    }
    if result.get("diagnostics"):
        record["pseudo_labels"] = result["diagnostics"]
    if evaluated is not None:
        record["selection"] = {"split": val_split, "miou_best": record["miou_best"], "miou_last": record["miou_last"]}
        record["miou_best"], record["iou_best"] = evaluated["best"]["miou"], evaluated["best"]["iou"]
        record["miou_last"], record["iou_last"] = evaluated["last"]["miou"], evaluated["last"]["iou"]
    return {k: (math.nan if v is None and k.startswith("miou") else v) for k, v in record.items()}


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(shared overrides, method.* overrides)."""
    shared, method = [], []
    for text in overrides:
        path, _ = config_mod.parse_override(text)
        (method if path[0] == "method" else shared).append(text)
    for text in method:
        if len(config_mod.parse_override(text)[0]) < 2:
            raise ConfigError(f"--set {text}: expected method.KEY=VALUE")
    return shared, method


def _command(preset, methods, seeds, labeled, data_root, eval_split, out, overrides) -> str:
    parts = ["semiseg", "bench", str(preset), "--methods", ",".join(methods), "--seeds", ",".join(map(str, seeds))]
    parts += ["--labeled", labeled, "--eval-split", eval_split, "--out", str(out)]
    parts += ["--data-root", data_root] if data_root else []
    parts += ["--set", *overrides] if overrides else []
    return shlex.join(parts)


def run_bench(
    preset: str | Path,
    methods: Sequence[str],
    out: str | Path,
    seeds: Sequence[int] = (0,),
    labeled: str | None = None,
    data_root: str | None = None,
    eval_split: str | None = None,
    overrides: Sequence[str] = (),
    quiet: bool = False,
    report: bool = True,
) -> dict:
    """Train every method and both references for every seed on one protocol; write results.json/.md (+ report)."""
    from semiseg.data.datasets import build_dataset, dataset_info
    from semiseg.data.splits import is_count_or_fraction, make_split
    from semiseg.engine.evaluate import describe_mode
    from semiseg.engine.log import versions
    from semiseg.engine.loop import total_iters
    from semiseg.methods import METHODS

    out = Path(out)
    preset_path = _shown(resolve_preset(preset))
    where = f"{preset_path}: "
    methods = list(dict.fromkeys(m.strip() for m in methods if m.strip() and m.strip() not in REFERENCES))
    variants = {m: parse_method(m) for m in methods}
    order = ["supervised", *methods, "full"]
    shared_sets, method_sets = _split_overrides(overrides)
    raw = config_mod.read_yaml(preset_path)
    preset_method = dict(raw.pop("method", None) or {})
    preset_method.pop("name", None)
    raw = config_mod.apply_overrides(raw, shared_sets + ([f"data.root={data_root}"] if data_root else []))
    benched = ["supervised", *dict.fromkeys(base_name for base_name, _ in variants.values())]
    _check_method_keys(list(preset_method), benched, f"{preset_path}:")
    _check_method_keys([config_mod.parse_override(s)[0][1] for s in method_sets], benched, "--set")

    base = config_mod.from_dict(raw, METHODS, where)
    labeled = str(labeled or base.data.labeled)
    if not is_count_or_fraction(labeled):
        raise ConfigError(f"{where}data.labeled: bench draws the labeled subset itself; give a fraction or count")
    eval_split = eval_split or base.data.val_split
    info = dataset_info(base.data)
    train = build_dataset(base.data, base.data.train_split)
    eval_set = build_dataset(base.data, eval_split)  # fail before hours of training, not after
    by_id = {item.id: item for item in train.items}
    n_lab = len(make_split(train.ids, labeled, seeds[0])[0])
    n_unl = len(train) - n_lab
    # One step count for every run: an epoch-based preset would give the references fewer steps.
    iters = total_iters(base, n_lab, n_unl, 1)
    raw = config_mod.apply_overrides(raw, [f"train.iters={iters}"])

    configs: dict[tuple[str, int], Config] = {}
    split_files = {}
    for seed in seeds:
        lab_ids, unl_ids = make_split(train.ids, labeled, seed)
        folder = out / "splits" / f"seed{seed}"
        lab_path, unl_path = write_split_lists(
            folder, [by_id[i] for i in lab_ids], [by_id[i] for i in unl_ids], base.data.root
        )
        split_files[seed] = {"labeled": str(lab_path), "unlabeled": str(unl_path)}
        for name in order:
            actual, own_sets = ("supervised", []) if name in REFERENCES else variants[name]
            run_raw = copy.deepcopy(raw)
            sets = {"labeled": str(lab_path), "unlabeled": str(unl_path), "split_seed": seed}
            run_raw.setdefault("train", {})["seed"] = seed
            if name == "full":
                sets.update(labeled="", unlabeled="")
                run_raw["train"]["iters"] = base.train.full_iters or iters
            run_raw.setdefault("data", {}).update(sets)
            own_method = [t for t in own_sets if t.startswith("method.")]
            run_raw["method"] = method_section(
                actual, preset_method, preset_path.parent / f"{actual}.yaml", method_sets + own_method, where
            )
            run_raw = config_mod.apply_overrides(run_raw, [t for t in own_sets if not t.startswith("method.")])
            configs[(name, seed)] = config_mod.from_dict(run_raw, METHODS, where)

    first = configs[("supervised", seeds[0])]
    sample = eval_set[0]
    results: dict = {
        "protocol": {
            "command": _command(preset_path, methods, seeds, labeled, data_root, eval_split, out, overrides),
            "preset": str(preset_path),
            "dataset": base.data.dataset,
            "data_root": base.data.root,
            "train_split": base.data.train_split,
            "labeled": labeled,
            "seeds": list(seeds),
            "train_count": len(train),
            "labeled_count": n_lab,
            "unlabeled_count": n_unl,
            "split_files": split_files,
            "val_split": base.data.val_split,
            "eval_split": eval_split,
            "eval_images": len(eval_set) if base.eval.max_images <= 0 else min(base.eval.max_images, len(eval_set)),
            "eval_mode": describe_mode(
                base.eval.mode or info.eval_mode,
                base.eval.window or base.data.crop,
                base.eval.stride,
                base.eval.scales,
                base.eval.flip,
            ),
            "eval_every": base.eval.every,
            "resolution": [int(sample.image.shape[1]), int(sample.image.shape[0])],
            "resize": base.data.resize,
            "crop": base.data.crop,
            "iters": iters,
            "full_iters": base.train.full_iters or iters,
            "batch_size": base.data.batch_size,
            "batch_size_u": base.data.batch_size_u,
            "model": describe_model(base.model),
            "classes": list(info.classes),
            "palette": [list(c) for c in info.palette],
            "config": config_mod.to_dict(first),
            "method_configs": {n: config_mod.to_dict(configs[(n, seeds[0])].method) for n in order},
            "versions": versions(),
        },
        "methods": order,
        "runs": {},
        "summary": {},
    }
    previous_path = out / "results.json"
    if previous_path.is_file():
        differs = merge_previous(results, read_results(out))
        if differs:
            print(f"bench: {previous_path} is of another protocol ({differs} differs); this bench starts a new table")
    total = len(configs)
    # Runs another bench is training are taken up last (then waited for), so benches sharing a folder split the work.
    queue = [(i, key, False) for i, key in enumerate(configs, 1)]
    while queue:
        i, (name, seed), wait = queue.pop(0)
        cfg = configs[(name, seed)]
        run_dir = out / "runs" / run_folder_name(name) / f"seed{seed}"
        print(f"bench: [{i}/{total}] {name} seed {seed} -> {run_dir}")
        result = train_run(name, cfg, run_dir, quiet, wait)
        if result is None:
            print(f"bench: {run_dir} is being trained by another bench; coming back to it", flush=True)
            queue.append((i, (name, seed), True))
            continue
        evaluated = eval_on_split(run_dir, eval_split) if eval_split != cfg.data.val_split else None
        record = run_record(name, seed, run_dir, result, evaluated, cfg.data.val_split)
        results["runs"].setdefault(name, {})[str(seed)] = record
        results["summary"] = summarize(results["runs"], results["methods"])
        # Written after every run, so that a long bench can be inspected (and reported) while it goes.
        write_tables(out, results)
    if report:
        from semiseg.report import write_report

        path = write_report(out)
        print(f"bench: report {path}")
    print(format_markdown(results), end="")
    return results

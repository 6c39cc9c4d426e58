"""train(): the one entry that trains any method in a run folder: one fit, or a multi-stage method's stages.

`semiseg train`, `semiseg bench` and the tests call `train(cfg, run_dir, method)`. A method with `stages(cfg)`
(ST, ST++, BST) is run as those stages, each in its own folder under the run with a `done.json` marker written last;
rerunning resumes at the first stage without one (fit resumes inside a training stage). A training stage is a fit
of the method on the data its `data(env)` prepares, exporting `snapshots` snapshots; a work stage (pseudo-labeling,
selection) writes files and returns a summary. To redo a stage, delete its folder, those of every later stage and
the root results.json. The run root receives config.yaml, results.json (the final training stage's result, every
stage's summary, and what the method's optional `summarize(env, summaries)` adds) and the final training stage's
best/last exports, which is what `semiseg bench` reads; its train_seconds is the sum over all stages and its steps
the sum over the training stages.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from semiseg import atomic
from semiseg import config as config_mod
from semiseg.config import Config
from semiseg.data.info import DatasetInfo
from semiseg.engine import checkpoint, dist
from semiseg.engine.log import RunLog, format_duration
from semiseg.engine.loop import TrainData, fit, snapshot_name
from semiseg.errors import TrainingError

DONE = "done.json"
"""a stage folder's completion marker, written last"""


@dataclass
class StageEnv:
    """What a stage's functions may use: the run root, its config, the dataset, the method and the device."""

    root: Path
    cfg: Config
    info: DatasetInfo
    method: ModuleType
    device: torch.device
    log: RunLog

    def load(self, stage: str) -> tuple[nn.Module, str]:
        """The best (else last) export of a training stage, on the device, and its path relative to the root."""
        folder = self.root / stage
        path = folder / "best.safetensors"
        if not path.is_file():
            path = folder / "last.safetensors"
        return self.load_export(path), str(path.relative_to(self.root))

    def load_export(self, path: Path) -> nn.Module:
        """An export of this method (a snapshot, best or last) rebuilt by its build, on the device, in eval mode."""
        _, net, _ = checkpoint.load_export(path, {self.cfg.method.name: self.method})
        return net.to(self.device)


@dataclass(frozen=True)
class TrainStage:
    """A fit of the method on what `data(env)` prepares, in the stage folder; K snapshots exported when K > 0."""

    name: str
    data: Callable[[StageEnv], TrainData]
    snapshots: int = 0
    cfg: Config | None = None
    """the config this stage trains with; None = the run's"""


@dataclass(frozen=True)
class WorkStage:
    """Work that is not training (pseudo-labeling, selection): work(env, folder) -> the stage's summary."""

    name: str
    work: Callable[[StageEnv, Path], dict]


Stage = TrainStage | WorkStage


def train(cfg: Config, run_dir: str | Path, method: ModuleType, quiet: bool = False) -> dict:
    """Train (or resume, or skip when finished) `method` as configured in run_dir; the run's results.json."""
    run_dir = Path(run_dir)
    if hasattr(method, "stages"):
        return run_stages(cfg, run_dir, method, quiet)
    fit(cfg, run_dir, method, quiet=quiet)
    dist.barrier()
    return run_results(run_dir)


def run_results(folder: Path) -> dict:
    """The results.json a finished fit (or a multi-stage run) leaves in its folder."""
    path = folder / "results.json"
    if not path.is_file():
        raise TrainingError(f"{path}: the run finished without writing its results")
    return json.loads(path.read_text())


def _train_stage(env: StageEnv, stage: TrainStage, folder: Path, quiet: bool) -> dict:
    cfg = stage.cfg or env.cfg
    data = stage.data(env)
    fit(cfg, folder, env.method, data, info=env.info, quiet=quiet, snapshots=stage.snapshots)
    dist.barrier()
    result = run_results(folder)
    summary = {"kind": "train", **result, "seconds": result.get("train_seconds", 0.0)}
    summary["list"] = {
        "labeled": sum(len(p.dataset) * p.repeat for p in data.labeled if not p.pseudo),
        "pseudo": sum(len(p.dataset) * p.repeat for p in data.labeled if p.pseudo),
    }
    if stage.snapshots:
        summary["snapshots"] = [snapshot_name(k) for k in range(1, stage.snapshots + 1)]
    return summary


def _finish(env: StageEnv, summaries: dict[str, dict]) -> dict:
    """Copy the final training stage's exports to the root and write the root results.json."""
    trains = {name: s for name, s in summaries.items() if s.get("kind") == "train"}
    final_name = list(trains)[-1]
    final = trains[final_name]
    results = {
        "method": env.cfg.method.name,
        "steps": sum(s.get("steps", 0) for s in trains.values()),
        "best": final.get("best"),
        "last": final.get("last"),
        "train_seconds": round(sum(s.get("seconds", 0.0) for s in summaries.values()), 1),
        "images_per_second": final.get("images_per_second"),
        "peak_memory_mb": max((s.get("peak_memory_mb", 0.0) for s in trains.values()), default=0.0),
        "eval_mode": final.get("eval_mode"),
        "val_split": final.get("val_split"),
        "final_stage": final_name,
        "stages": {name: {k: v for k, v in s.items() if k != "counts"} for name, s in summaries.items()},
    }
    if hasattr(env.method, "summarize"):
        results.update(env.method.summarize(env, summaries))
    if dist.is_main():
        for name in ("best.safetensors", "last.safetensors"):
            src = env.root / final_name / name
            if src.is_file():
                atomic.write_bytes(env.root / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
        atomic.write_json(env.root / "results.json", results)
    dist.barrier()
    return results


def run_stages(cfg: Config, run_dir: str | Path, method: ModuleType, quiet: bool = False) -> dict:
    """Run (or resume) method.stages(cfg) in run_dir; return the root results.json content."""
    from semiseg.data.datasets import dataset_info

    root = Path(run_dir)
    if (root / "results.json").is_file():
        if dist.is_main():
            print(f"{root}: already finished; nothing to do")
        return run_results(root)
    device = dist.init(cfg.train.device)
    stages = method.stages(cfg)
    log = RunLog(root, tensorboard=False)
    if dist.is_main() and not (root / "config.yaml").is_file():
        atomic.write_text(root / "config.yaml", config_mod.dump(cfg))
    env = StageEnv(root, cfg, dataset_info(cfg.data), method, device, log)
    summaries: dict[str, dict] = {}
    try:
        for stage in stages:
            folder = root / stage.name
            if (folder / DONE).is_file():
                summaries[stage.name] = json.loads((folder / DONE).read_text())
                log.info(f"{root}: stage {stage.name} finished; skipped")
                continue
            log.info(f"{root}: stage {stage.name}")
            start = time.perf_counter()
            if isinstance(stage, TrainStage):
                summary = _train_stage(env, stage, folder, quiet)
            else:
                summary = stage.work(env, folder)
            summary.setdefault("seconds", round(time.perf_counter() - start, 1))
            if dist.is_main():
                atomic.write_json(folder / DONE, summary)
            dist.barrier()
            summaries[stage.name] = summary
            log.info(f"{root}: stage {stage.name} done in {format_duration(summary['seconds'])}")
        return _finish(env, summaries)
    finally:
        log.close()

"""Every method, by paper name. An explicit dict: grep finds every use.

The method contract (docs/architecture.md): a method is one module with
  Config                       frozen dataclass (subclass of config.MethodConfig), every field commented
  build(cfg, info)             -> dict of named nn.Modules ("model", "student", "teacher", ...)
  TRAINED, EVAL_NETS           nets the optimizer trains; nets evaluated (the best one is exported)
  USES_UNLABELED               whether the loop must stream unlabeled crops
  train_step(nets, batch, cfg, ctx) -> engine.loop.StepOut(loss, logs)
  after_step(nets, cfg, ctx)   optional: EMA teachers, queues
  prepare(cfg, run_dir, info)  optional: -> engine.loop.TrainData, the data a fit trains on (SWDBN's weak labels)
  stages(cfg)                  optional: -> [engine.run.Stage], a multi-stage method (ST, ST++, BST)
The files beside the methods are the cores two or more of them share: weak_to_strong.py (FixMatch, UniMatch,
UniMatch V2, DSSN, SWDBN, CTT) and selftrain.py (ST, ST++, BST).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from semiseg import config
from semiseg.methods import bst, ctt, dssn, fixmatch, mean_teacher, st, supervised, swdbn, unimatch, unimatch_v2

METHODS = {
    "supervised": supervised,
    "mean_teacher": mean_teacher,
    "fixmatch": fixmatch,
    "unimatch": unimatch,
    "dssn": dssn,
    "ctt": ctt,
    "swdbn": swdbn,
    "st": st,
    "stpp": st,  # ST++: the same module; Config.plus is derived from the name
    "bst": bst,
    "unimatch_v2": unimatch_v2,
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> config.Config:
    """config.load with every method of METHODS: a YAML preset (or the defaults) plus `--set` overrides."""
    return config.load(path, list(overrides), METHODS)

"""Checkpoints: exact resume state, safe loading, model-only safetensors exports.

A run folder holds `last.pt` (full resume state) and the exports best/last.safetensors (snapshot_K.safetensors
too when asked), each written through semiseg.atomic, so a crash mid-write leaves the previous file intact.
Loading uses `torch.load(weights_only=True)`: only tensors and plain containers, never pickled code.
"""

from __future__ import annotations

import copy
import json
import math
import random
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semiseg import atomic
from semiseg.errors import CheckpointError


def json_safe(v: Any) -> Any:
    """NaN -> None (JSON has no NaN), tuples -> lists, paths -> str, recursively."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def save(path: Path, state: dict) -> None:
    """torch.save `state` atomically."""
    atomic.write_bytes(path, lambda tmp: torch.save(state, tmp))


def snapshot(obj: Any) -> Any:
    """A copy of a checkpoint structure whose tensors are detached CPU clones (training may change the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class BackgroundSaver:
    """Writes checkpoints from a thread: the training step waits only for the in-memory snapshot, not for
    serialisation and fsync (measured: 1-2 s per save of a ResNet-50 run's state on 2 CPU cores, README).

    At most one write is in flight; `wait()` joins it and re-raises its error, and a new `save` waits first.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, path: Path, state: dict) -> None:
        self.wait()
        frozen = snapshot(state)

        def write():
            try:
                save(path, frozen)
            except BaseException as err:  # re-raised in the training thread by wait()
                self._error = err

        self._thread = threading.Thread(target=write, name="semiseg-checkpoint", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by `save`, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle errors and truncated files carry long messages
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot load checkpoint ({first[:200]})") from None


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(net, "module") and isinstance(net.module, nn.Module):
            net = net.module
        elif hasattr(net, "_orig_mod"):
            net = net._orig_mod
        else:
            return net


def clean_state_dict(sd: dict) -> dict:
    """Strip `module.` and `_orig_mod.` prefixes left by DDP and torch.compile."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def rng_state(gen: torch.Generator | None = None) -> dict:
    """Every random state a training step touches."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if gen is not None:
        state["gen"] = gen.get_state()
    return state


def set_rng_state(state: dict, gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if gen is not None and "gen" in state:
        gen.set_state(state["gen"])


def export_model(path: Path, net: nn.Module, meta: dict) -> None:
    """Model-only export: safetensors without wrapper prefixes, plus `meta` (config, classes) as JSON metadata."""
    from safetensors.torch import save_file

    sd = clean_state_dict(unwrap(net).state_dict())
    # safetensors refuses shared storage; contiguous clones are cheap next to the export itself.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    metadata = {"semiseg": json.dumps(meta)}
    atomic.write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_export(path: Path) -> tuple[dict, dict]:
    """(state_dict, meta) of a safetensors export written by `export_model`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("semiseg", "{}"))
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read safetensors file ({str(err)[:200]})") from None
    return sd, meta


def load_weights(net: nn.Module, sd: dict, path: Path) -> nn.Module:
    """`net` with an export's state dict `sd` loaded; CheckpointError naming the first key that does not fit."""
    missing, unexpected = net.load_state_dict(sd, strict=False)
    # Exports made before networks owned their normalisation lack its buffers; they were trained with ImageNet's,
    # which is what a rebuilt network without weights starts from.
    missing = [k for k in missing if not k.startswith("input_norm.")]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        kind = "missing" if missing else "unexpected"
        raise CheckpointError(
            f"{path}: {kind} key {key} for this model ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    return net


def load_export(path: str | Path, methods: Mapping[str, Any], overrides: Sequence[str] = ()):
    """(cfg, model on CPU in eval mode, DatasetInfo) rebuilt from a safetensors export and its embedded config.

    The network is rebuilt by the method that trained it (`methods[name].build`, methods = semiseg.methods.METHODS
    or a part of it), so multi-branch networks (BST, SWDBN) load as themselves; `overrides` are `--set` strings
    applied to the embedded config (e.g. data.root).
    """
    from semiseg import config as config_mod
    from semiseg.data.datasets import dataset_info

    path = Path(path)
    sd, meta = read_export(path)
    if "config" not in meta:
        raise CheckpointError(f"{path}: not a semiseg export (no config in its metadata)")
    raw = config_mod.apply_overrides(meta["config"], list(overrides))
    raw.setdefault("model", {})["pretrained"] = ""
    cfg = config_mod.from_dict(raw, methods, f"{path} (embedded config): ")
    info = dataset_info(cfg.data)
    method = methods[cfg.method.name]
    name = meta.get("net") or method.EVAL_NETS[0]
    nets = method.build(cfg, info)
    if name not in nets:
        raise CheckpointError(f"{path}: the export names net {name!r}, which {cfg.method.name} does not build")
    return cfg, load_weights(nets[name], sd, path).eval(), info

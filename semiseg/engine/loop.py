"""fit(): the one training loop every method runs on.

A method supplies `build` (its networks), `train_step` (one step's loss and logs) and optionally `after_step`
(EMA teachers, queues) and `prepare` (the data it trains on). This loop alone does backward, the optimizer step,
the lr schedule, logging, evaluation, checkpoints and exports (best, last and the K snapshots of
`snapshots`). Rerunning the same command on the same run folder resumes from `last.pt` exactly: networks,
optimizers, scaler, step, RNG states and every stream's position.

fit() reads top to bottom as its parts: set up the device, prepare the data, build the networks and optimizers,
resume or start, open the streams, then per step `_train_step` (micro-batches, backward, optimizer), the log line,
`_evaluate` (and the best export), the snapshot export and `last.pt`; `_finish` writes the last export and
results.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from semiseg import atomic
from semiseg import config as config_mod
from semiseg.config import Config, ConfigError
from semiseg.data.batch import Batch
from semiseg.data.info import DatasetInfo
from semiseg.data.loader import STREAM_LABELED, STREAM_MIX, STREAM_UNLABELED, CropSet, Part, Stream
from semiseg.engine import checkpoint, dist
from semiseg.engine.log import Meter, RunLog, cpu_native_bf16, format_duration, progress_line, versions
from semiseg.engine.optim import build_optimizer, poly_lr, set_lr
from semiseg.errors import TrainingError


@dataclass
class StepOut:
    """What a method's train_step returns: the scalar loss to minimise and named logs (tensors or floats)."""

    loss: torch.Tensor
    logs: dict = field(default_factory=dict)


@dataclass
class TrainData:
    """The training lists of one fit: labeled parts (GT or pseudo-labels) and unlabeled parts."""

    labeled: list[Part]
    unlabeled: list[Part] = field(default_factory=list)
    tags: dict[str, frozenset[int]] | None = None
    """image-level class tags of the unlabeled images by id, for methods that train from tags (SWDBN); ctx.tags"""


@dataclass
class Context:
    """What a train_step may know besides its networks, batch and method config."""

    step: int
    """0-based optimizer step"""
    iters: int
    """total optimizer steps of this fit"""
    gen: torch.Generator
    """CPU generator for batched augmentation parameters (saved in checkpoints)"""
    info: DatasetInfo
    device: torch.device
    config: Config
    """the whole resolved config (data crop, model, ...)"""
    tags: dict[str, frozenset[int]] | None = None
    """TrainData.tags of this fit"""


@dataclass
class FitResult:
    run_dir: Path
    best: dict
    """{"miou", "step", "net"} of the best evaluation"""
    last: dict
    """{"miou", "step", "net", "iou"} of the final evaluation"""
    train_seconds: float
    images_per_second: float
    """training images (labeled + unlabeled crops) per second"""
    nets: dict
    peak_memory_mb: float = 0.0


def _epoch_batches(cfg: Config, n_labeled: int, n_unlabeled: int, world: int) -> int:
    """Batches (over all processes) in one epoch of the unlabeled list (the labeled one when there is none), >= 1."""
    if n_unlabeled > 0:
        return max(n_unlabeled // max(cfg.data.batch_size_u * world, 1), 1)
    return max(n_labeled // max(cfg.data.batch_size * world, 1), 1)


def total_iters(cfg: Config, n_labeled: int, n_unlabeled: int, world: int) -> int:
    """train.iters, or train.epochs over the unlabeled set (labeled set when there is none) in steps."""
    if cfg.train.iters > 0:
        return cfg.train.iters
    if cfg.train.epochs <= 0:
        raise ConfigError("train: set train.iters or train.epochs")
    return max(
        1, math.ceil(cfg.train.epochs * _epoch_batches(cfg, n_labeled, n_unlabeled, world) / cfg.optim.accumulate)
    )


def epoch_steps(cfg: Config, n_labeled: int, n_unlabeled: int, world: int) -> int:
    """Optimizer steps in one epoch of the list (as total_iters counts them), >= 1: eval.per_epoch's period."""
    return max(1, math.ceil(_epoch_batches(cfg, n_labeled, n_unlabeled, world) / cfg.optim.accumulate))


def snapshot_steps(iters: int, k: int) -> list[int]:
    """Steps floor(j * iters / k), j = 1..k (at least 1), after which snapshot j is exported."""
    return [max(1, j * iters // k) for j in range(1, k + 1)]


def snapshot_name(k: int) -> str:
    """File name of snapshot k (1-based)."""
    return f"snapshot_{k}.safetensors"


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.amp on `device`; None = full precision.

    auto: CUDA bf16 where supported, else fp16; CPU bf16 where the processor computes it natively (AVX512-BF16 or
    AMX), else fp32 (emulated bf16 is slower than fp32). bf16 / fp16 force that dtype (fp16 on CUDA only).
    """
    mode = cfg.train.amp
    if mode == "off" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cpu":
        if mode == "fp16":
            raise ConfigError("train.amp=fp16: CPU autocast supports bf16 only; use bf16, auto or off")
        return torch.bfloat16 if mode == "bf16" or (mode == "auto" and cpu_native_bf16()) else None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast at `dtype` on the device, or a no-op context for full precision."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def build_train_data(cfg: Config) -> TrainData:
    """Labeled and unlabeled lists from cfg.data (splits.resolve_train_split)."""
    from semiseg.data.datasets import resolve_train_split

    labeled, unlabeled = resolve_train_split(cfg.data)
    repeat = max(cfg.data.repeat_labeled, 1)
    return TrainData([Part(labeled, repeat=repeat)], [Part(unlabeled)] if unlabeled is not None else [])


def export_meta(cfg: Config, info: DatasetInfo, net: str, step: int, **extra: Any) -> dict:
    """The metadata every export carries: the config that rebuilds the network, classes, palette, step, ..."""
    return {
        "config": config_mod.to_dict(cfg),
        "classes": list(info.classes),
        "net": net,
        "palette": [list(c) for c in info.palette],
        "step": step,
        **extra,
    }


def _setup_device(cfg: Config) -> torch.device:
    device = dist.init(cfg.train.device)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


@dataclass
class _State:
    """Everything a step changes and `last.pt` saves."""

    nets: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler | None
    gen: torch.Generator
    step: int = 0
    best: dict = field(default_factory=lambda: {"miou": float("-inf"), "step": -1, "net": None})
    seconds: float = 0.0
    """training seconds of earlier calls (resume)"""


def channels_last(cfg: Config, device: torch.device) -> bool:
    """Whether train.channels_last puts networks and inputs in channels_last on `device` (auto: CUDA only)."""
    return cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and device.type == "cuda")


def build_nets(cfg: Config, method, info: DatasetInfo, device: torch.device, nets=None) -> dict[str, nn.Module]:
    """The method's networks (or `nets`) on the device, built under torch.manual_seed(train.seed).

    Under torchrun with model.sync_bn, every net whose BatchNorm runs on batch statistics gets SyncBatchNorm: the
    TRAINED nets and the method's TRAIN_MODE_TEACHERS (teachers the reference runs in train mode and synchronises over
    all GPUs, e.g. DSSN's and CTT's), so their statistics are those of the whole batch, not of one GPU's share.
    """
    torch.manual_seed(cfg.train.seed)
    nets = nets if nets is not None else method.build(cfg, info)
    nets = {name: net.to(device) for name, net in nets.items()}
    if channels_last(cfg, device):
        nets = {name: net.to(memory_format=torch.channels_last) for name, net in nets.items()}
    if dist.world_size() > 1 and cfg.model.sync_bn:
        for name in (*method.TRAINED, *getattr(method, "TRAIN_MODE_TEACHERS", ())):
            nets[name] = dist.sync_batchnorm(nets[name], device)
    return nets


def _resume(state: _State, path: Path) -> None:
    """Load `last.pt` into the state: networks, optimizers, scaler, RNG, step, best, seconds."""
    saved = checkpoint.load(path)
    for name, net in state.nets.items():
        checkpoint.unwrap(net).load_state_dict(saved["nets"][name])
    for name, opt in state.optimizers.items():
        opt.load_state_dict(saved["optim"][name])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    rng = saved["rng"][dist.rank()] if isinstance(saved["rng"], list) else saved["rng"]
    checkpoint.set_rng_state(rng, state.gen)
    state.step, state.best, state.seconds = saved["step"], saved["best"], saved.get("seconds", 0.0)


def _resume_or_start(state: _State, cfg: Config, run_dir: Path, log: RunLog, iters: int, dtype, device) -> None:
    """Resume from run_dir/last.pt (state, RNG, metrics cut to its step), or log the config and write config.yaml."""
    last_path = run_dir / "last.pt"
    if last_path.is_file():
        _resume(state, last_path)
        if state.step >= iters and (run_dir / "results.json").is_file():
            log.info(f"{run_dir}: already finished ({iters} steps); nothing to do")
    else:
        log.info(
            f"run folder {run_dir}\nconfig:\n{config_mod.dump(cfg)}seed {cfg.train.seed}\nversions {versions()}", False
        )
        log.info(f"run folder {run_dir} (resolved config: {run_dir / 'config.yaml'}, log: {run_dir / 'log.txt'})")
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(run_dir / "config.yaml", config_mod.dump(cfg))
    precision = f"{dtype} autocast".replace("torch.", "") if dtype is not None else "fp32"
    layout = "channels_last" if channels_last(cfg, device) else "contiguous"
    log.info(f"precision: {precision} (train.amp={cfg.train.amp}), memory layout: {layout} ({device.type})", False)
    if state.step > 0:
        log.info(f"resuming {run_dir} at step {state.step}/{iters}")
        log.truncate_metrics(state.step)


def _save_last(state: _State, path: Path, cfg: Config, seconds: float, saver: checkpoint.BackgroundSaver) -> None:
    """Write `last.pt` (rank 0, from a background thread: the step waits for a snapshot of the state, not for the
    write) with every rank's RNG state; all ranks wait for the snapshot."""
    saved = {
        "step": state.step,
        "nets": {n: checkpoint.clean_state_dict(checkpoint.unwrap(v).state_dict()) for n, v in state.nets.items()},
        "optim": {n: o.state_dict() for n, o in state.optimizers.items()},
        "scaler": state.scaler.state_dict() if state.scaler is not None else {},
        "best": state.best,
        "seconds": seconds,
        "config": config_mod.dump(cfg),
    }
    mine = checkpoint.rng_state(state.gen)
    rngs = [None] * dist.world_size()
    if dist.world_size() > 1:
        torch.distributed.all_gather_object(rngs, mine)
    else:
        rngs = [mine]
    saved["rng"] = rngs
    if dist.is_main():
        saver.save(path, saved)
    dist.barrier()


def compile_encoders(nets: dict[str, nn.Module], names) -> None:
    """torch.compile, in place, the encoder (`.backbone`) of each named net, else the whole net.

    The encoder is the one module every forward path of a method goes through (forward, UniMatch's forward_fp, the
    feature paths of DSSN and CTT) and carries most of the compute. Compiling the whole net wrapped only its
    forward, and with UniMatch (eager forward_fp beside compiled forward on the same BatchNorm layers) backward
    failed on torch 2.13 ("modified by an inplace operation"). In place: state-dict keys do not change.
    """
    for name in names:
        net = nets[name]
        target = getattr(net, "backbone", None)
        (target if isinstance(target, nn.Module) else net).compile()


def _wrap_for_training(nets: dict[str, nn.Module], method, cfg: Config, device: torch.device) -> None:
    """torch.compile of the trained nets' encoders (train.compile) and DistributedDataParallel (under torchrun)."""
    if cfg.train.compile:
        compile_encoders(nets, method.TRAINED)
    if dist.world_size() > 1:
        find_unused = getattr(method, "DDP_FIND_UNUSED", False)
        for name in method.TRAINED:
            nets[name] = dist.DDPNet(nets[name], device, find_unused)


def _open_streams(cfg: Config, data: TrainData, uses_unlabeled: bool, start: int, device: torch.device):
    """(labeled, unlabeled or None, CutMix-partner or None) streams, positioned after `start` steps."""
    rank, world, pin = dist.rank(), dist.world_size(), device.type == "cuda"
    d, seed, consumed = cfg.data, cfg.train.seed, start * cfg.optim.accumulate
    lab = Stream(
        CropSet(data.labeled, d.crop, d.scale_range, d.base_size, labeled=True),
        d.batch_size, seed, STREAM_LABELED, d.workers, consumed * d.batch_size, rank, world, pin,
    )  # fmt: skip
    if not uses_unlabeled:
        return lab, None, None
    unl_set = CropSet(data.unlabeled, d.crop, d.scale_range, d.base_size, labeled=False)
    args = (d.batch_size_u, seed)
    unl = Stream(unl_set, *args, STREAM_UNLABELED, d.workers, consumed * d.batch_size_u, rank, world, pin)
    mix = None
    if cfg.train.mix_partner == "stream":
        mix = Stream(unl_set, *args, STREAM_MIX, d.workers, consumed * d.batch_size_u, rank, world, pin)
    return lab, unl, mix


def _train_step(state: _State, method, streams, ctx: Context, dtype, last_path: Path) -> tuple[dict, float]:
    """One optimizer step over optim.accumulate micro-batches: (the first micro-batch's logs, data seconds)."""
    cfg = ctx.config
    accumulate = cfg.optim.accumulate
    data_time = 0.0
    step_logs: dict = {}
    for micro in range(accumulate):
        td = time.perf_counter()
        batch = Batch(*(next(s) if s is not None else None for s in streams)).to(ctx.device)
        data_time += time.perf_counter() - td
        with autocast(ctx.device, dtype):
            out = method.train_step(state.nets, batch, cfg.method, ctx)
        if not torch.isfinite(out.loss.detach()):
            logs = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in out.logs.items()}
            raise TrainingError(
                f"non-finite loss at step {ctx.step}: loss={float(out.loss.detach())} logs={logs}; "
                f"the last good checkpoint is {last_path if last_path.exists() else 'none yet'}"
            )
        loss = out.loss / accumulate
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
        else:
            loss.backward()
        if micro == 0:
            step_logs = {"train/loss": out.loss.detach(), **out.logs}
    for opt in state.optimizers.values():
        if state.scaler is not None:
            state.scaler.unscale_(opt)
        if cfg.optim.grad_clip > 0:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        if state.scaler is not None:
            state.scaler.step(opt)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.update()
    if hasattr(method, "after_step"):
        method.after_step(state.nets, cfg.method, ctx)
    return step_logs, data_time


def _evaluate(state: _State, method, val_set, cfg: Config, info, device, dtype, log: RunLog, run_dir: Path) -> dict:
    """Evaluate every EVAL_NETS net, log it, export best.safetensors on a new best; the evaluation record."""
    from semiseg.engine.evaluate import evaluate_config

    results = {
        name: evaluate_config(checkpoint.unwrap(state.nets[name]), val_set, info, cfg, device, amp_dtype=dtype)
        for name in method.EVAL_NETS
    }
    for net in state.nets.values():
        net.train()
    step = state.step
    for name, res in results.items():
        log.info(f"eval {name} step {step}: mIoU {res['miou']:.2f} ({res['mode']}, {res['images']} images)")
        per_class = {f"val/{name}/iou/{k}": v for k, v in res["iou"].items()}
        log.metrics(step, {f"val/{name}/miou": res["miou"], **per_class})
    top_name = max(results, key=lambda n: results[n]["miou"])
    top = results[top_name]
    if top["miou"] > state.best["miou"]:
        state.best = {"miou": top["miou"], "step": step, "net": top_name, "iou": top["iou"]}
        if dist.is_main():
            meta = export_meta(cfg, info, top_name, step, miou=top["miou"])
            checkpoint.export_model(run_dir / "best.safetensors", state.nets[top_name], meta)
    return {
        "miou": top["miou"],
        "step": step,
        "net": top_name,
        "iou": top["iou"],
        "all": {n: r["miou"] for n, r in results.items()},
    }


def _finish(state: _State, method, cfg: Config, info, run_dir: Path, last_eval: dict, iters: int, timing: dict):
    """Rank 0: last.safetensors (the last evaluation's net) and results.json; the log's closing line."""
    export_name = last_eval.get("net") or method.EVAL_NETS[0]
    meta = export_meta(cfg, info, export_name, state.step, miou=last_eval.get("miou"))
    checkpoint.export_model(run_dir / "last.safetensors", state.nets[export_name], meta)
    best = state.best
    summary = {
        "method": cfg.method.name,
        "steps": iters,
        "best": best if best["step"] >= 0 else None,
        "last": last_eval or None,
        **timing,
        "eval_mode": cfg.eval.mode or info.eval_mode,
        "val_split": cfg.data.val_split,
    }
    atomic.write_json(run_dir / "results.json", summary)
    return (
        f"done in {format_duration(timing['train_seconds'])}: "
        + (f"best mIoU {best['miou']:.2f} (step {best['step']}, {best['net']})" if best["step"] >= 0 else "")
        + (f", last {last_eval['miou']:.2f}" if last_eval else "")
    )


def _close(log: RunLog, streams) -> None:
    """Close the run's log files (and its handler on the `semiseg` logger) and its loader streams."""
    log.close()
    for s in streams:
        if s is not None:
            s.close()


def fit(
    cfg: Config,
    run_dir: str | Path,
    method: ModuleType,
    data: TrainData | None = None,
    val_set=None,
    info: DatasetInfo | None = None,
    nets: dict[str, nn.Module] | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
    snapshots: int = 0,
) -> FitResult:
    """Train `method` as configured, in `run_dir`; resume if `run_dir/last.pt` exists; return the results.

    `data` defaults to method.prepare(cfg, run_dir, info) when the method has one, else to the lists cfg.data
    describes; `val_set` and `info` default to what cfg.data describes. `nets` replaces method.build.
    `snapshots` = K exports snapshot_1..K.safetensors at snapshot_steps(iters, K) (ST++'s stability score).
    `stop_after` ends the process-local loop after that many steps of this call without finishing the run (tests
    of resume).
    """
    from semiseg.data.datasets import build_dataset, dataset_info

    run_dir = Path(run_dir)
    device = _setup_device(cfg)
    info = info or dataset_info(cfg.data)
    log = RunLog(run_dir, quiet=quiet)
    if data is None:
        data = method.prepare(cfg, run_dir, info) if hasattr(method, "prepare") else build_train_data(cfg)
    if val_set is None and cfg.data.val_split:
        val_set = build_dataset(cfg.data, cfg.data.val_split)

    built = build_nets(cfg, method, info, device, nets)
    optimizers = {name: build_optimizer(built[name], cfg.optim) for name in method.TRAINED}
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + dist.rank())
    state = _State(built, optimizers, scaler, gen)

    n_lab = sum(len(p.dataset) * p.repeat for p in data.labeled)
    n_unl = sum(len(p.dataset) * p.repeat for p in data.unlabeled) if method.USES_UNLABELED else 0
    if method.USES_UNLABELED and n_unl == 0:
        raise ConfigError(f"method.name: {cfg.method.name} needs unlabeled images; data.unlabeled is empty")
    iters = total_iters(cfg, n_lab, n_unl, dist.world_size())

    last_path = run_dir / "last.pt"
    _resume_or_start(state, cfg, run_dir, log, iters, dtype, device)
    start = state.step
    _wrap_for_training(state.nets, method, cfg, device)
    streams = _open_streams(cfg, data, method.USES_UNLABELED, start, device)
    d = cfg.data
    unlabeled_per_step = d.batch_size_u * (2 if streams[2] else 1) if streams[1] else 0
    images_per_step = (d.batch_size + unlabeled_per_step) * cfg.optim.accumulate * dist.world_size()
    meter = Meter()
    eval_every = epoch_steps(cfg, n_lab, n_unl, dist.world_size()) if cfg.eval.per_epoch else cfg.eval.every
    ckpt_every = cfg.train.ckpt_every or eval_every or max(iters // 10, 1)
    saver = checkpoint.BackgroundSaver()
    snapshot_at = list(enumerate(snapshot_steps(iters, snapshots), 1)) if snapshots else []
    t_start = time.perf_counter()
    steps_this_call = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for net in state.nets.values():
        net.train()

    last_eval: dict = {}
    try:
        while state.step < iters:
            if stop_after is not None and steps_this_call >= stop_after:
                break
            t0 = time.perf_counter()
            lr = poly_lr(cfg.optim.lr, state.step, iters, cfg.optim.poly_power, cfg.optim.warmup_iters)
            for opt in state.optimizers.values():
                set_lr(opt, lr, cfg.optim)
            ctx = Context(state.step, iters, gen, info, device, cfg, data.tags)
            step_logs, data_time = _train_step(state, method, streams, ctx, dtype, last_path)
            state.step += 1
            steps_this_call += 1
            step = state.step
            meter.add(step_logs, data_time, time.perf_counter() - t0)

            if step % cfg.train.log_every == 0 or step == iters:
                its, wait = meter.timing()
                values = meter.read()
                log.info(progress_line(step, iters, its, wait, values, lr))
                log.metrics(step, {**values, "train/lr": lr, "train/its": its, "train/data_wait": wait})
            do_eval = val_set is not None and ((eval_every > 0 and step % eval_every == 0) or step == iters)
            if do_eval:
                last_eval = _evaluate(state, method, val_set, cfg, info, device, dtype, log, run_dir)
            if dist.is_main():
                for k in [k for k, at in snapshot_at if at == step]:
                    meta = export_meta(cfg, info, "model", step, snapshot=k)
                    checkpoint.export_model(run_dir / snapshot_name(k), state.nets["model"], meta)
            if (do_eval or (ckpt_every > 0 and step % ckpt_every == 0)) and step < iters:
                _save_last(state, last_path, cfg, state.seconds + time.perf_counter() - t_start, saver)
    except BaseException as e:
        # e.g. a non-finite loss: the last good checkpoint is complete on disk before the error leaves fit(), the
        # run's log says why it stopped, and the next fit in this process (a bench's next run) neither logs into this
        # run's files nor inherits its loader workers
        with contextlib.suppress(Exception):
            saver.wait()
        with contextlib.suppress(Exception):
            log.info(f"stopped at step {state.step}: {type(e).__name__}: {e}", console=False)
        with contextlib.suppress(Exception):
            _close(log, streams)
        raise

    train_seconds = state.seconds + time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    result_imgs = images_per_step * steps_this_call / max(time.perf_counter() - t_start, 1e-9)
    best = state.best
    if state.step >= iters and steps_this_call > 0:
        _save_last(state, last_path, cfg, train_seconds, saver)
        saver.wait()  # last.pt is complete before results.json says the run is
        if dist.is_main():
            timing = {
                "train_seconds": round(train_seconds, 1),
                "images_per_second": round(result_imgs, 2),
                "peak_memory_mb": round(peak, 1),
            }
            log.info(_finish(state, method, cfg, info, run_dir, last_eval, iters, timing))
    elif state.step >= iters and (run_dir / "results.json").is_file():
        summary = json.loads((run_dir / "results.json").read_text())
        last_eval = summary.get("last") or {}
        best = summary.get("best") or best
    saver.wait()
    _close(log, streams)
    plain = {n: checkpoint.unwrap(v.module if isinstance(v, dist.DDPNet) else v) for n, v in state.nets.items()}
    return FitResult(run_dir, best, last_eval, train_seconds, result_imgs, plain, peak)

"""fit(): the one training loop every method runs on.

A method supplies `build` (its networks), `train_step` (one step's loss and logs) and optionally `after_step`
(EMA teachers, queues). This loop alone does backward, the optimizer step, the lr schedule, logging, evaluation
and checkpoints. Rerunning the same command on the same run folder resumes from `last.pt` exactly: networks,
optimizers, scaler, step, RNG states and every stream's position.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

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


@dataclass
class TrainData:
    """The training lists of one fit: labeled parts (GT or pseudo-labels) and unlabeled parts."""

    labeled: list[Part]
    unlabeled: list[Part] = field(default_factory=list)


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


def total_iters(cfg: Config, n_labeled: int, n_unlabeled: int, world: int) -> int:
    """train.iters, or train.epochs over the unlabeled set (labeled set when there is none) in steps."""
    if cfg.train.iters > 0:
        return cfg.train.iters
    if cfg.train.epochs <= 0:
        raise config_mod.ConfigError("train: set train.iters or train.epochs")
    if n_unlabeled > 0:
        per_epoch = n_unlabeled // max(cfg.data.batch_size_u * world, 1)
    else:
        per_epoch = n_labeled // max(cfg.data.batch_size * world, 1)
    return max(1, math.ceil(cfg.train.epochs * max(per_epoch, 1) / cfg.optim.accumulate))


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


def build_train_data(cfg: Config) -> TrainData:
    """Labeled and unlabeled lists from cfg.data (splits.resolve_train_split)."""
    from semiseg.data.datasets import resolve_train_split

    labeled, unlabeled = resolve_train_split(cfg.data)
    repeat = max(cfg.data.repeat_labeled, 1)
    return TrainData([Part(labeled, repeat=repeat)], [Part(unlabeled)] if unlabeled is not None else [])


def channels_last(cfg: Config, device: torch.device) -> bool:
    """Whether train.channels_last puts networks and inputs in channels_last on `device` (auto: CUDA only)."""
    return cfg.train.channels_last == "on" or (cfg.train.channels_last == "auto" and device.type == "cuda")


def _prepare(net: nn.Module, device: torch.device, cfg: Config) -> nn.Module:
    net = net.to(device)
    if channels_last(cfg, device):
        net = net.to(memory_format=torch.channels_last)
    return net


def _evaluate_nets(method, nets, val_set, cfg: Config, info, device, dtype) -> dict[str, dict]:
    from semiseg.engine.evaluate import evaluate_config

    return {
        name: evaluate_config(checkpoint.unwrap(nets[name]), val_set, info, cfg, device, amp_dtype=dtype)
        for name in method.EVAL_NETS
    }


def fit(
    cfg: Config,
    run_dir: str | Path,
    method: ModuleType,
    train: TrainData | None = None,
    val_set=None,
    info: DatasetInfo | None = None,
    nets: dict[str, nn.Module] | None = None,
    quiet: bool = False,
    stop_after: int | None = None,
) -> FitResult:
    """Train `method` as configured, in `run_dir`; resume if `run_dir/last.pt` exists; return the results.

    `train`, `val_set` and `info` default to what cfg.data describes. `nets` replaces method.build (multi-stage
    methods pass fresh networks). `stop_after` ends the process-local loop after that many steps of this call
    without finishing the run (tests of resume).
    """
    from semiseg.data.datasets import build_dataset, dataset_info

    run_dir = Path(run_dir)
    device = dist.init(cfg.train.device)
    rank, world = dist.rank(), dist.world_size()
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = info or dataset_info(cfg.data)
    train = train or build_train_data(cfg)
    if val_set is None and cfg.data.val_split:
        val_set = build_dataset(cfg.data, cfg.data.val_split)
    log = RunLog(run_dir, quiet=quiet)

    torch.manual_seed(cfg.train.seed)
    nets = nets if nets is not None else method.build(cfg, info)
    nets = {name: _prepare(net, device, cfg) for name, net in nets.items()}
    if world > 1 and cfg.model.sync_bn:
        for name in method.TRAINED:
            nets[name] = nn.SyncBatchNorm.convert_sync_batchnorm(nets[name])
    optimizers = {name: build_optimizer(nets[name], cfg.optim) for name in method.TRAINED}
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    n_lab = sum(len(p.dataset) * p.repeat for p in train.labeled)
    n_unl = sum(len(p.dataset) * p.repeat for p in train.unlabeled) if method.USES_UNLABELED else 0
    if method.USES_UNLABELED and n_unl == 0:
        raise config_mod.ConfigError(f"method.name: {cfg.method.name} needs unlabeled images; data.unlabeled is empty")
    iters = total_iters(cfg, n_lab, n_unl, world)
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + rank)

    start, best, history_seconds = 0, {"miou": float("-inf"), "step": -1, "net": None}, 0.0
    last_path = run_dir / "last.pt"
    if last_path.is_file():
        state = checkpoint.load(last_path)
        for name, net in nets.items():
            checkpoint.unwrap(net).load_state_dict(state["nets"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optim"][name])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"], gen)
        start, best, history_seconds = state["step"], state["best"], state.get("seconds", 0.0)
        if start >= iters and (run_dir / "results.json").is_file():
            log.info(f"{run_dir}: already finished ({iters} steps); nothing to do")
    else:
        log.info(
            f"run folder {run_dir}\nconfig:\n{config_mod.dump(cfg)}seed {cfg.train.seed}\nversions {versions()}", False
        )
        log.info(f"run folder {run_dir} (resolved config: {run_dir / 'config.yaml'}, log: {run_dir / 'log.txt'})")
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(run_dir / "config.yaml", config_mod.dump(cfg))

    precision = f"{dtype} autocast".replace("torch.", "") if dtype is not None else "fp32"
    layout = "channels_last" if channels_last(cfg, device) else "contiguous"
    log.info(f"precision: {precision} (train.amp={cfg.train.amp}), memory layout: {layout} ({device.type})", False)
    if start > 0:
        log.info(f"resuming {run_dir} at step {start}/{iters}")
        log.truncate_metrics(start)

    if cfg.train.compile:
        for name in method.TRAINED:
            nets[name] = torch.compile(nets[name])
    if world > 1:
        find_unused = getattr(method, "DDP_FIND_UNUSED", False)
        for name in method.TRAINED:
            nets[name] = dist.DDPNet(nets[name], device, find_unused)

    accumulate = cfg.optim.accumulate
    workers = cfg.data.workers
    pin = device.type == "cuda"
    crop, scale, base = cfg.data.crop, cfg.data.scale_range, cfg.data.base_size
    bl, bu = cfg.data.batch_size, cfg.data.batch_size_u
    lab_stream = Stream(
        CropSet(train.labeled, crop, scale, base, labeled=True),
        bl, cfg.train.seed, STREAM_LABELED, workers, start * bl * accumulate, rank, world, pin,
    )  # fmt: skip
    unl_stream = mix_stream = None
    if method.USES_UNLABELED:
        unl_set = CropSet(train.unlabeled, crop, scale, base, labeled=False)
        unl_stream = Stream(
            unl_set, bu, cfg.train.seed, STREAM_UNLABELED, workers, start * bu * accumulate, rank, world, pin
        )
        if cfg.train.mix_partner == "stream":
            mix_stream = Stream(
                unl_set, bu, cfg.train.seed, STREAM_MIX, workers, start * bu * accumulate, rank, world, pin
            )

    images_per_step = (bl + (bu * (2 if mix_stream else 1) if unl_stream else 0)) * accumulate * world
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )
    meter = Meter()
    eval_every = cfg.eval.every
    ckpt_every = cfg.train.ckpt_every or eval_every or max(iters // 10, 1)
    t_start = time.perf_counter()
    steps_this_call = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for net in nets.values():
        net.train()

    saver = checkpoint.BackgroundSaver()  # the step waits for a snapshot of the state, not for the write

    def save_last(step: int) -> None:
        states = {
            "step": step,
            "nets": {n: checkpoint.clean_state_dict(checkpoint.unwrap(v).state_dict()) for n, v in nets.items()},
            "optim": {n: o.state_dict() for n, o in optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "best": best,
            "seconds": history_seconds + time.perf_counter() - t_start,
            "config": config_mod.dump(cfg),
        }
        rngs = [None] * world
        my_rng = checkpoint.rng_state(gen)
        if world > 1:
            torch.distributed.all_gather_object(rngs, my_rng)
        else:
            rngs = [my_rng]
        states["rng"] = rngs
        if dist.is_main():
            saver.save(last_path, states)
        dist.barrier()

    step = start
    lr = poly_lr(cfg.optim.lr, step, iters, cfg.optim.poly_power, cfg.optim.warmup_iters)
    last_eval: dict = {}
    while step < iters:
        if stop_after is not None and steps_this_call >= stop_after:
            break
        t0 = time.perf_counter()
        lr = poly_lr(cfg.optim.lr, step, iters, cfg.optim.poly_power, cfg.optim.warmup_iters)
        for opt in optimizers.values():
            set_lr(opt, lr)
        data_time = 0.0
        step_logs: dict = {}
        for micro in range(accumulate):
            td = time.perf_counter()
            batch = Batch(
                next(lab_stream),
                next(unl_stream) if unl_stream is not None else None,
                next(mix_stream) if mix_stream is not None else None,
            ).to(device)
            data_time += time.perf_counter() - td
            ctx = Context(step=step, iters=iters, gen=gen, info=info, device=device, config=cfg)
            with autocast():
                out = method.train_step(nets, batch, cfg.method, ctx)
            if not torch.isfinite(out.loss.detach()):
                logs = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in out.logs.items()}
                raise TrainingError(
                    f"non-finite loss at step {step}: loss={float(out.loss.detach())} logs={logs}; "
                    f"the last good checkpoint is {last_path if last_path.exists() else 'none yet'}"
                )
            loss = out.loss / accumulate
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if micro == 0:
                step_logs = {"train/loss": out.loss.detach(), **out.logs}
        for opt in optimizers.values():
            if scaler is not None:
                scaler.unscale_(opt)
            if cfg.optim.grad_clip > 0:
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        if hasattr(method, "after_step"):
            method.after_step(nets, cfg.method, Context(step, iters, gen, info, device, cfg))
        step += 1
        steps_this_call += 1
        meter.add(step_logs, data_time, time.perf_counter() - t0)

        if step % cfg.train.log_every == 0 or step == iters:
            its, wait = meter.timing()
            values = meter.read()
            log.info(progress_line(step, iters, its, wait, values, lr))
            log.metrics(step, {**values, "train/lr": lr, "train/its": its, "train/data_wait": wait})

        do_eval = val_set is not None and ((eval_every > 0 and step % eval_every == 0) or step == iters)
        if do_eval:
            results = _evaluate_nets(method, nets, val_set, cfg, info, device, dtype)
            for net in nets.values():
                net.train()
            for name, res in results.items():
                log.info(f"eval {name} step {step}: mIoU {res['miou']:.2f} ({res['mode']}, {res['images']} images)")
                log.metrics(
                    step, {f"val/{name}/miou": res["miou"], **{f"val/{name}/iou/{k}": v for k, v in res["iou"].items()}}
                )
            top_name = max(results, key=lambda n: results[n]["miou"])
            top = results[top_name]
            last_eval = {
                "miou": top["miou"],
                "step": step,
                "net": top_name,
                "iou": top["iou"],
                "all": {n: r["miou"] for n, r in results.items()},
            }
            if top["miou"] > best["miou"]:
                best = {"miou": top["miou"], "step": step, "net": top_name, "iou": top["iou"]}
                if dist.is_main():
                    meta = {
                        "config": config_mod.to_dict(cfg),
                        "classes": list(info.classes),
                        "net": top_name,
                        "palette": [list(c) for c in info.palette],
                        "step": step,
                        "miou": top["miou"],
                    }
                    checkpoint.export_model(run_dir / "best.safetensors", nets[top_name], meta)
        if (do_eval or (ckpt_every > 0 and step % ckpt_every == 0)) and step < iters:
            save_last(step)

    train_seconds = history_seconds + time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    result_imgs = images_per_step * steps_this_call / max(time.perf_counter() - t_start, 1e-9)
    if step >= iters and steps_this_call > 0:
        save_last(step)
        saver.wait()  # last.pt is complete before results.json says the run is
        if dist.is_main():
            export_name = last_eval.get("net") or method.EVAL_NETS[0]
            meta = {
                "config": config_mod.to_dict(cfg),
                "classes": list(info.classes),
                "net": export_name,
                "palette": [list(c) for c in info.palette],
                "step": step,
                "miou": last_eval.get("miou"),
            }
            checkpoint.export_model(run_dir / "last.safetensors", nets[export_name], meta)
            summary = {
                "method": cfg.method.name,
                "steps": iters,
                "best": best if best["step"] >= 0 else None,
                "last": last_eval or None,
                "train_seconds": round(train_seconds, 1),
                "images_per_second": round(result_imgs, 2),
                "peak_memory_mb": round(peak, 1),
                "eval_mode": cfg.eval.mode or info.eval_mode,
                "val_split": cfg.data.val_split,
            }
            checkpoint.atomic_write_json(run_dir / "results.json", summary)
            log.info(
                f"done in {format_duration(train_seconds)}: "
                + (f"best mIoU {best['miou']:.2f} (step {best['step']}, {best['net']})" if best["step"] >= 0 else "")
                + (f", last {last_eval['miou']:.2f}" if last_eval else "")
            )
    elif step >= iters and (run_dir / "results.json").is_file():
        import json

        summary = json.loads((run_dir / "results.json").read_text())
        last_eval = summary.get("last") or {}
        best = summary.get("best") or best
    saver.wait()
    log.close()
    for s in (lab_stream, unl_stream, mix_stream):
        if s is not None:
            s.close()
    plain = {n: checkpoint.unwrap(v.module if isinstance(v, dist.DDPNet) else v) for n, v in nets.items()}
    return FitResult(run_dir, best, last_eval, train_seconds, result_imgs, plain, peak)

"""Training images/s of methods' steps (forward, backward, optimizer) on random crops, data loading excluded, with
several precisions / memory layouts measured side by side.

usage: python benchmarks/step_speed.py PRESET [--methods A,B] [--variants off,bf16] [--steps N] [--set k=v ...]
e.g.   python benchmarks/step_speed.py configs/camvid/bench.yaml --methods supervised,fixmatch,unimatch
       python benchmarks/step_speed.py configs/camvid/bench.yaml --methods unimatch --variants off,bf16,off+cl,bf16+cl

A variant is train.amp (off | bf16 | auto | fp16) plus `+cl` for channels_last and `+compile` for torch.compile of
the trained networks' encoders (as train.compile does; the first steps compile, so give --warmup room). The variants
of one method take turns step by step (A, B, A, B, ...) from identical weights, so machine load hits them alike:
compare the columns of one row. Printed: seconds per step (median), training images/s (labeled + unlabeled crops),
and each variant's speed relative to the first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what `import semiseg` sets; before torch loads OpenMP

import torch  # noqa: E402

from semiseg.data.batch import Batch, LabeledBatch, UnlabeledBatch  # noqa: E402
from semiseg.data.datasets import dataset_info  # noqa: E402
from semiseg.engine.log import cpu_name  # noqa: E402
from semiseg.engine.loop import Context, amp_dtype, channels_last, compile_encoders  # noqa: E402
from semiseg.engine.optim import build_optimizer  # noqa: E402
from semiseg.methods import METHODS, load_config  # noqa: E402


def random_batch(cfg, num_classes, device, gen):
    bl, bu, crop = cfg.data.batch_size, cfg.data.batch_size_u, cfg.data.crop
    img = lambda n: torch.randint(0, 256, (n, 3, crop, crop), generator=gen, dtype=torch.uint8)  # noqa: E731
    mask = torch.randint(0, num_classes, (bl, crop, crop), generator=gen)
    pad = torch.zeros(bu, crop, crop, dtype=torch.bool)
    return Batch(LabeledBatch(img(bl), mask), UnlabeledBatch(img(bu), pad), UnlabeledBatch(img(bu), pad)).to(device)


class Runner:
    """One method in one variant: its nets, optimizers and autocast dtype; step() times one training step."""

    def __init__(self, cfg, method, info, device, state):
        self.cfg, self.method, self.info, self.device = cfg, method, info, device
        nets = method.build(cfg, info)
        for name, net in nets.items():
            net.load_state_dict(state[name])
        # as the loop does (engine.loop.channels_last): cfg.train.channels_last is "auto" | "on" | "off", all truthy
        fmt = torch.channels_last if channels_last(cfg, device) else torch.contiguous_format
        self.nets = {k: v.to(device, memory_format=fmt).train() for k, v in nets.items()}
        self.opts = [build_optimizer(self.nets[n], cfg.optim) for n in method.TRAINED]
        if cfg.train.compile:
            compile_encoders(self.nets, method.TRAINED)
        self.dtype = amp_dtype(cfg, device)
        self.gen = torch.Generator().manual_seed(0)
        self.batch = random_batch(cfg, info.num_classes, device, torch.Generator().manual_seed(0))
        self.i = 0

    def step(self) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        ctx = Context(self.i, 1000, self.gen, self.info, self.device, self.cfg)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.method.train_step(self.nets, self.batch, self.cfg.method, ctx)
        out.loss.backward()
        for o in self.opts:
            o.step()
            o.zero_grad(set_to_none=True)
        if hasattr(self.method, "after_step"):
            self.method.after_step(self.nets, self.cfg.method, ctx)
        sync()
        self.i += 1
        return time.perf_counter() - t


def variant_overrides(variant: str) -> list[str]:
    """'bf16+cl+compile' -> the train.amp / channels_last / compile overrides of that variant."""
    amp, *suffixes = variant.split("+")
    unknown = set(suffixes) - {"cl", "compile"}
    if unknown:
        raise SystemExit(f"variant {variant!r}: suffixes are +cl (channels_last) and +compile, not {sorted(unknown)}")
    cl = "on" if "cl" in suffixes else "off"
    return [f"train.amp={amp}", f"train.channels_last={cl}", f"train.compile={'compile' in suffixes}"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("preset")
    p.add_argument("--methods", "--method", default="supervised", help="comma-separated method names")
    p.add_argument("--variants", default="off,bf16", help="train.amp values, +cl channels_last, +compile torch.compile")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    base = list(args.overrides) + ["model.pretrained="]
    print(f"{args.preset}: {cpu_name()}, {args.threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})")
    for name in [m for m in args.methods.split(",") if m]:
        cfgs = [load_config(args.preset, base + [f"method.name={name}", *variant_overrides(v)]) for v in variants]
        cfg0 = cfgs[0]
        device = torch.device("cuda" if torch.cuda.is_available() and cfg0.train.device != "cpu" else "cpu")
        info = dataset_info(cfg0.data)
        method = METHODS[name]
        torch.manual_seed(0)
        state = {k: v.state_dict() for k, v in method.build(cfg0, info).items()}
        runners = [Runner(cfg, method, info, device, state) for cfg in cfgs]
        times = [[] for _ in runners]
        for i in range(args.warmup + args.steps):
            for r, t in zip(runners, times):
                sec = r.step()
                if i >= args.warmup:
                    t.append(sec)
        n_img = cfg0.data.batch_size + (cfg0.data.batch_size_u if method.USES_UNLABELED else 0)
        medians = [statistics.median(t) for t in times]
        cells = [f"{v} {m:.3f} s ({n_img / m:.1f} img/s, x{medians[0] / m:.2f})" for v, m in zip(variants, medians)]
        print(
            f"{name:<11} {cfg0.model.backbone}/{cfg0.model.head} OS{cfg0.model.output_stride} crop {cfg0.data.crop} "
            f"batch {cfg0.data.batch_size}+{cfg0.data.batch_size_u if method.USES_UNLABELED else 0}: "
            + " | ".join(cells),
            flush=True,
        )


if __name__ == "__main__":
    main()

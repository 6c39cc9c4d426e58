"""Training images/s of one method's step (forward, backward, optimizer) on random crops, data loading excluded.

usage: python benchmarks/step_speed.py PRESET [--method NAME] [--steps N] [--warmup N] [--set k=v ...]
e.g.   python benchmarks/step_speed.py configs/pascal/supervised_r101_92.yaml --steps 2 --warmup 1
       python benchmarks/step_speed.py configs/camvid/bench.yaml --method unimatch
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from semiseg.data.batch import Batch, LabeledBatch, UnlabeledBatch  # noqa: E402
from semiseg.data.datasets import dataset_info  # noqa: E402
from semiseg.engine.loop import Context, amp_dtype  # noqa: E402
from semiseg.engine.optim import build_optimizer  # noqa: E402
from semiseg.methods import METHODS, load_config  # noqa: E402


def random_batch(cfg, num_classes, device, gen):
    bl, bu, crop = cfg.data.batch_size, cfg.data.batch_size_u, cfg.data.crop
    img = lambda n: torch.randint(0, 256, (n, 3, crop, crop), generator=gen, dtype=torch.uint8)  # noqa: E731
    mask = torch.randint(0, num_classes, (bl, crop, crop), generator=gen)
    pad = torch.zeros(bu, crop, crop, dtype=torch.bool)
    return Batch(LabeledBatch(img(bl), mask), UnlabeledBatch(img(bu), pad)).to(device)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("preset")
    p.add_argument("--method", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ["model.pretrained="]
    if args.method:
        overrides.append(f"method.name={args.method}")
    cfg = load_config(args.preset, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    info = dataset_info(cfg.data)
    method = METHODS[cfg.method.name]
    nets = {k: v.to(device).train() for k, v in method.build(cfg, info).items()}
    if cfg.train.channels_last:
        nets = {k: v.to(memory_format=torch.channels_last) for k, v in nets.items()}
    opts = [build_optimizer(nets[n], cfg.optim) for n in method.TRAINED]
    gen = torch.Generator().manual_seed(0)
    dtype = amp_dtype(cfg, device)
    batch = random_batch(cfg, info.num_classes, device, gen)
    n_img = cfg.data.batch_size + (cfg.data.batch_size_u if method.USES_UNLABELED else 0)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ctx = Context(i, 100, gen, info, device, cfg)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = method.train_step(nets, batch, cfg.method, ctx)
        out.loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        if hasattr(method, "after_step"):
            method.after_step(nets, cfg.method, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    sec = sorted(times)[len(times) // 2]
    print(
        f"{args.preset} method={cfg.method.name} model={cfg.model.backbone}/{cfg.model.head} "
        f"OS{cfg.model.output_stride} "
        f"crop={cfg.data.crop} batch={cfg.data.batch_size}+{cfg.data.batch_size_u if method.USES_UNLABELED else 0} "
        f"device={device}: {sec:.3f} s/step (median of {len(times)}), {n_img / sec:.2f} training images/s"
    )


if __name__ == "__main__":
    main()

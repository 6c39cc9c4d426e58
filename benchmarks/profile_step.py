"""Where a method's training step spends its time: torch.profiler over a few steps on random crops.

usage: python benchmarks/profile_step.py PRESET [--method unimatch] [--steps 4] [--set k=v ...] [--trace out.json]

Prints the step's time and the top operators by self CPU time (convolutions forward / backward, BatchNorm,
augmentation kernels, copies, the optimizer). Data loading is excluded, as in step_speed.py.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from step_speed import Runner  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from semiseg.data.datasets import dataset_info  # noqa: E402
from semiseg.methods import METHODS, load_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("preset")
    p.add_argument("--method", default="unimatch")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace", default="", help="write a Chrome trace here")
    p.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, list(args.overrides) + ["model.pretrained=", f"method.name={args.method}"])
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    info = dataset_info(cfg.data)
    method = METHODS[args.method]
    torch.manual_seed(0)
    state = {k: v.state_dict() for k, v in method.build(cfg, info).items()}
    runner = Runner(cfg, method, info, device, state)
    for _ in range(2):
        runner.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            with record_function("step"):
                runner.step()
    events = prof.key_averages()
    step_us = next(e.cpu_time_total for e in events if e.key == "step") / args.steps
    print(f"{args.method}: {step_us / 1e6:.3f} s per step (CPU time under the profiler, {args.steps} steps)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()

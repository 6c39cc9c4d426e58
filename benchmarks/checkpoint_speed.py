"""How long a `last.pt` save stalls training: written inline vs by the background saver (engine/checkpoint.py).

usage: python benchmarks/checkpoint_speed.py [PRESET] [--repeats 3] [--set k=v ...]
       (default preset: configs/pascal/unimatch_r101_92.yaml --set model.backbone=resnet50, the peer comparison's model)

The state is what the loop saves: the networks, AdamW's moments after one step, RNG states. Printed: the state's
size, the median seconds the training thread is blocked per save in each mode, and the background write's duration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from semiseg.data.datasets import dataset_info  # noqa: E402
from semiseg.engine import checkpoint  # noqa: E402
from semiseg.engine.optim import build_optimizer  # noqa: E402
from semiseg.methods import METHODS, load_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("preset", nargs="?", default="configs/pascal/unimatch_r101_92.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="overrides", nargs="*", default=["model.backbone=resnet50"])
    args = p.parse_args()
    cfg = load_config(args.preset, list(args.overrides) + ["model.pretrained="])
    method = METHODS[cfg.method.name]
    nets = method.build(cfg, dataset_info(cfg.data))
    opts = {n: build_optimizer(nets[n], cfg.optim) for n in method.TRAINED}
    for n, o in opts.items():  # one step so that the optimizer holds its moments, as in a real checkpoint
        for prm in nets[n].parameters():
            prm.grad = torch.zeros_like(prm)
        o.step()
    state = {
        "nets": {n: v.state_dict() for n, v in nets.items()},
        "optim": {n: o.state_dict() for n, o in opts.items()},
        "rng": [checkpoint.rng_state()],
    }
    inline, blocked, written = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        saver = checkpoint.BackgroundSaver()
        for _ in range(args.repeats):
            t = time.perf_counter()
            checkpoint.save(path, state)
            inline.append(time.perf_counter() - t)
            t = time.perf_counter()
            saver.save(path, state)
            blocked.append(time.perf_counter() - t)
            saver.wait()
            written.append(time.perf_counter() - t)
        size = path.stat().st_size / 2**20
    print(
        f"{args.preset} {cfg.model.backbone}/{cfg.model.head}: state {size:.0f} MiB; training blocked per save: "
        f"inline {statistics.median(inline):.2f} s, background {statistics.median(blocked):.2f} s "
        f"(its write finishes after {statistics.median(written):.2f} s)"
    )


if __name__ == "__main__":
    main()

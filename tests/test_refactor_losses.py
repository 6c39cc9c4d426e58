"""Every method's per-step losses on a fixed 3-step tiny run equal the recorded ones (issue 17's refactor guard).

The recording (tests/data/refactor_losses.json) was written before the architecture refactor of issue 17 by
`OMP_NUM_THREADS=1 python tests/test_refactor_losses.py --write`, through the `semiseg train` command, so it holds
whatever the public entry point trains: every training stage of ST / ST++ / BST, SWDBN's prepared weak labels. Rerun
with `--compare` to print every difference. The test runs on one thread, as recorded, and compares to 1e-4 relative
(another CPU rounds its kernels differently in the last digits; a changed computation moves a 3-step loss by far
more); on the recording machine the values are bit-identical.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

RECORD = Path(__file__).parent / "data" / "refactor_losses.json"

TINY = [
    "data.dataset=synthetic",
    "data.synthetic_train=24",
    "data.synthetic_val=6",
    "data.synthetic_size=32",
    "data.labeled=8",
    "data.crop=32",
    "data.batch_size=2",
    "data.batch_size_u=2",
    "data.workers=0",
    "model.backbone=resnet18",
    "model.width=8",
    "model.head_channels=16",
    "model.low_level_channels=8",
    "model.output_stride=8",
    "optim.lr=0.01",
    "train.log_every=1",
    "eval.max_images=4",
]
"""tests/conftest.py's TINY, frozen here: the recording must not move when the shared fixture does"""

FIXED = ["train.iters=3", "train.amp=off", "train.device=cpu", "eval.every=0"]
"""3 steps, full precision on any CPU (amp=auto would pick bf16 on CPUs with native bf16)"""

W2S = ["method.tau=0"]
"""pseudo-labels at every pixel: with the default 0.95 a 3-step net passes none, and the unlabeled losses are 0"""

SELF_TRAINING = ["method.snapshots=2", "method.tta_scales=[1.0,0.5]", "method.small_split=0"]
"""ST / ST++ / BST: 2 snapshots (the least ST++ accepts) and two TTA scales keep the stages short; small_split 0 keeps
one copy of the 8 labeled ids in the teacher stage, as every run did when this was recorded (issue 19 made 2 copies
below 200 ids the default, after the recording)"""

RUNS = {
    "supervised": ["method.name=supervised"],
    "fixmatch": ["method.name=fixmatch", *W2S],
    "fixmatch_stream": ["method.name=fixmatch", "train.mix_partner=stream", *W2S],
    "fixmatch_two_forwards": ["method.name=fixmatch", "method.joint_forward=false", *W2S],
    "unimatch": ["method.name=unimatch", *W2S],
    "unimatch_stream": ["method.name=unimatch", "train.mix_partner=stream", *W2S],
    "unimatch_v2": ["method.name=unimatch_v2", *W2S],
    "unimatch_v2_stream": ["method.name=unimatch_v2", "train.mix_partner=stream", *W2S],
    "dssn": ["method.name=dssn"],
    "dssn_threshold": ["method.name=dssn", "method.selection=threshold", "method.warmup_steps=0"],
    "dssn_stream": ["method.name=dssn", "train.mix_partner=stream"],
    "dssn_infonce": ["method.name=dssn", "method.align=infonce", "model.proj_dim=8", "method.shared_box=true"],
    "ctt": ["method.name=ctt", "method.conf_tau=0", "method.bank_warmup_steps=1", "method.bank_gate=0"],
    "ctt_cutmix_stream": [
        "method.name=ctt",
        "method.mix=cutmix",
        "train.mix_partner=stream",
        "method.conf_tau=0",
        "method.bank_warmup_steps=1",
    ],
    "swdbn": ["method.name=swdbn", *W2S],
    "swdbn_stream": ["method.name=swdbn", "train.mix_partner=stream", *W2S],
    "swdbn_tags": ["method.name=swdbn", "method.weak_source=tags", *W2S],
    "swdbn_boxes": ["method.name=swdbn", "method.weak_source=boxes", "method.teacher=self", *W2S],
    "st": ["method.name=st", *SELF_TRAINING],
    "stpp": ["method.name=stpp", *SELF_TRAINING],
    "bst": ["method.name=bst", *SELF_TRAINING],
}


def run_losses(name: str, root: Path) -> dict[str, dict[str, list[float]]]:
    """Train RUNS[name] through `semiseg train`; {stage folder ('' = the run): {train/* key: [value per step]}}."""
    from semiseg import cli
    from semiseg import config as config_mod
    from semiseg.methods import load_config

    cfg = load_config(None, TINY + FIXED + RUNS[name])
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config_mod.to_dict(cfg)))
    out = root / name
    assert cli.main(["train", str(path), "--out", str(out)]) == 0
    stages = {}
    for metrics in sorted(out.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        rows = [r for r in rows if "train/loss" in r]
        if not rows:  # a multi-stage run's root log: no training steps of its own
            continue
        keys = sorted(k for k in rows[0] if k.startswith("train/") and k not in ("train/its", "train/data_wait"))
        stage = str(metrics.parent.relative_to(out))
        stages["" if stage == "." else stage] = {k: [r.get(k) for r in rows] for k in keys}
    for scores in out.rglob("scores.json"):  # ST++ / BST: the stability scores that split the unlabeled images
        stages[str(scores.parent.relative_to(out))] = {"scores": list(json.loads(scores.read_text()).values())}
    return stages


def differences(recorded: dict, now: dict, rel: float = 0.0) -> list[str]:
    """Lines naming every stage, key and step whose value differs by more than `rel` (relative)."""
    out = []
    for stage in sorted(set(recorded) | set(now)):
        a, b = recorded.get(stage), now.get(stage)
        if a is None or b is None:
            out.append(f"{stage or '(run)'}: only in {'the recording' if b is None else 'this run'}")
            continue
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key), b.get(key)
            if va is None or vb is None or len(va) != len(vb):
                out.append(f"{stage or '(run)'} {key}: {va} != {vb}")
                continue
            for step, (x, y) in enumerate(zip(va, vb), 1):
                same = x == y or (x is not None and y is not None and math.isclose(x, y, rel_tol=rel, abs_tol=rel))
                if not same:
                    out.append(f"{stage or '(run)'} {key} step {step}: {x!r} != {y!r}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_losses_equal_the_recording(name, tmp_path):
    import torch

    recorded = json.loads(RECORD.read_text())[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded (OMP_NUM_THREADS=1): a thread count changes how sums are rounded
    try:
        now = run_losses(name, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert differences(recorded, now, rel=1e-4) == []


def main(argv: list[str]) -> int:
    import tempfile

    mode = argv[0] if argv else "--compare"
    names = argv[1:] or list(RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        now = {name: run_losses(name, Path(tmp)) for name in names}
    if mode == "--write":
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(now, indent=1) + "\n")
        print(f"wrote {RECORD}")
        return 0
    recorded = json.loads(RECORD.read_text())
    bad = 0
    for name in names:
        diff = differences(recorded[name], now[name])
        bad += bool(diff)
        print(f"{name}: {'identical' if not diff else f'{len(diff)} differences'}")
        for line in diff:
            print(f"  {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The benchmark scripts' own logic: variant parsing and the layout / compile each variant really runs with."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_speed  # noqa: E402

from semiseg.data.datasets import dataset_info  # noqa: E402
from semiseg.methods import METHODS, load_config  # noqa: E402


def test_variant_overrides():
    assert step_speed.variant_overrides("off") == ["train.amp=off", "train.channels_last=off", "train.compile=False"]
    assert step_speed.variant_overrides("bf16+cl+compile") == [
        "train.amp=bf16",
        "train.channels_last=on",
        "train.compile=True",
    ]
    with pytest.raises(SystemExit, match="suffixes"):
        step_speed.variant_overrides("bf16+nhwc")


@pytest.mark.parametrize(("variant", "layout"), [("off", torch.contiguous_format), ("off+cl", torch.channels_last)])
def test_runner_runs_the_variants_layout(tiny_overrides, variant, layout):
    """ "off" must run contiguous weights even on a preset whose channels_last is "on" (a string, always truthy)."""
    over = tiny_overrides + ["model.pretrained=", "method.name=supervised", "train.channels_last=on"]
    cfg = load_config("configs/camvid/bench.yaml", over + step_speed.variant_overrides(variant))
    info = dataset_info(cfg.data)
    method = METHODS["supervised"]
    state = {k: v.state_dict() for k, v in method.build(cfg, info).items()}
    runner = step_speed.Runner(cfg, method, info, torch.device("cpu"), state)
    convs = [
        m
        for m in runner.nets["model"].modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1 and m.in_channels > 1
    ]
    other = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
    assert convs and all(c.weight.is_contiguous(memory_format=layout) for c in convs)
    assert not any(c.weight.is_contiguous(memory_format=other) for c in convs)
    assert runner.step() > 0

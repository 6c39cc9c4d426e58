"""A real 2-process torchrun (Gloo, CPU): training runs, and evaluation equals one process's on the same checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from semiseg import config as C
from semiseg.methods import load_config

pytestmark = pytest.mark.slow


def run(args, cwd, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "semiseg", *args]
    else:
        cmd = [sys.executable, "-m", "semiseg", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.iters=4", "eval.every=2", "eval.max_images=0", "train.device=cpu"])
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(C.to_dict(cfg)))

    run(["train", str(cfg_path), "--out", str(tmp_path / "ddp")], tmp_path, nproc=2)
    result = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert result["steps"] == 4 and result["last"]["miou"] >= 0
    assert (tmp_path / "ddp" / "last.safetensors").is_file()
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert log.count("] config:") == 1  # rank 0 alone writes

    run(["eval", str(tmp_path / "ddp"), "--out", str(tmp_path / "e1.json"), "--device", "cpu"], tmp_path, nproc=1)
    run(["eval", str(tmp_path / "ddp"), "--out", str(tmp_path / "e2.json"), "--device", "cpu"], tmp_path, nproc=2)
    e1 = json.loads((tmp_path / "e1.json").read_text())
    e2 = json.loads((tmp_path / "e2.json").read_text())
    assert e1["images"] == e2["images"] == 6
    assert e1["miou"] == e2["miou"] and e1["iou"] == e2["iou"]

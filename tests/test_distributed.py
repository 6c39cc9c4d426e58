"""A real 2-process torchrun (Gloo, CPU): training runs, and evaluation equals one process's on the same checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("name", ["dssn", "ctt"])
def test_a_train_mode_teacher_normalises_over_both_processes(tmp_path, tiny_overrides, name):
    # DSSN's and CTT's teachers run in train mode; under torchrun with model.sync_bn their BatchNorm must see the whole
    # batch (SyncBatchNorm over all processes), as the references' do, not each process's half.
    import torch
    from ddp_teacher_bn import bn_stats, fixed_batch

    from semiseg.data.datasets import dataset_info
    from semiseg.engine.loop import build_nets
    from semiseg.methods import METHODS, load_config

    sets = tiny_overrides + [f"method.name={name}", "model.sync_bn=true", "train.device=cpu"]
    script = str(Path(__file__).parent / "ddp_teacher_bn.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    proc = subprocess.run(cmd + [str(tmp_path / "bn.pt"), *sets], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = torch.load(tmp_path / "bn.pt")

    cfg = load_config(None, sets)
    method = METHODS[name]

    def one_process(images):
        teacher = build_nets(cfg, method, dataset_info(cfg.data), torch.device("cpu"))[method.TRAIN_MODE_TEACHERS[0]]
        with torch.no_grad():
            teacher.train()(images)
        return bn_stats(teacher)

    whole, half = one_process(fixed_batch()), one_process(fixed_batch()[:2])
    assert set(two) == set(whole) and {kind for kind, _, _ in two.values()} == {"GlobalBatchNorm"}
    for key, (_, mean, var) in two.items():
        torch.testing.assert_close(mean, whole[key][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, whole[key][2], rtol=1e-5, atol=1e-6)
    # per-process statistics (one half of the batch) differ: the comparison above can fail
    assert any(not torch.allclose(v, half[k][1], atol=1e-4) for k, (_, v, _) in two.items())


def test_sync_bn_trains_under_two_cpu_processes(tmp_path, tiny_overrides):
    # torch's SyncBatchNorm refuses CPU tensors; the Gloo path normalises with engine.dist.GlobalBatchNorm, through
    # DDP's forward and backward (student) and without gradients (DSSN's train-mode teacher)
    sets = ["method.name=dssn", "model.sync_bn=true", "train.iters=2", "eval.max_images=2", "train.device=cpu"]
    cfg = load_config(None, tiny_overrides + sets)
    path = tmp_path / "dssn.yaml"
    path.write_text(yaml.safe_dump(C.to_dict(cfg)))
    run(["train", str(path), "--out", str(tmp_path / "ddp")], tmp_path, nproc=2)
    result = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert result["steps"] == 2 and result["last"]["miou"] >= 0

"""Distributed helpers. Every helper is a no-op in one process.

Ranks come from the environment: torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT must be exported by the job script or are derived
from SLURM_NODELIST's first host). NCCL on GPUs, Gloo on CPU.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; (0, 1, 0) otherwise."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_NODELIST", "localhost")
    m = re.match(r"([^\[,]+)(\[([0-9]+))?", nodes)
    return (m.group(1) + (m.group(3) or "")) if m else "localhost"


def init(device: str = "auto") -> torch.device:
    """Join the process group if launched distributed; return this process's device."""
    rank, world, local = env_ranks()
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if device.startswith("cuda:"):
        dev = torch.device(device)
    elif use_cuda:
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", _slurm_master())
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    return dev


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (returns it); unchanged in one process."""
    if is_dist():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def shard(n: int) -> range:
    """Indices of `n` items this rank handles: rank, rank + world, ...; no item twice, none padded."""
    return range(rank(), n, world_size())


def cleanup() -> None:
    if is_dist():
        tdist.destroy_process_group()


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the batch of every process (all-reduced sums), on
    any device: torch's SyncBatchNorm accepts only accelerator tensors, and the Gloo (CPU) runs need the same maths.

    Mean and biased variance come from the all-reduced per-channel sum, sum of squares and count (float64); the
    running statistics are updated as BatchNorm does (unbiased variance, momentum). Gradients flow through the
    all-reduce, so a trained net gets SyncBatchNorm's gradients too. Outside training, or in one process, it is
    BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xd = x.double()
        count = xd.new_tensor([x.numel() / c])
        totals = all_reduce(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:c] / n
        var = totals[c : 2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = (1, c, 1, 1)
        scale = torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        y = (x - mean.to(x.dtype).view(shape)) * scale
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """`net` with every BatchNorm2d normalising over all processes: torch's SyncBatchNorm on accelerators (its fused
    kernels), GlobalBatchNorm on the CPU; parameters and buffers are shared, state-dict keys unchanged."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, child in net.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            if child.track_running_stats:
                bn.running_mean, bn.running_var = child.running_mean, child.running_var
                bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(net, name, bn)
        else:
            sync_batchnorm(child, device)
    return net


class _Entry(nn.Module):
    """DDP only synchronises gradients of calls that go through its forward: dispatch any method from there."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, name: str, *args, **kwargs):
        return getattr(self.net, name)(*args, **kwargs)


class DDPNet:
    """A trained network under DistributedDataParallel that keeps the network's own call interface.

    `ddp_net(x)`, `ddp_net.forward_fp(x, 2)`, ... all run through DDP's forward; nn.Module methods
    (train, eval, parameters, state_dict, ...) and attributes are those of the wrapped network.
    """

    def __init__(self, net: nn.Module, device: torch.device, find_unused: bool = False):
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        self.module = net
        self.ddp = DistributedDataParallel(_Entry(net), device_ids=ids, find_unused_parameters=find_unused)

    def __call__(self, *args, **kwargs):
        return self.ddp("forward", *args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self.module, name)
        if callable(attr) and not hasattr(nn.Module, name) and not isinstance(attr, nn.Module):
            return lambda *args, **kwargs: self.ddp(name, *args, **kwargs)
        return attr

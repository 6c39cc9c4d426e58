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

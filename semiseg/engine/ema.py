"""Exponential moving average of a network (parameters and, optionally, BatchNorm buffers) and the mean-teacher
schedules of Tarvainen & Valpola (2017): the ramped keep rate and the sigmoid ramp-up of the consistency weight."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep: float, buffers: bool = True) -> None:
    """teacher <- keep * teacher + (1 - keep) * student, for parameters and (if `buffers`) float buffers.

    Integer buffers (BatchNorm's num_batches_tracked) are copied. keep = 0 copies the student.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("ema_update: teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, keep)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - keep)
    if not buffers:
        return
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        if tb.dtype.is_floating_point:
            tb.mul_(keep).add_(sb.detach(), alpha=1.0 - keep)
        else:
            tb.copy_(sb)


def mean_teacher_keep(step: int, keep: float) -> float:
    """The ramped keep rate of mean-teacher methods: min(1 - 1/(step + 1), keep)."""
    return min(1.0 - 1.0 / (step + 1), keep)


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - min(step / length, 1))^2): from exp(-5) = 0.0067 at step 0 to 1 at `length`; 1 when length <= 0."""
    if length <= 0:
        return 1.0
    t = min(step / length, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)

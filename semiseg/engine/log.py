"""Run logging: a text log with the resolved config on top, progress lines, metrics.jsonl, TensorBoard if installed.

Only rank 0 writes. Progress lines (not a redrawn bar) so that SLURM and `tee` logs stay readable.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

from semiseg.engine import dist


def versions() -> dict:
    import numpy
    import PIL

    import semiseg

    return {
        "semiseg": semiseg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cuda": torch.version.cuda or "none",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
    }


def cpu_flags() -> set[str]:
    """The processor's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is faster than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_name() -> str:
    """The CPU's model name and the vector ISA torch's kernels use, e.g. 'Intel(R) Xeon(R) Processor (AVX512)'.

    Float results of CPU training differ between ISAs in the last bits, and from-scratch runs amplify that, so
    a bench's machine line names it.
    """
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    capability += ", native bf16" if cpu_native_bf16() else ""
    return f"{name} ({capability})" if capability else name


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _Forward(logging.Handler):
    """Sends `semiseg.*` logging records to a RunLog (console and log.txt)."""

    def __init__(self, run_log: RunLog):
        super().__init__(logging.INFO)
        self.run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        self.run_log.info(prefix + record.getMessage())


class RunLog:
    """Text log + console + metrics.jsonl (+ TensorBoard) for one run folder."""

    def __init__(self, run_dir: Path | None, quiet: bool = False, tensorboard: bool = True):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.main = dist.is_main()
        self.quiet = quiet
        self._text = None
        self._jsonl = None
        self._tb = None
        if self.main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._text = open(self.run_dir / "log.txt", "a", buffering=1)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.run_dir / "tb"))
                except Exception:  # tensorboard is optional
                    self._tb = None
        # Library messages (pretrained-weight load reports, input normalisation) belong in the run's log too.
        self._handler = _Forward(self)
        self._logger = logging.getLogger("semiseg")
        self._level = self._logger.level
        self._logger.addHandler(self._handler)
        self._logger.setLevel(logging.INFO)

    def info(self, text: str, console: bool = True) -> None:
        """A line to the console (unless quiet or console=False) and the text log, with a timestamp in the log."""
        if not self.main:
            return
        if console and not self.quiet:
            print(text, file=sys.stdout, flush=True)
        if self._text is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            for line in text.splitlines() or [""]:
                self._text.write(f"[{stamp}] {line}\n")

    def metrics(self, step: int, values: dict) -> None:
        """One JSON line {"step": ..., key: value, ...}; scalars also to TensorBoard."""
        if not self.main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics.jsonl rows after `step` (written by a run killed after its last checkpoint)."""
        if not self.main or self._jsonl is None:
            return
        path = self.run_dir / "metrics.jsonl"
        self._jsonl.close()
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r).get("step", 0) <= step]
        path.write_text("".join(r + "\n" for r in rows))
        self._jsonl = open(path, "a", buffering=1)

    def close(self) -> None:
        self._logger.removeHandler(self._handler)
        self._logger.setLevel(self._level)
        for f in (self._text, self._jsonl):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        self._text = self._jsonl = self._tb = None


class Meter:
    """Running means of step logs kept on the device; read (one sync) only when a line is printed."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.steps = 0
        self.data_time = 0.0
        self.step_time = 0.0

    def add(self, logs: dict, data_time: float, step_time: float) -> None:
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1
        self.steps += 1
        self.data_time += data_time
        self.step_time += step_time

    def read(self) -> dict:
        out = {k: (v / max(self.count, 1)).item() for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out

    def timing(self) -> tuple[float, float]:
        """(it/s, data-wait share) since the last reset."""
        its = self.steps / self.step_time if self.step_time > 0 else 0.0
        wait = self.data_time / self.step_time if self.step_time > 0 else 0.0
        self.steps, self.data_time, self.step_time = 0, 0.0, 0.0
        return its, wait


def progress_line(step: int, iters: int, its: float, wait: float, logs: dict, lr: float) -> str:
    eta = (iters - step) / its if its > 0 else float("nan")
    parts = [f"step {step}/{iters}", f"{its:.2f} it/s", f"data {100 * wait:.0f}%"]
    parts.append(f"eta {format_duration(eta) if math.isfinite(eta) else '?'}")
    parts.append(f"lr {lr:.2e}")
    parts += [f"{k.removeprefix('train/')} {v:.4f}" for k, v in logs.items()]
    return " | ".join(parts)

"""Atomic file writes: a temporary file in the target's folder, then a rename, so a reader (or a crash) never sees
half a file. Every file semiseg writes whole goes through here: checkpoints, exports, results, split lists, PNGs (the
run's append-only log.txt and metrics.jsonl are written line by line instead)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_bytes(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename the temporary file to `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give results the usual umask-based mode so others can read them.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_bytes(path, write)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")

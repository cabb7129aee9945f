"""Atomic writes: a temp file (or folder) beside the target, then `os.replace`.

Readers, and a job killed half-way (even by `kill -9`), see either the old file or the complete new one, never half
a file. JSON is written strictly: NaN and infinities become `null` (json.dumps would emit the non-standard `NaN`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder (so the rename never crosses filesystems)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp_name, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def atomic_folder(target: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it replaces `target` as a whole.

    An exception (or a kill) leaves `target` as it was and no staging folder behind (a kill may leave a hidden
    `.<name>-*` folder, never a half-written `target`). `keep_existing`: when `target` already exists on success
    (another process finished first), keep that one and drop ours.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result should read like any folder
    try:
        yield staging
        if target.exists() and keep_existing:
            return
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(staging, target)
            except OSError:
                if not (keep_existing and target.exists()):  # not a concurrent winner: a real failure
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def to_json_ready(value):
    """Plain Python values for json: numpy scalars and arrays unwrapped, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(key): to_json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_json_ready(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Pretty-printed strict JSON (see `to_json_ready`), written atomically."""
    return write_text_atomic(path, json.dumps(to_json_ready(data), indent=2, allow_nan=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """One strict JSON object per line, written atomically."""
    lines = [json.dumps(to_json_ready(row), ensure_ascii=False, allow_nan=False) for row in rows]
    return write_text_atomic(path, "".join(line + "\n" for line in lines))

"""Atomic file writes (a reader never sees a half-written checkpoint, JSON or table) and the JSONL reader."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TMP_SUFFIX = ".tmp"  # temp files are named .<target name>.<random><TMP_SUFFIX> next to their target


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """write(fh) into a temp file in the same folder, fsync, then rename over ``path``: a reader (or a crash)
    never sees a half-written file, and no temp file is left behind on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


class JsonlError(ValueError):
    """A line of a JSON-lines file that is neither valid JSON nor a torn last line; `what` says which."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}")
        self.path, self.what = path, what


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every object of a JSON-lines file (a run's training log), in order.

    One policy for every reader: a torn last line (no newline after it: a writer was killed, or is still
    writing) is dropped, because appends are not atomic; any other line that is not a JSON object raises
    JsonlError, because nothing but damage puts one there."""
    path = Path(path)
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    events: list[dict] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            if i == len(lines) and not text.endswith("\n"):
                break
            raise JsonlError(path, f"line {i} is not JSON") from None
        if not isinstance(event, dict):
            raise JsonlError(path, f"line {i} is not a JSON object")
        events.append(event)
    return events


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temp file + fsync + rename (a checkpoint survives a kill or a crash). A write the
    disk refused (full, or past a file-size limit) raises the OSError underneath, even when torch's writer
    reports it as a RuntimeError of its own."""
    import torch

    try:
        _atomic_write(path, lambda fh: torch.save(obj, fh))
    except RuntimeError as exc:
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def remove_stale_temps(folder: str | os.PathLike) -> tuple[int, int]:
    """Delete the temp files that interrupted atomic writes left in ``folder``; returns (files, bytes).

    A SIGKILL between the temp file's creation and the rename skips the cleanup above, and at WT103 size each
    leftover checkpoint temp holds as much as the checkpoint itself. Call it only while nothing writes there
    (a run about to resume), or a write in flight would lose its temp file."""
    n_files = n_bytes = 0
    for path in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another rank or process removed it first
            continue
        n_files, n_bytes = n_files + 1, n_bytes + size
    return n_files, n_bytes

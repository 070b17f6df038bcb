"""What a run records about the code and the machine that made it (the run folder's env file).

The env record names the code: its commit, whether the checkout differed from it (then a patch beside it holds
the difference, which `git apply` re-applies to that commit) and a hash of the package source; and the
process: versions, device, CPU model, threads, allocator. `deqlm.infra.run_folder.code_label` reads such
a record back as the report's one-word answer to "which code made this number?".
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from deqlm.infra.allocator import allocator_info

UNTRACKED_PATCH_LIMIT = 1 << 20  # untracked files larger than this are named in the env record, not patched
UNTRACKED_PATCH_TOTAL = 8 << 20  # and so is every untracked file past this many bytes of them


def _git_bytes(cwd: Path, *args: str, ok: tuple[int, ...] = (0,)) -> bytes | None:
    """git's raw stdout, or None when git is missing, fails, or `cwd` is not inside a checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode in ok else None


def _git(cwd: Path, *args: str) -> str | None:
    out = _git_bytes(cwd, *args)
    return None if out is None else out.decode(errors="replace").strip()


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def git_state(where: Path | None = None) -> dict:
    """The commit the code came from and whether the checkout differs from it (untracked files that git does
    not ignore count: a new module or experiment file changes what runs)."""
    where = where or _package_dir()
    sha = _git(where, "rev-parse", "HEAD")
    status = _git(where, "status", "--porcelain", "--untracked-files=all") if sha else None
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


# `git diff` as `git apply` reads it, whatever the user's configuration says about colour, prefixes, external
# diff tools or text conversion
PLAIN_DIFF = ("-c", "color.ui=never", "diff", "--no-color", "--no-ext-diff", "--no-textconv",
              "--src-prefix=a/", "--dst-prefix=b/", "--binary")


def git_patch(where: Path | None = None) -> tuple[bytes | None, list[str]]:
    """The checkout's difference from its commit as one patch that `git apply` re-applies there: tracked
    changes, staged or not, then each untracked file git does not ignore as a new file. Returns the patch
    (None when git fails: then no patch can be trusted) and the untracked files left out for size (one over
    UNTRACKED_PATCH_LIMIT bytes, or past UNTRACKED_PATCH_TOTAL bytes of them)."""
    top = Path(_git(where or _package_dir(), "rev-parse", "--show-toplevel") or ".")
    tracked = _git_bytes(top, *PLAIN_DIFF, "HEAD")
    listing = _git_bytes(top, "ls-files", "--others", "--exclude-standard", "-z")
    if tracked is None or listing is None:
        return None, []
    parts, skipped, total = [tracked], [], 0
    for rel in sorted(os.fsdecode(name) for name in listing.split(b"\0") if name):
        size = (top / rel).lstat().st_size
        if size > UNTRACKED_PATCH_LIMIT or total + size > UNTRACKED_PATCH_TOTAL:
            skipped.append(rel)
            continue
        new_file = _git_bytes(top, *PLAIN_DIFF, "--no-index", "--", "/dev/null", rel, ok=(0, 1))
        if new_file is None:
            return None, []
        parts.append(new_file)
        total += size
    return b"".join(parts), skipped


def source_hash(package_dir: Path | None = None) -> dict:
    """sha256 over the package's Python files (each one's relative path, length and bytes, in path order):
    names the code of a run started outside a git checkout, and tells two runs' code apart when it differs."""
    root = package_dir or _package_dir()
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return {"source_sha256": digest.hexdigest(), "source_files": len(files)}


def code_provenance(where: Path | None = None) -> tuple[dict, bytes | None]:
    """The env record's code fields and, for a dirty checkout, the patch that turns its commit into the code
    run."""
    info = {**git_state(where), **source_hash(where)}
    if not info["git_dirty"]:
        return {**info, "git_untracked_skipped": []}, None
    patch, skipped = git_patch(where)
    return {**info, "git_untracked_skipped": skipped}, patch  # a failed diff: dirty, no patch, not recorded


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string: floating-point results differ in
    their last digits between CPU models, so a rerun on another one is not expected to match to the digit."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def env_info(device: torch.device, world_size: int = 1) -> dict:
    """Versions, hardware and launch facts of this process (the run folder's env record)."""
    info = {
        "start_time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "world_size": world_size,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "allocator": allocator_info(),
        "argv": sys.argv,
    }
    return info


def env_record(device: torch.device, world_size: int = 1) -> tuple[dict, bytes | None]:
    """This process's env record (facts and code provenance) and, for a dirty checkout, its patch."""
    code, patch = code_provenance()
    return {**env_info(device, world_size), **code}, patch

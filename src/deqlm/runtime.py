"""Process-level set-up shared by every entry point: seeding, device and precision, run directories, env.json.

A run directory holds everything needed to trust a number next to it:

    <train.run_dir>/<corpus>/<experiment>/<stamp>/{config.yaml, env.json, metrics.jsonl, ckpt/}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from deqlm.allocator import allocator_info
from deqlm.config import ConfigError
from deqlm.io import atomic_write_json


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present; under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA (`train.amp`); a no-op elsewhere (solvers keep their linear algebra in
    float32)."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def describe_device(device: torch.device) -> str:
    """The device as a record names it: the GPU's model, or the CPU's with the thread count (speeds on a CPU
    depend on it)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def set_threads(n: int) -> None:
    """`train.threads` > 0 pins the intra-op thread count (bitwise resume needs the same count)."""
    if n > 0:
        torch.set_num_threads(n)


def make_run_dir(root: str | os.PathLike, corpus: str, experiment: str) -> Path:
    """Create `<root>/<corpus>/<experiment>/<stamp>/`; a numeric suffix keeps same-second runs apart."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = Path(root) / corpus / experiment
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        path = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a fresh run directory under {parent}")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict:
    """The commit the code came from and whether the working tree differed from it."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def env_info(device: torch.device, world_size: int = 1) -> dict:
    """Versions, hardware and launch facts of this process (written once per run as env.json)."""
    info = {
        "start_time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        **git_state(),
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
        "allocator": allocator_info(),
        "argv": sys.argv,
    }
    return info


def write_env(run_dir: str | os.PathLike, device: torch.device, world_size: int = 1,
              name: str = "env.json") -> dict:
    info = env_info(device, world_size)
    atomic_write_json(Path(run_dir) / name, info)
    return info

"""Process set-up shared by every entry point: seeding, the device, autocast and threads."""

from __future__ import annotations

import contextlib
import platform
import random

import numpy as np
import torch

from deqlm.config import ConfigError


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


def set_threads(n: int | None) -> None:
    """`train.threads` pins the intra-op thread count (bitwise resume needs the same count); None leaves
    PyTorch's own."""
    if n is not None:
        torch.set_num_threads(n)

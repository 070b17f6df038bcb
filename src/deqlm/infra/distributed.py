"""Data parallelism across processes (torchrun): process group, gradient sync, metric reduction.

Shared by the trainer and the evaluation loop (validation under DDP splits the columns over the ranks), so
it belongs to neither package.

Launch: `torchrun --nproc_per_node=N -m deqlm.train EXP.yaml` (multi-node: add --nnodes/--rdzv-*).
Backend nccl on CUDA, gloo on CPU. `data.batch_size` is the global batch; rank r trains on its contiguous
column slice, so the mean of the per-rank mean losses equals the single-process loss (equal token counts).

Gradient sync (`train.grad_sync`):
  ddp        DistributedDataParallel(find_unused_parameters=False). Its reducer hooks fire when a parameter's
             gradient is accumulated; the DEQ implicit backward calls `autograd.grad` w.r.t. z only inside
             backward, which accumulates nothing into parameters, so the two coexist
             (tests/test_train_ddp.py).
  allreduce  after backward, one flat all-reduce (mean) of the gradients that exist (every rank runs the
             same mode, so they agree on that set). Slower (no overlap with backward) but makes no assumption
             about which parameters a step uses; the fallback when DDP's reducer objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deqlm.config import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def column_slice(batch_size: int, info: DistInfo) -> slice:
    """The contiguous batch columns of this rank (the global batch must divide evenly)."""
    if batch_size % info.world_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is not divisible by the world size {info.world_size}"
        )
    per = batch_size // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a list of floats over ranks in one collective (float64 so token counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean_dict(stats: dict[str, float | None], info: DistInfo,
                         device: torch.device) -> dict[str, float | None]:
    """Mean over ranks of each value; a key that is None on a rank is averaged over the ranks that have it."""
    if not info.enabled:
        return dict(stats)
    keys = sorted(stats)
    vals = [0.0 if stats[k] is None else float(stats[k]) for k in keys]
    have = [0.0 if stats[k] is None else 1.0 for k in keys]
    summed = all_reduce_sum(vals + have, info, device)
    n = len(keys)
    return {k: (summed[i] / summed[n + i] if summed[n + i] > 0 else None) for i, k in enumerate(keys)}


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (ranks must agree to skip a step together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's python object on every rank (e.g. the run directory path)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device,
               grad_sync: str) -> torch.nn.Module:
    """The module the training step calls: DDP-wrapped for grad_sync=ddp, the model itself otherwise."""
    if not info.enabled or grad_sync != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


def allreduce_grads(model: torch.nn.Module, info: DistInfo) -> None:
    """Average gradients over ranks in one flat buffer (grad_sync=allreduce)."""
    if not info.enabled:
        return
    # Every rank runs the same model in the same mode, so the set of parameters with a gradient agrees.
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n

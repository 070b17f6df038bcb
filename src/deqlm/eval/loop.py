"""The evaluation loop: one split under the Transformer-XL protocol, exact token-weighted NLL.

The trainer validates with it and `deqlm.eval` evaluates runs with it, so the two numbers come from the same
code. It takes the model, the data and an `EvalSettings`; it knows nothing of how a run is trained.

Legend: B batch columns, L segment length.
"""

from __future__ import annotations

import math
import time

import torch

from deqlm.eval.settings import EvalSettings
from deqlm.infra.distributed import DistInfo, all_reduce_mean_dict, all_reduce_sum, column_slice
from deqlm.infra.metrics import add_solver_stats, solver_means
from deqlm.infra.runtime import autocast_context


def evaluate(model: torch.nn.Module, dataset, split: str, settings: EvalSettings, step: int | None,
             device: torch.device, max_tokens: int = 0, *, amp: str = "none",
             dist: DistInfo | None = None) -> dict:
    """Columns of `settings.batch_size`, segments of `settings.tgt_len`, memory carried across segments
    (unless the dataset says otherwise), the memory, clamp and solver settings passed with every call.

    `model` is the SequenceLM itself (not a DDP wrapper); it runs in the mode of `step` (pretraining or DEQ)
    and is left in the train/eval state it came in. Under DDP each rank takes its slice of the columns and
    the sums are all-reduced (the same numbers as one process). Returns nll_sum, n_tokens, loss, ppl,
    tokens_per_s, wall_s and the solver means (None when the model reports none). `max_tokens` > 0 stops
    after the first segments that reach that many tokens."""
    dist = dist or DistInfo()
    was_training = model.training
    model.eval()
    bs = settings.batch_size
    shard = dist.enabled and bs % dist.world_size == 0
    cols = column_slice(bs, dist) if shard else slice(0, bs)
    carry = getattr(dataset, "carry_mems", True)
    call = settings.model_kwargs()
    nll_sum, n_tokens, sums, counts = 0.0, 0, {}, {}
    t0 = time.perf_counter()
    with torch.no_grad():
        mems = model.init_mems(cols.stop - cols.start)
        for x_BL, y_BL in dataset.eval_batches(split, bs, settings.tgt_len):
            x_BL, y_BL = x_BL[cols].to(device), y_BL[cols].to(device)
            if not carry:
                mems = model.init_mems(x_BL.shape[0])
            with autocast_context(amp, device):
                out = model(x_BL, y_BL, mems, step=step, **call)
            mems = out.mems
            nll_sum += float(out.nll_sum)
            n_tokens += int(out.n_tokens)
            add_solver_stats(out.stats, sums, counts)
            if max_tokens and n_tokens * (dist.world_size if shard else 1) >= max_tokens:
                break
    wall_s = time.perf_counter() - t0
    solver = solver_means(sums, counts)
    if shard:
        nll_sum, n_tokens = all_reduce_sum([nll_sum, float(n_tokens)], dist, device)
        n_tokens = int(round(n_tokens))
        solver = all_reduce_mean_dict(solver, dist, device)
    model.train(was_training)
    loss = nll_sum / max(n_tokens, 1)
    return {"nll_sum": nll_sum, "n_tokens": n_tokens, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "tokens_per_s": n_tokens / max(wall_s, 1e-9), "wall_s": wall_s, **solver}

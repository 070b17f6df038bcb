"""A paper row (protocol.py) built into a model at the benchmark protocol, and what its solver will hold.

Word embeddings are excluded by construction (the paper's memory column excludes them): the model is built
with a 2-word vocabulary and no adaptive clusters, so its embedding and softmax tables hold a few hundred
bytes, and the benchmarks feed the core random embedded inputs (core_step.py) and optimise only the core's
parameters.

Tensor names: B batch, L segment length, D d_model, F flattened state per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deqlm.bench.protocol import (
    PAPER_BATCH,
    PAPER_MEM_LEN,
    PAPER_TGT_LEN,
    REPO_ROOT,
    PaperRow,
    find_experiment,
    get_row,
    protocol_overrides,
    size_overrides,
)
from deqlm.config import load_config
from deqlm.models import build_model
from deqlm.solvers.anderson import history_slots
from deqlm.solvers.broyden import buffer_slots


@dataclass
class BuiltRow:
    row: PaperRow
    cfg: object  # ExperimentConfig
    experiment: str  # YAML path, relative to the repository
    overrides: list[str]  # everything applied on top of the YAML, in order
    model: torch.nn.Module  # SequenceLM built with a 2-word vocabulary; only its cells and core are used
    params: list[torch.nn.Parameter]  # the core's trainable parameters (the cells'; the DEQ engine has none)


def build_row(key: str, size: str, *, batch: int = PAPER_BATCH, tgt_len: int = PAPER_TGT_LEN,
              mem_len: int = PAPER_MEM_LEN, extra: list[str] | tuple[str, ...] = (),
              device: torch.device | None = None) -> BuiltRow:
    """Load the row's experiment YAML, apply the protocol, the size and `extra`, and build it on `device`."""
    row = get_row(key)
    path, row_overrides = find_experiment(row)
    overrides = protocol_overrides(batch, tgt_len, mem_len) + list(row_overrides)
    cfg = load_config(path, overrides)
    overrides += size_overrides(cfg, size) + list(extra)
    cfg = load_config(path, overrides + ["model.adaptive=false", "model.n_classes=0"])
    model = build_model(cfg.model, cfg.deq, vocab_size=2).to(device or torch.device("cpu"))
    model.train()
    params = [p for cell in model.cell_list for p in cell.parameters() if p.requires_grad]
    try:
        rel = str(path.relative_to(REPO_ROOT))
    except ValueError:
        rel = str(path)
    return BuiltRow(row, cfg, rel, overrides, model, params)


def core_input_width(cfg) -> int:
    """Width of the embedded input the core reads: d_model (Transformer, after the adaptive projection)
    or d_embed (TrellisNet)."""
    return cfg.model.d_model if cfg.model.arch == "transformer" else cfg.model.d_embed


def state_numel_per_sample(cfg, tgt_len: int) -> int:
    """F: the flattened equilibrium state of one sample (Transformer: L*D; TrellisNet: [h; c], each of
    nhid + nout channels: 2*(nhid + nout)*L)."""
    m = cfg.model
    return tgt_len * (m.d_model if m.arch == "transformer" else 2 * (m.d_model + m.d_out))


def solver_workspace_bytes(cfg, batch: int, tgt_len: int, elem_bytes: int = 4) -> int:
    """Bytes a DEQ solver holds besides f's activations, the larger of forward and backward (never both live).

    Broyden (deqlm.solvers.broyden) stores one step vector per iteration in a circular buffer of rank + 1
    slots, allocated in chunks of up to 8 as steps are taken: min(r + 1, max_iter) * F * B floats (r =
    deq.broyden_rank, so the buffer stops growing with the step cap; the official code keeps two vectors per
    allowed step, 2 * max_iter * F * B). Anderson keeps 2 * min(m, max_iter) histories (images and residuals);
    fixed-point iteration keeps none. Unrolled cores: 0. An upper bound: the buffer grows only with the steps
    actually taken.
    """
    if cfg.model.core != "deq":
        return 0
    fb = state_numel_per_sample(cfg, tgt_len) * batch * elem_bytes
    d = cfg.deq

    def one(solver: str, max_iter: int) -> int:
        if solver == "broyden":
            return buffer_slots(d.broyden_rank, max_iter) * fb
        if solver == "anderson":
            return 2 * history_slots(d.anderson_m, max_iter) * fb
        return 0

    return max(one(d.f_solver, d.f_max_iter), one(d.b_solver, d.b_max_iter))

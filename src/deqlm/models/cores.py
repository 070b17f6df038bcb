"""Cores: how a stack of cells turns the embedded input into the final state. One signature for all of them:

    core(cells, x, mems, *, mem_len, clamp_len, jac_penalty=None, solver=None)
        -> CoreOut(z, mems, stats, aux, jac_loss)

* `DEQCore` finds z* = f(z*) with f(z) = cell(z, ctx) through `deqlm.deq.DEQFixedPoint` (Bai et al. 2019):
  forward root solve without a graph; implicit (IFT), phantom or reversible backward. ctx holds the
  injection, memory, positions and dropout masks, built once, so f is one fixed map. Memory: the previous
  segment's z* (one slot). `solver` holds this call's forward-solver overrides (`max_iter`, `tol`;
  evaluation settings) and, optionally, `z0`, the solve's initial guess (a sampler's warm start), handed to
  the layer's call; unrolled cores have no solver and ignore it.
* `UnrolledCore(weight_tied=True)` applies the one cell n_layer times from z0 with ordinary backprop:
  exactly the DEQ's f iterated (same ctx, same single memory slot: the final state). It is the pretraining
  stack of a DEQ model and the paper's weight-tied baselines, and the cell's parameters are the DEQ's.
* `UnrolledCore(weight_tied=False)` applies n_layer distinct cells; each layer keeps its own memory of
  its input (Transformer-XL proper, Dai et al. 2019; per-level history for an untied TrellisNet).

`cells` is the model's list of cells (one for DEQ / tied cores, n_layer for untied), so a DEQ model and its
weight-tied unrolled baseline hold identical parameters. Optional gradient checkpointing recomputes each
unrolled layer in backward (torch.utils.checkpoint, non-reentrant). Legend: B batch, L length; `x` is the
embedded input (B, L, E), `z` a cell state in the cell's own layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deqlm.deq import JacPenalty
from deqlm.models.dropout import weights_read


class CoreOut(NamedTuple):
    z: torch.Tensor  # final state (cell layout)
    mems: list[torch.Tensor]  # memories for the next segment, detached
    stats: dict  # solver figures, floats (DEQ: the engine's dict, b_* filled by the implicit backward)
    aux: list[torch.Tensor]  # intermediate states for auxiliary losses (unrolled cores with aux_every > 0)
    jac_loss: torch.Tensor | None  # the Jacobian penalty at z* (DEQ, when one was handed in)


class DEQCore(nn.Module):
    """Equilibrium core: z* = f(z*; x, mem) solved by the DEQ engine it is given."""

    def __init__(self, deq: nn.Module):
        super().__init__()
        self.deq = deq

    def n_mems(self, n_cells: int) -> int:
        return 1

    def forward(
        self,
        cells: list[nn.Module],
        x: torch.Tensor,
        mems: list[torch.Tensor],
        *,
        mem_len: int,
        clamp_len: int = -1,
        jac_penalty: JacPenalty | None = None,
        solver: Mapping[str, Any] | None = None,
    ) -> CoreOut:
        cell = cells[0]
        ctx = cell.context(x, mems[0], clamp_len)
        # the recorded application of f is differentiated once per adjoint step: cells may trade forward
        # speed for backward memory there (TrellisNet on a CPU: deqlm.models.trellisnet.causal_conv_k2)
        ctx["lean_backward"] = True

        # f(z) = cell(z, ctx), its inputs handed over explicitly: the reversible gradient re-runs f in
        # backward and differentiates it with respect to ctx and the cell's weights as the forward read them
        # (listed only when that gradient asks)
        solver = dict(solver or {})
        z0 = solver.pop("z0", None)  # a warm start (the previous position's equilibrium), else the cell's own
        z0 = cell.init_state(x) if z0 is None else z0
        z_star, stats = self.deq(cell, z0, ctx, weights=partial(weights_read, cell), **solver)
        jac_loss = None
        if jac_penalty is not None:
            z_leaf = z_star.detach().requires_grad_()
            jac_loss = jac_penalty(cell(z_leaf, ctx), z_leaf)
        new_mems = [cell.update_mem(mems[0], z_star, x, mem_len, ctx)]
        return CoreOut(z_star, new_mems, stats, [], jac_loss)


class UnrolledCore(nn.Module):
    """Unrolled depth: the same cell n_layer times (weight_tied) or n_layer distinct cells."""

    def __init__(self, n_layer: int, weight_tied: bool, grad_checkpoint: bool = False, aux_every: int = 0):
        super().__init__()
        if n_layer <= 0:
            raise ValueError(f"model.n_layer={n_layer} must be positive")
        self.n_layer, self.weight_tied = n_layer, weight_tied
        self.grad_checkpoint, self.aux_every = grad_checkpoint, aux_every

    def n_mems(self, n_cells: int) -> int:
        return 1 if self.weight_tied else self.n_layer

    def _layer(self, cell: nn.Module, z: torch.Tensor, ctx: dict) -> torch.Tensor:
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(cell, z, ctx, use_reentrant=False)
        return cell(z, ctx)

    def _wants_aux(self, level: int) -> bool:
        return self.aux_every > 0 and level % self.aux_every == 0 and level < self.n_layer

    def forward(
        self,
        cells: list[nn.Module],
        x: torch.Tensor,
        mems: list[torch.Tensor],
        *,
        mem_len: int,
        clamp_len: int = -1,
        jac_penalty: JacPenalty | None = None,
        solver: Mapping[str, Any] | None = None,
    ) -> CoreOut:
        aux: list[torch.Tensor] = []
        if self.weight_tied:
            cell = cells[0]
            ctx = cell.context(x, mems[0], clamp_len)
            z = cell.init_state(x)
            for level in range(1, self.n_layer + 1):
                z = self._layer(cell, z, ctx)
                if self._wants_aux(level):
                    aux.append(z)
            return CoreOut(z, [cell.update_mem(mems[0], z, x, mem_len, ctx)], {}, aux, None)
        assert len(cells) == self.n_layer, (len(cells), self.n_layer)
        z = cells[0].init_state(x)
        new_mems = []
        for level, (cell, mem) in enumerate(zip(cells, mems), start=1):
            ctx = cell.context(x, mem, clamp_len)
            new_mems.append(cell.update_mem(mem, z, x, mem_len, ctx))  # memory of this layer's input
            z = self._layer(cell, z, ctx)
            if self._wants_aux(level):
                aux.append(z)
        return CoreOut(z, new_mems, {}, aux, None)

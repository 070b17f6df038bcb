"""SequenceLM: embedding -> core(cells) -> softmax head, the one model class behind every experiment.

DEQ and unrolled models differ only in their core (deqlm.models.cores); a DEQ model in its first
`pretrain_steps` steps runs its own cell as a shallow weight-tied unrolled stack. That is the one visible
branch in `forward`. The trainer never asks which kind of model it holds.

Legend: B batch, L segment length, E embedding width, P readout width (d_model, or TrellisNet d_out), N = B*L.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from deqlm.config import ModelConfig
from deqlm.deq import JacPenalty, jacobian_penalty
from deqlm.infra.precision import at_least_float32
from deqlm.models.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from deqlm.models.cores import CoreOut, DEQCore, UnrolledCore
from deqlm.models.dropout import VariationalDropout, apply_mask, fill_parametrization_cache
from deqlm.models.interface import LMOutput


@contextlib.contextmanager
def _filled_cache(model: nn.Module):
    with parametrize.cached():
        fill_parametrization_cache(model)
        yield


class SequenceLM(nn.Module):
    """`model(x_BL, y_BL, mems, step=None) -> LMOutput`; `init_mems(B)`; `mode(step)`.

    Evaluation settings are arguments of the call, never state of the model: `mem_len`, `clamp_len` and
    `solver` (forward-solver overrides `max_iter`, `tol`, for the DEQ layer) apply to that call only.
    Cells live in `self.cell` (DEQ and weight-tied cores: one cell, so a checkpoint of either loads into the
    other) or in `self.cells` (untied cores).

    Built by `deqlm.models.build_model`, which makes the parts; the model reads its own settings (memory and
    clamp lengths, dropouts around the core, the pretraining length, the auxiliary and Jacobian loss terms)
    from `cfg`, the `ModelConfig` the parts were made from.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        embed: AdaptiveEmbedding,
        cells: list[nn.Module],
        core: nn.Module,
        head: ProjectedAdaptiveLogSoftmax,
        *,
        pretrain_core: UnrolledCore | None = None,
    ):
        super().__init__()
        self.embed, self.core, self.head = embed, core, head
        if len(cells) == 1:
            self.cell = cells[0]
        else:
            self.cells = nn.ModuleList(cells)
        self.pretrain_core = pretrain_core
        self.pretrain_steps = cfg.pretrain_steps if pretrain_core is not None else 0
        self.mem_len, self.clamp_len = cfg.mem_len, cfg.clamp_len
        self.drop_in = VariationalDropout(cfg.dropouti)
        self.drop_out = VariationalDropout(cfg.dropout_out)
        self.aux_weight = cfg.aux_weight
        self.jac_weight, self.jac_freq = cfg.jac_weight, cfg.jac_freq
        self.jac_penalty = jacobian_penalty(cfg.jac_norm, cfg.jac_samples, cfg.jac_power_iters)

    @property
    def cell_list(self) -> list[nn.Module]:
        """The cells in the order the core applies them (one for DEQ and weight-tied cores)."""
        return [self.cell] if hasattr(self, "cell") else list(self.cells)

    # --- the contract ---------------------------------------------------------------------------------------
    def mode(self, step: int | None = None) -> str:
        """'pretrain' (DEQ model, step <= pretrain_steps), 'deq', or 'unrolled' (unrolled core).

        `step` is the trainer's: optimizer steps count from 1 (and a checkpoint's step is the last one taken),
        so the first `pretrain_steps` steps run the unrolled stack, as the official code's 0-based
        `train_step < pretrain_steps` does."""
        if not isinstance(self.core, DEQCore):
            return "unrolled"
        return "pretrain" if step is not None and step <= self.pretrain_steps else "deq"

    def init_mems(self, batch_size: int) -> list[torch.Tensor]:
        like = next(self.parameters())
        cells = self.cell_list
        n = self.core.n_mems(len(cells))
        return [cells[min(i, len(cells) - 1)].empty_mem(batch_size, like) for i in range(n)]

    def weight_cache(self, core: nn.Module) -> contextlib.AbstractContextManager:
        """Weight norm / DropConnect computed once per forward, not once per solver step.

        A gradient-checkpointed core recomputes its layers in backward outside any cache, so it must also
        compute the weights inside each layer in forward (otherwise the recomputed tensors differ)."""
        if getattr(core, "grad_checkpoint", False):
            return contextlib.nullcontext()
        return _filled_cache(self)

    def forward(
        self,
        x_BL: torch.Tensor,
        y_BL: torch.Tensor,
        mems: list[torch.Tensor] | None = None,
        step: int | None = None,
        *,
        mem_len: int | None = None,
        clamp_len: int | None = None,
        solver: Mapping[str, Any] | None = None,
    ) -> LMOutput:
        """One segment. `mem_len` / `clamp_len` (None: the model's) and `solver` hold for this call only."""
        B = x_BL.size(0)
        core = self._core(step)
        jac_penalty = self.jac_penalty if self._jac_this_step(core) else None
        with self.weight_cache(core):
            out, h_BLP = self._run(core, x_BL, mems, mem_len, clamp_len, solver, jac_penalty)
            readout = self.cell_list[-1].readout
            m_out = self.drop_out.mask((B, 1, h_BLP.size(-1)), h_BLP)
            nll_sum = self._nll(h_BLP, y_BL, m_out).sum()
            loss = nll_sum / y_BL.numel()
            stats = out.stats
            if out.aux and self.aux_weight > 0:
                loss = loss + self.aux_weight * sum(
                    self._nll(readout(z), y_BL, m_out).mean() for z in out.aux
                )
            if out.jac_loss is not None:
                loss = loss + self.jac_weight * out.jac_loss
                stats["jac_loss"] = float(out.jac_loss.detach())
        return LMOutput(
            loss=loss,
            nll_sum=at_least_float32(nll_sum.detach()),
            n_tokens=int(y_BL.numel()),
            mems=out.mems,
            stats=stats,
        )

    def next_token_logp(
        self, x_BL: torch.Tensor, mems: list[torch.Tensor] | None = None, step: int | None = None, *,
        mem_len: int | None = None, clamp_len: int | None = None, solver: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, CoreOut]:
        """log p(next token) at every position (B, L, V) and the core's output (memory, solver figures, and
        its state z, the warm start a sampler may hand to the next call as `solver={"z0": z}`)."""
        core = self._core(step)
        with self.weight_cache(core):
            out, h_BLP = self._run(core, x_BL, mems, mem_len, clamp_len, solver, None)
            B, L, P = h_BLP.shape
            return self.head.log_prob(h_BLP.reshape(B * L, P)).reshape(B, L, -1), out

    def _core(self, step: int | None) -> nn.Module:
        # The one branch between DEQ and unrolled computation: the shallow weight-tied pretraining stack
        # (Bai et al. 2019 §4, pretraining) or the model's own core (DEQ solve or unrolled stack).
        return self.pretrain_core if self.mode(step) == "pretrain" else self.core

    def _run(self, core: nn.Module, x_BL: torch.Tensor, mems: list[torch.Tensor] | None, mem_len: int | None,
             clamp_len: int | None, solver: Mapping[str, Any] | None, jac_penalty: JacPenalty | None
             ) -> tuple[CoreOut, torch.Tensor]:
        """Embedding, core and readout of one segment: (the core's output, the readout h_BLP)."""
        B = x_BL.size(0)
        if mems is None or len(mems) == 0:
            mems = self.init_mems(B)
        x_BLE = self.embed(x_BL)
        x_BLE = apply_mask(x_BLE, self.drop_in.mask((B, 1, x_BLE.size(-1)), x_BLE))
        out: CoreOut = core(
            self.cell_list,
            x_BLE,
            mems,
            mem_len=self.mem_len if mem_len is None else mem_len,
            clamp_len=self.clamp_len if clamp_len is None else clamp_len,
            jac_penalty=jac_penalty,
            solver=solver,
        )
        return out, self.cell_list[-1].readout(out.z)

    # --- helpers --------------------------------------------------------------------------------------------
    def _nll(self, h_BLP: torch.Tensor, y_BL: torch.Tensor, m_out: torch.Tensor | None) -> torch.Tensor:
        h_BLP = apply_mask(h_BLP, m_out)
        return self.head(h_BLP.reshape(-1, h_BLP.size(-1)), y_BL.reshape(-1))

    def _jac_this_step(self, core: nn.Module) -> bool:
        if not (self.training and isinstance(core, DEQCore) and self.jac_weight > 0 and self.jac_freq > 0):
            return False
        return bool(torch.rand(()) < self.jac_freq)


def count_params(model: SequenceLM) -> dict[str, int]:
    """params_total and params_nonembedding, each shared tensor counted once.

    Embedding = every tensor of the input embedding and the softmax head: word tables, adaptive projections,
    cluster weights and output biases (the Transformer-XL convention).
    """
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters()}
    emb = {id(p): p.numel() for part in (model.embed, model.head) for p in part.parameters()}
    total = sum(seen.values())
    return {"params_total": total, "params_nonembedding": total - sum(emb.values())}

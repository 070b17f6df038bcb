"""SequenceLM: embedding -> core(cells) -> softmax head, the one model class behind every experiment.

DEQ and explicit models differ only in their core (deqlm.models.cores); a DEQ model in its first
`pretrain_steps` steps runs its own cell as a shallow weight-tied unrolled stack. That is the one visible
branch in `forward`. The trainer never asks which kind of model it holds.

Legend: B batch, L segment length, E embedding width, P readout width (d_model, or TrellisNet d_out), N = B*L.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from deqlm.deq import DEQFixedPoint
from deqlm.models.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from deqlm.models.cores import CoreOut, DEQCore, UnrolledCore
from deqlm.models.dropout import VariationalDropout, apply_mask, fill_parametrization_cache
from deqlm.models.interface import LMOutput
from deqlm.models.transformer_cell import TransformerCell
from deqlm.models.trellisnet_cell import TrellisNetCell


@contextlib.contextmanager
def _filled_cache(model: nn.Module):
    with parametrize.cached():
        fill_parametrization_cache(model)
        yield


class SequenceLM(nn.Module):
    """`model(x_BL, y_BL, mems, step=None) -> LMOutput`; `init_mems(B)`; `mode(step)`; `set_eval_solver(...)`.

    Cells live in `self.cell` (DEQ and weight-tied cores: one cell, so a checkpoint of either loads into the
    other) or in `self.cells` (untied cores).
    """

    def __init__(
        self,
        embed: AdaptiveEmbedding,
        cells: list[nn.Module],
        core: nn.Module,
        head: ProjectedAdaptiveLogSoftmax,
        *,
        pretrain_core: UnrolledCore | None = None,
        pretrain_steps: int = 0,
        mem_len: int = 150,
        clamp_len: int = -1,
        dropouti: float = 0.0,
        dropout_out: float = 0.0,
        aux_weight: float = 0.0,
        jac_weight: float = 0.0,
        jac_freq: float = 0.0,
        jac_samples: int = 1,
    ):
        super().__init__()
        self.embed, self.core, self.head = embed, core, head
        if len(cells) == 1:
            self.cell = cells[0]
        else:
            self.cells = nn.ModuleList(cells)
        self.pretrain_core = pretrain_core
        self.pretrain_steps = pretrain_steps if pretrain_core is not None else 0
        self.mem_len, self.clamp_len = mem_len, clamp_len
        self.eval_mem_len, self.eval_clamp_len = mem_len, clamp_len
        self.drop_in = VariationalDropout(dropouti)
        self.drop_out = VariationalDropout(dropout_out)
        self.aux_weight = aux_weight
        self.jac_weight, self.jac_freq, self.jac_samples = jac_weight, jac_freq, jac_samples

    @property
    def layers(self) -> list[nn.Module]:
        return [self.cell] if hasattr(self, "cell") else list(self.cells)

    # --- the contract ---------------------------------------------------------------------------------------
    def mode(self, step: int | None = None) -> str:
        """'pretrain' (DEQ model, step <= pretrain_steps), 'deq', or 'unrolled' (explicit core).

        `step` is the trainer's: optimizer steps count from 1 (and a checkpoint's step is the last one taken),
        so the first `pretrain_steps` steps run the unrolled stack, as the official code's 0-based
        `train_step < pretrain_steps` does."""
        if not isinstance(self.core, DEQCore):
            return "unrolled"
        return "pretrain" if step is not None and step <= self.pretrain_steps else "deq"

    def init_mems(self, batch_size: int) -> list[torch.Tensor]:
        like = next(self.parameters())
        cells = self.layers
        n = self.core.n_mems(len(cells))
        return [cells[min(i, len(cells) - 1)].empty_mem(batch_size, like) for i in range(n)]

    def set_eval_solver(
        self,
        f_max_iter: int | None = None,
        f_tol: float | None = None,
        mem_len: int | None = None,
        clamp_len: int | None = None,
    ) -> None:
        """Evaluation-time overrides (None keeps the configured value); training settings are untouched."""
        self.eval_mem_len = self.mem_len if mem_len is None else mem_len
        self.eval_clamp_len = self.clamp_len if clamp_len is None else clamp_len
        if isinstance(self.core, DEQCore):
            deq = self.core.deq
            if not hasattr(self, "_deq_eval_defaults"):
                self._deq_eval_defaults = (deq.eval_f_max_iter, deq.eval_f_tol)
            deq.eval_f_max_iter = self._deq_eval_defaults[0] if f_max_iter is None else int(f_max_iter)
            deq.eval_f_tol = self._deq_eval_defaults[1] if f_tol is None else float(f_tol)

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
    ) -> LMOutput:
        B = x_BL.size(0)
        if mems is None or len(mems) == 0:
            mems = self.init_mems(B)
        # The one branch between DEQ and explicit computation: the shallow weight-tied warm-up stack
        # (Bai et al. 2019 §4, pretraining) or the model's own core (DEQ solve or explicit stack).
        core = self.pretrain_core if self.mode(step) == "pretrain" else self.core
        mem_len = self.mem_len if self.training else self.eval_mem_len
        clamp_len = self.clamp_len if self.training else self.eval_clamp_len
        jac_samples = self.jac_samples if self._jac_this_step(core) else 0
        with self.weight_cache(core):
            x_BLE = self.embed(x_BL)
            x_BLE = apply_mask(x_BLE, self.drop_in.mask((B, 1, x_BLE.size(-1)), x_BLE))
            out: CoreOut = core(
                self.layers, x_BLE, mems, mem_len=mem_len, clamp_len=clamp_len, jac_samples=jac_samples
            )
            readout = self.layers[-1].readout
            h_BLP = readout(out.z)
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
            nll_sum=nll_sum.detach().float(),
            n_tokens=int(y_BL.numel()),
            mems=out.mems,
            stats=stats,
        )

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


def build_model(cfg_model, cfg_deq, vocab_size: int) -> SequenceLM:
    """Assemble a SequenceLM from `cfg.model` (ModelConfig) and `cfg.deq` (DEQConfig, for DEQ cores)."""
    m = cfg_model
    if m.arch not in ("transformer", "trellisnet"):
        raise ValueError(f"model.arch={m.arch!r} is not one of transformer, trellisnet")
    if m.core not in ("deq", "unrolled"):
        raise ValueError(f"model.core={m.core!r} is not one of deq, unrolled")
    if m.grad_checkpoint and m.wdrop > 0:
        raise ValueError("model.grad_checkpoint=true cannot recompute model.wdrop noise; set model.wdrop=0")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    cutoffs = list(m.cutoffs) if m.adaptive else []
    div_val = m.div_val if m.adaptive else 1
    if m.arch == "transformer":
        embed = AdaptiveEmbedding(
            vocab_size,
            m.d_embed,
            m.d_model,
            cutoffs,
            div_val,
            scale=True,
            emb_dropout=m.emb_dropout,
            init_std=m.init_std,
        )
        d_read = m.d_model

        def make_cell(inject: bool) -> nn.Module:
            return TransformerCell(
                m.d_model,
                m.n_head,
                m.d_head,
                m.d_inner,
                dropout=m.dropout,
                dropatt=m.dropatt,
                pre_ln=m.pre_ln,
                inject=inject,
                same_length=m.same_length,
                init_std=m.init_std,
                weight_norm=m.weight_norm,
                init=m.init,
                ln_affine=m.ln_affine,
                input_path=m.input_path,
            )
    else:
        embed = AdaptiveEmbedding(
            vocab_size,
            m.d_embed,
            m.d_embed,
            cutoffs,
            div_val,
            scale=m.emb_scale,
            emb_dropout=m.emb_dropout,
            init_std=m.init_std,
        )
        d_read = m.d_out

        def make_cell(inject: bool) -> nn.Module:
            return TrellisNetCell(
                m.d_embed,
                m.d_model,
                m.d_out,
                dropouth=m.dropouth,
                wdrop=m.wdrop,
                init_std=m.init_std,
                weight_norm=m.weight_norm,
                inject_gain=m.inject_gain,
                rec_gain=m.rec_gain,
            )

    if m.n_classes > 0:  # sequence classifier (copy memory): untied linear head over every position
        head = ProjectedAdaptiveLogSoftmax(
            m.n_classes, d_read, d_read, [], 1, tie_to=None, init_std=m.init_std
        )
    else:
        head = ProjectedAdaptiveLogSoftmax(
            vocab_size,
            m.d_embed,
            d_read,
            cutoffs,
            div_val,
            tie_to=embed if m.tie_weight else None,
            tie_projs=m.tie_projs,
            init_std=m.init_std,
        )
    pretrain_core = None
    if m.core == "deq":
        cells = [make_cell(True)]
        core: nn.Module = DEQCore(DEQFixedPoint.from_config(cfg_deq))
        if m.pretrain_steps > 0:
            pretrain_core = UnrolledCore(m.pretrain_depth, weight_tied=True)
    elif m.weight_tied:
        cells = [make_cell(True)]
        core = UnrolledCore(m.n_layer, True, m.grad_checkpoint, m.aux_every)
    else:  # explicit Transformer-XL takes the embedding as its first input; TrellisNet injects at every level
        cells = [make_cell(m.arch == "trellisnet") for _ in range(m.n_layer)]
        core = UnrolledCore(m.n_layer, False, m.grad_checkpoint, m.aux_every)
    return SequenceLM(
        embed,
        cells,
        core,
        head,
        pretrain_core=pretrain_core,
        pretrain_steps=m.pretrain_steps,
        mem_len=m.mem_len,
        clamp_len=m.clamp_len,
        dropouti=m.dropouti,
        dropout_out=m.dropout_out,
        aux_weight=m.aux_weight,
        jac_weight=m.jac_weight,
        jac_freq=m.jac_freq,
        jac_samples=m.jac_samples,
    )

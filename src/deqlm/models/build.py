"""`build_model(cfg.model, cfg.deq, vocab_size)`: a SequenceLM from its config, one builder per choice;
`count_on_meta` counts its parameters without allocating them (`python -m deqlm.params`).

What differs between architectures (the embedding's width and scale, the cell, the readout width, whether an
untied unrolled stack injects the input at every level) comes from one builder per `model.arch` (`ARCHS`); how
the cells are stacked comes from one builder per `model.core` (`CORES`); the softmax head is the same for all.
The names are those of deqlm.choices (`Arch`, `Core`), which the config accepts; importing this module checks
that both registries hold exactly those names, so `build_model` looks a name up without checking it again.

Parameters are created in the order embedding, head, cells: the order the weights are drawn in, so one seed
keeps giving the same initial model (and committed runs stay reproducible).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from deqlm.choices import Arch, Core, check_registry
from deqlm.config import DEQConfig, ModelConfig
from deqlm.deq import DEQFixedPoint
from deqlm.models.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from deqlm.models.cores import DEQCore, UnrolledCore
from deqlm.models.lm import SequenceLM, count_params
from deqlm.models.transformer import TransformerCell, TransformerLayer
from deqlm.models.trellisnet import TrellisNetLayer


class ArchParts(NamedTuple):
    """What an architecture contributes; the head and the core are assembled the same way for every one."""

    embed: AdaptiveEmbedding
    make_cell: Callable[[bool], nn.Module]  # inject -> a new cell (inject: x enters the cell at every call)
    d_read: int  # P: width of the readout the softmax head sees
    inject_untied: bool  # an untied unrolled stack injects x at every level (else: x is level 1's input)


class CoreParts(NamedTuple):
    cells: list[nn.Module]
    core: nn.Module
    pretrain_core: UnrolledCore | None


def _clusters(m: ModelConfig) -> tuple[list[int], int]:
    """Adaptive cutoffs and divisor, or one cluster (a plain softmax) when `model.adaptive` is off."""
    return (list(m.cutoffs), m.div_val) if m.adaptive else ([], 1)


def _embedding(m: ModelConfig, vocab_size: int, d_proj: int, scale: bool) -> AdaptiveEmbedding:
    cutoffs, div_val = _clusters(m)
    return AdaptiveEmbedding(vocab_size, m.d_embed, d_proj, cutoffs, div_val, scale=scale,
                             emb_dropout=m.emb_dropout, init_std=m.init_std)


def transformer_parts(m: ModelConfig, vocab_size: int) -> ArchParts:
    """DEQ-Transformer / Transformer-XL: embedding projected to d_model and scaled by sqrt(d_model); an
    unrolled untied stack takes the embedding as its first level's input (Transformer-XL proper)."""

    def make_layer(inject: bool) -> TransformerLayer:
        return TransformerLayer(
            m.d_model, m.n_head, m.d_head, m.d_inner, dropout=m.dropout, dropatt=m.dropatt, pre_ln=m.pre_ln,
            inject=inject, same_length=m.same_length, init_std=m.init_std, weight_norm=m.weight_norm,
            init=m.init, ln_affine=m.ln_affine, input_path=m.input_path,
            residual_input_scale=m.residual_input_scale,
        )

    def make_cell(inject: bool) -> TransformerLayer | TransformerCell:
        if m.cell_layers == 1:
            return make_layer(inject)
        return TransformerCell([make_layer(True)] + [make_layer(False) for _ in range(m.cell_layers - 1)])

    embed = _embedding(m, vocab_size, m.d_model, scale=True)
    return ArchParts(embed, make_cell, d_read=m.d_model, inject_untied=False)


def trellisnet_parts(m: ModelConfig, vocab_size: int) -> ArchParts:
    """(DEQ-)TrellisNet: embedding at d_embed (scaled only with `emb_scale`), readout of the d_out channels;
    every level of a TrellisNet injects x, untied or not."""

    def make_cell(inject: bool) -> TrellisNetLayer:
        # the cell always injects; `inject` is True for every TrellisNet core (inject_untied below)
        return TrellisNetLayer(
            m.d_embed, m.d_model, m.d_out, dropouth=m.dropouth, wdrop=m.wdrop, init_std=m.init_std,
            weight_norm=m.weight_norm, inject_gain=m.inject_gain, rec_gain=m.rec_gain,
        )

    embed = _embedding(m, vocab_size, m.d_embed, scale=m.emb_scale)
    return ArchParts(embed, make_cell, d_read=m.d_out, inject_untied=True)


def deq_core(m: ModelConfig, cfg_deq: DEQConfig, parts: ArchParts) -> CoreParts:
    """One injected cell solved to its fixed point; with `pretrain_steps`, the same cell as a shallow
    weight-tied stack first (Bai et al. 2019 §4)."""
    cells = [parts.make_cell(True)]
    pretrain = UnrolledCore(m.pretrain_depth, weight_tied=True) if m.pretrain_steps > 0 else None
    return CoreParts(cells, DEQCore(DEQFixedPoint.from_config(cfg_deq)), pretrain)


def unrolled_core(m: ModelConfig, cfg_deq: DEQConfig, parts: ArchParts) -> CoreParts:
    """Unrolled depth: one injected cell applied n_layer times (`weight_tied`), or n_layer cells."""
    if m.weight_tied:
        cells = [parts.make_cell(True)]
    else:
        cells = [parts.make_cell(parts.inject_untied) for _ in range(m.n_layer)]
    return CoreParts(cells, UnrolledCore(m.n_layer, m.weight_tied, m.grad_checkpoint, m.aux_every), None)


ARCHS: dict[str, Callable[[ModelConfig, int], ArchParts]] = {
    "transformer": transformer_parts,
    "trellisnet": trellisnet_parts,
}
CORES: dict[str, Callable[[ModelConfig, DEQConfig, ArchParts], CoreParts]] = {
    "deq": deq_core,
    "unrolled": unrolled_core,
}
check_registry(ARCHS, Arch, "model.arch")
check_registry(CORES, Core, "model.core")


def _head(m: ModelConfig, parts: ArchParts, vocab_size: int) -> ProjectedAdaptiveLogSoftmax:
    if m.n_classes > 0:  # sequence classifier (copy memory): untied linear head over every position
        return ProjectedAdaptiveLogSoftmax(m.n_classes, parts.d_read, parts.d_read, [], 1, tie_to=None,
                                           init_std=m.init_std)
    cutoffs, div_val = _clusters(m)
    return ProjectedAdaptiveLogSoftmax(vocab_size, m.d_embed, parts.d_read, cutoffs, div_val,
                                       tie_to=parts.embed if m.tie_weight else None, tie_projs=m.tie_projs,
                                       init_std=m.init_std)


def build_model(cfg_model: ModelConfig, cfg_deq: DEQConfig, vocab_size: int) -> SequenceLM:
    """Assemble a SequenceLM from `cfg.model` and `cfg.deq` (read by DEQ cores only)."""
    m = cfg_model
    if m.grad_checkpoint and m.wdrop > 0:
        raise ValueError("model.grad_checkpoint=true cannot recompute model.wdrop noise; set model.wdrop=0")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    parts = ARCHS[m.arch](m, vocab_size)
    head = _head(m, parts, vocab_size)
    cells, core, pretrain_core = CORES[m.core](m, cfg_deq, parts)
    return SequenceLM(m, parts.embed, cells, core, head, pretrain_core=pretrain_core)


def count_on_meta(cfg_model: ModelConfig, cfg_deq: DEQConfig, vocab_size: int) -> dict[str, int]:
    """`count_params` of the model built on the meta device: nothing is allocated, any size counts at once."""
    with torch.device("meta"):
        return count_params(build_model(cfg_model, cfg_deq, vocab_size=vocab_size))

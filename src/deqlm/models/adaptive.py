"""Adaptive input embedding and projected adaptive log-softmax (Baevski & Auli 2019; Grave et al. 2017).

The vocabulary [0, V) is cut into clusters [c_0=0, c_1), [c_1, c_2), ... at `cutoffs`. Cluster i stores
vectors of size d_i = d_embed // div_val**i and a projection P_i (d_proj, d_i) to the model width: for every
cluster when div_val > 1 (Transformer-XL convention, so the head has one even when d_embed == d_proj), else
only when d_embed != d_proj. With no cutoffs both reduce to a plain embedding and a plain (optionally tied)
softmax, which is what PTB and the copy-memory classifier use: one code path for every head.

Tying as in the official Transformer-XL / DEQ WT103 configs: the softmax reuses the embedding tables
(`tie_weight`) and the tail projections (`tie_projs`); the head cluster's projection is tied only when
div_val == 1 (then there is a single table). Shared tensors are the same `nn.Parameter`, so `parameters()`
counts them once.

Legend: B batch, L length, N flattened tokens, P d_proj (model side), E_i cluster width, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deqlm.infra.precision import at_least_float32
from deqlm.models.dropout import embedding_row_dropout


def cluster_bounds(n_token: int, cutoffs: list[int]) -> list[int]:
    bounds = [0, *cutoffs, n_token]
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"model.cutoffs={list(cutoffs)!r} must be increasing and below the vocab size {n_token}"
        )
    return bounds


def _cluster_dims(d_embed: int, div_val: int, n_clusters: int) -> list[int]:
    dims = [d_embed // (div_val**i) for i in range(n_clusters)]
    if min(dims) < 1:
        raise ValueError(f"model.div_val={div_val} leaves a cluster of width 0 (d_embed={d_embed})")
    return dims


class AdaptiveEmbedding(nn.Module):
    """Token ids x_BL -> vectors (B, L, P), scaled by sqrt(P) when `scale` (Transformer convention)."""

    def __init__(
        self,
        n_token: int,
        d_embed: int,
        d_proj: int,
        cutoffs: list[int],
        div_val: int = 1,
        scale: bool = True,
        emb_dropout: float = 0.0,
        init_std: float = 0.01,
        proj_init_std: float = 0.01,
    ):
        super().__init__()
        self.bounds = cluster_bounds(n_token, cutoffs)
        self.dims = _cluster_dims(d_embed, div_val, len(self.bounds) - 1)
        self.d_proj = d_proj
        self.scale = math.sqrt(d_proj) if scale else 1.0
        self.emb_dropout = emb_dropout
        self.weights = nn.ParameterList()
        self.projs = nn.ParameterList()
        self.proj_index: list[int] = []  # cluster -> index into self.projs, -1 when no projection
        for i, d_i in enumerate(self.dims):
            size = self.bounds[i + 1] - self.bounds[i]
            self.weights.append(nn.Parameter(torch.empty(size, d_i).normal_(0.0, init_std)))
            if d_i != d_proj or div_val > 1:
                self.proj_index.append(len(self.projs))
                self.projs.append(nn.Parameter(torch.empty(d_proj, d_i).normal_(0.0, proj_init_std)))
            else:
                self.proj_index.append(-1)

    def proj(self, i: int) -> torch.Tensor | None:
        return None if self.proj_index[i] < 0 else self.projs[self.proj_index[i]]

    def forward(self, x_BL: torch.Tensor) -> torch.Tensor:
        if len(self.weights) == 1:
            weight = embedding_row_dropout(self.weights[0], self.emb_dropout, self.training)
            out_BLP = F.embedding(x_BL, weight)
            if self.proj(0) is not None:
                out_BLP = F.linear(out_BLP, self.proj(0))
            return out_BLP * self.scale
        x_N = x_BL.reshape(-1)
        out_NP = self.weights[0].new_zeros(x_N.numel(), self.d_proj)
        for i, weight in enumerate(self.weights):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            idx = ((x_N >= lo) & (x_N < hi)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            emb = F.embedding(x_N[idx] - lo, weight)
            if self.proj(i) is not None:
                emb = F.linear(emb, self.proj(i))
            out_NP = out_NP.index_copy(0, idx, emb.to(out_NP.dtype))
        return out_NP.view(*x_BL.shape, self.d_proj) * self.scale


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Hidden states h_NP and targets y_N -> per-token NLL (N,), exact (no sampling)."""

    def __init__(
        self,
        n_token: int,
        d_embed: int,
        d_proj: int,
        cutoffs: list[int],
        div_val: int = 1,
        tie_to: AdaptiveEmbedding | None = None,
        tie_projs: bool = True,
        init_std: float = 0.01,
        proj_init_std: float = 0.01,
    ):
        super().__init__()
        self.bounds = cluster_bounds(n_token, cutoffs)
        self.dims = _cluster_dims(d_embed, div_val, len(self.bounds) - 1)
        self.n_clusters = len(self.bounds) - 1
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.projs = nn.ParameterList()
        self.proj_index: list[int] = []
        for i, d_i in enumerate(self.dims):
            size = self.bounds[i + 1] - self.bounds[i]
            if tie_to is not None:
                self.weights.append(tie_to.weights[i])
            else:
                self.weights.append(nn.Parameter(torch.empty(size, d_i).normal_(0.0, init_std)))
            self.biases.append(nn.Parameter(torch.zeros(size)))
            if d_i == d_proj and div_val == 1:
                self.proj_index.append(-1)
                continue
            self.proj_index.append(len(self.projs))
            tie_this = tie_to is not None and tie_projs and (i > 0 or div_val == 1)
            shared = tie_to.proj(i) if tie_this and tie_to.d_proj == d_proj else None
            if shared is not None:
                self.projs.append(shared)
            else:
                self.projs.append(nn.Parameter(torch.empty(d_proj, d_i).normal_(0.0, proj_init_std)))
        if self.n_clusters > 1:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters - 1, self.dims[0]))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters - 1))

    def _hidden(self, h_NP: torch.Tensor, i: int) -> torch.Tensor:
        k = self.proj_index[i]
        return h_NP if k < 0 else F.linear(h_NP, self.projs[k].t())

    def log_prob(self, h_NP: torch.Tensor) -> torch.Tensor:
        """log p(v | h) for every word v (N, V): the head's shortlist, then each tail cluster's words as the
        cluster's head log-probability plus the word's within the cluster (what sampling needs)."""
        head_logp_NV = F.log_softmax(at_least_float32(F.linear(self._hidden(h_NP, 0), *self._head())), dim=-1)
        if self.n_clusters == 1:
            return head_logp_NV
        shortlist = self.bounds[1]
        parts = [head_logp_NV[:, :shortlist]]
        for i in range(1, self.n_clusters):
            tail = F.linear(self._hidden(h_NP, i), self.weights[i], self.biases[i])
            parts.append(head_logp_NV[:, shortlist + i - 1 : shortlist + i] + F.log_softmax(
                at_least_float32(tail), dim=-1))
        return torch.cat(parts, dim=1)

    def _head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head softmax's weight and bias: the shortlist's words, then one row per tail cluster."""
        weight, bias = self.weights[0], self.biases[0]
        if self.n_clusters > 1:
            weight = torch.cat([weight, self.cluster_weight], 0)
            bias = torch.cat([bias, self.cluster_bias], 0)
        return weight, bias

    def forward(self, h_NP: torch.Tensor, y_N: torch.Tensor) -> torch.Tensor:
        head_logp_NV = F.log_softmax(at_least_float32(F.linear(self._hidden(h_NP, 0), *self._head())), dim=-1)
        if self.n_clusters == 1:
            return -head_logp_NV.gather(1, y_N[:, None]).squeeze(1)
        nll_N = head_logp_NV.new_zeros(y_N.numel())
        shortlist = self.bounds[1]
        for i in range(self.n_clusters):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            idx = ((y_N >= lo) & (y_N < hi)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            head_part = head_logp_NV.index_select(0, idx)
            if i == 0:
                logp = head_part.gather(1, y_N[idx, None]).squeeze(1)
            else:
                tail = F.linear(self._hidden(h_NP.index_select(0, idx), i), self.weights[i], self.biases[i])
                tail_logp = F.log_softmax(at_least_float32(tail), dim=-1)
                logp = head_part[:, shortlist + i - 1] + tail_logp.gather(
                    1, (y_N[idx] - lo)[:, None]
                ).squeeze(1)
            nll_N = nll_N.index_copy(0, idx, -logp)
        return nll_N

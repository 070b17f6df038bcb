"""The Transformer-XL layer written as a map z -> f(z; ctx), and the DEQ-Transformer's cell: one such layer
(the paper's, Bai et al. 2019, §4) or several in turn (`TransformerCell`).

f(z) = LN2(h + FFN(h)), h = LN1(z + Attn(z; mem)) (post-LN, the paper's) or the pre-LN variant. Attention is
Transformer-XL's relative positional attention (Dai et al. 2019, eq. in §3.3): over keys [mem ; z],
score(i, j) = (q_i + u)·k_j + (q_i + v)·W_R R_{i-j}, with the learned biases u = r_w_bias, v = r_r_bias and
sinusoids R of the relative distance (clamped at clamp_len).

Input injection (DEQ cells only, `inject=True`): a learned projection of the embedded tokens is added to the
query/key/value of the current positions, so f depends on the input x at every solver step. Unrolled
Transformer-XL layers use `inject=False` and take the embedding as their first input instead.

`input_path` says where else x enters an injected cell (docs/models.md, "Input path"):
* `qkv` (the official cell): only through that projection. From z0 = 0 the token reaches the state through
  attention values alone, and with the official small injection the cell starts near the unigram plateau.
* `residual` (our departure): the layer's input is z + x, as if x were the embedding an unrolled first layer
  receives, so f(0) is one Transformer-XL layer applied to the embedding (plus the injection).
  `residual_input_scale` multiplies that x (1: as the embedding comes). Pre-LN feeds
  z + x to the attention branch and keeps z as the residual stream, as RevDEQ's cell does.

`init` says how weights are drawn (docs/models.md, "Initialisation"):
* `official`: as the official DEQ-Transformer really ran. It applied weight norm before writing N(0, init_std)
  into `.weight`, and the weight is recomputed from g and v before use, so the weight-normed attention and FFN
  layers kept PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The injection (not weight-normed) and the
  positional biases do get N(0, init_std); all biases start at zero. Without weight norm the layers get the
  same default draw, so both settings start from one function.
* `normal`: every weight N(0, init_std) (Transformer-XL's own scheme, used here before the audit).

Everything that is constant across solver steps lives in `ctx`, built once per forward by `context()`: the
injection, the memory's keys and values, the projected positional embeddings, the causal mask and all dropout
masks. `forward(z, ctx)` then is one fixed, deterministic map.

Legend: B batch, L segment length, M memory length, R = M + L key positions, D d_model, H heads, K d_head,
I d_inner.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deqlm.infra.precision import at_least_float32
from deqlm.models.dropout import VariationalDropout, add_weight_norm, apply_mask


def sinusoid_RD(pos_R: torch.Tensor, d_model: int) -> torch.Tensor:
    """Sinusoidal embedding of (float) positions, [sin | cos] halves as in Transformer-XL."""
    half = (d_model + 1) // 2
    inv_freq = 1.0 / (
        10000 ** (torch.arange(0, half, device=pos_R.device, dtype=pos_R.dtype) * 2.0 / d_model)
    )
    angles_RH = pos_R[:, None] * inv_freq[None, :]
    return torch.cat([angles_RH.sin(), angles_RH.cos()], dim=-1)[:, :d_model]


FFN_BLOCK_BYTES = 64 * 2**20  # the most bytes one d_inner-wide FFN tensor may take (TransformerLayer._ffn)


def ffn_block_rows(seq_len: int, d_inner: int, elem_bytes: int) -> int:
    """Batch rows per FFN block: as many as keep one (rows, L, I) tensor within FFN_BLOCK_BYTES (>= 1)."""
    return max(1, FFN_BLOCK_BYTES // max(1, seq_len * d_inner * elem_bytes))


def _split_rows(mask: torch.Tensor | None, rows: int, batch: int) -> list[torch.Tensor | None]:
    """A (B, 1, W) dropout mask in blocks of `rows` batch rows (None: no mask, for every block)."""
    if mask is None:
        return [None] * -(-batch // rows)
    return list(mask.split(rows))


def _ffn_block(
    h_BLD: torch.Tensor, m_inner: torch.Tensor | None, m_ff: torch.Tensor | None,
    w1_ID: torch.Tensor, b1_I: torch.Tensor, w2_DI: torch.Tensor, b2_D: torch.Tensor,
) -> torch.Tensor:
    """mask_ff(ff2(relu(mask_inner(ff1(h))))).

    Bias, mask and ReLU run in place on the product h W1^T (their backwards need none of the values they
    overwrite): one d_inner-wide tensor in the forward. That product comes from `torch.matmul`, which is not a
    view of its result as far as autograd is concerned (a 3-d `F.linear` is, and in-place operations on a view
    make autograd copy the whole base, twice, in every backward). The mask is >= 0, so masking before the
    ReLU is the same function, and the ReLU's saved output is also ff2's saved input: one d_inner-wide tensor
    kept for backward instead of two."""
    pre_BLI = torch.matmul(h_BLD, w1_ID.mT).add_(b1_I)
    if m_inner is not None:
        pre_BLI.mul_(m_inner)
    return apply_mask(F.linear(F.relu(pre_BLI, inplace=True), w2_DI, b2_D), m_ff)


class GatherLast(torch.autograd.Function):
    """x.gather(-1, index), with a backward that keeps only the index and x's shape.

    Autograd's own gather saves x itself to know its size: for the relative-position scores that is one
    (B, H, L, R) float tensor per layer application, as large as the attention scores and kept once per
    layer by an unrolled stack (docs/models.md gives the size at the paper's shapes), which
    Transformer-XL's pad-and-reshape shift does not keep. The backward scatters the gradient into zeros out
    of differentiable operations, so it is itself differentiable (Jacobian regularisation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.x_shape = x.shape
        return x.gather(-1, index)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (index,) = ctx.saved_tensors
        return g.new_zeros(ctx.x_shape).scatter_add(-1, index, g), None


class TransformerLayer(nn.Module):
    """One Transformer-XL layer; alone it is the DEQ-Transformer's cell, the map f the solver works on."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        d_inner: int,
        dropout: float = 0.0,
        dropatt: float = 0.0,
        pre_ln: bool = False,
        inject: bool = True,
        same_length: bool = False,
        init_std: float = 0.01,
        weight_norm: bool = True,
        init: str = "official",
        ln_affine: bool = False,
        input_path: str = "qkv",
        residual_input_scale: float = 1.0,
    ):
        super().__init__()
        self.d_model, self.n_head, self.d_head, self.d_inner = d_model, n_head, d_head, d_inner
        self.pre_ln, self.same_length = pre_ln, same_length
        self.input_residual = inject and input_path == "residual"
        self.residual_input_scale = residual_input_scale
        hk = n_head * d_head
        self.qkv = nn.Linear(d_model, 3 * hk, bias=False)
        self.r_net = nn.Linear(d_model, hk, bias=False)
        self.o_net = nn.Linear(hk, d_model, bias=False)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head).normal_(0.0, init_std))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head).normal_(0.0, init_std))
        self.ff1 = nn.Linear(d_model, d_inner)
        self.ff2 = nn.Linear(d_inner, d_model)
        self.ln1 = nn.LayerNorm(d_model, elementwise_affine=ln_affine)
        self.ln2 = nn.LayerNorm(d_model, elementwise_affine=ln_affine)
        self.inject = nn.Linear(d_model, 3 * hk) if inject else None
        self.drop = VariationalDropout(dropout)
        self.dropatt = VariationalDropout(dropatt)
        for lin in (self.qkv, self.r_net, self.o_net, self.ff1, self.ff2):
            if init == "normal":
                nn.init.normal_(lin.weight, 0.0, init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
            if weight_norm:
                add_weight_norm(lin)
        if self.inject is not None:  # never weight-normed: the official inject_conv is a plain 1x1 conv
            nn.init.normal_(self.inject.weight, 0.0, init_std)
            nn.init.zeros_(self.inject.bias)

    # --- state and memory -----------------------------------------------------------------------------------
    def empty_mem(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        width = 2 * self.d_model if self.inject is not None else self.d_model
        return like.new_zeros(batch_size, 0, width)

    def init_state(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """z0: zeros for an injected (DEQ / weight-tied) cell, the embedding for an unrolled first layer."""
        return torch.zeros_like(x_BLD) if self.inject is not None else x_BLD

    def readout(self, z_BLD: torch.Tensor) -> torch.Tensor:
        return z_BLD

    def update_mem(
        self, mem_BMW: torch.Tensor, z_BLD: torch.Tensor, x_BLD: torch.Tensor, mem_len: int, ctx: dict
    ) -> torch.Tensor:
        """Transformer-XL memory: the last mem_len steps of [mem ; new], detached (no grad across segments).

        An injected cell also keeps the embedded tokens next to the states (W = 2D), so the memory's keys and
        values carry the same injection they had when they were computed (as in the official DEQ-Transformer).
        `ctx` (this segment's context) is not needed by one layer; a `TransformerCell` needs it.
        """
        if mem_len <= 0:
            return mem_BMW[:, :0].detach()
        new_BLW = torch.cat([z_BLD, x_BLD], dim=-1) if self.inject is not None else z_BLD
        return torch.cat([mem_BMW, new_BLW], dim=1)[:, -mem_len:].detach()

    # --- the map f ------------------------------------------------------------------------------------------
    def context(self, x_BLD: torch.Tensor, mem_BMW: torch.Tensor, clamp_len: int = -1) -> dict:
        """Everything f needs that does not change across solver steps (computed once, with autograd on)."""
        B, L, _ = x_BLD.shape
        M = mem_BMW.size(1)
        R = M + L
        H, K = self.n_head, self.d_head
        dev = x_BLD.device
        ctx: dict = {}
        ctx["u_BL3"] = self.inject(x_BLD) if self.inject is not None else None
        ctx["x_BLD"] = self.residual_input_scale * x_BLD if self.input_residual else None
        if M > 0:
            z_mem_BMD = mem_BMW[..., : self.d_model]
            if self.input_residual:
                z_mem_BMD = z_mem_BMD + self.residual_input_scale * mem_BMW[..., self.d_model :]
            w_mem_BM3 = self.qkv(self.ln1(z_mem_BMD) if self.pre_ln else z_mem_BMD)
            if self.inject is not None:
                w_mem_BM3 = w_mem_BM3 + self.inject(mem_BMW[..., self.d_model :])
            _, k_mem, v_mem = w_mem_BM3.chunk(3, dim=-1)
            ctx["k_mem_BMHK"] = k_mem.view(B, M, H, K)
            ctx["v_mem_BMHK"] = v_mem.view(B, M, H, K)
        else:
            ctx["k_mem_BMHK"] = ctx["v_mem_BMHK"] = None
        dist_R = torch.arange(R - 1, -1, -1, device=dev, dtype=x_BLD.dtype)
        if clamp_len > 0:
            dist_R = dist_R.clamp(max=clamp_len)
        ctx["r_k_RHK"] = self.r_net(sinusoid_RD(dist_R, self.d_model)).view(R, H, K)
        # query i sits at absolute position M + i; key j is at distance d = M + i - j
        i_L1 = torch.arange(L, device=dev)[:, None]
        j_1R = torch.arange(R, device=dev)[None, :]
        dist_LR = M + i_L1 - j_1R
        allowed_LR = dist_LR >= 0
        if self.same_length and M > 0:
            allowed_LR = allowed_LR & (dist_LR < M)
        ctx["allowed_LR"] = allowed_LR
        # relative scores are computed against every distance in dist_R (index r holds distance R-1-r)
        ctx["rel_index_LR"] = (R - 1 - dist_LR).clamp(0, R - 1)
        ctx["m_attn"] = self.drop.mask((B, 1, self.d_model), x_BLD)
        ctx["m_inner"] = self.drop.mask((B, 1, self.d_inner), x_BLD)
        ctx["m_ff"] = self.drop.mask((B, 1, self.d_model), x_BLD)
        ctx["m_prob"] = self.dropatt.mask((B, H, L, R), x_BLD)
        return ctx

    def _attention(self, z_BLD: torch.Tensor, ctx: dict) -> torch.Tensor:
        B, L, _ = z_BLD.shape
        H, K = self.n_head, self.d_head
        w_BL3 = self.qkv(self.ln1(z_BLD) if self.pre_ln else z_BLD)
        if ctx["u_BL3"] is not None:
            w_BL3 = w_BL3 + ctx["u_BL3"]
        q, k, v = (t.reshape(B, L, H, K) for t in w_BL3.chunk(3, dim=-1))
        if ctx["k_mem_BMHK"] is not None:
            k = torch.cat([ctx["k_mem_BMHK"], k], dim=1)
            v = torch.cat([ctx["v_mem_BMHK"], v], dim=1)
        content_BHLR = torch.einsum("blhk,brhk->bhlr", q + self.r_w_bias, k)
        position_BHLR = torch.einsum("blhk,rhk->bhlr", q + self.r_r_bias, ctx["r_k_RHK"])
        R = position_BHLR.size(-1)
        position_BHLR = GatherLast.apply(position_BHLR, ctx["rel_index_LR"].expand(B, H, L, R))
        score_BHLR = (content_BHLR + position_BHLR) * (1.0 / math.sqrt(K))
        score_BHLR = score_BHLR.masked_fill(~ctx["allowed_LR"], float("-inf"))
        prob_BHLR = apply_mask(torch.softmax(at_least_float32(score_BHLR), dim=-1).to(v.dtype), ctx["m_prob"])
        attn_BLHK = torch.einsum("bhlr,brhk->blhk", prob_BHLR, v)
        return apply_mask(self.o_net(attn_BLHK.reshape(B, L, H * K)), ctx["m_attn"])

    def _ffn(self, h_BLD: torch.Tensor, ctx: dict) -> torch.Tensor:
        """FFN(h), over blocks of batch rows when one d_inner-wide tensor would pass `FFN_BLOCK_BYTES`.

        The DEQ-Transformer's d_inner is tens of thousands wide, so at the paper's batch one (B, L, I)
        tensor is larger than the FFN's weights (docs/models.md gives the sizes), and the backward of the
        masked ReLU holds two of them at once (the incoming gradient and its masked copy), once per adjoint
        step, at the training step's memory peak. Per block that working memory is
        as small as the block; the bytes saved for backward are unchanged (the same activations, in
        pieces), and so is the function. Unrolled layers (d_inner ~2,000) run as one block."""
        B, L, _ = h_BLD.shape
        # the weights once per call: with weight norm each access recomputes them (and saves the result)
        weights = (self.ff1.weight, self.ff1.bias, self.ff2.weight, self.ff2.bias)
        rows = ffn_block_rows(L, self.d_inner, h_BLD.element_size())
        if rows >= B:
            return _ffn_block(h_BLD, ctx["m_inner"], ctx["m_ff"], *weights)
        masks = [_split_rows(ctx[k], rows, B) for k in ("m_inner", "m_ff")]
        return torch.cat(
            [_ffn_block(h, m_inner, m_ff, *weights) for h, m_inner, m_ff in zip(h_BLD.split(rows), *masks)]
        )

    def forward(self, z_BLD: torch.Tensor, ctx: dict) -> torch.Tensor:
        # residual input path: the layer reads z + x. Pre-LN keeps z as its residual stream (adding x there
        # would pile up one x per application); post-LN's LN1 absorbs it.
        in_BLD = z_BLD if ctx["x_BLD"] is None else z_BLD + ctx["x_BLD"]
        a_BLD = self._attention(in_BLD, ctx)
        if self.pre_ln:
            h_BLD = z_BLD + a_BLD
            return h_BLD + self._ffn(self.ln2(h_BLD), ctx)
        h_BLD = self.ln1(in_BLD + a_BLD)
        return self.ln2(h_BLD + self._ffn(h_BLD, ctx))


class TransformerCell(nn.Module):
    """Several Transformer-XL layers applied in turn as one map f (`model.cell_layers` > 1; our departure).

    The paper's DEQ-Transformer solves one layer. A cell of n untied layers keeps the DEQ's O(1) memory in
    depth but gives the equilibrium n distinct attention patterns per head and n FFNs, which tests whether
    the DEQ's gap to an untied stack comes from weight tying (docs/models.md, "Layers per cell"). Only the
    first layer is injected (its input path applies); the others read the previous layer's output, as
    Transformer-XL's upper layers do, and each attends over a memory of its own input at the previous
    segment's fixed point. The memory is [z* ; x ; y1* ; ... ; y(n-1)*] (W = (n + 1) D), yi* the output of
    layer i at z*, so a segment split in two with memory is solved as one long segment.
    """

    def __init__(self, layers: list[TransformerLayer]):
        super().__init__()
        if layers[0].inject is None or any(layer.inject is not None for layer in layers[1:]):
            raise ValueError("a TransformerCell injects x into its first layer only")
        self.layers = nn.ModuleList(layers)
        self.d_model = layers[0].d_model

    def empty_mem(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch_size, 0, (len(self.layers) + 1) * self.d_model)

    def init_state(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return self.layers[0].init_state(x_BLD)

    def readout(self, z_BLD: torch.Tensor) -> torch.Tensor:
        return z_BLD

    def update_mem(
        self, mem_BMW: torch.Tensor, z_BLD: torch.Tensor, x_BLD: torch.Tensor, mem_len: int, ctx: dict
    ) -> torch.Tensor:
        """The last mem_len steps of [mem ; new], new = [z* ; x ; y1* ; ...] (the upper layers' inputs at z*,
        recomputed once with this segment's context), detached."""
        if mem_len <= 0:
            return mem_BMW[:, :0].detach()
        parts = [z_BLD, x_BLD]
        with torch.no_grad():
            y_BLD = z_BLD
            for layer, layer_ctx in zip(self.layers[:-1], ctx["layers"][:-1]):
                y_BLD = layer(y_BLD, layer_ctx)
                parts.append(y_BLD)
        return torch.cat([mem_BMW, torch.cat(parts, dim=-1)], dim=1)[:, -mem_len:].detach()

    def context(self, x_BLD: torch.Tensor, mem_BMW: torch.Tensor, clamp_len: int = -1) -> dict:
        """One context per layer, each with its slice of the memory: [z ; x] for the injected first layer,
        the stored input yi for layer i + 1."""
        D = self.d_model
        slices = [mem_BMW[..., : 2 * D]] + [
            mem_BMW[..., (i + 1) * D : (i + 2) * D] for i in range(1, len(self.layers))
        ]
        return {"layers": [layer.context(x_BLD, m, clamp_len) for layer, m in zip(self.layers, slices)]}

    def forward(self, z_BLD: torch.Tensor, ctx: dict) -> torch.Tensor:
        for layer, layer_ctx in zip(self.layers, ctx["layers"]):
            z_BLD = layer(z_BLD, layer_ctx)
        return z_BLD

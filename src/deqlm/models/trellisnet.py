"""The TrellisNet level as a map z -> f(z; ctx), the DEQ-TrellisNet cell (Bai et al. 2019 §4; TrellisNet,
Bai et al. 2019 ICLR).

The state z holds [h ; c] (channel-first, B x F x L), each of H = nhid + nout channels as in the official code
(the readout is the last nout channels of h; with this width the PTB and WT103 cells have the paper's 20M and
45M non-embedding parameters). One weight-shared causal convolution of kernel 2 reads h at times t-1 and t;
the input injection, a kernel-2 convolution over [x_{t-1}, x_t], is computed once per forward and added.
LSTM-style gating of the C = 4H pre-activations (i, f, o, g):

    c_t = sigmoid(f_t) * c_{t-1} + sigmoid(i_t) * tanh(g_t),   h_t = sigmoid(o_t) * tanh(c_t),

where c_{t-1} is the previous level's cell state one step back. The convolution reads h only, never c: c is
unbounded, and feeding it back through a random convolution scrambles the signal level after level (a 16-level
stack then sat on the unigram plateau of PTB; docs/models.md). History padding: the step before t = 0 is the
previous segment's last state (and last embedded token), carried in the memory tensor [z_last ; x_last]
(B x (F+E) x 1); zeros on the first segment.

Initialisation: weights N(0, init_std), or, when `inject_gain` / `rec_gain` are set, each output channel's
filter rescaled to that norm (with weight norm this is the initial g). A small `rec_gain` makes every level
start close to "inject x and gate", so depth does not scramble the input before the model has learnt to use
the recurrence.

Legend: B batch, L segment length, E d_embed (ninp), H = nhid + nout, F = 2H state channels, C = 4H gate
channels, O d_out (nout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deqlm.models.dropout import VariationalDropout, add_dropconnect, add_weight_norm, apply_mask


def causal_conv_k2(x_BIL1: torch.Tensor, w_OI2: torch.Tensor, lean_backward: bool = False) -> torch.Tensor:
    """Kernel-2 convolution without padding: (B, I, L + 1) -> (B, O, L).

    `lean_backward` (set by the DEQ core, whose one recorded application of f is differentiated once per
    adjoint solver step): on a CPU, record it with PyTorch's im2col convolution instead of oneDNN's.
    oneDNN's input-gradient re-materialises a copy of the whole weight in its own layout on every call,
    allocated inside each vector-Jacobian product, i.e. at the training step's memory peak (docs/models.md
    gives the size); the im2col path's input-gradient allocates only the gradient itself. Its forward is
    slower, which costs one f-evaluation per training step. Elsewhere (no graph, unrolled stacks, CUDA) the
    default convolution.
    """
    lean = lean_backward and _IM2COL_CONV2D is not None and x_BIL1.device.type == "cpu"
    if lean and torch.is_grad_enabled():
        # contiguous: that path's weight gradient is wrong for a strided weight (docs/models.md)
        x_BI1L1, w_OI12 = x_BIL1.contiguous().unsqueeze(2), w_OI2.contiguous().unsqueeze(2)
        return _IM2COL_CONV2D(x_BI1L1, w_OI12, (1, 2), None, (1, 1), (0, 0)).squeeze(2)
    return F.conv1d(x_BIL1, w_OI2)


# PyTorch's own im2col convolution (a private binding): if a release drops it, the default convolution is used
_IM2COL_CONV2D = getattr(torch._C._nn, "thnn_conv2d", None)


class LSTMGating(torch.autograd.Function):
    """[h ; c] (B, 2H, L) from the C = 4H pre-activations (i, f, o, g) and c_{t-1}:

        c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g),   h = sigmoid(o) * tanh(c).

    The same function as that expression, and as many saved bytes as autograd keeps for it (here the
    pre-activations, c_prev and tanh(c); autograd keeps the four gate activations instead of the
    pre-activations). What changes is the working memory: the forward writes h and c into the output's halves
    (no concatenation), and the backward recomputes the gate activations into the one (B, C, L) gradient
    tensor and turns them into the gate gradients in place, where autograd makes four gradients and then
    concatenates them. In a DEQ this backward runs once per adjoint step, at the training step's memory
    peak. Under create_graph (Jacobian regularisation) the backward recomputes from the inputs out of place,
    so it is itself differentiable.
    """

    @staticmethod
    def forward(ctx, pre_BCL: torch.Tensor, c_prev_BHL: torch.Tensor) -> torch.Tensor:
        B, H, L = c_prev_BHL.shape
        sig_B3HL = torch.sigmoid(pre_BCL[:, : 3 * H])  # i, f, o
        tg_BHL = torch.tanh(pre_BCL[:, 3 * H :])
        si, sf, so = sig_B3HL.chunk(3, dim=1)
        out_B2HL = pre_BCL.new_empty(B, 2 * H, L, dtype=torch.promote_types(pre_BCL.dtype, c_prev_BHL.dtype))
        h, c = out_B2HL.chunk(2, dim=1)
        torch.mul(sf, c_prev_BHL, out=c).addcmul_(si, tg_BHL)
        tc_BHL = torch.tanh(c)
        torch.mul(so, tc_BHL, out=h)
        ctx.save_for_backward(pre_BCL, c_prev_BHL, tc_BHL)
        return out_B2HL

    @staticmethod
    def backward(ctx, g_out_B2HL: torch.Tensor):
        pre_BCL, c_prev, tc = ctx.saved_tensors
        dh, dc_in = g_out_B2HL.chunk(2, dim=1)
        if torch.is_grad_enabled():  # double backward: recompute from the inputs, out of place
            i, f, o, g = pre_BCL.chunk(4, dim=1)
            si, sf, so, tg = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
            tc = torch.tanh(sf * c_prev + si * tg)
            dc = dc_in + dh * so * (1 - tc * tc)
            d_pre = torch.cat([dc * tg * si * (1 - si), dc * c_prev * sf * (1 - sf), dh * tc * so * (1 - so),
                               dc * si * (1 - tg * tg)], dim=1)
            return d_pre, dc * sf
        H = c_prev.shape[1]
        d_pre_BCL = torch.empty_like(pre_BCL, memory_format=torch.contiguous_format)
        torch.sigmoid(pre_BCL[:, : 3 * H], out=d_pre_BCL[:, : 3 * H])
        torch.tanh(pre_BCL[:, 3 * H :], out=d_pre_BCL[:, 3 * H :])
        si, sf, so, tg = d_pre_BCL.chunk(4, dim=1)  # the activations, turned into gradients in place below
        dc = torch.mul(tc, tc).neg_().add_(1).mul_(so).mul_(dh).add_(dc_in)  # dL/dc through h and directly
        # one (B, H, L) buffer serves twice: first sigmoid(i) * dc (the g gradient needs sigmoid(i), the i
        # gradient needs tanh(g), so one of them must be kept aside), then dL/dc_prev, the returned gradient
        buf = torch.mul(si, dc)
        so.addcmul_(so, so, value=-1).mul_(tc).mul_(dh)  # sigmoid' = s - s^2
        si.addcmul_(si, si, value=-1).mul_(tg).mul_(dc)
        tg.mul_(tg).neg_().add_(1).mul_(buf)  # tanh' = 1 - t^2
        dc_prev = torch.mul(dc, sf, out=buf)
        sf.addcmul_(sf, sf, value=-1).mul_(c_prev).mul_(dc)
        return d_pre_BCL, dc_prev


def _set_row_norms(w_OIK: torch.Tensor, gain: float) -> None:
    """Rescale each output channel's filter to norm `gain` (with weight norm: the initial g)."""
    with torch.no_grad():
        w_OIK.mul_(gain / w_OIK.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1))


class TrellisNetLayer(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_hid: int,
        d_out: int,
        dropouth: float = 0.0,
        wdrop: float = 0.0,
        init_std: float = 0.01,
        weight_norm: bool = True,
        inject_gain: float | None = None,
        rec_gain: float | None = None,
    ):
        super().__init__()
        if d_out <= 0 or d_hid <= 0:
            raise ValueError(f"TrellisNet sizes must be positive: model.d_model={d_hid}, model.d_out={d_out}")
        self.d_in, self.d_out = d_in, d_out
        self.d_h = d_hid + d_out  # official h_size
        self.d_state = 2 * self.d_h
        self.inject = nn.Conv1d(d_in, 4 * self.d_h, kernel_size=2)
        self.conv = nn.Conv1d(self.d_h, 4 * self.d_h, kernel_size=2, bias=False)
        for conv, gain in ((self.inject, inject_gain), (self.conv, rec_gain)):
            nn.init.normal_(conv.weight, 0.0, init_std)
            if gain is not None:
                _set_row_norms(conv.weight, gain)
            if weight_norm:
                add_weight_norm(conv)
        nn.init.zeros_(self.inject.bias)
        add_dropconnect(self.conv, wdrop)
        self.drop_h = VariationalDropout(dropouth)

    # --- state and memory -----------------------------------------------------------------------------------
    def empty_mem(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch_size, self.d_state + self.d_in, 0)

    def init_state(self, x_BLE: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLE.shape
        return x_BLE.new_zeros(B, self.d_state, L)

    def readout(self, z_BFL: torch.Tensor) -> torch.Tensor:
        return z_BFL[:, self.d_h - self.d_out : self.d_h].transpose(1, 2)

    @staticmethod
    def update_mem(
        mem: torch.Tensor, z_BFL: torch.Tensor, x_BLE: torch.Tensor, mem_len: int = 1, ctx: dict | None = None
    ) -> torch.Tensor:
        """History padding for the next segment: [z_{L-1} ; x_{L-1}], detached. `mem_len` and `ctx` are not
        used."""
        return torch.cat([z_BFL[:, :, -1:], x_BLE[:, -1:].transpose(1, 2)], dim=1).detach()

    # --- the map f ------------------------------------------------------------------------------------------
    def context(self, x_BLE: torch.Tensor, mem: torch.Tensor, clamp_len: int = -1) -> dict:
        """Injection (conv over [x_{t-1}, x_t]), history and the dropouth mask: once per forward."""
        B = x_BLE.size(0)
        if mem.size(-1) == 0:
            mem = x_BLE.new_zeros(B, self.d_state + self.d_in, 1)
        z_hist_BF1, x_hist_BE1 = mem[:, : self.d_state], mem[:, self.d_state :]
        x_BEL1 = torch.cat([x_hist_BE1, x_BLE.transpose(1, 2)], dim=2)
        return {
            "u_BCL": self.inject(x_BEL1),
            "z_hist_BF1": z_hist_BF1,
            "m_h": self.drop_h.mask((B, self.d_h, 1), x_BLE),
        }

    def forward(self, z_BFL: torch.Tensor, ctx: dict) -> torch.Tensor:
        z_pad_BFL1 = torch.cat([ctx["z_hist_BF1"], z_BFL], dim=2)
        h_pad_BHL1 = apply_mask(z_pad_BFL1[:, : self.d_h], ctx["m_h"])
        pre_BCL = causal_conv_k2(h_pad_BHL1, self.conv.weight, ctx.get("lean_backward", False)) + ctx["u_BCL"]
        return LSTMGating.apply(pre_BCL, z_pad_BFL1[:, self.d_h :, :-1])

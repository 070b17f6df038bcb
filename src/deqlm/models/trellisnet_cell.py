"""The TrellisNet level as a map z -> f(z; ctx), the DEQ-TrellisNet cell (Bai et al. 2019 §4; TrellisNet,
Bai et al. 2019 ICLR).

The state z holds [h ; c] (channel-first, B x F x L with F = 2 * nhid). One weight-shared causal
convolution of kernel 2 reads z at times t-1 and t; the input injection, a kernel-2 convolution over
[x_{t-1}, x_t], is computed once per forward and added. LSTM-style gating of the C = 4 * nhid pre-activations
(i, f, o, g):

    c_t = sigmoid(f_t) * c_{t-1} + sigmoid(i_t) * tanh(g_t),   h_t = sigmoid(o_t) * tanh(c_t),

where c_{t-1} is the previous level's cell state one step back. History padding: the step before t = 0 is the
previous segment's last state (and last embedded token), carried in the memory tensor [z_last ; x_last] (B
x (F+E) x 1); zeros on the first segment. The readout is the last `d_out` channels of h.

Legend: B batch, L segment length, E d_embed (ninp), F = 2 * nhid state channels, C = 4 * nhid gate channels,
O d_out (nout).
"""

from __future__ import annotations

import torch
from torch import nn

from deqlm.models.dropout import VariationalDropout, add_dropconnect, add_weight_norm, apply_mask


class TrellisNetCell(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_hid: int,
        d_out: int,
        dropouth: float = 0.0,
        wdrop: float = 0.0,
        init_std: float = 0.01,
        weight_norm: bool = True,
    ):
        super().__init__()
        if d_out > d_hid:
            raise ValueError(
                f"model.d_out={d_out} must not exceed the TrellisNet hidden size model.d_model={d_hid}"
            )
        self.d_in, self.d_hid, self.d_out = d_in, d_hid, d_out
        self.d_state = 2 * d_hid
        self.inject = nn.Conv1d(d_in, 4 * d_hid, kernel_size=2)
        self.conv = nn.Conv1d(self.d_state, 4 * d_hid, kernel_size=2, bias=False)
        for conv in (self.inject, self.conv):
            nn.init.normal_(conv.weight, 0.0, init_std)
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
        return z_BFL[:, self.d_hid - self.d_out : self.d_hid].transpose(1, 2)

    @staticmethod
    def update_mem(
        mem: torch.Tensor, z_BFL: torch.Tensor, x_BLE: torch.Tensor, mem_len: int = 1
    ) -> torch.Tensor:
        """History padding for the next segment: [z_{L-1} ; x_{L-1}], detached. `mem_len` is not used."""
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
            "m_h": self.drop_h.mask((B, self.d_state, 1), x_BLE),
        }

    def forward(self, z_BFL: torch.Tensor, ctx: dict) -> torch.Tensor:
        z_pad_BFL1 = torch.cat([ctx["z_hist_BF1"], z_BFL], dim=2)
        pre_BCL = self.conv(apply_mask(z_pad_BFL1, ctx["m_h"])) + ctx["u_BCL"]
        i, f, o, g = pre_BCL.chunk(4, dim=1)
        c_prev = z_pad_BFL1[:, self.d_hid :, :-1]
        c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.cat([h, c], dim=1)

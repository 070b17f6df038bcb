"""One training step of a row's core on random embedded inputs: what the memory and speed benchmarks measure.

Tensor names: B batch, L segment length, E the width the core reads (d_model or d_embed).
"""

from __future__ import annotations

import contextlib

import torch

from deqlm.bench.rows import BuiltRow, core_input_width
from deqlm.train.optim import build_optimizer, optimizer_state_bytes


class CoreStep:
    """One training step of a row's core: embedded inputs u (B, L, E) -> core -> readout -> loss.

    The loss is the mean square of the readout (plus the row's auxiliary-loss readouts, weighted as in
    training): a stand-in for the softmax that keeps every tensor of the core in the graph while the softmax
    tables and logits stay out, as the paper's memory column asks. Memory carries over between calls exactly
    as in training (Transformer-XL memory of mem_len, TrellisNet history padding).
    """

    def __init__(self, built: BuiltRow, batch: int, tgt_len: int, mem_len: int, device: torch.device,
                 seed: int = 0):
        self.built, self.device = built, device
        self.model = built.model
        self.mem_len = mem_len
        gen = torch.Generator(device="cpu").manual_seed(seed)
        width = core_input_width(built.cfg)
        self.u_BLE = torch.randn(batch, tgt_len, width, generator=gen).to(device)
        self.mems = self.model.init_mems(batch)
        self.optimizer = build_optimizer(built.params, built.cfg.optim)
        self.clip = built.cfg.optim.clip
        self.stats: dict = {}

    def forward(self, train: bool = True, solver: dict | None = None):
        """The core's forward on u with the current memory; returns (loss, CoreOut). `solver`: this call's
        forward-solver overrides (`max_iter`, `tol`), as evaluation passes them."""
        model = self.model
        with model.weight_cache(model.core):
            out = model.core(model.cell_list, self.u_BLE, self.mems, mem_len=self.mem_len,
                             clamp_len=model.clamp_len, solver=solver)
            read = model.cell_list[-1].readout
            loss = read(out.z).float().pow(2).mean()
            aux_w = self.built.cfg.model.aux_weight
            if train and out.aux and aux_w > 0:
                loss = loss + aux_w * sum(read(z).float().pow(2).mean() for z in out.aux)
        return loss, out

    def step(self, meter=None) -> torch.Tensor:
        """zero_grad -> forward -> backward -> clip -> optimizer step; `meter` (a context manager) wraps the
        forward only (e.g. activation.SavedTensorMeter)."""
        self.optimizer.zero_grad(set_to_none=True)
        with meter if meter is not None else contextlib.nullcontext():
            loss, out = self.forward()
        loss.backward()
        self.clip_and_update()
        self.mems = out.mems
        self.stats = dict(out.stats)
        return loss.detach()

    def clip_and_update(self) -> None:
        """Gradient clipping at the row's `optim.clip`, then the optimizer step (the end of `step`)."""
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.built.params, self.clip)
        self.optimizer.step()

    def materialise_optimizer_state(self) -> None:
        """A cheap priming step: create the optimizer's state (Adam moments) with zero gradients and lr 0."""
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for p in self.built.params:
            p.grad = torch.zeros_like(p)
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def tensor_bytes(self) -> dict:
        """Parameter, gradient (one per parameter during the step) and optimizer-state bytes of the core."""
        param = sum(p.numel() * p.element_size() for p in self.built.params)
        optim = optimizer_state_bytes(self.optimizer)
        return {"param_bytes": param, "grad_bytes": param, "optim_bytes": optim,
                "params_core": sum(p.numel() for p in self.built.params)}

"""Tiny model configs shared by the tests/test_models_*.py files (not a test module)."""

from __future__ import annotations

import torch

from deqlm.config import load_config
from deqlm.models import build_model

VOCAB = 23
# solver settings that converge to 1e-6 on the tiny models (with init_std 0.25 for the Transformer cell)
TIGHT = ["deq.f_solver=broyden", "deq.broyden_rank=80", "deq.f_tol=1e-6", "deq.f_max_iter=80",
         "deq.b_tol=1e-6", "deq.b_max_iter=80"]

TINY = {
    "transformer": [
        "model.arch=transformer",
        "model.d_model=16",
        "model.d_embed=16",
        "model.n_head=2",
        "model.d_head=8",
        "model.d_inner=24",
        "model.mem_len=6",
    ],
    "trellisnet": ["model.arch=trellisnet", "model.d_model=8", "model.d_embed=6", "model.d_out=5"],
}


def tiny_cfg(arch: str, *overrides: str):
    return load_config(None, [*TINY[arch], "model.dropout=0.0", "model.init_std=0.1", *overrides])


def tiny_model(arch: str, *overrides: str, seed: int = 0):
    cfg = tiny_cfg(arch, *overrides)
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.deq, vocab_size=VOCAB)


def core_readout(model, x_BL: torch.Tensor, mems=None, step=None):
    """Per-position readout h (B, L, P) and the next mems, through the model's own forward pieces."""
    if mems is None:
        mems = model.init_mems(x_BL.size(0))
    core = model.pretrain_core if model.mode(step) == "pretrain" else model.core
    out = core(model.cell_list, model.embed(x_BL), mems, mem_len=model.mem_len, clamp_len=model.clamp_len)
    return model.cell_list[-1].readout(out.z), out


def split_and_long_segment(model, x_BL: torch.Tensor, split: int):
    """z over x_BL solved as two segments (memory carried across) and as one long segment, both (B, L, D)."""

    def solve(x, mems):
        return model.core(model.cell_list, model.embed(x), mems, mem_len=model.mem_len)

    B = x_BL.size(0)
    with torch.no_grad():
        z_long = solve(x_BL, model.init_mems(B)).z
        out_a = solve(x_BL[:, :split], model.init_mems(B))
        z_b = solve(x_BL[:, split:], out_a.mems).z
    return torch.cat([out_a.z, z_b], 1), z_long

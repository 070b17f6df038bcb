"""The reversible backward's reconstruction error by state dtype, beta and number of steps (docs/solvers.md).

    python scripts/reversible_recon.py

A tiny DEQ-Transformer (width 16, float32 weights, seed 0) on random tokens; for each setting one training
forward and backward, printing `rev_recon_err` = ||rebuilt z0 - z0|| / ||z_N|| as a markdown table.
"""

from __future__ import annotations

import argparse
import sys

from deqlm.config import load_config

TINY = ["model.arch=transformer", "model.d_model=16", "model.d_embed=16", "model.n_head=2", "model.d_head=8",
        "model.d_inner=24", "model.mem_len=6", "model.dropout=0.0", "model.init_std=0.1"]
STEPS = (2, 4, 12)


def recon_error(dtype: str, beta: float, steps: int) -> float:
    import torch  # noqa: PLC0415 - after parsing, so that --help answers without torch

    from deqlm.models.build import build_model  # noqa: PLC0415

    cfg = load_config(None, [*TINY, "deq.f_solver=reversible", "deq.grad=reversible", "deq.f_tol=0",
                             f"deq.f_max_iter={steps}", f"deq.reversible_dtype={dtype}",
                             f"deq.reversible_beta={beta}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.deq, vocab_size=23)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 23, (3, 7), generator=g) for _ in range(2))
    out = model(x, y)
    out.loss.backward()
    return out.stats["rev_recon_err"]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    print("| states | beta | " + " | ".join(f"{n} steps" for n in STEPS) + " |")
    print("|---|---|" + "---|" * len(STEPS))
    for dtype in ("float64", "float32"):
        for beta in (0.5, 0.8):
            cells = [f"{recon_error(dtype, beta, n):.1e}" for n in STEPS]
            print(f"| {dtype} | {beta} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every deqlm model returns: `LMOutput`, the contract between models and the trainer / evaluator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LMOutput:
    """One segment's result.

    loss      scalar to backpropagate: mean NLL per target token (+ auxiliary and Jacobian terms in training)
    nll_sum   exact sum of the target tokens' NLL (float tensor, detached) for perplexity
    n_tokens  number of target tokens in nll_sum
    mems      memories for the next segment (detached; opaque to callers)
    stats     floats: solver figures in DEQ mode (`f_nstep`, `f_rel_res`, ...; `b_*` appear after backward),
              `jac_loss` when the Jacobian term was computed; empty for unrolled cores
    """

    loss: torch.Tensor
    nll_sum: torch.Tensor
    n_tokens: int
    mems: list[torch.Tensor]
    stats: dict = field(default_factory=dict)

"""Adaptive embedding / projected adaptive log-softmax: a normalised distribution, tying, counting."""

from __future__ import annotations

import torch

from _model_helpers import tiny_model
from deqlm.models import count_params
from deqlm.models.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax


def _pair(div_val: int):
    torch.manual_seed(0)
    emb = AdaptiveEmbedding(30, 16, 8, [5, 12, 20], div_val=div_val, init_std=0.3, proj_init_std=0.3)
    head = ProjectedAdaptiveLogSoftmax(30, 16, 8, [5, 12, 20], div_val=div_val, tie_to=emb, init_std=0.3)
    with torch.no_grad():
        head.cluster_weight.normal_(0, 0.3)
    return emb, head


def test_adaptive_softmax_is_a_normalised_distribution_over_the_vocab():
    for div_val in (1, 2):
        _, head = _pair(div_val)
        h = torch.randn(3, 8)
        nll_3V = torch.stack([head(h, torch.full((3,), v)) for v in range(30)], dim=1)
        torch.testing.assert_close(torch.exp(-nll_3V).sum(1), torch.ones(3))


def test_full_log_probabilities_are_the_per_token_ones_for_every_cluster():
    for div_val in (1, 2):
        _, head = _pair(div_val)
        h = torch.randn(3, 8)
        logp_3V = head.log_prob(h)
        nll_3V = torch.stack([head(h, torch.full((3,), v)) for v in range(30)], dim=1)
        torch.testing.assert_close(logp_3V, -nll_3V)


def test_tied_softmax_shares_tables_and_tail_projections_but_not_the_head_projection():
    emb, head = _pair(div_val=2)
    assert all(a is b for a, b in zip(emb.weights, head.weights))
    assert head.projs[0] is not emb.projs[0]
    assert all(head.projs[i] is emb.projs[i] for i in range(1, 4))


def test_embedding_maps_each_cluster_and_scales_by_sqrt_d_proj():
    emb, _ = _pair(div_val=2)
    out = emb(torch.tensor([[0, 6, 13, 29]]))
    expect = torch.nn.functional.linear(emb.weights[2][13 - 12], emb.projs[2]) * 8**0.5
    torch.testing.assert_close(out[0, 2], expect)


def test_count_params_counts_tied_tensors_once_and_excludes_embedding_and_softmax():
    model = tiny_model("transformer", "model.core=unrolled", "model.n_layer=1", "model.weight_norm=false")
    counts = count_params(model)
    core = sum(p.numel() for p in model.cell_list[0].parameters())
    assert counts["params_nonembedding"] == core
    assert counts["params_total"] == sum(p.numel() for p in set(model.parameters()))

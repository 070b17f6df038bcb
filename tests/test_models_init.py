"""Transformer cell init (model.init, model.ln_affine) and where the input enters f (model.input_path)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import parametrize

from _model_helpers import TIGHT as _TIGHT_SOLVER
from _model_helpers import VOCAB, split_and_long_segment, tiny_model
from deqlm.models.transformer import TransformerLayer

D, H, K, I = 64, 4, 16, 256  # wide enough for std estimates within a few percent
TIGHT = [*_TIGHT_SOLVER, "model.init_std=0.25"]


def _cell(init: str, **kw) -> TransformerLayer:
    torch.manual_seed(0)
    return TransformerLayer(D, H, K, I, init=init, init_std=0.01, **kw)


def _weight(lin: torch.nn.Linear) -> torch.Tensor:
    """The weight a forward uses (weight norm recomputes it from g and v)."""
    return lin.weight.detach()


@pytest.mark.parametrize("weight_norm", [True, False])
def test_official_init_keeps_pytorch_default_uniform_in_attention_and_ffn(weight_norm):
    cell = _cell("official", weight_norm=weight_norm)
    for lin in (cell.qkv, cell.r_net, cell.o_net, cell.ff1, cell.ff2):
        w = _weight(lin)
        bound = 1.0 / math.sqrt(w.size(1))
        assert float(w.abs().max()) <= bound
        assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert lin.bias is None or not lin.bias.any()
    assert parametrize.is_parametrized(cell.qkv) == weight_norm


def test_official_init_draws_the_injection_from_init_std_without_weight_norm():
    cell = _cell("official", weight_norm=True)
    assert not parametrize.is_parametrized(cell.inject)
    assert float(cell.inject.weight.detach().std()) == pytest.approx(0.01, rel=0.05)
    assert not cell.inject.bias.any()
    biases = torch.cat([cell.r_w_bias.flatten(), cell.r_r_bias.flatten()]).detach()
    assert float(biases.std()) == pytest.approx(0.01, rel=0.25)


def test_normal_init_draws_every_weight_from_init_std():
    cell = _cell("normal", weight_norm=True)
    for lin in (cell.qkv, cell.r_net, cell.o_net, cell.ff1, cell.ff2, cell.inject):
        assert float(_weight(lin).std()) == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("ln_affine", [False, True])
def test_layer_norms_learn_a_scale_and_shift_only_when_asked(ln_affine):
    cell = _cell("official", ln_affine=ln_affine)
    n_ln_params = sum(p.numel() for ln in (cell.ln1, cell.ln2) for p in ln.parameters())
    assert n_ln_params == (4 * D if ln_affine else 0)


def test_residual_path_f_of_zero_is_an_unrolled_first_layer_applied_to_the_embedding():
    """With the injection off, the residual cell at z = 0 is exactly a Transformer-XL first layer."""
    torch.manual_seed(0)
    cell = TransformerLayer(D, H, K, I, input_path="residual", weight_norm=False).eval()
    plain = TransformerLayer(D, H, K, I, inject=False, weight_norm=False).eval()
    plain.load_state_dict({k: v for k, v in cell.state_dict().items() if not k.startswith("inject")})
    torch.nn.init.zeros_(cell.inject.weight)
    x_BLD = torch.randn(2, 5, D)
    mem_BMW = torch.zeros(2, 0, 2 * D)
    with torch.no_grad():
        f0 = cell(torch.zeros_like(x_BLD), cell.context(x_BLD, mem_BMW))
        first_layer = plain(x_BLD, plain.context(x_BLD, mem_BMW[..., :D]))
    torch.testing.assert_close(f0, first_layer)


def test_residual_input_scale_multiplies_the_embedding_on_the_residual_path_only():
    """With the injection off, a cell reading s * x sees what an unscaled cell sees for the input s * x,
    in the memory as in the current segment."""
    torch.manual_seed(0)
    scaled = TransformerLayer(D, H, K, I, input_path="residual", residual_input_scale=3.0, weight_norm=False)
    plain = TransformerLayer(D, H, K, I, input_path="residual", weight_norm=False)
    plain.load_state_dict(scaled.state_dict())
    for cell in (scaled, plain):
        torch.nn.init.zeros_(cell.inject.weight)
        cell.eval()
    x_BLD, z_BLD = torch.randn(2, 5, D), torch.randn(2, 5, D)
    mem_BMW = torch.randn(2, 4, 2 * D)
    mem_scaled_BMW = torch.cat([mem_BMW[..., :D], 3.0 * mem_BMW[..., D:]], dim=-1)
    with torch.no_grad():
        out = scaled(z_BLD, scaled.context(x_BLD, mem_BMW))
        expected = plain(z_BLD, plain.context(3.0 * x_BLD, mem_scaled_BMW))
        unscaled = plain(z_BLD, plain.context(x_BLD, mem_BMW))
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, unscaled, atol=1e-3)


def _own_state_change(input_path: str) -> float:
    """Relative change of z*_t when token t changes, at init (the token's reach into its own state)."""
    sizes = ["model.init_std=0.02", "model.d_model=32", "model.d_embed=32", "model.d_head=16"]
    path = f"model.input_path={input_path}"
    model = tiny_model("transformer", "model.core=deq", *TIGHT, path, *sizes).eval()
    x = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[:, 5] = (x[:, 5] + 1) % VOCAB
    with torch.no_grad():
        cells = model.cell_list
        z1, z2 = (model.core(cells, model.embed(t), model.init_mems(4), mem_len=0).z for t in (x, x2))
    return float((z1[:, 5] - z2[:, 5]).norm() / z1[:, 5].norm())


def test_residual_input_path_carries_the_token_into_its_own_state_far_more_than_qkv():
    assert _own_state_change("residual") > 5 * _own_state_change("qkv")


def test_residual_path_deq_over_two_segments_with_memory_equals_one_long_segment():
    model = tiny_model("transformer", "model.core=deq", *TIGHT, "model.input_path=residual",
                       "model.mem_len=6").eval()
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    z_split, z_long = split_and_long_segment(model, x, 6)
    torch.testing.assert_close(z_split, z_long, atol=1e-4, rtol=1e-4)


def test_pre_ln_residual_path_does_not_pile_up_the_input_over_applications():
    """Pre-LN: x enters the attention branch only; a tied stack does not gain one x per layer."""
    torch.manual_seed(0)
    cell = TransformerLayer(D, H, K, I, pre_ln=True, input_path="residual", weight_norm=False).eval()
    torch.nn.init.zeros_(cell.o_net.weight)  # both branches off: only the residual stream is left
    torch.nn.init.zeros_(cell.ff2.weight)
    x_BLD = torch.randn(2, 5, D)
    ctx = cell.context(x_BLD, torch.zeros(2, 0, 2 * D))
    with torch.no_grad():
        z = torch.zeros_like(x_BLD)
        for _ in range(3):
            z = cell(z, ctx)
    assert float(z.abs().max()) == 0.0

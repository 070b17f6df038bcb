"""Transformer DEQs whose cell f is several untied layers applied in turn (`model.cell_layers`)."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import TIGHT, VOCAB, split_and_long_segment, tiny_cfg, tiny_model
from deqlm.config import ConfigError
from deqlm.models.transformer import TransformerCell

# the residual input path: with qkv only, the tiny cell at this init does not converge on every row
MULTI = ["model.core=deq", "model.cell_layers=2", "model.input_path=residual", "model.init_std=0.25", *TIGHT]


def _tokens(seed: int, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def test_multilayer_cell_holds_distinct_layers_and_injects_into_the_first_only():
    cell = tiny_model("transformer", *MULTI).cell_list[0]
    assert isinstance(cell, TransformerCell) and len(cell.layers) == 2
    assert cell.layers[0].inject is not None and cell.layers[1].inject is None
    w0, w1 = (layer.ff1.weight for layer in cell.layers)
    assert not torch.equal(w0, w1)


def test_multilayer_cell_output_is_the_fixed_point_of_its_layers_applied_in_turn():
    model = tiny_model("transformer", *MULTI).eval()
    x_BLD = model.embed(_tokens(0))
    mem = model.init_mems(2)[0]
    with torch.no_grad():
        out = model.core(model.cell_list, x_BLD, [mem], mem_len=model.mem_len)
        cell = model.cell_list[0]
        ctx = cell.context(x_BLD, mem)
        y_BLD = cell.layers[0](out.z, ctx["layers"][0])
        z_next = cell.layers[1](y_BLD, ctx["layers"][1])
    assert float((z_next - out.z).norm() / out.z.norm()) < 1e-5
    assert out.stats["converged_frac"] == 1.0


def test_multilayer_cell_over_two_segments_with_memory_equals_one_long_segment():
    model = tiny_model("transformer", *MULTI, "model.mem_len=6").eval()
    z_split, z_long = split_and_long_segment(model, _tokens(1), 6)
    torch.testing.assert_close(z_split, z_long, atol=1e-4, rtol=1e-4)


def test_implicit_gradients_reach_every_layer_of_the_block():
    model = tiny_model("transformer", *MULTI).train()
    x = _tokens(2)
    model(x[:, :-1], x[:, 1:], model.init_mems(2)).loss.backward()
    for name, p in model.cell_list[0].named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("overrides", [
    ["model.arch=trellisnet"],
    ["model.core=unrolled", "model.weight_tied=false", "model.n_layer=2"],
])
def test_cell_layers_above_one_are_refused_where_no_single_injected_cell_exists(overrides):
    with pytest.raises(ConfigError, match="model.cell_layers=2"):
        tiny_cfg("transformer", "model.cell_layers=2", *overrides)

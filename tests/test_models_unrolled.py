"""Unrolled cores: causality, memory equivalence, losses, checkpointing, modes."""

from __future__ import annotations

import pytest
import torch

from _model_helpers import VOCAB, core_readout, tiny_model

ARCH_CORES = [(arch, tied) for arch in ("transformer", "trellisnet") for tied in ("true", "false")]


@pytest.mark.parametrize("arch,tied", ARCH_CORES)
def test_changing_token_t_never_changes_outputs_before_t(arch, tied):
    model = tiny_model(arch, "model.core=unrolled", f"model.weight_tied={tied}", "model.n_layer=3").eval()
    torch.manual_seed(1)
    x = torch.randint(0, VOCAB, (2, 9))
    x2 = x.clone()
    x2[:, 5] = (x[:, 5] + 1) % VOCAB
    with torch.no_grad():
        h1, _ = core_readout(model, x)
        h2, _ = core_readout(model, x2)
    assert torch.equal(h1[:, :5], h2[:, :5])
    assert not torch.allclose(h1[:, 5:], h2[:, 5:])


@pytest.mark.parametrize("arch", ["transformer", "trellisnet"])
def test_two_segments_with_memory_equal_one_long_segment(arch):
    kw = ["model.core=unrolled", "model.weight_tied=false", "model.n_layer=3", "model.mem_len=6"]
    model = tiny_model(arch, *kw).eval()
    torch.manual_seed(2)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        h_long, _ = core_readout(model, x)
        h_a, out_a = core_readout(model, x[:, :6])
        h_b, _ = core_readout(model, x[:, 6:], out_a.mems)
    torch.testing.assert_close(torch.cat([h_a, h_b], 1), h_long, atol=1e-6, rtol=1e-5)


def test_transformer_mems_keep_last_mem_len_steps_detached():
    model = tiny_model("transformer", "model.core=unrolled", "model.n_layer=2", "model.mem_len=4")
    x = torch.randint(0, VOCAB, (3, 7))
    out = model(x, x, model.init_mems(3))
    assert [tuple(m.shape) for m in out.mems] == [(3, 4, 16), (3, 4, 16)]
    assert all(not m.requires_grad for m in out.mems)
    assert out.stats == {} and out.n_tokens == 21 and model.mode(0) == "unrolled"


def test_loss_is_mean_nll_and_nll_sum_is_exact_sum():
    model = tiny_model("transformer", "model.core=unrolled", "model.n_layer=2").eval()
    x, y = torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5))
    out = model(x, y)
    h, _ = core_readout(model, x)
    logp = torch.log_softmax(h @ model.embed.weights[0].t() + model.head.biases[0], -1)
    nll = -logp.gather(-1, y[..., None]).sum().detach()
    torch.testing.assert_close(out.nll_sum, nll)
    torch.testing.assert_close(out.loss.detach(), nll / 10)


def test_aux_losses_add_to_the_loss_but_not_to_nll_sum():
    kw = ["model.core=unrolled", "model.weight_tied=true", "model.n_layer=4", "model.aux_every=2"]
    plain = tiny_model("trellisnet", *kw, "model.aux_weight=0.0").eval()
    aux = tiny_model("trellisnet", *kw, "model.aux_weight=0.5").eval()
    x = torch.randint(0, VOCAB, (2, 5))
    a, b = plain(x, x), aux(x, x)
    torch.testing.assert_close(a.nll_sum, b.nll_sum)
    assert float(b.loss.detach()) > float(a.loss.detach())


@pytest.mark.parametrize("arch", ["transformer", "trellisnet"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    grads = []
    for ckpt in ("false", "true"):
        kw = ["model.core=unrolled", "model.weight_tied=false", "model.n_layer=2", "model.weight_norm=true"]
        model = tiny_model(arch, *kw, f"model.grad_checkpoint={ckpt}")
        x = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
        model(x, x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_copy_memory_classifier_scores_every_position():
    kw = ["model.core=unrolled", "model.n_layer=2", "model.n_classes=10", "model.mem_len=0"]
    model = tiny_model("transformer", *kw, "model.tie_weight=false")
    x = torch.randint(0, 10, (2, 30))
    out = model(x, x, model.init_mems(2))
    assert out.n_tokens == 60 and out.mems[0].shape[1] == 0
    out.loss.backward()


def test_pre_ln_and_same_length_and_clamp_len_run():
    kw = ["model.core=unrolled", "model.n_layer=2", "model.pre_ln=true", "model.same_length=true"]
    model = tiny_model("transformer", *kw, "model.clamp_len=3")
    x = torch.randint(0, VOCAB, (2, 5))
    out = model(x, x)
    out2 = model(x, x, out.mems)
    assert torch.isfinite(out2.loss)


def test_transformer_ffn_saves_one_inner_wide_tensor_with_dropout_on():
    """With dropout active, bytes saved for backward grow by one (B, L) float per unit of d_inner: the
    ReLU's output doubles as ff2's input, instead of a second, masked copy being saved."""
    from deqlm.infra.memory import SavedTensorMeter
    from deqlm.models.transformer import TransformerLayer

    def saved(d_inner: int) -> int:
        torch.manual_seed(0)
        cell = TransformerLayer(16, 2, 8, d_inner, dropout=0.3, weight_norm=False).train()
        x_BLD = torch.randn(3, 5, 16)
        ctx = cell.context(x_BLD, cell.empty_mem(3, x_BLD))
        with SavedTensorMeter(exclude=list(cell.parameters())) as meter:
            cell(torch.randn(3, 5, 16, requires_grad=True), ctx)
        return meter.bytes

    per_unit = (saved(1024) - saved(512)) / 512
    assert per_unit == pytest.approx(3 * 5 * 4 + 3 * 4, rel=0.05)  # activations + the (B, 1, I) mask


def _cell_and_ctx(d_inner: int, dropout: float, B: int = 4, L: int = 6):
    from deqlm.models.transformer import TransformerLayer

    torch.manual_seed(0)
    cell = TransformerLayer(16, 2, 8, d_inner, dropout=dropout, weight_norm=True).train()
    x_BLD = torch.randn(B, L, 16, dtype=torch.float64)
    cell.double()
    return cell, x_BLD, cell.context(x_BLD, cell.empty_mem(B, x_BLD))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_ffn_in_row_blocks_is_the_same_function_and_gradients(monkeypatch, dropout):
    """Blocks of batch rows (forced here with a tiny byte budget, uneven last block) give the same output
    and the same gradients for z, the input injection and every weight as one block."""
    import deqlm.models.transformer as tc

    cell, x_BLD, ctx = _cell_and_ctx(64, dropout, B=5)
    z_BLD = torch.randn(5, 6, 16, dtype=torch.float64, requires_grad=True)
    outs = []
    for budget in (tc.FFN_BLOCK_BYTES, 2 * 6 * 64 * 8):  # one block; 2 rows per block: 2 + 2 + 1
        monkeypatch.setattr(tc, "FFN_BLOCK_BYTES", budget)
        cell.zero_grad(set_to_none=True)
        out = cell(z_BLD, ctx)
        (g_z,) = torch.autograd.grad(out, z_BLD, torch.ones_like(out), retain_graph=True)
        out.pow(2).sum().backward(retain_graph=True)
        outs.append((out.detach(), g_z, [p.grad.clone() for p in cell.parameters() if p.grad is not None]))
    assert tc.ffn_block_rows(6, 64, 8) == 2
    (o1, gz1, gp1), (o2, gz2, gp2) = outs
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(gz2, gz1)
    assert len(gp1) == len(gp2) > 0
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(b, a)


def test_ffn_working_memory_forward_and_vector_jacobian_product(monkeypatch):
    """Forward: masking and ReLU in place, so the cell's live bytes never pass what it saves by more than a
    quarter of one d_inner-wide tensor (out of place: one whole tensor more). An adjoint step's
    vector-Jacobian product through the cell: under 2.5 d_inner-wide tensors in one block (in-place
    operations on a view would make autograd copy the base twice: 4), and with one batch row per block
    under half of that, while the bytes saved for backward stay the same."""
    from functools import partial

    import deqlm.models.transformer as tc
    from deqlm.infra.memory import SavedTensorMeter, peak_live_bytes

    B, L, I = 8, 16, 4096
    inner_bytes = B * L * I * 4
    budgets = (tc.FFN_BLOCK_BYTES, L * I * 4)  # the whole batch in one block; one row per block
    results = []
    for dropout in (0.0, 0.3):
        for budget in budgets:
            monkeypatch.setattr(tc, "FFN_BLOCK_BYTES", budget)
            torch.manual_seed(0)
            cell = tc.TransformerLayer(16, 2, 8, I, dropout=dropout, weight_norm=True).train()
            x_BLD = torch.randn(B, L, 16)
            ctx = cell.context(x_BLD, cell.empty_mem(B, x_BLD))
            z_BLD = torch.randn(B, L, 16, requires_grad=True)
            forward_peak = peak_live_bytes(partial(cell, z_BLD, ctx))
            with SavedTensorMeter(exclude=list(cell.parameters())) as meter:
                out = cell(z_BLD, ctx)
            vjp_peak = peak_live_bytes(partial(torch.autograd.grad, out, z_BLD, torch.randn_like(out)))
            assert forward_peak < meter.bytes + 0.25 * inner_bytes
            results.append((meter.bytes, vjp_peak))
        (saved1, peak1), (saved8, peak8) = results[-2:]
        assert saved8 == saved1
        assert peak1 < 2.5 * inner_bytes
        assert peak8 < 0.5 * peak1


def test_gather_last_equals_gather_with_its_gradients_and_saves_only_the_index():
    """GatherLast (the relative-position shift) = torch.gather in value, gradient and second derivative
    (float64 gradcheck / gradgradcheck, an expanded index as the cell uses), and the bytes it saves for
    backward are the index's storage, not a copy of the scores."""
    from deqlm.infra.memory import SavedTensorMeter
    from deqlm.models.transformer import GatherLast

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 7, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 7, (4, 7)).expand(2, 3, 4, 7)
    torch.testing.assert_close(GatherLast.apply(x, index), x.gather(-1, index))
    assert torch.autograd.gradcheck(lambda t: GatherLast.apply(t, index), (x,))
    assert torch.autograd.gradgradcheck(lambda t: GatherLast.apply(t, index).pow(2), (x,))
    with SavedTensorMeter() as ours:
        GatherLast.apply(x, index)
    with SavedTensorMeter() as autograd_own:
        x.gather(-1, index)
    assert ours.bytes == index.untyped_storage().nbytes() == 4 * 7 * 8
    assert autograd_own.bytes >= x.numel() * 8

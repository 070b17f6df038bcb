"""SavedTensorMeter counts the bytes autograd keeps for backward: distinct storages, parameters excluded."""

from __future__ import annotations

import torch

from deqlm.infra.memory import SavedTensorMeter, saved_bytes


def test_counts_saved_activations_once_and_excludes_parameters():
    lin = torch.nn.Linear(8, 16)
    x = torch.randn(4, 8)
    with SavedTensorMeter(exclude=lin.parameters()) as meter:
        h = torch.tanh(lin(x))
    # linear saves its input x (4x8), tanh saves its output (4x16); the weight is excluded
    assert meter.bytes == (4 * 8 + 4 * 16) * 4
    h.sum().backward()  # the hooks stay transparent
    assert lin.weight.grad is not None


def test_each_layer_of_a_deeper_stack_adds_its_activations_and_no_grad_saves_nothing():
    layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(6))
    x = torch.randn(8, 32)

    def run(depth):
        h = x
        for layer in layers[:depth]:
            h = torch.relu(layer(h))
        return h

    _, two = saved_bytes(run, 2, exclude=layers.parameters())
    _, six = saved_bytes(run, 6, exclude=layers.parameters())
    # the input plus one relu output per layer (each next linear saves that same storage: counted once)
    assert (two, six) == (3 * 8 * 32 * 4, 7 * 8 * 32 * 4)
    with torch.no_grad():
        _, none = saved_bytes(run, 6)
    assert none == 0


def test_disabled_meter_installs_no_hooks():
    with SavedTensorMeter(enabled=False) as meter:
        torch.tanh(torch.randn(3, requires_grad=True))
    assert meter.bytes == 0 and meter.n_saved == 0

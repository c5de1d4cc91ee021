"""Bugs the state machine of tests/test_stateful.py found, minimised to plain tests."""

from __future__ import annotations

import torch
from conftest import lora_of_ones

import adapterkit as ak


def test_loading_fused_after_an_undone_inexact_fuse_still_fuses_exactly(tmp_path):
    """load(fuse=True) fused with the exact= flag of an earlier fuse(exact=False) even after it was
    undone; ak.switch fuses exactly when nothing is fused, and so does load now."""
    model = lora_of_ones(torch.tensor([[0.2, 1 / 3]]), "a")
    ak.fuse(model, ["a"], [0.5], exact=False)  # w + 0.5, then - 0.5: w on multiples of 2⁻²⁴, odd ones here
    ak.unfuse(model)  # nothing is fused any more
    ak.save(model, tmp_path, "a")
    base = model[0].base_layer.weight.detach().clone()
    ak.load(model, tmp_path, "b", fuse=True)  # no exact=... option: fused as ak.fuse fuses by default
    ak.unfuse(model)
    assert torch.equal(model[0].base_layer.weight, base)  # inexact, w + 1 - 1 would round the odd multiples

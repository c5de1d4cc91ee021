"""Fuse, unfuse and switch: outputs preserved, base weights restored bit-for-bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.host import AdaptedModule
from conftest import lora_of_ones


def _model(dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 8)).to(dtype).eval()


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removesuffix(".base_layer"): m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _assert_weights_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for name, weight in _base_weights(model).items():
        assert torch.equal(weight, expected[name]), name


def _with_two_adapters(dtype=torch.float32) -> nn.Module:
    model = _model(dtype)
    config = ak.LoRAConfig(r=4, target_modules=["0", "2"], init="random")
    ak.attach(model, config, "a")
    ak.attach(model, config.replace(r=2, target_modules=["2", "4"]), "b")
    return model


def test_fused_output_matches_unfused():
    model = _with_two_adapters()
    x = torch.randn(6, 32)
    unfused = model(x)
    ak.fuse(model)
    assert ak.fused_adapters(model) == [("a", 1.0)]
    assert all(not m.plan.deltas for m in model.modules() if isinstance(m, AdaptedModule))
    torch.testing.assert_close(model(x), unfused, rtol=1e-5, atol=1e-5)
    ak.unfuse(model)
    torch.testing.assert_close(model(x), unfused, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfuse_is_bit_exact_after_1000_fuse_unfuse_switch_cycles(dtype):
    model = _with_two_adapters(dtype)
    original = _base_weights(model)
    x = torch.randn(4, 32, dtype=dtype)
    ak.fuse(model, ["a"])
    fused_a = model(x)
    for i in range(1000):
        ak.switch(model, "b" if i % 2 == 0 else "a")
        if i % 3 == 0:
            ak.unfuse(model)
            _assert_weights_equal(model, original) if i % 99 == 0 else None
            ak.fuse(model)
    ak.switch(model, "a")
    assert torch.equal(model(x), fused_a)  # re-fusing from the original is deterministic
    ak.unfuse(model)
    _assert_weights_equal(model, original)


def test_switch_changes_outputs_to_the_other_adapter():
    model = _with_two_adapters()
    x = torch.randn(4, 32)
    ak.activate(model, "b")
    only_b = model(x)
    ak.activate(model, "a")
    ak.fuse(model)
    ak.switch(model, "b")
    assert ak.fused_adapters(model) == [("b", 1.0)]
    assert ak.active_adapters(model) == [("b", 1.0)]
    torch.testing.assert_close(model(x), only_b, rtol=1e-5, atol=1e-5)


def test_weighted_multi_adapter_fuse_equals_weighted_unfused_sum():
    model = _with_two_adapters()
    x = torch.randn(4, 32)
    ak.activate(model, ["a", "b"], weights=[0.7, -1.5])
    unfused = model(x)
    ak.activate(model, None)
    base = model(x)
    assert not torch.allclose(base, unfused)
    ak.fuse(model, ["a", "b"], weights=[0.7, -1.5])
    torch.testing.assert_close(model(x), unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exact", [True, False])
def test_inexact_fuse_loses_the_bits_fp32_cannot_hold_and_exact_fuse_keeps_them(exact):
    """ΔW = all ones: fused, an fp32 entry w in [0, 1) becomes fl(1 + w), so unfusing by subtraction
    leaves w rounded to a multiple of 2⁻²³ (1e-9 vanishes); an exact fuse gives w back."""
    original = torch.tensor([[0.1, 1e-9], [0.2, -0.25]])
    model = lora_of_ones(original)
    ak.fuse(model, exact=exact)
    assert torch.equal(model[0].weight, torch.tensor([[1.1, 1.0], [1.2, 0.75]]))  # fp32 rounding of 1 + w
    ak.unfuse(model)
    ulp = 2.0**-23  # fp32 spacing in [1, 2): fp32(0.1) = 838860.81·ulp, fp32(0.2) = 1677721.63·ulp; 0.75 is exact
    drifted = torch.tensor([[838861 * ulp, 0.0], [1677722 * ulp, -0.25]])
    assert torch.equal(model[0].weight, original if exact else drifted)
    assert exact or not torch.equal(drifted, original)


def test_exact_fuse_keeps_a_reusable_host_copy_until_freed():
    model = _with_two_adapters()
    fusion = model[0].fusion()
    assert fusion.host_bytes == 0
    ak.fuse(model)
    buffer = fusion._host_copy
    assert buffer.device.type == "cpu" and fusion.host_bytes == 48 * 32 * 4
    ak.unfuse(model)
    ak.fuse(model)
    assert fusion._host_copy is buffer  # reused, not reallocated
    ak.unfuse(model, free_memory=True)
    assert fusion.host_bytes == 0
    ak.fuse(model, exact=False)
    assert fusion.host_bytes == 0


def test_activating_another_set_while_fused_is_refused():
    model = _with_two_adapters()
    ak.fuse(model, ["a"])
    before = _base_weights(model)
    with pytest.raises(ak.FusedStateError):
        ak.activate(model, "b")
    _assert_weights_equal(model, before)
    ak.activate(model, "a")  # the same set is fine


def test_detaching_a_fused_adapter_restores_the_base_and_keeps_the_rest_fused():
    model = _with_two_adapters()
    original = _base_weights(model)
    x = torch.randn(4, 32)
    ak.activate(model, "b")
    only_b = model(x)
    ak.fuse(model, ["a", "b"])
    ak.detach(model, "a")
    assert ak.fused_adapters(model) == [("b", 1.0)]
    torch.testing.assert_close(model(x), only_b, rtol=1e-5, atol=1e-5)
    ak.detach(model, "b")
    _assert_weights_equal(model, original)
    assert all(type(m) is not AdaptedModule for m in model.modules())


def test_fuse_without_active_adapter_or_with_unknown_name_raises():
    model = _with_two_adapters()
    ak.activate(model, None)
    with pytest.raises(ak.FusionError):
        ak.fuse(model)
    with pytest.raises(ak.AdapterNotFoundError):
        ak.fuse(model, ["nope"])


def test_merge_and_unload_bakes_in_and_removes_wrappers(tiny_bert, token_ids):
    ak.attach(tiny_bert, ak.LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], init="random"))
    with torch.no_grad():
        tiny_bert.classifier.adapters["default"].module.weight.add_(1.0)
    adapted = tiny_bert(input_ids=token_ids).logits
    merged = ak.merge_and_unload(tiny_bert)
    assert not hasattr(merged, "adapterkit_state")
    assert all(not isinstance(m, AdaptedModule) for m in merged.modules())
    assert isinstance(merged.classifier, nn.Linear)
    torch.testing.assert_close(merged(input_ids=token_ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_mixed_precision_fuse_is_computed_in_fp32_and_restored_exactly():
    model = _with_two_adapters(torch.bfloat16)
    original = _base_weights(model)
    layer = model[0].adapters["a"]
    expected = (original["0"].float() + layer.scaling * (layer.lora_B @ layer.lora_A)).to(torch.bfloat16)
    ak.fuse(model, ["a"])
    assert torch.equal(model[0].weight, expected)
    ak.unfuse(model)
    _assert_weights_equal(model, original)

"""Model-level operations, the method registry and the two adapter kinds (deltas and inserted modules).

The test-only methods below are registered from outside the core, which is how every method plugs in.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.core.host import AdaptedModule
from adapterkit.core.layers import DeltaLayer, ModuleLayer


# -- two test-only methods -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiagonalConfig(ak.AdapterConfig):
    """A sparse delta on the diagonal of a square weight."""

    init: float = 0.5


class DiagonalLayer(DeltaLayer):
    def __init__(self, name: str, base: nn.Linear, init: float) -> None:
        super().__init__(name)
        n = base.weight.shape[0]
        self.values = nn.Parameter(torch.full((n,), init))
        self.register_buffer("indices", torch.arange(n) * (n + 1), persistent=False)

    def delta_output(self, x: Tensor, scale: float) -> Tensor:
        return x * self.values * scale

    def add_to_weight(self, weight: Tensor, scale: float) -> None:
        weight.view(-1).index_add_(0, self.indices, (self.values.detach() * scale).to(weight.dtype))

    def support(self) -> Tensor:
        return self.indices


@ak.register_method
class DiagonalMethod(ak.AdapterMethod):
    name = "test-diagonal"
    config_class = DiagonalConfig

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and module.in_features == module.out_features

    def create_layer(self, config, adapter_name, module_name, module):
        return DiagonalLayer(adapter_name, module, config.init)


@dataclasses.dataclass(frozen=True)
class ShiftConfig(ak.AdapterConfig):
    """An inserted module: adds a learned bias to the output of any module (``width`` wide)."""

    width: int = 4


class ShiftLayer(ModuleLayer):
    def __init__(self, name: str, width: int) -> None:
        super().__init__(name)
        self.shift = nn.Parameter(torch.ones(width))

    def adapt(self, inputs: Tensor, output: Tensor, scale: float) -> Tensor:
        return output + scale * self.shift


@ak.register_method
class ShiftMethod(ak.AdapterMethod):
    name = "test-shift"
    config_class = ShiftConfig

    def supports(self, module: nn.Module) -> bool:
        return True

    def create_layer(self, config, adapter_name, module_name, module):
        return ShiftLayer(adapter_name, config.width)


# -- tests ---------------------------------------------------------------------------------------
def test_attach_returns_model_freezes_base_and_lists_adapters(mlp):
    assert ak.attach(mlp, ak.LoRAConfig(target_modules=["0"]), "a") is mlp
    ak.attach(mlp, ak.LoRAConfig(target_modules=["2"]), "b")
    assert ak.adapters(mlp) == ["a", "b"]
    assert ak.active_adapters(mlp) == [("a", 1.0)]  # the first becomes active, later ones do not
    assert not mlp[0].base_layer.weight.requires_grad and not mlp[1 + 3].weight.requires_grad
    assert all(p.requires_grad for p in ak.adapter_parameters(mlp, "b"))


def test_state_dict_keys_are_keyed_by_adapter_name_not_attach_order(mlp):
    """Regression: keys were adapters.0/adapters.1, so a model that attached b, a loaded a's
    tensors into b under strict=True, and detach renumbered the rest."""
    torch.manual_seed(0)
    source = copy.deepcopy(mlp)
    ak.attach(source, ak.LoRAConfig(r=2, target_modules=["0"], init="random"), "a")
    ak.attach(source, ak.LoRAConfig(r=4, target_modules=["0"], init="random"), "b")
    target = copy.deepcopy(mlp)
    ak.attach(target, ak.LoRAConfig(r=4, target_modules=["0"]), "b")
    ak.attach(target, ak.LoRAConfig(r=2, target_modules=["0"]), "a")
    assert "0.adapters.a.lora_A" in source.state_dict()
    target.load_state_dict(source.state_dict(), strict=True)
    for name in ("a", "b"):
        assert torch.equal(target[0].adapters[name].lora_B, source[0].adapters[name].lora_B)
        ak.activate(source, name), ak.activate(target, name)
        x = torch.randn(3, 8)
        assert torch.equal(target(x), source(x))
    keys_before = set(source.state_dict())
    ak.detach(source, "a")
    assert set(source.state_dict()) == {k for k in keys_before if ".adapters.a." not in k}


def test_detach_restores_the_original_module_objects_and_frees_memory(mlp):
    originals = [id(m) for m in mlp]
    x = torch.randn(2, 8)
    before = mlp(x)
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0", "2"], init="random"), "a")
    ak.attach(mlp, ak.LoRAConfig(target_modules=["2"], init="random"), "b")
    probe = weakref.ref(mlp[0].adapters["a"].lora_A)
    ak.detach(mlp, "a")
    gc.collect()
    assert probe() is None
    assert ak.adapters(mlp) == ["b"] and ak.active_adapters(mlp) == []
    ak.detach(mlp, "b")
    assert [id(m) for m in mlp] == originals
    assert not hasattr(mlp, "adapterkit_state")
    assert torch.equal(mlp(x), before)


def test_activate_none_one_or_weighted_several(mlp):
    x = torch.randn(2, 8)
    base = mlp(x)
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0"], init="random"), "a")
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0"], init="random"), "b")
    with_a = mlp(x)
    ak.activate(mlp, None)
    assert torch.equal(mlp(x), base)
    ak.activate(mlp, "b")
    with_b = mlp(x)
    # outputs after the ReLU are not additive; check the adapted layer's own output
    h = lambda: mlp[0](x)
    ak.activate(mlp, "a"); ha = h()
    ak.activate(mlp, "b"); hb = h()
    ak.activate(mlp, None); h0 = h()
    ak.activate(mlp, ["a", "b"], weights=[0.5, 2.0])
    torch.testing.assert_close(h(), h0 + 0.5 * (ha - h0) + 2.0 * (hb - h0), rtol=1e-5, atol=1e-6)
    assert not torch.equal(with_a, with_b)


@pytest.mark.parametrize("names, weights, error", [
    ("missing", None, ak.AdapterNotFoundError),
    (["a", "a"], None, ak.ConfigError),
    (["a"], [1.0, 2.0], ak.ConfigError),
    (["a"], [float("inf")], ak.ConfigError),
])
def test_bad_activation_raises_and_changes_nothing(mlp, names, weights, error):
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0"]), "a")
    with pytest.raises(error):
        ak.activate(mlp, names, weights)
    assert ak.active_adapters(mlp) == [("a", 1.0)]


def test_duplicate_name_and_unknown_detach(mlp):
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0"]), "a")
    with pytest.raises(ak.DuplicateAdapterError, match="'a'"):
        ak.attach(mlp, ak.LoRAConfig(target_modules=["2"]), "a")
    with pytest.raises(ak.AdapterNotFoundError, match="'b'"):
        ak.detach(mlp, "b")


def test_every_error_is_an_adapter_error():
    for name in dir(ak.errors):
        obj = getattr(ak.errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ak.AdapterError)


def test_unknown_method_name_is_reported():
    with pytest.raises(ak.UnknownMethodError, match="registered"):
        ak.get_method("nope")
    assert {"lora", "test-diagonal", "test-shift"} <= {m.name for m in ak.registered_methods()}


def test_a_plugin_sparse_delta_fuses_and_restores_only_its_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).eval()
    x = torch.randn(3, 6)
    original = [model[0].weight.clone(), model[2].weight.clone()]
    ak.attach(model, DiagonalConfig(target_modules=["0", "2"]), "diag")
    ak.attach(model, ak.LoRAConfig(target_modules=["2"], init="random"), "lora")
    ak.activate(model, ["diag", "lora"])
    unfused = model(x)
    ak.fuse(model, ["diag"])
    fusion = model[0].fusion()
    assert fusion._host_copy is None and len(fusion._saved_entries) == 1  # sparse: only 6 entries kept
    assert fusion._saved_entries[0].values.numel() == 6
    ak.fuse(model, ["diag", "lora"])  # mixed dense + sparse on layer 2
    torch.testing.assert_close(model(x), unfused, rtol=1e-5, atol=1e-6)
    for _ in range(200):
        ak.switch(model, "diag")
        ak.switch(model, "lora")
    ak.unfuse(model)
    assert torch.equal(model[0].weight, original[0]) and torch.equal(model[2].weight, original[1])


def test_inserted_modules_run_unfused_and_refuse_to_fuse(mlp):
    x = torch.randn(2, 8)
    ak.attach(mlp, ShiftConfig(target_modules=["4"]), "shift")
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0"], init="random"), "lora")
    ak.activate(mlp, ["shift", "lora"])
    expected = mlp(x)
    before = mlp[0].weight.clone()
    with pytest.raises(ak.NotFusableError, match="shift"):
        ak.fuse(mlp, ["shift"])
    assert torch.equal(mlp[0].weight, before)
    ak.fuse(mlp)  # folds the LoRA, keeps the inserted module running
    assert ak.fused_adapters(mlp) == [("lora", 1.0)]
    assert ak.active_adapters(mlp) == [("shift", 1.0), ("lora", 1.0)]
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ak.NotFusableError):
        ak.merge_and_unload(mlp)


def test_two_copies_of_one_module_cannot_be_active_together(tiny_bert):
    cfg = ak.LoRAConfig(target_modules=["query"], modules_to_save=["classifier"])
    ak.attach(tiny_bert, cfg, "a")
    ak.attach(tiny_bert, cfg, "b")
    with pytest.raises(ak.AdapterError, match="classifier"):
        ak.activate(tiny_bert, ["a", "b"])


def test_module_copies_switch_with_their_adapter(tiny_bert, token_ids):
    cfg = ak.LoRAConfig(target_modules=["query"], modules_to_save=["classifier"])
    base = tiny_bert(input_ids=token_ids).logits
    ak.attach(tiny_bert, cfg, "a")
    ak.attach(tiny_bert, cfg, "b")
    with torch.no_grad():
        tiny_bert.classifier.layer("b").module.bias.add_(1.0)
    assert torch.equal(tiny_bert(input_ids=token_ids).logits, base)
    ak.switch(tiny_bert, "b")
    torch.testing.assert_close(tiny_bert(input_ids=token_ids).logits, base + 1.0)
    ak.unfuse(tiny_bert)
    ak.activate(tiny_bert, None)
    assert torch.equal(tiny_bert(input_ids=token_ids).logits, base)


def test_works_inside_torch_no_grad_and_with_gradients_through_plain_loop(mlp):
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0", "2"]))
    opt = torch.optim.SGD([p for p in mlp.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(mlp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert mlp(x).shape == (16, 4)


def test_loading_does_not_advance_the_callers_random_stream(mlp, tmp_path):
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0", "2"], init="random"), "a")
    ak.save(mlp, tmp_path / "a", "a")
    ak.detach(mlp, "a")
    torch.manual_seed(5)
    ak.load(mlp, tmp_path / "a")
    after_load = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_load, torch.rand(3))
    torch.manual_seed(5)
    ak.attach(mlp, ak.LoRAConfig(target_modules=["0"]), "b")  # a fresh adapter does draw its init
    assert not torch.equal(torch.rand(3), after_load)


def test_a_container_module_can_be_saved_whole_beside_fused_deltas(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))).eval()
    x = torch.randn(3, 8)
    ak.attach(model, ak.LoRAConfig(target_modules=["0"], modules_to_save=["1"], init="random"), "a")
    with torch.no_grad():
        model[1].layer("a").module[2].bias.add_(1.0)
    unfused = model(x)
    ak.fuse(model)
    torch.testing.assert_close(model(x), unfused, rtol=1e-5, atol=1e-6)
    ak.unfuse(model)
    ak.save(model, tmp_path / "a", "a")
    fresh = copy.deepcopy(model)
    ak.detach(fresh, "a")
    ak.load(fresh, tmp_path / "a")
    assert torch.equal(fresh(x), unfused)


def test_an_inserted_module_around_a_block_and_lora_inside_it_nest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 8)
    ak.attach(model, ShiftConfig(target_modules="1", width=8), "block")  # regex: exactly "1", not "1.1"
    ak.attach(model, ak.LoRAConfig(target_modules=["1.0"], init="random"), "inner")  # inside the wrapped block
    assert isinstance(model[1].base_layer[0], AdaptedModule)
    ak.activate(model, ["block", "inner"])
    inner = model[1].base_layer[0]
    expected = model[2](torch.tanh(inner.base_layer(model[0](x)) + inner.adapters["inner"].delta_output(model[0](x), 1.0)) + 1.0)
    torch.testing.assert_close(model(x), expected)
    ak.detach(model, "block")
    assert isinstance(model[1], nn.Sequential) and isinstance(model[1][0], AdaptedModule)
    ak.detach(model, "inner")
    assert all(not isinstance(m, AdaptedModule) for m in model.modules())


def test_fingerprint_of_a_block_ignores_adapters_inside_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2)).eval()
    ak.attach(model, ShiftConfig(target_modules="1", width=8), "block")
    ak.save(model, tmp_path / "block", "block")
    ak.attach(model, ak.LoRAConfig(target_modules=["1.0"], init="random"), "inner")
    ak.fuse(model, ["inner"])
    twin = copy.deepcopy(model)
    ak.detach(twin, "block")
    assert ak.load(twin, tmp_path / "block", verify="full") == "block"  # same base despite the fused LoRA

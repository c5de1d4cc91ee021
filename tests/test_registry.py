"""The registry refuses ambiguity; ak.merge survives as a deprecated alias of ak.to_plain."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core import registry


@dataclasses.dataclass(frozen=True)
class _OwnConfig(ak.AdapterConfig):
    pass


def test_a_second_method_with_a_taken_name_or_config_class_is_refused():
    before = {m.name: type(m) for m in ak.registered_methods()}

    class SameName(ak.AdapterMethod):
        name = "lora"
        config_class = _OwnConfig

    class SameConfig(ak.AdapterMethod):
        name = "test-registry-own"
        config_class = ak.LoRAConfig

    with pytest.raises(ak.ConfigError, match="'lora' is already registered"):
        ak.register_method(SameName)
    with pytest.raises(ak.ConfigError, match="LoRAConfig already belongs to method 'lora'"):
        ak.register_method(SameConfig)
    assert {m.name: type(m) for m in ak.registered_methods()} == before
    assert ak.LoRAConfig.method == "lora" and _OwnConfig.method == ""


def test_a_method_without_a_name_is_refused():
    class Nameless(ak.AdapterMethod):
        config_class = _OwnConfig

    with pytest.raises(ak.ConfigError, match="non-empty string 'name'"):
        ak.register_method(Nameless)
    assert "" not in {m.name for m in registry.registered_methods()}


def test_merge_is_a_deprecated_alias_of_to_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    twin = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    config = ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=4, target_modules=["0"]), n_modules=2)
    for m in (model, twin):
        torch.manual_seed(1)
        ak.attach(m, config, "m")
    ak.to_plain(model, "m")
    with pytest.warns(DeprecationWarning, match="ak.to_plain"):
        ak.merge(twin, "m")
    assert type(ak.config_of(model, "m")) is type(ak.config_of(twin, "m")) is ak.BottleneckConfig
    x = torch.randn(3, 8)
    assert torch.equal(model.eval()(x), twin.eval()(x))


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "../x", "a\x00b", " a", "-a", "keys", "x" * 101, 3, None])
def test_adapter_names_that_cannot_be_keys_or_directory_names_are_refused(mlp, name):
    from conftest import assert_unchanged, snapshot

    before = snapshot(mlp)
    with pytest.raises(ak.ConfigError, match="adapter name"):
        ak.attach(mlp, ak.LoRAConfig(target_modules=["0"]), name)
    assert_unchanged(mlp, before)

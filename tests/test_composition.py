"""Composition blocks: ak.Add sums weight deltas (and fuses the sum exactly), ak.Stack runs
inserted modules in order, invalid nestings are refused with the model unchanged, and every
block survives to_dict/from_dict and ak.save/ak.load. (Split routing: test_composition_split.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from torch import nn

import adapterkit as ak
from adapterkit.core.state import get_state
from composition_support import StrideDiffConfig, add_delta, layer_of

TARGETS = ["0", "2"]
X = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3))


def deltas(mlp: nn.Module) -> nn.Module:
    """LoRA ``l``, SHiRA ``s``, DyLoRA ``y`` and a weight+bias sparse diff ``f`` on layers 0 and 2."""
    model = copy.deepcopy(mlp)
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=TARGETS), "l")
    ak.attach(model, ak.ShiraConfig(density=0.2, target_modules=TARGETS), "s")
    ak.attach(model, ak.DyLoRAConfig(r_max=4, target_modules=TARGETS), "y")
    ak.attach(model, StrideDiffConfig(stride=3, target_modules=TARGETS), "f")
    for seed, name in enumerate("lsyf"):
        randomise(model, name, seed=seed + 1, scale=0.3)
    return model


ADD = ak.Add("l", ak.Add("s", "f", weights=[0.5, 2.0]), "y", weights=[1.0, -1.5, 0.7])
EFFECTIVE = [("l", 1.0), ("s", -0.75), ("f", -3.0), ("y", 0.7)]


def hand_built(model: nn.Module, mlp: nn.Module, order: list[tuple[str, float]]) -> nn.Module:
    """A plain copy of the base whose layers get each delta added in place, in ``order``."""
    plain = copy.deepcopy(mlp)
    for name, weight in order:
        for path in TARGETS:
            add_delta(model, plain.get_submodule(path), name, path, weight)
    return plain


def test_add_sums_the_weighted_deltas_of_every_kind(mlp):
    model = deltas(mlp)
    ak.activate(model, ADD)
    assert ak.active_adapters(model) == EFFECTIVE
    with torch.no_grad():
        unfused = model(X)
        by_hand = mlp[4](torch.relu(_layer(model, mlp, "2", torch.relu(_layer(model, mlp, "0", X)))))
    torch.testing.assert_close(unfused, by_hand, rtol=1e-5, atol=1e-5)
    for order in (EFFECTIVE, EFFECTIVE[::-1]):  # sequential application, either order
        with torch.no_grad():
            torch.testing.assert_close(unfused, hand_built(model, mlp, order)(X), rtol=1e-5, atol=1e-5)
    ak.fuse(model)
    assert ak.fused_adapters(model) == EFFECTIVE
    with torch.no_grad():
        torch.testing.assert_close(model(X), unfused, rtol=1e-5, atol=1e-5)


def _layer(model: nn.Module, mlp: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """``W x + b + Σ wᵢ ΔWᵢ x`` for the layer at ``path``, each delta from its own factors."""
    base = mlp.get_submodule(path)
    out = base(x)
    for name, weight in EFFECTIVE:
        layer = layer_of(model, name, path)
        if name == "f":  # weight and bias entries
            w, b = (layer.part(t).apply(torch.zeros_like(p), weight) for t, p in (("weight", base.weight), ("bias", base.bias)))
            out = out + x @ w.T + b
        else:
            out = out + x @ (weight * layer.delta_weight(base.weight.shape)).T
    return out


def test_fusing_an_add_folds_the_sum_and_unfusing_restores_bit_exact_for_30_cycles(mlp):
    model = deltas(mlp)
    ak.activate(model, "l")
    originals = {k: v.clone() for k, v in mlp.state_dict().items()}
    with torch.no_grad():
        unfused = model(X)
        ak.fuse(model, ADD)
        assert ak.active_adapters(model) == EFFECTIVE and ak.fused_adapters(model) == EFFECTIVE
        fused = model(X)
        torch.testing.assert_close(fused, hand_built(model, mlp, EFFECTIVE)(X), rtol=1e-5, atol=1e-5)
        ak.unfuse(model)
        unfused = model(X)
        for _ in range(30):
            ak.fuse(model)
            assert torch.equal(model(X), fused)
            ak.unfuse(model)
            for path in TARGETS:
                base = get_state(model).wrappers[path].base_layer
                assert torch.equal(base.weight, originals[f"{path}.weight"])
                assert torch.equal(base.bias, originals[f"{path}.bias"])  # the diff's bias part too
            assert torch.equal(model(X), unfused)


def test_stack_runs_inserted_modules_in_order_and_adds_the_deltas_at_their_module(mlp):
    model = copy.deepcopy(mlp)
    for name in ("a", "b"):
        ak.attach(model, ak.BottleneckConfig(bottleneck=4, target_modules=TARGETS), name)
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=TARGETS), "l")
    ak.attach(model, ak.LoRAConfig(r=3, target_modules=["2"]), "m")
    for seed, name in enumerate("ablm"):
        randomise(model, name, seed=seed + 5, scale=0.3)

    def by_hand(order: str) -> torch.Tensor:
        h = X
        for path in TARGETS:
            base = mlp.get_submodule(path)
            out = base(h) + layer_of(model, "l", path).delta_output(h, 0.5)
            if path == "2":
                out = out + layer_of(model, "m", path).delta_output(h, 2.0)
            for name in order:
                out = layer_of(model, name, path).adapt(h, out, 1.0)
            h = torch.relu(out)
        return mlp[4](h)

    with torch.no_grad():
        ak.activate(model, ak.Stack(ak.Add("l", "m", weights=[0.5, 2.0]), "a", "b"))
        ab = model(X)
        torch.testing.assert_close(ab, by_hand("ab"), rtol=1e-5, atol=1e-6)
        ak.activate(model, ak.Stack("b", ak.Add("l", "m", weights=[0.5, 2.0]), "a"))  # deltas act before modules wherever listed
        ba = model(X)
        torch.testing.assert_close(ba, by_hand("ba"), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ab, ba, atol=1e-3)
        ak.activate(model, ["l", "m", "a", "b"], weights=[0.5, 2.0, 1.0, 1.0])  # a list: Add for deltas, Stack for modules
        assert torch.equal(model(X), ab)


def test_lora_add_is_a_sum_not_the_product_of_a_sequential_stack(mlp):
    """Spec check 8 on the square 16×16 layer: Add(a, b) = Wx + ΔW_a x + ΔW_b x; a sequential LoRA
    "stack" (AdapterHub's pitfall) would be Wx + ΔW_b(ΔW_a x) and differs; ak.Stack of LoRAs adds."""
    model = copy.deepcopy(mlp)
    for seed, name in enumerate("ab"):
        ak.attach(model, ak.LoRAConfig(r=2, target_modules=["2"]), name)
        randomise(model, name, seed=seed + 9, scale=0.5)
    layer, base = model[2], mlp[2]
    h = torch.randn(4, 16)
    dw = {n: layer_of(model, n, "2").delta_weight(base.weight.shape) for n in "ab"}
    with torch.no_grad():
        ak.activate(model, ak.Add("a", "b"))
        added = layer(h)
        torch.testing.assert_close(added, base(h) + h @ dw["a"].T + h @ dw["b"].T, rtol=1e-5, atol=1e-6)
        product = base(h) + (h @ dw["a"].T) @ dw["b"].T
        assert not torch.allclose(added, product, atol=1e-2)
        ak.activate(model, ak.Stack("a", "b"))
        torch.testing.assert_close(layer(h), added, rtol=0, atol=0)


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: ak.Add("a", ak.Stack("b", "c")),
    lambda: ak.Add("a", ak.Split("b", "c")),
    lambda: ak.Add(),
    lambda: ak.Add("a", "b", weights=[1.0]),
    lambda: ak.Add("a", weights=[float("nan")]),
    lambda: ak.Add("a", weights=5),
    lambda: ak.Stack("a"),
    lambda: ak.Stack("a", ak.Add("b", "a")),
    lambda: ak.Stack("a", 3),
    lambda: ak.Split("a"),
    lambda: ak.Split("a", "b", "c"),
    lambda: ak.Split("a", "b", by="attention_mask"),
    lambda: ak.Split(ak.Split("a", "b"), "c"),
    lambda: ak.Split(ak.Stack("a", ak.Split("b", "c")), "d"),
    lambda: ak.Split("a", "a"),
    lambda: ak.Stack(ak.Split("a", "b"), ak.Split("c", "d", by="token_type_ids")),
])
def test_invalid_blocks_are_refused_when_built(build):
    with pytest.raises(ak.ConfigError):
        build()


def mixed(mlp: nn.Module) -> nn.Module:
    model = copy.deepcopy(mlp)
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=TARGETS), "l")
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["2"], modules_to_save=["4"]), "h")
    ak.attach(model, ak.BottleneckConfig(bottleneck=4, target_modules=TARGETS), "a")
    ak.attach(model, ak.BottleneckConfig(bottleneck=4, target_modules=TARGETS), "b")
    return model


@pytest.mark.parametrize("call, error", [
    (lambda m: ak.activate(m, ak.Add("l", "a")), ak.ConfigError),  # an inserted module inside Add
    (lambda m: ak.activate(m, ak.Stack("l", "missing")), ak.UnknownMemberError),
    (lambda m: ak.activate(m, ak.Add("l", "h"), weights=[1.0, 1.0]), ak.ConfigError),
    (lambda m: ak.activate(m, ak.Split("l", "h")), ak.ConfigError),  # modules_to_save cannot be routed
    (lambda m: ak.fuse(m, ak.Split("l", "h")), ak.ConfigError),
    (lambda m: ak.fuse(m, ak.Stack("l", "a")), ak.ConfigError),  # inserted modules cannot be fused
    (lambda m: ak.fuse(m, ak.Add("l", "missing")), ak.ConfigError),
    (lambda m: ak.save(m, "/nonexistent/never", ak.Add("l", "a")), ak.ConfigError),
])
def test_invalid_compositions_change_nothing(mlp, call, error):
    model = mixed(mlp)
    ak.activate(model, ak.Stack("l", "a", "b"))
    before = snapshot(model)
    with pytest.raises(error):
        call(model)
    assert_unchanged(model, before)
    assert issubclass(ak.UnknownMemberError, ak.AdapterNotFoundError)  # ak.save's long-standing error


def test_fused_deltas_must_match_the_new_composition(mlp):
    model = mixed(mlp)
    ak.fuse(model, ak.Add("l", "h", weights=[0.5, 1.0]))
    before = snapshot(model)
    with pytest.raises(ak.FusedStateError):
        ak.activate(model, ak.Stack(ak.Add("l", "h"), "a"))  # other weights than the fused ones
    assert_unchanged(model, before)
    ak.activate(model, ak.Stack(ak.Add("l", "h", weights=[0.5, 1.0]), "a"))  # the fused sum plus a module
    assert ak.active_adapters(model) == [("l", 0.5), ("h", 1.0), ("a", 1.0)]


# -- serialisation ------------------------------------------------------------------------------

BLOCKS = [
    ak.Stack("a", "b"),
    ADD,
    ak.Stack(ak.Add("l", "m", weights=[0.5, 2.0]), "a", ak.Stack("b", "c")),
    ak.Stack(ak.Split("q", ak.Add("d", "e", weights=[1.0, 0.25]), by="token_type_ids"), "r"),
    ak.Split(ak.Stack("q", "p"), "d"),
]


@pytest.mark.parametrize("block", BLOCKS)
def test_blocks_round_trip_through_json(block):
    data = json.loads(json.dumps(block.to_dict()))
    assert type(block).from_dict(data) == block
    assert ak.core.composition.block_from_dict(data) == block


def test_a_stack_of_names_keeps_its_file_layout():
    assert ak.Stack("a", "b").to_dict() == {"stack": ["a", "b"]}
    assert ak.Stack.from_dict({"stack": ["a", "b"]}).names == ("a", "b")


def test_save_and_load_an_add_restores_and_activates_it_and_can_fuse_it(mlp, tmp_path):
    model = deltas(mlp)
    ak.activate(model, ADD)
    with torch.no_grad():
        expected = model(X)
    ak.save(model, tmp_path, ADD)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["composition.json", "f", "l", "s", "y"]
    for fuse in (False, True):
        fresh = copy.deepcopy(mlp)
        assert ak.load(fresh, tmp_path, fuse=fuse) == "l"
        assert get_state(fresh).composition == ADD and ak.active_adapters(fresh) == EFFECTIVE
        assert ak.fused_adapters(fresh) == (EFFECTIVE if fuse else [])
        with torch.no_grad():
            torch.testing.assert_close(fresh(X), expected, rtol=0 if not fuse else 1e-5, atol=0 if not fuse else 1e-5)


def test_save_and_load_a_nested_stack(mlp, tmp_path):
    model = mixed(mlp)
    ak.attach(model, ak.LoRAConfig(r=3, target_modules=["0"]), "m")
    for seed, name in enumerate("lmab"):
        randomise(model, name, seed=seed + 2, scale=0.3)
    block = ak.Stack(ak.Add("l", "m", weights=[0.5, -1.0]), "b", "a")
    ak.activate(model, block)
    with torch.no_grad():
        expected = model(X)
    ak.save(model, tmp_path, block)
    fresh = copy.deepcopy(mlp)
    ak.load(fresh, tmp_path)
    assert get_state(fresh).composition == block
    with torch.no_grad():
        assert torch.equal(fresh(X), expected)
    before = snapshot(fresh)
    with pytest.raises(ak.ConfigError, match="only an Add"):
        ak.load(copy.deepcopy(mlp), tmp_path, fuse=True)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("content", [
    {"foo": ["a"]},
    {"stack": "ab"},
    {"stack": ["l", "l"]},
    {"stack": ["l", 4]},
    {"add": ["l", "a"], "weights": "x"},
    {"add": ["l", "a"], "weights": [1, None]},
    {"split": ["l"], "by": "mask"},
    {"split": ["l", "a"], "by": "labels"},
    {"split": [{"split": ["l", "a"]}, "b"]},
    {"stack": ["l", "a"], "extra": 1},
    {"stack": ["l", "a"], "add": ["b"]},
    ["l", "a"],
])
def test_a_corrupt_composition_file_loads_nothing(mlp, tmp_path, content):
    model = mixed(mlp)
    ak.save(model, tmp_path, ak.Stack("l", "a"))
    (tmp_path / "composition.json").write_text(json.dumps(content))
    fresh = copy.deepcopy(mlp)
    before = snapshot(fresh)
    with pytest.raises(ak.CorruptFileError, match="composition.json"):
        ak.load(fresh, tmp_path)
    assert_unchanged(fresh, before)


def test_a_well_formed_composition_the_adapters_cannot_form_loads_nothing(mlp, tmp_path):
    model = mixed(mlp)
    ak.save(model, tmp_path, ak.Stack("l", "a"))
    (tmp_path / "composition.json").write_text(json.dumps({"add": ["l", "a"], "weights": [1, 1]}))
    fresh = copy.deepcopy(mlp)
    before = snapshot(fresh)
    with pytest.raises(ak.ConfigError, match="insert modules"):
        ak.load(fresh, tmp_path)
    assert_unchanged(fresh, before)

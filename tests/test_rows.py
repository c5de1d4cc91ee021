"""ak.per_row: one forward in which each batch row runs its own adapter (or the base model).

The reference for every row is that row run alone with only its adapter activated. Kinds:
LoRA (grouped and gathered), DyLoRA at a lowered rank, SHiRA, bottleneck, 1-bit LoRA, LoRA with
a replaced classifier head (modules_to_save) and a weight+bias sparse diff (a tensor delta).
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adapterkit as ak
from adapterkit.core import rows as rows_module
from composition_support import StrideDiffConfig

QV = ["query", "value"]
PFEIFFER_BERT = r"bert\.encoder\.layer\.\d+\.output\.dense"
IDS = torch.randint(1, 100, (6, 7), generator=torch.Generator().manual_seed(2))

CONFIGS = {
    "lora": lambda i: ak.LoRAConfig(r=2 + i, target_modules=QV),
    "dylora": lambda i: ak.DyLoRAConfig(r_max=4, target_modules=QV, seed=i),
    "shira": lambda i: ak.ShiraConfig(density=0.1, target_modules=QV, seed=i),
    "bottleneck": lambda i: ak.BottleneckConfig(bottleneck=4, target_modules=PFEIFFER_BERT),
    "lowbit": lambda i: ak.LoRAConfig(r=4, target_modules=QV, bits=1),
    "copies": lambda i: ak.LoRAConfig(r=2, target_modules=QV, modules_to_save=["classifier"]),
    "diff": lambda i: StrideDiffConfig(stride=3, offset=i, target_modules=QV),
}


# tiny models: on a busy 2-core machine OpenMP's hand-offs cost more than the work (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def add(model: nn.Module, kind: str, name: str, i: int) -> None:
    ak.attach(model, CONFIGS[kind](i), name)
    randomise(model, name, seed=10 + i, scale=0.3)
    if kind == "dylora":
        ak.set_rank(model, 2, [name])  # the row must see the rank chosen for inference


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def alone(model: nn.Module, names: list[str | None], ids: torch.Tensor = IDS) -> torch.Tensor:
    """Each row run on its own with only its adapter active (the activation is put back)."""
    before = ak.active_adapters(model)
    out = []
    for i, name in enumerate(names):
        ak.activate(model, name)
        out.append(logits(model, ids[i:i + 1]))
    ak.activate(model, [n for n, _ in before], [w for _, w in before])
    return torch.cat(out)


def mixed(model: nn.Module, names: list[str | None], ids: torch.Tensor = IDS) -> torch.Tensor:
    with ak.per_row(model, names):
        return logits(model, ids)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_each_row_equals_its_adapter_run_alone(tiny_bert, kind):
    for i, name in enumerate("abc"):
        add(tiny_bert, kind, name, i)
    names = ["a", None, "b", "a", "c", None]
    got = mixed(tiny_bert, names)
    torch.testing.assert_close(got, alone(tiny_bert, names), atol=1e-5, rtol=0)
    ak.activate(tiny_bert, None)
    plain = logits(tiny_bert, IDS)
    assert torch.equal(got[[1, 5]], plain[[1, 5]])  # None rows: the base model
    assert (got[[0, 2, 4]] - plain[[0, 2, 4]]).abs().amax() > 1e-3  # the adapters change their rows


def test_a_mix_of_every_kind_and_base_rows_in_one_batch(tiny_bert):
    kinds = ["lora", "dylora", "shira", "bottleneck", "lowbit", "copies", "diff"]
    for i, kind in enumerate(kinds):
        add(tiny_bert, kind, kind, i)
    names = [*kinds, None, "copies", "lora", None, "bottleneck"]
    ids = torch.randint(1, 100, (len(names), 5), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(mixed(tiny_bert, names, ids), alone(tiny_bert, names, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gather_from", [1, 10**9], ids=["gathered", "grouped"])
def test_many_lora_adapters_of_two_ranks_gathered_or_grouped(mlp, monkeypatch, gather_from):
    monkeypatch.setattr(rows_module, "GATHER_MIN_GROUPS", gather_from)
    calls = []
    monkeypatch.setattr(rows_module, "_gathered", lambda *a, _f=rows_module._gathered: calls.append(1) or _f(*a))
    for i in range(10):
        ak.attach(mlp, ak.LoRAConfig(r=2 + i % 2, target_modules=["0", "2"]), f"l{i}")
        randomise(mlp, f"l{i}", seed=i, scale=0.3)
    x = torch.randn(24, 3, 8, generator=torch.Generator().manual_seed(1))
    for names in ([f"l{i % 10}" if i % 5 else None for i in range(24)],  # base rows: gathered rows only
                  [f"l{i % 3 * 2}" for i in range(24)]):  # every row one rank: added into the output in place
        with torch.no_grad(), ak.per_row(mlp, names):
            got = mlp(x)
        for i, name in enumerate(names):
            ak.activate(mlp, name)
            with torch.no_grad():
                torch.testing.assert_close(got[i:i + 1], mlp(x[i:i + 1]), atol=1e-5, rtol=0)
    assert bool(calls) == (gather_from == 1)  # two ranks: one gathered bmm per rank and module


def test_generate_with_left_padding_equals_each_row_generated_alone(tiny_llama):
    ak.attach(tiny_llama, ak.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    ak.attach(tiny_llama, ak.ShiraConfig(density=0.1, target_modules=["o_proj"], seed=1), "b")
    ak.attach(tiny_llama, ak.BottleneckConfig(bottleneck=4, target_modules=["down_proj"]), "c")
    for i, name in enumerate("abc"):
        randomise(tiny_llama, name, seed=i, scale=0.5)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 100, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :4] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    names = ["a", None, "b", "c"]
    settings_ = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), ak.per_row(tiny_llama, names):
        out = tiny_llama.generate(input_ids=ids, attention_mask=mask, **settings_)
    for i, name in enumerate(names):
        ak.activate(tiny_llama, name)
        with torch.no_grad():
            ref = tiny_llama.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **settings_)
        assert torch.equal(out.sequences[i:i + 1], ref.sequences)
        for step, step_ref in zip(out.scores, ref.scores):
            torch.testing.assert_close(step[i:i + 1], step_ref, atol=1e-5, rtol=0)


def test_threads_with_different_rows_on_one_model_get_exact_results(tiny_bert):
    for i, kind in enumerate(["lora", "shira", "bottleneck", "copies"]):
        add(tiny_bert, kind, kind, i)
    plans = [["lora", "shira", None, "copies", "bottleneck", "lora"], [None] * 5 + ["shira"],
             ["copies"] * 6, ["bottleneck", "lora", "lora", None, "shira", "copies"]]
    expected = [mixed(tiny_bert, names) for names in plans]
    results: list[list[torch.Tensor]] = [[] for _ in plans]

    def work(k: int) -> None:
        for _ in range(15):
            results[k].append(mixed(tiny_bert, plans[k]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, outs in enumerate(results):
        assert len(outs) == 15 and all(torch.equal(o, expected[k]) for o in outs)
    torch.testing.assert_close(expected[0], alone(tiny_bert, plans[0]), atol=1e-5, rtol=0)


def test_the_models_own_activation_is_untouched_and_restored(tiny_bert):
    add(tiny_bert, "lora", "a", 0)
    add(tiny_bert, "bottleneck", "b", 1)
    ak.activate(tiny_bert, ["a", "b"], [0.5, 1.0])
    before, active = logits(tiny_bert, IDS), ak.active_adapters(tiny_bert)
    with ak.per_row(tiny_bert, ["b"] * 6):
        with ak.per_row(tiny_bert, [None] * 3 + ["a"] * 3):  # the innermost assignment wins
            inner = logits(tiny_bert, IDS)
        outer = logits(tiny_bert, IDS)
        assert ak.active_adapters(tiny_bert) == active
    assert torch.equal(logits(tiny_bert, IDS), before)
    torch.testing.assert_close(inner, alone(tiny_bert, [None] * 3 + ["a"] * 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(outer, alone(tiny_bert, ["b"] * 6), atol=1e-5, rtol=0)
    clone = copy.deepcopy(tiny_bert)  # a copy made inside a block has no assignment of its own
    with ak.per_row(tiny_bert, [None] * 6):
        assert torch.equal(logits(copy.deepcopy(tiny_bert), IDS), before)
    assert torch.equal(logits(clone, IDS), before)


def test_gradients_reach_only_the_adapters_of_their_rows(mlp):
    for i, name in enumerate("abc"):
        ak.attach(mlp, ak.LoRAConfig(r=2, target_modules=["0", "2"], init="random"), name)
    mlp.train()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    with ak.per_row(mlp, ["a", None, "b", "a"]):
        mlp(x).square().sum().backward()
    grads = {n: [p.grad for p in ak.adapter_parameters(mlp, n)] for n in "abc"}
    assert all(g is not None and g.abs().sum() > 0 for n in "ab" for g in grads[n])
    assert all(g is None for g in grads["c"])


# -- refusals: checked before anything runs, the model stays bit-identical ----------------------
@dataclasses.dataclass(frozen=True)
class ScaleConfig(ak.AdapterConfig):
    """A model-level adapter that scales the model's output."""

    requires_targets = False


class ScaleLayer(ak.ModelLayer):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.factor = nn.Parameter(torch.tensor(2.0))

    def after(self, model, args, kwargs, output, scale):
        return output * self.factor


@ak.register_method
class ScaleMethod(ak.AdapterMethod):
    name = "test-rows-scale"
    config_class = ScaleConfig

    def select(self, model, config):
        return [""], []

    def supports(self, module: nn.Module) -> bool:
        return True

    def create_layer(self, config, adapter_name, module_name, module, context=None):
        return ScaleLayer(adapter_name)


def refused(model: nn.Module, names, error: type[Exception], match: str, x=None) -> None:
    before = snapshot(model)
    with pytest.raises(error, match=match):
        with ak.per_row(model, names):
            if x is not None:
                with torch.no_grad():
                    model(x)
    assert_unchanged(model, before)


def test_refusals_leave_the_model_unchanged(mlp):
    x = torch.randn(3, 8)
    ak.attach(mlp, ak.LoRAConfig(r=2, target_modules=["0", "2"]), "a")
    ak.attach(mlp, ak.LoRAConfig(r=2, target_modules=["0"]), "b")
    refused(mlp, ["a", "nope", None], ak.AdapterNotFoundError, "nope", x)
    refused(mlp, "a", ak.ConfigError, "one adapter name", x)
    refused(mlp, ["a", 3, None], ak.ConfigError, "3", x)
    refused(mlp, [], ak.ConfigError, "no rows", x)
    refused(mlp, ["a", "b"], ak.ConfigError, r"2 rows, but module '0' \(Linear\).*\(3, 8\)", x)
    ak.fuse(mlp, ["b"])
    refused(mlp, ["a", None, None], ak.FusedStateError, "unfuse", x)
    ak.unfuse(mlp)
    ak.activate(mlp, ak.Split("a", "b"))
    refused(mlp, ["a", None, None], ak.ConfigError, "Split", x)
    ak.activate(mlp, "a")
    ak.attach(mlp, ScaleConfig(), "scale")
    refused(mlp, ["a", "scale", None], ak.ConfigError, "whole model", x)
    ak.activate(mlp, ["a", "scale"])
    refused(mlp, ["a", None, None], ak.ConfigError, r"model-level adapter\(s\) \['scale'\] are active", x)
    refused(nn.Linear(2, 2), [None], ak.ConfigError, "no adapters")


# -- a property over random assignments ------------------------------------------------------
@pytest.fixture(scope="module")
def kinds_mlp():
    """An MLP with one adapter of each kind on its layers, and every adapter's output for X."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    configs = {
        "lora": ak.LoRAConfig(r=2, target_modules=["0", "2"]),
        "shira": ak.ShiraConfig(density=0.2, target_modules=["2", "4"], seed=1),
        "neck": ak.BottleneckConfig(bottleneck=3, target_modules=["2"]),
        "copy": ak.LoRAConfig(r=2, target_modules=["0"], modules_to_save=["4"]),
        "diff": StrideDiffConfig(stride=2, target_modules=["0"]),
    }
    for i, (name, config) in enumerate(configs.items()):
        ak.attach(model, config, name)
        randomise(model, name, seed=i, scale=0.4)
    x = torch.randn(8, 2, 8, generator=torch.Generator().manual_seed(9))
    outputs = {}
    with torch.no_grad():
        for name in [None, *configs]:
            ak.activate(model, name)
            outputs[name] = model(x)  # the MLP treats rows independently: row i alone = row i here
    ak.activate(model, None)
    return model, x, outputs


@settings(max_examples=40)
@given(st.lists(st.sampled_from([None, "lora", "shira", "neck", "copy", "diff"]), min_size=1, max_size=8),
       st.integers(1, 9))
def test_any_assignment_gives_every_row_its_adapter(kinds_mlp, names, gather_from):
    model, x, outputs = kinds_mlp
    rows_module.GATHER_MIN_GROUPS, before = gather_from, rows_module.GATHER_MIN_GROUPS
    try:
        with torch.no_grad(), ak.per_row(model, names):
            got = model(x[: len(names)])
    finally:
        rows_module.GATHER_MIN_GROUPS = before
    want = torch.stack([outputs[name][i] for i, name in enumerate(names)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

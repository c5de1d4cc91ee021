"""ak.Split: tokens routed by a per-example (batch, tokens) mask, True positions through b.

References are hand-run: each branch's plain activation run on its own, rows chosen by the mask.
On a token-local model (an MLP over (batch, tokens, features)) that is exact for the whole model;
on BERT (attention mixes tokens) it is checked module by module on the inputs each adapted module
saw. Covers bottleneck modules, LoRA deltas, SHiRA and a weight+bias sparse diff (LT-SFT's shape).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from torch import nn

import adapterkit as ak
from adapterkit.core.state import get_state
from composition_support import StrideDiffConfig, rows

TARGETS = ["0", "2"]
PFEIFFER_BERT = r"bert\.encoder\.layer\.\d+\.output\.dense"
X = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(4))
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0] * 6, [1] * 6], dtype=torch.bool)  # split at 2, 4, none, 0

CONFIGS = {
    "bottleneck": lambda i: ak.BottleneckConfig(bottleneck=4, target_modules=TARGETS),
    "lora": lambda i: ak.LoRAConfig(r=2, target_modules=TARGETS),
    "shira": lambda i: ak.ShiraConfig(density=0.2, target_modules=TARGETS, seed=i),
    "diff": lambda i: StrideDiffConfig(stride=3, offset=i, target_modules=TARGETS),
}


def three(mlp: nn.Module, kind: str) -> nn.Module:
    """Adapters q, d (the branches) and r of one kind on layers 0 and 2."""
    model = copy.deepcopy(mlp)
    for i, name in enumerate("qdr"):
        ak.attach(model, CONFIGS[kind](i), name)
        randomise(model, name, seed=i + 1, scale=0.3)
    return model


def run(model: nn.Module, block, mask: torch.Tensor | None = None) -> torch.Tensor:
    ak.activate(model, block)
    with torch.no_grad():
        if mask is None:
            return model(X)
        with ak.routing(model, mask):
            return model(X)


SHAPES = {  # the routed block and the plain activation of each branch
    "split": (ak.Split("q", "d"), "q", "d"),
    "stack": (ak.Stack(ak.Split("q", "d"), "r"), ak.Stack("q", "r"), ak.Stack("d", "r")),
    "add": (ak.Split(ak.Add("q", "r", weights=[1.0, 0.5]), "d"), ak.Add("q", "r", weights=[1.0, 0.5]), "d"),
}


@pytest.mark.parametrize("kind, shape", [(k, s) for k in CONFIGS for s in SHAPES if (k, s) != ("bottleneck", "add")])
def test_split_routes_exactly_the_masked_tokens(mlp, kind, shape):
    model = three(mlp, kind)
    block, a, b = SHAPES[shape]
    expected = rows(MASK, run(model, a), run(model, b))
    assert not torch.allclose(run(model, a), run(model, b), atol=1e-3)  # the branches differ
    assert torch.equal(run(model, block, MASK), expected)


def bert_input(seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] q [SEP] d [SEP] pad: queries of 3, 5 and 2 tokens, documents of different lengths,
    padding (token type 0) after the document."""
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0],
                          [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                          [0, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    attention = torch.tensor([[1] * 8 + [0] * 2, [1] * 10, [1] * 6 + [0] * 4])
    ids = torch.randint(1, 100, types.shape, generator=torch.Generator().manual_seed(seed)) * attention
    return {"input_ids": ids, "attention_mask": attention, "token_type_ids": types}


def first_one_rule(types: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(types.shape, dtype=torch.bool)
    for i, row in enumerate(types.tolist()):
        if 1 in row:
            mask[i, row.index(1):] = True
    return mask


def hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, output_hidden_states=True).hidden_states[-1]


PAPER = ak.Stack(ak.Split("qlang", "dlang", by="token_type_ids"), "rank")
BERT_CONFIGS = {
    "bottleneck": ak.BottleneckConfig(reduction_factor=4, target_modules=PFEIFFER_BERT),
    "lora": ak.LoRAConfig(r=2, target_modules=["query", "value"]),
}


def paper_model(tiny_bert: nn.Module, kind: str) -> nn.Module:
    for i, name in enumerate(("qlang", "dlang", "rank")):
        ak.attach(tiny_bert, BERT_CONFIGS[kind], name)
        randomise(tiny_bert, name, seed=i + 11, scale=0.3)
    return tiny_bert


@pytest.mark.parametrize("kind", BERT_CONFIGS)
def test_the_papers_split_by_token_type_ids_routes_every_module_exactly(tiny_bert, kind):
    model = paper_model(tiny_bert, kind)
    batch = bert_input()
    mask = first_one_rule(batch["token_type_ids"])
    assert mask.sum(1).tolist() == [7, 5, 8]  # the padding after each document goes with it
    ak.activate(model, PAPER)
    seen = []
    handles = [w.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
               for w in get_state(model).wrappers.values()]
    with torch.no_grad():
        routed = hidden(model, batch)
    for h in handles:
        h.remove()
    assert len(seen) == 2 * (1 if kind == "bottleneck" else 2)
    with torch.no_grad():
        for wrapper, x, out in seen:
            ak.activate(model, ak.Stack("qlang", "rank"))
            a = wrapper(x)
            ak.activate(model, ak.Stack("dlang", "rank"))
            assert torch.equal(out, rows(mask, a, wrapper(x)))
        ak.activate(model, PAPER)
        for everything, branch in ((False, ak.Stack("qlang", "rank")), (True, ak.Stack("dlang", "rank"))):
            with ak.routing(model, torch.full(mask.shape, everything)):  # an explicit mask overrides token types
                whole = hidden(model, batch)
            ak.activate(model, branch)
            assert torch.equal(whole, hidden(model, batch))
            assert not torch.allclose(whole, routed, atol=1e-3)
            ak.activate(model, PAPER)
        assert torch.equal(hidden(model, batch), routed)
        positional = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], output_hidden_states=True)
        assert torch.equal(positional.hidden_states[-1], routed)


def test_a_split_without_a_mask_refuses_the_forward(tiny_bert):
    model = paper_model(tiny_bert, "lora")
    ak.activate(model, PAPER)
    batch = bert_input()
    with pytest.raises(ak.ConfigError, match="token_type_ids"):
        model(input_ids=batch["input_ids"])
    ak.activate(model, ak.Split("qlang", "dlang"))
    with pytest.raises(ak.ConfigError, match="ak.routing"):
        model(**batch)  # by="mask" ignores token types
    with pytest.raises(ak.ConfigError, match="bool"):
        with ak.routing(model, batch["token_type_ids"]):
            pass
    with pytest.raises(ak.ConfigError, match="does not fit"):
        with ak.routing(model, torch.zeros(3, 4, dtype=torch.bool)):
            model(**batch)
    with ak.routing(model, first_one_rule(batch["token_type_ids"])):
        model(**batch)  # nothing left behind by the refused calls


def test_only_modules_of_routed_adapters_branch_and_hooks_live_while_needed(tiny_bert):
    model = paper_model(tiny_bert, "lora")
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["key"], modules_to_save=["classifier"]), "other")
    state = get_state(model)
    ak.activate(model, ["qlang", "dlang", "rank", "other"])  # the common case: plain plans, no hooks
    assert all(w.plan.routed is None for w in state.wrappers.values()) and not model._forward_pre_hooks
    ak.activate(model, ak.Stack(ak.Split("qlang", "dlang", by="token_type_ids"), "rank", "other"))
    routed = {p for p, w in state.wrappers.items() if w.plan.routed is not None}
    assert routed and all(p.endswith(("query", "value")) for p in routed)  # key and classifier run plainly
    assert len(model._forward_pre_hooks) == 1
    with torch.no_grad():
        model(**bert_input())
    ak.detach(model, "dlang")  # the composition goes; the rest stays active as a list
    assert state.composition is None and ak.active_adapters(model) == [("qlang", 1.0), ("rank", 1.0), ("other", 1.0)]
    assert all(w.plan.routed is None for w in state.wrappers.values()) and not model._forward_pre_hooks


def test_save_and_load_a_split_and_copies_route_on_their_own(tiny_bert, tmp_path):
    fresh = copy.deepcopy(tiny_bert)
    model = paper_model(tiny_bert, "bottleneck")
    ak.activate(model, PAPER)
    batch = bert_input()
    with torch.no_grad():
        expected = model(**batch).logits
    ak.save(model, tmp_path, PAPER)
    assert ak.load(fresh, tmp_path) == "qlang" and get_state(fresh).composition == PAPER
    twin = copy.deepcopy(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
        assert torch.equal(twin(**batch).logits, expected)
        with ak.routing(twin, torch.zeros(3, 10, dtype=torch.bool)):  # the copy's mask is its own
            assert torch.equal(fresh(**batch).logits, expected)


def test_fusing_with_a_split_active_folds_only_the_common_deltas(mlp):
    model = three(mlp, "lora")
    block = ak.Stack(ak.Split("q", "d"), "r")
    routed = run(model, block, MASK)
    weights = {p: get_state(model).wrappers[p].base_layer.weight.clone() for p in TARGETS}
    ak.fuse(model)
    assert ak.fused_adapters(model) == [("r", 1.0)]
    torch.testing.assert_close(run(model, block, MASK), routed, rtol=1e-5, atol=1e-6)
    before = snapshot(model)
    with pytest.raises(ak.FusedStateError):
        ak.activate(model, ak.Split("q", "d"))  # r is fused: it must stay active
    with pytest.raises(ak.ConfigError, match="Split"):
        ak.merge_and_unload(model)  # no inserted module, but the routed deltas cannot be merged
    assert_unchanged(model, before)
    ak.unfuse(model)
    assert all(torch.equal(get_state(model).wrappers[p].base_layer.weight, w) for p, w in weights.items())
    ak.activate(model, ak.Split("q", "d"))
    with pytest.raises(ak.FusionError, match="Split"):
        ak.fuse(model)


def test_gradients_reach_a_branch_only_through_its_tokens(mlp):
    model = three(mlp, "lora")
    ak.activate(model, ak.Stack(ak.Split("q", "d"), "r"))
    for mask, silent in ((torch.zeros(4, 6, dtype=torch.bool), "d"), (torch.ones(4, 6, dtype=torch.bool), "q")):
        model.zero_grad()
        with ak.routing(model, mask):
            model(X).square().sum().backward()
        for name in "qdr":
            grads = [p.grad for p in ak.adapter_parameters(model, name)]
            assert all(g is not None for g in grads)
            assert all(not g.any() for g in grads) == (name == silent)


@pytest.fixture
def one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_threads_with_different_masks_on_one_model_get_exact_results(mlp, one_intra_op_thread):
    model = three(mlp, "shira")  # SHiRA's branch runs use the model's per-thread work buffers
    block = ak.Stack(ak.Split("q", "d"), "r")
    masks = [MASK, ~MASK, torch.zeros_like(MASK), MASK.roll(1, dims=1)]
    expected = [run(model, block, m) for m in masks]
    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        with torch.no_grad(), ak.routing(model, masks[i]):
            results[i] = [model(X) for _ in range(40)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(masks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        assert len(outs) == 40 and all(torch.equal(o, expected[i]) for o in outs)


def test_threads_with_different_token_types_on_one_model_get_exact_results(tiny_bert, one_intra_op_thread):
    model = paper_model(tiny_bert, "lora")
    ak.activate(model, PAPER)
    batches = [bert_input(seed) for seed in range(3)]
    batches[1]["token_type_ids"] = batches[1]["token_type_ids"].roll(2, dims=1)
    with torch.no_grad():
        expected = [model(**b).logits for b in batches]
    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            results[i] = [model(**batches[i]).logits for _ in range(15)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        assert len(outs) == 15 and all(torch.equal(o, expected[i]) for o in outs)

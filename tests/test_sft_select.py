"""LT-SFT selection: one global top-K over many tensors (exact K, ties to the lowest flat index),
the histogram path equal to the exact one, random and user rules, the K formula, bad configs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, snapshot

import adapterkit as ak
from adapterkit.methods.sft import select

SHAPES = {"emb.weight": (13, 5), "ln.weight": (5,), "ln.bias": (5,), "fc.weight": (7, 5), "fc.bias": (7,)}


def planted(seed: int, levels: int = 6) -> list[tuple[str, torch.Tensor]]:
    """|Δ| with many ties and zeros (few distinct levels), over tensors of several shapes."""
    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randint(0, levels, shape, generator=g).float() * 0.125) for name, shape in SHAPES.items()]


def brute_force(scores, k, exclude=None):
    """Sort every entry by (−score, global flat index) and take the first k."""
    entries = []
    offset = 0
    for name, score in scores:
        banned = set() if exclude is None or name not in exclude else set(exclude[name].tolist())
        for i, value in enumerate(score.reshape(-1).tolist()):
            if i not in banned:
                entries.append((-value, offset + i, name, i))
        offset += score.numel()
    chosen = sorted(entries)[:k]
    out = {}
    for _, _, name, i in chosen:
        out.setdefault(name, []).append(i)
    return {name: torch.tensor(sorted(v)) for name, v in out.items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n].cpu(), b[n].cpu()) for n in a)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 7, 40, 90, 117])
def test_global_top_k_is_exactly_k_and_equals_a_brute_force_sort_on_both_paths(seed, k):
    scores = planted(seed, levels=3 + seed)
    expected = brute_force(scores, k)
    exact, threshold = select.top_k_exact(scores, k)
    assert sum(v.numel() for v in exact.values()) == k and same(exact, expected)
    for chunk, bins in ((1000, 4096), (7, 4), (3, 2), (1, 2)):  # several narrowing rounds, tiny chunks
        hist, hist_threshold = select.top_k_histogram(scores, k, chunk=chunk, bins=bins)
        assert same(hist, exact) and hist_threshold == threshold
    assert same(select.top_k(scores, k, exact_limit=0, chunk=5, bins=3)[0], exact)  # the dispatcher's other path


@pytest.mark.parametrize("seed", range(4))
def test_excluded_entries_are_never_chosen_and_both_paths_agree(seed):
    scores = planted(seed)
    g = torch.Generator().manual_seed(100 + seed)
    exclude = {name: torch.randperm(s.numel(), generator=g)[: s.numel() // 3].sort().values for name, s in scores}
    for k in (5, 40, 81):
        exact, _ = select.top_k_exact(scores, k, exclude)
        assert same(exact, brute_force(scores, k, exclude))
        assert same(select.top_k_histogram(scores, k, exclude, chunk=4, bins=3)[0], exact)
        for name, idx in exact.items():
            assert not set(idx.tolist()) & set(exclude[name].tolist())
    with pytest.raises(ak.ConfigError, match="available"):
        select.top_k_exact(scores, 117 - sum(v.numel() for v in exclude.values()) + 1, exclude)


def test_continuous_scores_with_a_planted_top_set_and_all_equal_scores():
    g = torch.Generator().manual_seed(0)
    scores = [(name, torch.rand(shape, generator=g) * 1e-3) for name, shape in SHAPES.items()]
    scores[2][1][3] = 5.0  # a LayerNorm bias entry and an embedding entry changed most
    scores[0][1][12, 4] = 4.0
    chosen, threshold = select.top_k_histogram(scores, 2, chunk=16, bins=8)
    assert same(chosen, {"emb.weight": torch.tensor([64]), "ln.bias": torch.tensor([3])}) and threshold == 4.0
    flat = [(name, torch.full(shape, 0.5)) for name, shape in SHAPES.items()]  # every entry tied
    assert same(select.top_k_histogram(flat, 70, chunk=9, bins=5)[0], select.top_k_exact(flat, 70)[0])
    assert same(select.top_k_exact(flat, 70)[0], {"emb.weight": torch.arange(65), "ln.weight": torch.arange(5)})
    assert same(select.top_k_histogram(flat, 117, chunk=9, bins=5)[0], select.top_k_exact(flat, 117)[0])


def test_non_finite_changes_are_refused():
    scores = planted(0)
    scores[1][1][2] = float("nan")
    for run in (lambda: select.top_k_exact(scores, 3), lambda: select.top_k_histogram(scores, 3, chunk=4)):
        with pytest.raises(ak.ConfigError, match="non-finite"):
            run()


def test_random_selection_is_seeded_distinct_exact_and_avoids_the_support():
    sizes = [(name, torch.Size(shape).numel()) for name, shape in SHAPES.items()]
    exclude = {"fc.weight": torch.arange(0, 35, 2), "emb.weight": torch.arange(10)}
    a = select.random_k(sizes, 50, seed=3, exclude=exclude)
    assert same(a, select.random_k(sizes, 50, seed=3, exclude=exclude))
    assert not same(a, select.random_k(sizes, 50, seed=4, exclude=exclude))
    assert sum(v.numel() for v in a.values()) == 50
    for name, idx in a.items():
        assert torch.equal(idx, idx.unique()) and int(idx.max()) < dict(sizes)[name]
        assert not set(idx.tolist()) & set(exclude.get(name, torch.empty(0)).tolist())
    everything = select.random_k(sizes, 117 - 28, seed=0, exclude=exclude)  # every free entry
    assert sum(v.numel() for v in everything.values()) == 89


def test_k_formula_reproduces_the_ranking_and_language_budgets():
    table = {1: 14_174_208, 2: 7_091_712, 4: 3_550_464, 8: 1_779_840, 16: 894_528, 32: 451_872}
    assert {rf: ak.sft.match_adapter(768, rf, 12) for rf in table} == table
    assert ak.sft.match_adapter(768, 2, 12, invertible=True) == 7_387_776
    assert ak.sft.match_adapter(768, 2, 12, invertible=True) - ak.sft.match_adapter(768, 2, 12) == 296_064
    with pytest.raises(ak.ConfigError):
        ak.sft.match_adapter(768, 0, 12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of k"),
    (dict(k=10, density=0.1), "exactly one of k"),
    (dict(density=0.0), r"density must be in \(0, 1\]"),
    (dict(density=1.5), r"density must be in \(0, 1\]"),
    (dict(k=0), "positive integer"),
    (dict(k=True), "positive integer"),
    (dict(k=5, selection="best"), "selection must be"),
    (dict(k=5, iterations=6), "iterations"),
    (dict(k=5, tensors=("weight", "")), "tensors"),
    (dict(k=5, l1=-1.0), "l1"),
    (dict(k=5, full_steps=0), "full_steps >= 1"),
])
def test_bad_configs_raise_config_errors(kwargs, match):
    with pytest.raises(ak.ConfigError, match=match):
        ak.SFTConfig(target_modules="bert", **kwargs)


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(1, 100, (4, 7), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def test_impossible_budgets_and_bad_attach_calls_leave_the_model_unchanged(tiny_bert):
    before = snapshot(tiny_bert)
    total = sum(p.numel() for p in tiny_bert.bert.parameters())
    calls = [
        (lambda: ak.attach(tiny_bert, ak.SFTConfig(k=total + 1, target_modules="bert"), "a", calibration=_batches()),
         f"exceeds the {total} entries"),
        (lambda: ak.attach(tiny_bert, ak.SFTConfig(k=5, target_modules="bert"), "a"), "calibration=batches"),
        (lambda: ak.attach(tiny_bert, ak.SFTConfig(k=5, target_modules="bert", selection="random"), "a",
                           calibration=_batches()), "uses no calibration"),
        (lambda: ak.attach(tiny_bert, ak.SFTConfig(k=5, target_modules="bert", full_steps=3), "a",
                           calibration=_batches() + [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}]), "loss"),
        (lambda: ak.attach(tiny_bert, ak.SFTConfig(k=5, target_modules="bert", full_steps=3), "a",
                           calibration=_batches() + [{"input_ids": torch.zeros(2, 300, dtype=torch.long)}]),
         "sft dense phase failed.*step 2"),
        (lambda: ak.attach(tiny_bert, ak.SFTConfig(k=5, target_modules="bert"), "a", calibration=_batches(), mask=1),
         "takes the attach options"),
        (lambda: ak.attach(tiny_bert, ak.SFTConfig(k=5, target_modules="bert.encoder.layer.0.output.LayerNorm",
                                                   freeze_norms=True, selection="random"), "a"), "freeze_norms"),
    ]
    for call, match in calls:
        with pytest.raises(ak.AdapterError, match=match):
            call()
        assert_unchanged(tiny_bert, before)


def test_tied_embeddings_are_refused(tiny_llama):
    tiny_llama.lm_head.weight = tiny_llama.model.embed_tokens.weight
    with pytest.raises(ak.ConfigError, match="tied"):
        ak.attach(tiny_llama, ak.SFTConfig(k=5, target_modules="model.embed_tokens", selection="random"), "a")


def test_attach_selects_the_global_top_k_of_the_dense_phase_over_every_kind_of_tensor(tiny_bert, monkeypatch):
    """Phase 1 by hand on a twin (AdamW, same dropout draws), then the brute-force global top-K of
    |Δ| over embeddings, LayerNorms, weights and biases: exactly the attached support, on both paths."""
    batches, k, steps, lr = _batches(3), 6000, 3, 1e-2
    config = ak.SFTConfig(k=k, target_modules="bert", full_steps=steps, full_lr=lr)
    twin = copy.deepcopy(tiny_bert)
    params = [(f"{path}.{t}", p) for path, module in twin.named_modules() if path.startswith("bert")
              for t, p in module.named_parameters(recurse=False)]
    start = [p.detach().clone() for _, p in params]
    twin.requires_grad_(False)
    for _, p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0)
    twin.train()
    torch.manual_seed(11)
    for i in range(steps):
        twin(**batches[i % 3]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    scores = [(name, (p.detach() - s).abs()) for (name, p), s in zip(params, start)]
    expected = brute_force(scores, k)
    kinds = {name.split(".")[-2] for name in expected} | {name.split(".")[-1] for name in expected}
    assert {"word_embeddings", "LayerNorm", "weight", "bias"} <= kinds  # the budget really is global
    for limit in (select.EXACT_LIMIT, 0):
        monkeypatch.setattr(select, "EXACT_LIMIT", limit)
        monkeypatch.setattr(select, "CHUNK", 1000)
        torch.manual_seed(11)
        ak.attach(tiny_bert, config, "a", calibration=batches)
        layers = ak.core.state.get_state(tiny_bert).layers("a")
        got = {f"{path}.{t}": idx for path, layer in layers for t, idx in layer.supports().items()}
        assert same(got, expected)
        ak.detach(tiny_bert, "a")


def test_a_callable_selection_sees_every_change_and_its_masks_are_checked(tiny_bert):
    seen = {}

    def first_entries(changes, k):
        seen.update({name: (tuple(v.shape), bool((v >= 0).all())) for name, v in changes.items()})
        masks = {name: torch.zeros_like(v, dtype=torch.bool) for name, v in changes.items()}
        masks["bert.embeddings.LayerNorm.bias"][:k] = True
        return masks

    config = ak.SFTConfig(k=4, target_modules="bert.embeddings", selection=first_entries, full_steps=1, full_lr=1e-2)
    ak.attach(tiny_bert, config, "a", calibration=_batches())
    assert seen["bert.embeddings.word_embeddings.weight"] == ((100, 32), True) and len(seen) == 5
    layer = ak.core.state.get_state(tiny_bert).wrappers["bert.embeddings.LayerNorm"].layer("a")
    assert layer.delta_tensors() == ("bias",) and torch.equal(layer.part("bias").indices, torch.arange(4))
    assert ak.config_of(tiny_bert, "a").to_dict()["selection"].startswith("custom:")
    before = snapshot(tiny_bert)
    for bad in (lambda c, k: {n: torch.ones_like(v, dtype=torch.bool) for n, v in c.items()},  # more than k
                lambda c, k: {"nope": torch.ones(1, dtype=torch.bool)},
                lambda c, k: [1]):
        with pytest.raises(ak.ConfigError, match="selection function"):
            ak.attach(tiny_bert, config.replace(selection=bad), "b", calibration=_batches())
        assert_unchanged(tiny_bert, before)

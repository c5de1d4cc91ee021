"""LT-SFT training: the lottery-ticket rewind, phase 2 touching only the K chosen entries (any
optimizer) while the head trains densely, equivalence with dense gradient-masked training, L1 once
per optimizer step, training on top of another SFT, iterative LT-SFT, rollback on failure."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from torch import nn

import adapterkit as ak
from adapterkit.core.state import get_state
from adapterkit.methods.sft import train as sft_train


def batches(n: int = 3, seed: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 100, (4, 7), generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]


def base_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base parameter and buffer by its plain name (adapters left out, wrappers see through)."""
    out = {}
    for key, value in model.state_dict().items():
        if ".adapters." in key or "adapterkit_model_adapters" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.clone()
    return out


def same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def supports(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {f"{path}.{t}": idx.clone() for path, layer in get_state(model).layers(name) if hasattr(layer, "supports")
            for t, idx in layer.supports().items()}


def config(**overrides) -> ak.SFTConfig:
    values = dict(k=1500, target_modules="bert", modules_to_save=["classifier"], full_steps=3, full_lr=1e-2,
                  sparse_steps=4)
    values.update(overrides)
    return ak.SFTConfig(**values)


def test_phase_one_trains_the_model_and_the_rewind_is_bit_identical(tiny_bert):
    tiny_bert.requires_grad_(False)  # as after attaching: detaching then shows everything else is back
    before, values = snapshot(tiny_bert), base_values(tiny_bert)
    ak.attach(tiny_bert, config(), "sft", calibration=batches())
    record = ak.sft.outcome(tiny_bert, "sft")
    assert record["k"] == 1500 and record["iterations"][0]["threshold"] > 0  # the dense phase moved entries
    assert same_values(base_values(tiny_bert), values)
    ak.detach(tiny_bert, "sft")
    assert_unchanged(tiny_bert, before)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
], ids=["sgd", "adam", "adamw-decay"])
def test_phase_two_moves_only_the_chosen_entries_and_the_head_trains_densely(tiny_bert, make):
    ak.attach(tiny_bert, config(), "sft", calibration=batches())
    theta0, chosen = base_values(tiny_bert), supports(tiny_bert, "sft")
    head = get_state(tiny_bert).wrappers["classifier"].layer("sft").module
    head_before = copy.deepcopy(head.state_dict())
    optimizer = make(list(ak.adapter_parameters(tiny_bert, "sft")))
    tiny_bert.train()
    for batch in batches(6):
        optimizer.zero_grad()
        loss = tiny_bert(**batch).loss
        loss.backward()
        nn.utils.clip_grad_norm_(ak.adapter_parameters(tiny_bert, "sft"), 1.0)
        optimizer.step()
    tiny_bert.eval()
    assert same_values(base_values(tiny_bert), theta0)  # the base itself never moves
    ak.fuse(tiny_bert)
    fused = base_values(tiny_bert)
    moved = 0
    for name, value in theta0.items():
        flat, original = fused[name].reshape(-1), value.reshape(-1)
        inside = torch.zeros_like(original, dtype=torch.bool)
        if name in chosen:
            inside[chosen[name]] = True
        assert torch.equal(flat[~inside], original[~inside]), name  # outside the mask: θ₀ bit for bit
        moved += int((flat[inside] != original[inside]).sum())
    assert moved > 0.9 * 1500
    for key, value in head.state_dict().items():  # the head is a dense copy: every entry trained
        assert (value != head_before[key]).float().mean() > 0.95, key
    ak.unfuse(tiny_bert)
    assert same_values(base_values(tiny_bert), theta0)


def test_ak_train_runs_phase_two_with_the_method_default_rate_and_leaves_the_base_alone(tiny_bert):
    ak.attach(tiny_bert, config(k=3000), "sft", calibration=batches())
    theta0 = base_values(tiny_bert)
    losses = ak.train(tiny_bert, batches(3) * 4, lr=3e-2, progress=False, weight_decay=0.1)
    assert losses[-1] < losses[0] and same_values(base_values(tiny_bert), theta0)
    assert ak.get_method("sft").default_learning_rate == 5e-5


def test_sparse_phase_two_equals_dense_gradient_masked_training_and_holds_2k_optimizer_state(tiny_llama):
    ids = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2]} for i in range(2)]
    twin = copy.deepcopy(tiny_llama)
    cfg = ak.SFTConfig(k=4000, target_modules="model", selection="random", seed=3)
    ak.attach(tiny_llama, cfg, "sft")
    chosen, k = supports(tiny_llama, "sft"), 4000
    params = dict(twin.named_parameters())
    masks = {name: torch.zeros(p.numel(), dtype=torch.bool) for name, p in params.items()}
    for name, idx in chosen.items():
        masks[name][idx] = True
    twin.requires_grad_(False)
    for name in chosen:
        params[name].requires_grad_(True)
    sparse_opt = torch.optim.SGD(ak.adapter_parameters(tiny_llama, "sft"), lr=0.3)
    dense_opt = torch.optim.SGD([params[n] for n in chosen], lr=0.3)
    for step in range(8):
        for model, optimizer in ((tiny_llama, sparse_opt), (twin, dense_opt)):
            optimizer.zero_grad()
            model(**data[step % 2]).loss.backward()
            if model is twin:  # composable-sft's phase 2: dense gradients multiplied by the mask
                for name in chosen:
                    params[name].grad.mul_(masks[name].view(params[name].shape))
            optimizer.step()
    ak.fuse(tiny_llama)
    fused = base_values(tiny_llama)
    for name, p in params.items():
        torch.testing.assert_close(fused[name], p.detach(), rtol=0, atol=1e-6)
    assert sum(int((fused[n].reshape(-1)[chosen[n]] != 0).sum()) for n in chosen) > 0
    adam = torch.optim.AdamW(ak.adapter_parameters(tiny_llama, "sft"), lr=1e-3)
    ak.unfuse(tiny_llama)
    tiny_llama(**data[0]).loss.backward()
    adam.step()
    state = sum(s[key].numel() for s in adam.state.values() for key in ("exp_avg", "exp_avg_sq"))
    assert state == 2 * k


def test_the_l1_term_counts_once_per_optimizer_step_with_gradient_accumulation(tiny_bert):
    ak.attach(tiny_bert, config(k=300, modules_to_save=None, selection="random"), "sft")
    randomise(tiny_bert, "sft", seed=1, scale=0.05)
    values = [p for p in ak.adapter_parameters(tiny_bert, "sft")]
    start = [v.detach().clone() for v in values]
    data, lam, accumulation = batches(3), 50.0, 3
    n_base = sum(p.numel() for n, p in tiny_bert.named_parameters() if ".adapters." not in n)
    penalty = ak.sft.l1_penalty(tiny_bert, "sft")
    torch.testing.assert_close(penalty, sum(v.detach().abs().sum() for v in start) / n_base)
    # the reference gradient: the mean of the micro-batch gradients plus λ·sign(v)/N once
    tiny_bert.eval()
    grads, total = [torch.zeros_like(v) for v in values], lam * penalty.item()
    for batch in data:
        loss = tiny_bert(**batch).loss / accumulation
        total += loss.item()
        for g, d in zip(grads, torch.autograd.grad(loss, values, allow_unused=True)):
            g += 0 if d is None else d
    once = [g + lam * torch.sign(s) / n_base for g, s in zip(grads, start)]
    thrice = [g + 3 * lam * torch.sign(s) / n_base for g, s in zip(grads, start)]
    optimizer = torch.optim.SGD(values, lr=1.0)
    losses = sft_train.run_steps(tiny_bert, optimizer, iter(data), 1, accumulation, None,
                                 lambda: lam * ak.sft.l1_penalty(tiny_bert, "sft"), progress=False)
    moved = [s - v.detach() for s, v in zip(start, values)]
    for m, g, wrong in zip(moved, once, thrice):
        torch.testing.assert_close(m, g, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(m, w, atol=1e-7) for m, w in zip(moved, thrice))
    assert len(losses) == 1 and losses[0] == pytest.approx(total, rel=1e-6)  # the step's loss holds λ·L1 once


def test_an_sft_trained_on_top_of_another_sees_it_in_both_phases(tiny_bert):
    """Task SFT on base + language SFT (active, unfused) == task SFT on a model whose weights hold
    the language SFT: same support (K chosen relative to base + Δ_lang), same trained values."""
    ak.attach(tiny_bert, ak.SFTConfig(k=3000, target_modules="bert", selection="random", seed=1), "lang")
    randomise(tiny_bert, "lang", seed=2, scale=0.3)
    lang_values = [p.detach().clone() for p in ak.adapter_parameters(tiny_bert, "lang")]
    merged = ak.merge_and_unload(copy.deepcopy(tiny_bert))
    plain = copy.deepcopy(tiny_bert)
    ak.detach(plain, "lang")
    cfg = config(k=800, sparse_steps=3)
    results = {}
    for label, model in (("on_top", tiny_bert), ("merged", merged), ("plain", plain)):
        torch.manual_seed(0)
        results[label] = (ak.sft.train_sft(model, cfg, "task", batches(), lr=1e-2, progress=False),
                          supports(model, "task"), [p.detach().clone() for p in ak.adapter_parameters(model, "task")])
    assert ak.active_adapters(tiny_bert) == [("lang", 1.0), ("task", 1.0)]
    on_top, merged_run, plain_run = results["on_top"], results["merged"], results["plain"]
    assert on_top[1].keys() == merged_run[1].keys() and all(torch.equal(on_top[1][k], merged_run[1][k]) for k in on_top[1])
    for a, b in zip(on_top[2], merged_run[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(on_top[0]), torch.tensor(merged_run[0]), rtol=1e-5, atol=1e-6)
    assert any(k not in plain_run[1] or not torch.equal(on_top[1][k], plain_run[1][k]) for k in on_top[1])
    assert all(torch.equal(a, b.detach()) for a, b in zip(lang_values, ak.adapter_parameters(tiny_bert, "lang")))


def test_iterative_lt_sft_grows_the_support_to_exactly_k_keeping_trained_values(tiny_bert):
    seen = []
    base = tiny_bert.bert.encoder.layer[0].output.dense.weight  # stays the base weight once wrapped

    def loss_fn(model, batch):
        seen.append((tuple(n for n, _ in ak.active_adapters(model)), base.requires_grad))
        return model(**batch).loss

    theta0 = base_values(tiny_bert)
    cfg = config(k=1000, iterations=3, full_steps=2, sparse_steps=2)
    ak.sft.train_sft(tiny_bert, cfg, "sft", batches(), loss_fn=loss_fn, lr=1e-2, progress=False)
    record = ak.sft.outcome(tiny_bert, "sft")
    assert [it["new"] for it in record["iterations"]] == [334, 333, 333] and record["k"] == 1000
    assert sum(idx.numel() for idx in supports(tiny_bert, "sft").values()) == 1000
    assert ak.config_of(tiny_bert, "sft").outcome["k"] == 1000
    # phases in order: dense (base trainable), sparse, then each later dense phase runs with the diff active
    dense = [i for i, (_, trainable) in enumerate(seen) if trainable]
    assert len(dense) == 3 * 2 and all(seen[i][0] == ("sft",) for i in dense[2:])
    assert same_values(base_values(tiny_bert), theta0)
    values = torch.cat([p.detach().reshape(-1) for n, p in get_state(tiny_bert).wrappers["bert.embeddings.word_embeddings"]
                        .layer("sft").named_parameters()])
    assert values.numel() == 0 or (values != 0).any()


def test_iterations_keep_the_earlier_support_and_its_trained_values(tiny_bert):
    cfg = config(k=600, iterations=2, full_steps=2, sparse_steps=3, selection="random")
    ak.attach(tiny_bert, cfg.replace(iterations=1, k=300), "probe")
    first = supports(tiny_bert, "probe")  # the seeded random draw of iteration 0 (same name: same seed)
    ak.detach(tiny_bert, "probe")
    ak.sft.train_sft(tiny_bert, cfg, "probe", batches(), lr=1e-2, progress=False)
    final = supports(tiny_bert, "probe")
    assert all(set(first[k].tolist()) <= set(final[k].tolist()) for k in first)
    assert sum(v.numel() for v in final.values()) == 600


def test_a_failing_train_sft_leaves_the_model_as_it_was(tiny_bert):
    ak.attach(tiny_bert, ak.SFTConfig(k=50, target_modules="bert", selection="random"), "lang")
    before = snapshot(tiny_bert)
    bad = batches(2) + [{"input_ids": torch.zeros(2, 300, dtype=torch.long)}]
    with pytest.raises(ak.ConfigError, match="sparse phase failed"):
        ak.sft.train_sft(tiny_bert, config(full_steps=2, sparse_steps=5), "task", bad, lr=1e-2, progress=False)
    assert_unchanged(tiny_bert, before)
    with pytest.raises(ak.ConfigError, match="lr"):
        ak.sft.train_sft(tiny_bert, config(), "task", batches(), lr=0.0)
    ak.fuse(tiny_bert)
    before = snapshot(tiny_bert)
    with pytest.raises(ak.FusedStateError):
        ak.sft.train_sft(tiny_bert, config(), "task", batches())
    assert_unchanged(tiny_bert, before)

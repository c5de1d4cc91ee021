"""DyLoRA: the truncated forward, which components get gradient, rank sampling, and the paper's
behaviour on a linear teacher–student problem (spec: shared/docs/methods/dylora.md §2, §3, §11)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.methods.dylora import DyLoRALayer
from adapterkit.core.state import get_state


def dylora_mlp(**config) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    ak.attach(model, ak.DyLoRAConfig(**{"r_max": 6, "target_modules": ["0", "2"], "init": "random", **config}), "d")
    return model


def layers(model: nn.Module, name: str = "d") -> dict[str, DyLoRALayer]:
    return dict(get_state(model).layers(name))


def reference(model: nn.Module, x: torch.Tensor, rank: int, scale) -> torch.Tensor:
    """The spec's equation, layer by layer: W₀x + s(b) · B[:, :b] A[:b] x."""
    h = x
    for i, module in enumerate(model):
        if hasattr(module, "base_layer"):
            layer = module.layer("d")
            delta = layer.lora_B[:, :rank] @ layer.lora_A[:rank] * scale(rank)
            h = F.linear(h, module.base_layer.weight + delta, module.base_layer.bias)
        else:
            h = module(h)
    return h


@pytest.mark.parametrize("scaling", ["alpha_over_b", "alpha_over_rmax"])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_forward_at_rank_b_is_the_truncated_adapter_and_ignores_later_components(scaling, rank):
    model = dylora_mlp(scaling=scaling, alpha=12.0).eval()
    ak.set_rank(model, rank)
    x = torch.randn(5, 12)
    scale = (lambda b: 12.0 / b) if scaling == "alpha_over_b" else (lambda b: 12.0 / 6)
    out = model(x)
    torch.testing.assert_close(out, reference(model, x, rank, scale), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for layer in layers(model).values():
            layer.lora_A[rank:] += 5.0
            layer.lora_B[:, rank:] -= 3.0
    assert torch.equal(model(x), out)  # components > b take no part


def test_training_mode_uses_the_drawn_rank_and_eval_mode_the_inference_rank():
    model = dylora_mlp()
    ak.set_rank(model, 2)
    x = torch.randn(4, 12)
    for layer in layers(model).values():
        layer.train_rank = 5
    model.train()
    train_out = model(x)
    model.eval()
    torch.testing.assert_close(train_out, reference(model, x, 5, lambda b: 16.0 / b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), reference(model, x, 2, lambda b: 16.0 / b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("rank", [1, 4, 6])
def test_gradient_reaches_component_b_only_when_frozen_and_components_1_to_b_otherwise(frozen, rank):
    model = dylora_mlp(frozen=frozen).train()
    for layer in layers(model).values():
        layer.train_rank = rank
    model(torch.randn(7, 12)).square().sum().backward()
    for path, layer in layers(model).items():
        rows_a = layer.lora_A.grad.abs().sum(dim=1) > 0
        cols_b = layer.lora_B.grad.abs().sum(dim=0) > 0
        expected = torch.zeros(6, dtype=torch.bool)
        if frozen:
            expected[rank - 1] = True
        else:
            expected[:rank] = True
        assert torch.equal(rows_a, expected), (path, rows_a)
        assert torch.equal(cols_b, expected), (path, cols_b)


def test_uniform_sampling_is_uniform_seeded_and_global_across_layers():
    model = dylora_mlp(r_min=2, r_max=7, seed=3)
    draws = []
    for _ in range(10_000):
        ak.step(model)
        ranks = {layer.train_rank for layer in layers(model).values()}
        assert len(ranks) == 1  # global scope: one rank for every layer
        draws.append(ranks.pop())
    counts = collections.Counter(draws)
    assert set(counts) == set(range(2, 8))
    expected = len(draws) / 6
    chi2 = sum((counts[b] - expected) ** 2 / expected for b in range(2, 8))
    assert chi2 < 20.5  # 5 degrees of freedom: p ≈ 0.001
    again = dylora_mlp(r_min=2, r_max=7, seed=3)
    replay = []
    for _ in range(200):
        ak.step(again)
        replay.append(layers(again)["0"].train_rank)
    assert replay == draws[:200]  # same seed and name: same sequence
    other = dylora_mlp(r_min=2, r_max=7, seed=4)
    other_draws = []
    for _ in range(200):
        ak.step(other)
        other_draws.append(layers(other)["0"].train_rank)
    assert other_draws != draws[:200]


def test_geometric_sampling_favours_small_ranks_and_per_layer_scope_draws_per_layer():
    model = dylora_mlp(distribution="geometric", geometric_p=0.5, scope="per_layer")
    per_layer = {"0": [], "2": []}
    for _ in range(4000):
        ak.step(model)
        for path, layer in layers(model).items():
            per_layer[path].append(layer.train_rank)
    assert per_layer["0"] != per_layer["2"]
    counts = collections.Counter(per_layer["0"])
    probabilities = ak.config_of(model, "d").rank_probabilities()
    for b, p in zip(range(1, 7), probabilities):
        assert abs(counts[b] / 4000 - p) < 0.03, (b, counts[b] / 4000, p)
    assert probabilities[0] > 2 * probabilities[1] - 1e-9 and counts[1] > counts[3] > counts[6]


def test_adapters_with_the_same_seed_but_different_names_draw_different_ranks():
    model = dylora_mlp()
    ak.attach(model, ak.DyLoRAConfig(r_max=6, target_modules=["0", "2"]), "e")
    ak.activate(model, ["d", "e"])
    seen = []
    for _ in range(100):
        ak.step(model)
        seen.append((layers(model, "d")["0"].train_rank, layers(model, "e")["0"].train_rank))
    assert any(a != b for a, b in seen)


def test_ak_train_draws_a_rank_every_step():
    model = dylora_mlp()
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(module.layer("d").train_rank))
    batches = [{"x": torch.randn(8, 12)} for _ in range(30)]
    wrapped = nn.Module()
    wrapped.net = model
    wrapped.forward = lambda x: model(x).square().mean()
    ak.train(wrapped, batches, lr=1e-3, progress=False)
    assert len(seen) == 30 and len(set(seen)) > 3


def test_trainer_draws_once_per_optimizer_step_and_micro_batches_share_it(tiny_bert, tmp_path):
    from transformers import TrainingArguments

    ak.attach(tiny_bert, ak.DyLoRAConfig(r_max=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    query = tiny_bert.bert.encoder.layer[0].attention.self.query
    seen = []
    query.register_forward_pre_hook(lambda module, args: seen.append(module.layer("default").train_rank))
    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 100, (6,)), "labels": torch.tensor(i % 3)} for i in range(48)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=3,
                             num_train_epochs=1, learning_rate=1e-3, save_strategy="no", logging_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True)
    ak.AdapterTrainer(model=tiny_bert, args=args, train_dataset=rows).train()
    steps = [seen[i:i + 3] for i in range(0, len(seen), 3)]
    assert len(steps) == 4 and all(len(set(s)) == 1 for s in steps)  # micro-batches of a step share b
    assert len({s[0] for s in steps}) > 1 or len(seen) == 12


def _teacher_student(r_max: int = 8, steps: int = 4000, lr: float = 5e-3, **dylora):
    """The spec's §3 check: ΔW* = U diag(2·0.7^i) Vᵀ on 32×32; returns a fitter and the optimum."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    s = 2 * 0.7 ** torch.arange(32, dtype=torch.float32)
    target = u @ torch.diag(s) @ v.T
    optimum = {b: float((s[b:] ** 2).sum()) for b in (1, 2, 4, 8)}

    def fit(config) -> dict[int, float]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(32, 32, bias=False))
        nn.init.zeros_(model[0].weight)
        ak.attach(model, config)
        optimizer = torch.optim.Adam(ak.adapter_parameters(model, "default"), lr=lr)
        data = torch.Generator().manual_seed(2)
        model.train()
        for _ in range(steps):
            ak.step(model)
            x = torch.randn(64, 32, generator=data)
            loss = (model(x) - x @ target.T).square().sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        errors = {}
        for b in (1, 2, 4, 8):
            layer = model[0].layer("default")
            scale = layer.config.scale_at(b) if isinstance(layer, DyLoRALayer) else layer.scaling  # LoRA: keeps α/r
            delta = layer.lora_B[:, :b] @ layer.lora_A[:b] * scale
            errors[b] = float((delta.detach() - target).square().sum())
        return errors

    return fit, optimum


def test_dylora_degrades_gracefully_where_truncated_lora_collapses():
    """Spec §11: with α/b, DyLoRA's error falls monotonically in b and is ≤ 0.6× a truncated LoRA's at
    b = 1, 2, 4; frozen DyLoRA at b = 1 is within 5% of the rank-1 optimum."""
    fit, optimum = _teacher_student()
    lora = fit(ak.LoRAConfig(r=8, alpha=16, target_modules=["0"]))
    dylora = fit(ak.DyLoRAConfig(r_max=8, alpha=16, target_modules=["0"]))
    assert dylora[1] > dylora[2] > dylora[4] > dylora[8]
    for b in (1, 2, 4):
        assert dylora[b] <= 0.6 * lora[b], (b, dylora[b], lora[b])
    assert dylora[1] <= 1.05 * optimum[1], (dylora[1], optimum[1])


def test_constant_scaling_nests_like_a_truncated_svd():
    """Spec §3/§11: with α/r_max DyLoRA is within ~30% of the Eckart–Young optimum at b = 1, 2, 4. Rank 8
    is drawn in only 1/8 of this shortened run's steps (4k, the spec used 20k), so there we assert it is
    within 0.1 of the optimum (1.3% of ‖ΔW*‖² = 7.84), where α/b stays near 1.0 by design."""
    fit, optimum = _teacher_student()
    dylora = fit(ak.DyLoRAConfig(r_max=8, alpha=16, scaling="alpha_over_rmax", target_modules=["0"]))
    for b in (1, 2, 4):
        assert dylora[b] <= 1.3 * optimum[b], (b, dylora[b], optimum[b])
    assert dylora[8] <= optimum[8] + 0.1, dylora[8]

"""SHiRA training and switching: frozen entries never move, gradients match a dense reference, fusing is exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.core.state import get_state
from conftest import randomise

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor under its original name."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}


def layers(model: nn.Module, name: str) -> dict:
    return dict(get_state(model).layers(name))


# -- the untouched-entries invariant --------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw-decay": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("mask", ["rand", "wm"])
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS)
def test_training_never_moves_an_entry_outside_the_mask(make_optimizer, mask, tiny_llama, token_ids):
    """Even with every model parameter handed to the optimizer (momentum, decoupled decay), base tensors stay
    bit-identical; fused, each weight differs from the base in exactly its nnz masked entries."""
    original = base_tensors(tiny_llama)
    ak.attach(tiny_llama, ak.ShiraConfig(r=2, mask=mask, target_modules=LLAMA_TARGETS), "a")
    tiny_llama.train()
    optimizer = make_optimizer(tiny_llama.parameters())
    for _ in range(3):
        optimizer.zero_grad()
        tiny_llama(input_ids=token_ids, labels=token_ids).loss.backward()
        optimizer.step()
    after = base_tensors(tiny_llama)
    assert after.keys() == original.keys()
    assert all(torch.equal(after[k], original[k]) for k in original)
    for path, layer in layers(tiny_llama, "a").items():
        assert layer.values.detach().ne(0).all(), path  # every trainable entry moved
    ak.fuse(tiny_llama)
    for path, layer in layers(tiny_llama, "a").items():
        weight = tiny_llama.get_submodule(path).weight
        changed = (weight != original[f"{path}.weight"]).view(-1)
        assert int(changed.sum()) == layer.nnz, path
        assert torch.equal(changed.nonzero().view(-1), layer.indices), path
    ak.unfuse(tiny_llama)
    assert all(torch.equal(v, original[k]) for k, v in base_tensors(tiny_llama).items())


def test_optimizer_state_is_proportional_to_nnz(tiny_llama, token_ids):
    """Adam keeps exp_avg/exp_avg_sq of nnz entries per layer (Lemma 4.1), never a dense weight-sized state."""
    ak.attach(tiny_llama, ak.ShiraConfig(density=0.02, target_modules=LLAMA_TARGETS), "a")
    optimizer = torch.optim.Adam(tiny_llama.parameters(), lr=1e-3)
    tiny_llama(input_ids=token_ids, labels=token_ids).loss.backward()
    optimizer.step()
    shira = layers(tiny_llama, "a")
    assert set(map(id, optimizer.state)) == {id(layer.values) for layer in shira.values()}
    for layer in shira.values():
        state = optimizer.state[layer.values]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == layer.nnz < layer.shape[0] * layer.shape[1]
    nnz = sum(layer.nnz for layer in shira.values())
    assert ak.trainable_parameters(tiny_llama)[0] == nnz
    assert all(p.grad is None for n, p in tiny_llama.named_parameters() if ".adapters." not in n)


# -- gradients against a dense reference ----------------------------------------------------


def two_adapter_linear(dtype: torch.dtype, depth: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(24, 24) for _ in range(depth)]).to(dtype)
    targets = [str(i) for i in range(depth)]
    ak.attach(model, ak.ShiraConfig(density=0.2, target_modules=targets), "a")
    ak.attach(model, ak.ShiraConfig(density=0.3, mask="wm", target_modules=targets), "b")
    randomise(model, "a", seed=1)
    randomise(model, "b", seed=2)
    return model


def dense_reference(model: nn.Module, active: list[tuple[str, float]], x: torch.Tensor, grad_out: torch.Tensor):
    """fp32 autograd through W + Σ wᵢ·scatter(vᵢ): output, x grad and every adapter's values grad."""
    leaves = {(path, name): layer.values.detach().clone().requires_grad_(True)
              for name, _ in active for path, layer in layers(model, name).items()}
    h = x.detach().float().requires_grad_(True)
    out = h
    for i in range(len(model)):
        base = model[i].base_layer
        weight = base.weight.detach().float()
        for name, scale in active:
            idx = model[i].layer(name).indices
            weight = weight + scale * torch.zeros(weight.numel()).index_add(0, idx, leaves[str(i), name]).view(weight.shape)
        out = F.linear(out, weight, base.bias.detach().float())
    (out * grad_out.float()).sum().backward()
    return out.detach(), h.grad, {k: v.grad for k, v in leaves.items()}


CASES = {
    "solo": [("a", 1.0)],
    "solo-weighted": [("b", -0.7)],
    "two-active": [("a", 1.0), ("b", 1.0)],
    "two-weighted": [("a", 0.5), ("b", -1.5)],
}


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(5, 24), (2, 3, 24)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", CASES)
def test_sparse_autograd_matches_dense_reference(case, x_shape, dtype, depth):
    """forward_with_base (one active adapter) and delta_output (several) give the dense W + S result and gradients
    for x and values, for 2-D and 3-D inputs, fp32 and bf16 bases, and activation weights."""
    model = two_adapter_linear(dtype, depth)
    active = CASES[case]
    ak.activate(model, [n for n, _ in active], weights=[w for _, w in active])
    plan = model[0].plan
    assert (plan.solo is not None) == (len(active) == 1) and len(plan.deltas) == len(active)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*x_shape, generator=g).to(dtype).requires_grad_(True)
    grad_out = torch.randn(*x_shape[:-1], 24, generator=g).to(dtype)
    out = model(x)
    out.backward(grad_out)
    expected_out, expected_x, expected_v = dense_reference(model, active, x, grad_out)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    assert out.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(out.float(), expected_out, **tol)
    torch.testing.assert_close(x.grad.float(), expected_x, **tol)
    for (path, name), grad in expected_v.items():
        values = model.get_submodule(path).layer(name).values
        assert values.grad.dtype == torch.float32
        scale = grad.abs().max().item()
        torch.testing.assert_close(values.grad, grad, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))
    for i in range(depth):
        assert model[i].base_layer.weight.grad is None and model[i].base_layer.bias.grad is None


def test_inactive_adapter_gets_no_gradient():
    """Only active adapters take part: the inactive one's values get no gradient."""
    model = two_adapter_linear(torch.float32)
    ak.activate(model, "a")
    model(torch.randn(4, 24)).sum().backward()
    assert model[0].layer("a").values.grad is not None and model[0].layer("b").values.grad is None


# -- fusing and switching -------------------------------------------------------------------


def shira_pair(dtype=torch.float32, overlap: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 8)).to(dtype).eval()
    config = ak.ShiraConfig(density=0.1, mask="wm" if overlap else "rand", target_modules=["0", "2", "4"])
    ak.attach(model, config, "a")
    ak.attach(model, config.replace(target_modules=["2", "4"], density=0.05 if overlap else 0.1), "b")
    randomise(model, "a", seed=1)
    randomise(model, "b", seed=2)
    return model


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: model.get_submodule(p).weight.detach().clone() for p in ("0", "2", "4")}


def test_fused_output_matches_unfused_and_unfuse_is_exact():
    """Fusing one SHiRA adapter keeps outputs (≈) and unfusing restores outputs and weights bit-for-bit."""
    model = shira_pair()
    original = weights(model)
    x = torch.randn(6, 32)
    unfused = model(x)
    ak.fuse(model)
    assert ak.fused_adapters(model) == [("a", 1.0)] and not model[0].plan.deltas
    torch.testing.assert_close(model(x), unfused, rtol=1e-5, atol=1e-5)
    layer = model[2].layer("a")
    expected = original["2"].clone().view(-1).index_add_(0, layer.indices, layer.values.detach()).view(48, 48)
    assert torch.equal(model[2].weight, expected)  # W + S exactly, nothing else
    ak.unfuse(model)
    assert torch.equal(model(x), unfused)
    assert all(torch.equal(w, original[p]) for p, w in weights(model).items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfuse_is_bit_exact_after_1000_switches(dtype):
    """1,000 switches between two SHiRA adapters (with unfuse/fuse mixed in) leave zero drift; a switch lands
    exactly on W + S_b."""
    model = shira_pair(dtype)
    original = weights(model)
    ak.fuse(model, ["a"])
    for i in range(1000):
        ak.switch(model, "b" if i % 2 == 0 else "a")
        if i % 7 == 0:
            ak.unfuse(model)
            ak.fuse(model)
    ak.switch(model, "b")
    assert ak.fused_adapters(model) == [("b", 1.0)]
    for path in ("2", "4"):
        layer = model.get_submodule(path).layer("b")
        expected = original[path].clone().view(-1)
        expected[layer.indices] = (expected[layer.indices].float() + layer.values.detach()).to(dtype)
        assert torch.equal(model.get_submodule(path).weight.view(-1), expected), path
    assert torch.equal(model[0].weight, original["0"])  # b does not adapt layer 0
    ak.unfuse(model)
    assert all(torch.equal(w, original[p]) for p, w in weights(model).items())


def test_switching_reuses_gathered_originals_and_never_serves_stale_ones(monkeypatch):
    """While fused, each adapter's originals are gathered once and reused by later switches; after an unfuse
    (when the user may edit base weights, even through ``.data``) or a write by someone else, they are gathered
    again, so every fused weight is exactly the current base plus the delta."""
    model = shira_pair()
    original = weights(model)
    gathers = []
    real_index_select = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, *a: gathers.append(1) or real_index_select(t, *a))

    def expect(path: str, name: str, base: torch.Tensor) -> None:
        layer = model.get_submodule(path).layer(name)
        expected = base.clone().view(-1).index_add_(0, layer.indices, layer.values.detach()).view(base.shape)
        assert torch.equal(model.get_submodule(path).weight, expected)

    ak.fuse(model, ["a"])
    ak.switch(model, "b")
    gathers.clear()
    for name in ["a", "b"] * 5:
        ak.switch(model, name)
    assert not gathers  # every switch after the first visit writes from the cache
    with torch.no_grad():
        model[2].layer("a").values.add_(1.0)  # trained further while b is fused: the cache holds originals only
    ak.switch(model, "a")
    expect("2", "a", original["2"])
    ak.unfuse(model)
    model[2].weight.data.mul_(2.0)  # untracked by autograd's version counter
    edited = model[2].weight.detach().clone()
    ak.fuse(model, ["b"])
    ak.switch(model, "a")
    expect("2", "a", edited)
    ak.switch(model, "b")
    with torch.no_grad():
        model[2].weight.view(-1)[model[2].layer("b").indices] += 0.0  # a tracked write by someone else
    gathers.clear()
    ak.switch(model, "a")
    assert gathers  # the stale cache was dropped
    ak.unfuse(model)
    assert torch.equal(model[2].weight, edited)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_fuse_of_overlapping_adapters_adds(dtype):
    """Two wm adapters share their top entries: fusing with weights adds α₁v₁ + α₂v₂ there, equal to the unfused sum."""
    model = shira_pair(dtype, overlap=True)
    original = weights(model)
    a, b = model[2].layer("a"), model[2].layer("b")
    assert torch.isin(b.indices, a.indices).all()  # b's top 5% lies inside a's top 10%
    x = torch.randn(4, 32, dtype=dtype)
    ak.activate(model, ["a", "b"], weights=[0.5, -2.0])
    unfused = model(x)
    ak.fuse(model)
    delta = torch.zeros(48 * 48).index_add(0, a.indices, 0.5 * a.values.detach()).index_add(0, b.indices, -2.0 * b.values.detach())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(model[2].weight.float(), original["2"].float() + delta.view(48, 48), **tol)
    torch.testing.assert_close(model(x).float(), unfused.float(), **tol)
    ak.unfuse(model)
    assert all(torch.equal(w, original[p]) for p, w in weights(model).items())


def test_sparse_fuse_saves_only_the_touched_entries():
    """SHiRA-only fusing keeps the original values of the touched entries (the indices are the adapters' own), never a dense copy."""
    model = shira_pair()
    ak.fuse(model, ["a", "b"])
    for path in ("2", "4"):
        fusion = model.get_submodule(path).fusion()
        nnz = sum(model.get_submodule(path).layer(n).nnz for n in ("a", "b"))
        weight = model.get_submodule(path).weight
        assert fusion._host_copy is None
        assert fusion.host_bytes == nnz * 4 < weight.numel() * weight.element_size()  # original values only
    ak.unfuse(model, free_memory=True)
    assert all(model.get_submodule(p).host_bytes == 0 for p in ("0", "2", "4"))


def test_mixed_shira_and_lora_fuse_and_restore_exactly():
    """A SHiRA + LoRA active set fuses to the unfused outputs; switching SHiRA ↔ LoRA ↔ both restores exactly."""
    model = shira_pair()
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["0", "2"], init="random"), "lora")
    original = weights(model)
    x = torch.randn(4, 32)
    ak.activate(model, ["a", "lora"], weights=[0.8, 1.2])
    unfused = model(x)
    ak.fuse(model)
    torch.testing.assert_close(model(x), unfused, rtol=1e-5, atol=1e-5)
    for i in range(60):
        ak.switch(model, ("a", "lora", "b")[i % 3])
        if i % 5 == 0:
            ak.fuse(model, ["a", "lora", "b"], weights=[1.0, -0.5, 2.0])
    ak.fuse(model, ["a", "lora"], weights=[0.8, 1.2])
    torch.testing.assert_close(model(x), unfused, rtol=1e-5, atol=1e-5)
    ak.unfuse(model)
    assert all(torch.equal(w, original[p]) for p, w in weights(model).items())


def test_load_with_fuse_lands_in_fused_mode(tmp_path):
    """ak.load(..., fuse=True) folds the SHiRA adapter in: same outputs as the trained model, base restorable."""
    trained = shira_pair()
    x = torch.randn(4, 32)
    ak.activate(trained, "b")
    expected = trained(x)
    ak.save(trained, tmp_path, "b")
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 8)).eval()
    original = {p: fresh.get_submodule(p).weight.detach().clone() for p in ("0", "2", "4")}
    assert ak.load(fresh, tmp_path, fuse=True) == "b"
    assert ak.fused_adapters(fresh) == [("b", 1.0)] and not fresh[2].plan.deltas
    assert not torch.equal(fresh[2].weight, original["2"])
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    ak.unfuse(fresh)
    assert all(torch.equal(fresh.get_submodule(p).weight, w) for p, w in original.items())
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_leaves_a_plain_model_with_the_adapter_folded_in():
    """merge_and_unload removes the wrappers and keeps W + S."""
    model = shira_pair()
    x = torch.randn(3, 32)
    expected = model(x)
    plain = ak.merge_and_unload(copy.deepcopy(model))
    assert all(type(m) is not ak.AdaptedModule for m in plain.modules())
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)

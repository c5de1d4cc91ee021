"""MoSA: partitions, one-module-per-step training (both update modes), merge = mean of modules, the
consistency loss, files and errors (spec: shared/docs/methods/mosa.md §9)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, randomise, snapshot
from torch import nn

import adapterkit as ak
from adapterkit.io.safefiles import tensors_digest
from adapterkit.methods.mosa import MoSABottleneckLayer, MoSALoRALayer, SplitWeight, consistency_loss, partition
from adapterkit.core.state import get_state


def mosa_mlp(split: str = "up", base: str = "bottleneck", **config) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    if base == "bottleneck":
        base_config = ak.BottleneckConfig(bottleneck=8, style="parallel", activation="gelu", target_modules=["0", "2"])
    else:
        base_config = ak.LoRAConfig(r=4, alpha=8, target_modules=["0", "2"])
    ak.attach(model, ak.MoSAConfig(base=base_config, n_modules=4, split=split, **config), "m")
    return model


def splits(model: nn.Module) -> list[SplitWeight]:
    return [m for _, layer in get_state(model).layers("m") for m in layer.children() if isinstance(m, SplitWeight)]


@pytest.mark.parametrize("numel,n", [(100, 4), (101, 4), (7, 3), (4096, 2)])
def test_partition_is_disjoint_covering_and_balanced(numel, n):
    part = partition(numel, n, seed=5)
    counts = torch.bincount(part.long(), minlength=n)
    assert counts.sum() == numel and set(counts.tolist()) <= {numel // n, numel // n + 1}
    assert torch.equal(part, partition(numel, n, seed=5)) and not torch.equal(part, partition(numel, n, seed=6))


@pytest.mark.parametrize("split", ["up", "down", "both"])
@pytest.mark.parametrize("base", ["bottleneck", "lora"])
def test_one_tensor_of_values_per_split_matrix_with_independent_partitions(split, base):
    model = mosa_mlp(split, base)
    found = splits(model)
    assert len(found) == 2 * (2 if split == "both" else 1)
    for s in found:
        assert sum(v.numel() for v in s.values) == s.initial.numel()  # not N dense copies
    assert len({s.part.flatten()[:16].tolist().__str__() for s in found}) == len(found)


@pytest.mark.parametrize("update", ["never", "legacy"])
@pytest.mark.parametrize("base", ["bottleneck", "lora"])
def test_each_step_updates_only_the_chosen_module_unless_legacy_momentum_moves_the_rest(update, base):
    model = mosa_mlp("up", base, update_unselected=update).train()
    optimizer = torch.optim.AdamW(list(ak.adapter_parameters(model, "m")), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 12)
    for step in range(6):
        ak.step(model)
        chosen = [s.selected for s in splits(model)]
        before = [[v.detach().clone() for v in s.values] for s in splits(model)]
        optimizer.zero_grad()
        model(x).square().mean().backward()
        for s, k in zip(splits(model), chosen):
            grads = [v.grad for v in s.values]
            assert grads[k] is not None and grads[k].abs().sum() > 0
            others = [g for j, g in enumerate(grads) if j != k]
            assert all(g is None for g in others) if update == "never" else all(g is not None and not g.any() for g in others)
        optimizer.step()
        for s, k, old in zip(splits(model), chosen, before):
            moved = [not torch.equal(v, o) for v, o in zip(s.values, old)]
            assert moved[k]
            if update == "never":
                assert not any(m for j, m in enumerate(moved) if j != k)  # nothing else changes
    if update == "legacy":  # stale momentum and decay: after several steps, unchosen modules still move
        ak.step(model)
        s = splits(model)[0]
        old = [v.detach().clone() for v in s.values]
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        assert sum(not torch.equal(v, o) for v, o in zip(s.values, old)) > 1


def test_choices_are_seeded_per_layer_and_exactly_one_module_runs():
    a, b = mosa_mlp(seed=3), mosa_mlp(seed=3)
    seq_a, seq_b = [], []
    for _ in range(20):
        ak.step(a)
        ak.step(b)
        seq_a.append([s.selected for s in splits(a)])
        seq_b.append([s.selected for s in splits(b)])
    assert seq_a == seq_b and len({tuple(c) for c in seq_a}) > 1
    assert any(c[0] != c[1] for c in seq_a)  # layers choose independently
    model = mosa_mlp()
    randomise(model, "m", seed=1, scale=0.3, add=True)
    model.train()
    layer = model[2].layer("m")
    x = torch.randn(3, 16)
    for k in range(4):
        layer.up.selected = k
        weight, bias = layer.up.module_weight(k)
        expected = x + F.linear(F.gelu(layer.down(x)), weight, bias)
        torch.testing.assert_close(layer.adapt(x, x, 1.0), expected)


@pytest.mark.parametrize("base", ["bottleneck", "lora"])
def test_merge_is_the_mean_of_the_module_outputs_with_a_plain_adapters_shapes(base, tmp_path):
    model = mosa_mlp("up", base)
    randomise(model, "m", seed=1, scale=0.3, add=True)
    x = torch.randn(7, 12)
    outs = []
    model.train()
    for k in range(4):
        for s in splits(model):
            s.selected = k
        layer_outputs = []
        for path in ("0", "2"):
            layer = getattr(model, path).layer("m")
            inp = torch.randn(7, getattr(model, path).base_layer.in_features, generator=torch.Generator().manual_seed(9))
            base_out = getattr(model, path).base_layer(inp)
            out = layer.adapt(inp, base_out, 1.0) if base == "bottleneck" else base_out + layer.delta_output(inp, 1.0)
            layer_outputs.append(out)
        outs.append(layer_outputs)
    model.eval()
    merged_out = model(x)
    for s in splits(model):
        weight, _ = s.merged()
        manual = sum(s.module_weight(k)[0] for k in range(4)) / 4 if base == "bottleneck" else None
        if manual is not None:
            torch.testing.assert_close(weight, manual, rtol=1e-6, atol=1e-7)
    for i, path in enumerate(("0", "2")):
        layer = getattr(model, path).layer("m")
        inp = torch.randn(7, getattr(model, path).base_layer.in_features, generator=torch.Generator().manual_seed(9))
        base_out = getattr(model, path).base_layer(inp)
        merged = layer.adapt(inp, base_out, 1.0) if base == "bottleneck" else base_out + layer.delta_output(inp, 1.0)
        torch.testing.assert_close(merged, sum(o[i] for o in outs) / 4, rtol=1e-5, atol=1e-6)
    ak.to_plain(model, "m")
    torch.testing.assert_close(model(x), merged_out, rtol=1e-6, atol=1e-6)
    plain = copy.deepcopy(model)
    ak.detach(plain, "m")
    ak.attach(plain, ak.config_of(model, "m"), "m")
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(model) == shapes(plain)
    assert sum(p.numel() for p in ak.adapter_parameters(model, "m")) == sum(
        p.numel() for p in ak.adapter_parameters(plain, "m"))
    ak.save(model, tmp_path, "m")
    assert ak.config_of(model, "m").method == base


def test_one_tensor_representation_equals_an_n_copies_reference_under_sgd():
    """Spec §9.7: the reference keeps N full copies of Up (and of its bias), trains the chosen copy with its
    gradient masked to its partition, and merges by averaging; one SplitWeight gives the same weights."""
    split = SplitWeight(torch.zeros(5, 3), torch.zeros(5), n_modules=4, seed=11, legacy=False)
    optimizer = torch.optim.SGD(split.parameters(), lr=0.1)
    copies, biases = [torch.zeros(5, 3) for _ in range(4)], [torch.zeros(5) for _ in range(4)]
    masks = [(split.part == k).float() for k in range(4)]
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        k = int(torch.randint(4, (1,), generator=g))
        h, y = torch.randn(6, 3, generator=g), torch.randn(6, 5, generator=g)
        optimizer.zero_grad()
        weight, bias = split.module_weight(k)
        (F.linear(h, weight, bias) - y).square().sum().backward()
        optimizer.step()
        w, b = copies[k].clone().requires_grad_(True), biases[k].clone().requires_grad_(True)
        (F.linear(h, w, b) - y).square().sum().backward()
        copies[k] = (w - 0.1 * w.grad * masks[k]).detach()  # the reference: p.grad *= p.mask; SGD
        biases[k] = (b - 0.1 * b.grad).detach()
    merged, merged_bias = split.merged()
    torch.testing.assert_close(merged, sum(copies) / 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged_bias, sum(biases) / 4, rtol=1e-5, atol=1e-6)
    for k in range(4):
        torch.testing.assert_close(split.module_weight(k)[0], copies[k], rtol=1e-5, atol=1e-6)
        assert not (split.module_weight(k)[0] * (1 - masks[k])).any()  # each module is zero off its mask


def test_consistency_loss_is_symmetric_zero_on_equal_logits_and_stops_gradients():
    a = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    assert torch.allclose(consistency_loss(a, b), consistency_loss(b, a))
    assert consistency_loss(a, a.detach().clone()).abs() < 1e-7
    consistency_loss(a, b).backward()
    a2 = a.detach().clone().requires_grad_(True)
    p_a, log_b = F.softmax(a2, -1), F.log_softmax(b.detach(), -1)
    (0.5 * (p_a * (p_a.log() - log_b)).sum(-1).mean()).backward()  # only a's own KL term reaches a
    torch.testing.assert_close(a.grad, a2.grad)


def test_two_pass_loss_draws_fresh_modules_for_the_second_pass_in_ak_train_and_the_trainer(tiny_bert, tmp_path):
    from transformers import TrainingArguments

    ak.attach(tiny_bert, ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=4, target_modules=[r"output.dense"],
                                                                modules_to_save=["classifier"]),
                                       consistency_weight=0.5))
    seen = []
    dense = tiny_bert.bert.encoder.layer[0].output.dense
    dense.register_forward_pre_hook(lambda module, args: seen.append(module.layer("default").up.selected))
    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 100, (6,)), "labels": torch.tensor(i % 3)} for i in range(16)]
    batches = [{"input_ids": torch.stack([r["input_ids"] for r in rows[i:i + 4]]),
                "labels": torch.stack([r["labels"] for r in rows[i:i + 4]])} for i in range(0, 16, 4)]
    losses = ak.train(tiny_bert, batches, lr=1e-2, progress=False, loss_fn=ak.mosa.two_pass_loss)
    assert len(seen) == 8 and all(torch.isfinite(torch.tensor(losses)))
    seen.clear()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
                             learning_rate=1e-2, save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    ak.MoSATrainer(model=tiny_bert, args=args, train_dataset=rows).train()
    assert len(seen) == 8  # two passes per step


def test_save_load_round_trip_and_corrupt_partitions(tmp_path):
    model = mosa_mlp("both", update_unselected="legacy")
    randomise(model, "m", seed=1, scale=0.3, add=True)
    ak.save(model, tmp_path / "ok", "m")
    fresh = mosa_mlp("both", seed=7)
    ak.detach(fresh, "m")
    ak.load(fresh, tmp_path / "ok")
    x = torch.randn(4, 12)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "ok" / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith("up.part"))
    tensors[key] = torch.zeros_like(tensors[key])  # every entry in module 0: sizes no longer fit
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "adapter.safetensors")
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    config["tensors_sha256"] = tensors_digest(tensors)  # re-seal the edited tensors: reach the MoSA check
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(config))
    target = mosa_mlp()
    ak.detach(target, "m")
    before = snapshot(target)
    with pytest.raises(ak.CorruptFileError, match="MoSA module"):
        ak.load(target, tmp_path / "bad", ignore_fingerprint=True)
    assert_unchanged(target, before)


@pytest.mark.parametrize("overrides,message", [
    (dict(n_modules=1), "n_modules"), (dict(split="left"), "split"), (dict(update_unselected="sometimes"), "update"),
    (dict(consistency_weight=-1), "consistency_weight"), (dict(base=ak.ShiraConfig(target_modules=["0"])), "base")])
def test_bad_configs_raise_clear_errors(overrides, message):
    config = dict(base=ak.BottleneckConfig(target_modules=["0"]))
    config.update(overrides)
    with pytest.raises(ak.ConfigError, match=message):
        ak.MoSAConfig(**config)


def test_merging_a_fused_mosa_lora_is_refused_and_changes_nothing():
    model = mosa_mlp("up", "lora")
    randomise(model, "m", seed=1, scale=0.3, add=True)
    ak.fuse(model, ["m"])
    before = snapshot(model)
    with pytest.raises(ak.FusedStateError, match="unfuse"):
        ak.to_plain(model, "m")
    assert_unchanged(model, before)
    assert isinstance(model[0].layer("m"), MoSALoRALayer) and not isinstance(model[0].layer("m"), MoSABottleneckLayer)

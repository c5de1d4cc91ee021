"""Bottleneck adapters: identity at init, sequential and parallel wiring, conv adapters, stacks, files, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, randomise, snapshot
from torch import nn

import adapterkit as ak

PFEIFFER_BERT = r".*layer\.\d+\.output\.dense"


@pytest.mark.parametrize("style", ["pfeiffer", "houlsby", "parallel"])
def test_a_fresh_adapter_is_an_identity(tiny_bert, tiny_llama, token_ids, style):
    for base, targets in ((tiny_bert, PFEIFFER_BERT if style != "parallel" else ["intermediate"]),
                          (tiny_llama, ["mlp", "o_proj"])):
        expected = base(input_ids=token_ids).logits
        ak.attach(base, ak.BottleneckConfig(reduction_factor=4, style=style, target_modules=targets), "a")
        assert torch.equal(base(input_ids=token_ids).logits, expected)
        assert ak.trainable_parameters(base)[0] > 0


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_sequential_adds_up_of_down_of_the_output_and_parallel_reads_the_input(mlp, activation):
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    x = torch.randn(5, 8)
    base = copy.deepcopy(mlp)
    ak.attach(mlp, ak.BottleneckConfig(bottleneck=3, activation=activation, scaling=0.5, target_modules=["2"]), "seq")
    ak.attach(mlp, ak.BottleneckConfig(bottleneck=2, activation=activation, scaling=2.0, style="parallel",
                                       target_modules=["2"]), "par")
    randomise(mlp, "seq", seed=3, scale=0.2)
    randomise(mlp, "par", seed=4, scale=0.2)
    seq, par = mlp[2].layer("seq"), mlp[2].layer("par")
    h = F.relu(base[0](x))
    for name, reads in (("seq", lambda out: out), ("par", lambda out: h)):
        ak.activate(mlp, name)
        layer = mlp[2].layer(name)
        out = base[2](h)
        out = out + layer.scaling * layer.up(act(layer.down(reads(out))))
        torch.testing.assert_close(mlp(x), base[4](F.relu(out)), rtol=1e-5, atol=1e-6)
    ak.activate(mlp, ["seq", "par"])  # several inserted modules: each reads the previous one's output
    out = base[2](h)
    out = out + 0.5 * seq.up(act(seq.down(out)))
    out = out + 2.0 * par.up(act(par.down(h)))
    torch.testing.assert_close(mlp(x), base[4](F.relu(out)), rtol=1e-5, atol=1e-6)


def test_style_defaults_and_widths(tiny_bert):
    ak.attach(tiny_bert, ak.BottleneckConfig(style="houlsby", target_modules=[r"attention.output.dense", "output.dense"]),
              "h")
    layer = tiny_bert.bert.encoder.layer[0].output.dense.layer("h")
    assert layer.activation == "silu" and layer.down.out_features == 32 // 16 and not layer.parallel
    ak.attach(tiny_bert, ak.BottleneckConfig(style="parallel", bottleneck=5, target_modules=["intermediate"]), "p")
    layer = tiny_bert.bert.encoder.layer[0].intermediate.layer("p")
    assert layer.activation == "relu" and (layer.down.in_features, layer.up.out_features) == (32, 64)


def test_stack_feeds_the_first_adapter_into_the_second_and_round_trips(tiny_bert, token_ids, tmp_path):
    base = copy.deepcopy(tiny_bert)
    for name in ("lang", "task"):
        ak.attach(tiny_bert, ak.BottleneckConfig(reduction_factor=4, target_modules=PFEIFFER_BERT), name)
        randomise(tiny_bert, name, seed=ord(name[0]), scale=0.2)
    ak.activate(tiny_bert, ak.Stack("lang", "task"))
    dense = tiny_bert.bert.encoder.layer[1].output.dense
    lang, task = dense.layer("lang"), dense.layer("task")
    x = torch.randn(2, 3, 64)
    first = lang.adapt(x, dense.base_layer(x), 1.0)
    torch.testing.assert_close(dense(x), task.adapt(x, first, 1.0))
    stacked = tiny_bert(input_ids=token_ids).logits
    ak.activate(tiny_bert, ak.Stack("task", "lang"))
    assert not torch.allclose(dense(x), task.adapt(x, first, 1.0), atol=1e-3)  # order matters
    ak.save(tiny_bert, tmp_path, ak.Stack("lang", "task"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["composition.json", "lang", "task"]
    assert ak.load(base, tmp_path) == "lang"
    assert ak.active_adapters(base) == [("lang", 1.0), ("task", 1.0)]
    torch.testing.assert_close(base(input_ids=token_ids).logits, stacked, rtol=0, atol=0)
    assert ak.Stack.from_dict(ak.Stack("a", "b").to_dict()) == ak.Stack("a", "b")
    with pytest.raises(ak.ConfigError, match="two or more distinct"):
        ak.Stack("a")
    with pytest.raises(ak.DuplicateAdapterError):
        ak.load(base, tmp_path)  # already there: nothing changes
    with pytest.raises(ak.AdapterNotFoundError):
        ak.save(base, tmp_path / "x", ak.Stack("lang", "missing"))
    assert not (tmp_path / "x").exists()


def test_failed_stack_load_detaches_what_it_loaded(tiny_bert, tmp_path):
    model = copy.deepcopy(tiny_bert)
    for name in ("a", "b"):
        ak.attach(model, ak.BottleneckConfig(reduction_factor=4, target_modules=PFEIFFER_BERT), name)
    ak.save(model, tmp_path, ak.Stack("a", "b"))
    (tmp_path / "b" / "adapter.safetensors").write_bytes(b"broken")
    before = snapshot(tiny_bert)
    with pytest.raises(ak.AdapterError):
        ak.load(tiny_bert, tmp_path)
    assert_unchanged(tiny_bert, before)


def test_save_load_round_trip_and_no_peft_format(tiny_llama, token_ids, tmp_path):
    model = copy.deepcopy(tiny_llama)
    ak.attach(model, ak.BottleneckConfig(bottleneck=4, style="parallel", activation="gelu", target_modules=["mlp"]), "b")
    randomise(model, "b", seed=3, scale=0.2)
    ak.save(model, tmp_path, "b")
    ak.load(tiny_llama, tmp_path)
    assert ak.config_of(tiny_llama, "b") == ak.config_of(model, "b")
    assert torch.equal(tiny_llama(input_ids=token_ids).logits, model(input_ids=token_ids).logits)
    with pytest.raises(ak.UnsupportedError, match="no PEFT file format"):
        ak.save(model, tmp_path / "p", "b", format="peft")


def test_trains_only_the_adapter_with_ak_train(tiny_bert):
    ak.attach(tiny_bert, ak.BottleneckConfig(reduction_factor=4, target_modules=PFEIFFER_BERT,
                                             modules_to_save=["classifier"]), "a")
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 100, (4, 6)), "labels": torch.randint(0, 3, (4,))} for _ in range(5)]
    ak.train(tiny_bert, batches, lr=1e-2, progress=False)
    changed = {k for k, v in tiny_bert.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".up." in k for k in changed) and all(".adapters." in k for k in changed)


BAD = [
    (dict(bottleneck=40), "larger than the 32 features"),
    (dict(reduction_factor=64), "leaves no bottleneck"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=["too-wide", "too-narrow"])
def test_bad_widths_raise_at_attach_and_leave_the_model_unchanged(tiny_bert, overrides, message):
    before = snapshot(tiny_bert)
    with pytest.raises(ak.ConfigError, match=message):
        ak.attach(tiny_bert, ak.BottleneckConfig(target_modules=PFEIFFER_BERT, **overrides))
    assert_unchanged(tiny_bert, before)


@pytest.mark.parametrize("overrides,message", [(dict(style="serial"), "style"), (dict(activation="swish"), "activation"),
                                               (dict(bottleneck=0), "positive integer"), (dict(init="zeros"), "init"),
                                               (dict(reduction_factor=0), "reduction_factor")])
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ak.ConfigError, match=message):
        ak.BottleneckConfig(target_modules=["x"], **overrides)


def test_inserted_modules_cannot_be_fused_and_nothing_changes(tiny_bert, token_ids):
    ak.attach(tiny_bert, ak.BottleneckConfig(reduction_factor=4, target_modules=PFEIFFER_BERT), "a")
    before = snapshot(tiny_bert)
    with pytest.raises(ak.NotFusableError, match="insert modules"):
        ak.fuse(tiny_bert, ["a"])
    assert_unchanged(tiny_bert, before)
    with pytest.raises(ak.UnsupportedError, match="already plain"):
        ak.to_plain(tiny_bert, "a")
    assert_unchanged(tiny_bert, before)


def test_frozen_batch_norm_statistics_stay_put_while_trainable_ones_learn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    ak.attach(model, ak.BottleneckConfig(bottleneck=2, target_modules=["3"], modules_to_save=["4"]), "a")
    frozen = {k: v.clone() for k, v in model[1].state_dict().items()}
    trained_bn = model[4].layer("a").module
    stats = trained_bn.running_mean.clone()
    wrapped = nn.Module()
    wrapped.net = model
    wrapped.forward = lambda pixels, labels: F.cross_entropy(model(pixels), labels)
    batches = [{"pixels": torch.randn(4, 3, 6, 6) + 2.0, "labels": torch.randint(0, 2, (4,))} for _ in range(3)]
    ak.train(wrapped, batches, lr=1e-2, progress=False)
    assert all(torch.equal(v, frozen[k]) for k, v in model[1].state_dict().items())  # base statistics untouched
    assert not torch.equal(trained_bn.running_mean, stats)  # a trainable (modules_to_save) norm still learns
    model.train()
    with ak.FrozenNormStatistics(model):
        model(torch.randn(2, 3, 6, 6) + 5.0)
    assert all(torch.equal(v, frozen[k]) for k, v in model[1].state_dict().items())
    model.train()(torch.randn(2, 3, 6, 6) + 5.0)  # removed: a plain train-mode forward updates statistics again
    assert not torch.equal(model[1].running_mean, frozen["running_mean"])

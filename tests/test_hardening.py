"""Bad input through the public API: only ak.AdapterError subclasses, and the model bit-identical
afterwards (tensors, module objects, requires_grad, state and every module's train/eval flag)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from torch import nn

import adapterkit as ak
from adapterkit.zoo import vision


class Mixed(nn.Module):
    """Linear, conv, strided conv block, norm and embedding layers; some modules in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.strided = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.strided(torch.relu(self.conv(pixel_values))).mean((2, 3))
        logits = self.head(torch.relu(self.fc(self.norm(h))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def mixed_model() -> Mixed:
    torch.manual_seed(0)
    model = Mixed().train()
    model.norm.eval()  # a per-module flag that "model.train(flag)" would overwrite
    model.strided[1].eval()
    return model


def batch(n: int = 4, size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def refused(model: nn.Module, call, error: type | tuple[type, ...] = ak.AdapterError, match: str | None = None):
    """``call()`` raises ``error`` (an AdapterError: anything else fails the test) and changes nothing."""
    before = snapshot(model)
    with pytest.raises(ak.AdapterError, match=match) as info:
        call()
    assert isinstance(info.value, error), repr(info.value)
    assert_unchanged(model, before)
    return info.value


CONFIGS = {  # a valid config of every registered method for target list `t`
    "lora": lambda t, **kw: ak.LoRAConfig(r=2, target_modules=t, **kw),
    "dylora": lambda t, **kw: ak.DyLoRAConfig(r_max=4, target_modules=t, **kw),
    "shira": lambda t, **kw: ak.ShiraConfig(density=0.1, target_modules=t, **kw),
    "bottleneck": lambda t, **kw: ak.BottleneckConfig(bottleneck=2, target_modules=t, **kw),
    "mosa": lambda t, **kw: ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=2, target_modules=t), n_modules=2, **kw),
    "sft": lambda t, **kw: ak.SFTConfig(k=4, selection="random", freeze_norms=True, target_modules=t, **kw),
}


MODEL_LEVEL = {  # model-level methods: no target modules, a valid config for `mixed_model`
    "ranking": lambda **kw: ak.RankingAdapterConfig(width=8, heads=2, fusion_layers=1, encoder_layers=0, prompt_tokens=2,
                                                   relation_tokens=2, image_dim=4, text_dim=4, **kw),
}


def test_every_built_in_method_has_a_hardening_config():
    built_in = {m.name for m in ak.registered_methods() if type(m).__module__.startswith("adapterkit.methods.")}
    assert built_in <= set(CONFIGS) | set(MODEL_LEVEL)  # tests may register methods of their own


@pytest.mark.parametrize("method", sorted(MODEL_LEVEL))
def test_model_level_methods_refuse_bad_names_configs_and_options(method):
    model = mixed_model()
    make = MODEL_LEVEL[method]
    for name in ("a.b", "", "x" * 101, 3, None):
        refused(model, lambda: ak.attach(model, make(), name), ak.ConfigError)
    refused(model, lambda: ak.attach(model, make(), "a", unknown_option=1), ak.ConfigError)
    refused(model, lambda: ak.attach(model, make(modules_to_save=["nothing"]), "a"), ak.TargetError)
    refused(model, lambda: ak.attach(model, make().replace(image_dim=None), "a"), ak.ConfigError, "token widths")
    ak.attach(model, make(), "a")
    refused(model, lambda: ak.attach(model, make(), "a"), ak.errors.DuplicateAdapterError)  # the name is taken


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_attach_refuses_bad_targets_names_and_configs_for_every_method(method):
    model = mixed_model()
    make = CONFIGS[method]
    refused(model, lambda: ak.attach(model, make(["nothing"]), "a"), ak.TargetError, "matched no module")
    refused(model, lambda: ak.attach(model, make(["norm"]), "a"), ak.TargetError, "norm")
    refused(model, lambda: ak.attach(model, make(["fc"], modules_to_save=["nothing"]), "a"), ak.TargetError)
    for name in ("a.b", "", "x" * 101, 3, None):
        refused(model, lambda: ak.attach(model, make(["fc"]), name), ak.ConfigError)
    refused(model, lambda: ak.attach(model, "not a config", "a"), ak.ConfigError)
    refused(model, lambda: ak.attach(model, make(["fc"]), "a", unknown_option=1), ak.ConfigError)
    ak.attach(model, make(["fc"]), "a")
    refused(model, lambda: ak.attach(model, make(["fc"]), "a"), ak.DuplicateAdapterError)
    with pytest.raises(ak.ConfigError):
        make(["fc"], bits=3)


def test_mosa_with_a_lora_base_refuses_a_conv_layer_at_attach():
    model = mixed_model()
    config = ak.MoSAConfig(base=ak.LoRAConfig(r=2, target_modules=["conv"]), n_modules=2)
    refused(model, lambda: ak.attach(model, config, "m"), ak.TargetError, "'conv'.*MoSA LoRA")
    ak.attach(model, ak.MoSAConfig(base=ak.LoRAConfig(r=2, target_modules=["fc"]), n_modules=2), "m")  # linear: fine
    assert model(**batch())["logits"].shape == (4, 3)


@pytest.mark.parametrize("mosa", [False, True])
def test_a_parallel_adapter_that_does_not_fit_is_refused_at_attach_naming_the_module(mosa):
    model = mixed_model()

    def config(style: str) -> ak.AdapterConfig:
        base = ak.BottleneckConfig(bottleneck=2, style=style, target_modules=["strided"])
        return ak.MoSAConfig(base=base, n_modules=2) if mosa else base

    # the block halves the resolution: Up(Down(input)) cannot be added to its output
    refused(model, lambda: ak.attach(model, config("parallel"), "p"), ak.TargetError, r"'strided'.*sequential style")
    ak.attach(model, config("pfeiffer"), "s")  # a sequential adapter reads the output: fits
    randomise(model, "s", scale=0.1)
    assert model(**batch())["logits"].shape == (4, 3)


def test_a_sequential_adapter_after_a_block_of_another_width_is_refused_at_attach():
    model = nn.Sequential(nn.Linear(8, 16), nn.Unflatten(-1, (4, 4)))  # ends with 4 features, not 16
    wrapper = nn.Sequential(model, nn.Flatten(-2), nn.Linear(16, 2)).train()
    refused(wrapper, lambda: ak.attach(wrapper, ak.BottleneckConfig(bottleneck=2, target_modules=["0"]), "b"),
            ak.TargetError, "'0'")


def test_a_module_that_needs_more_inputs_is_not_probed():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return self.proj(x) * gate

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = TwoInputs()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x, torch.ones_like(x))

    model = Outer()
    ak.attach(model, ak.BottleneckConfig(bottleneck=2, style="parallel", target_modules=["block"]), "b")
    assert model(torch.randn(2, 8)).shape == (2, 8)


def adapted_model() -> Mixed:
    model = mixed_model()
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["fc", "head"]), "lora")
    ak.attach(model, ak.DyLoRAConfig(r_max=4, target_modules=["fc"]), "dy")
    ak.attach(model, ak.ShiraConfig(density=0.25, target_modules=["fc"]), "sh")
    ak.attach(model, ak.BottleneckConfig(bottleneck=2, target_modules=["conv"]), "bn")
    for name in ("lora", "dy", "sh", "bn"):
        randomise(model, name, scale=0.1)
    return model


BAD_CALLS = {
    "activate unknown": (lambda m: ak.activate(m, "nope"), ak.AdapterNotFoundError),
    "activate repeated": (lambda m: ak.activate(m, ["lora", "lora"]), ak.ConfigError),
    "activate nan weight": (lambda m: ak.activate(m, ["lora"], weights=[math.nan]), ak.ConfigError),
    "activate weight count": (lambda m: ak.activate(m, ["lora"], weights=[1.0, 2.0]), ak.ConfigError),
    "fuse unknown": (lambda m: ak.fuse(m, ["nope"]), ak.AdapterNotFoundError),
    "fuse inserted module": (lambda m: ak.fuse(m, ["bn"]), ak.NotFusableError),
    "fuse inf weight": (lambda m: ak.fuse(m, ["lora"], [math.inf]), ak.ConfigError),
    "switch unknown": (lambda m: ak.switch(m, "nope"), ak.AdapterNotFoundError),
    "switch inserted module": (lambda m: ak.switch(m, "bn"), ak.NotFusableError),
    "detach unknown": (lambda m: ak.detach(m, "nope"), ak.AdapterNotFoundError),
    "to_plain plain": (lambda m: ak.to_plain(m, "lora"), (ak.UnsupportedError, ak.FusedStateError)),
    "to_plain unknown": (lambda m: ak.to_plain(m, "nope"), ak.AdapterNotFoundError),
    "quantize bits": (lambda m: ak.quantize(m, "lora", bits=3), ak.ConfigError),
    "quantize method": (lambda m: ak.quantize(m, "lora", bits=1, method="round"), ak.ConfigError),
    "quantize unknown": (lambda m: ak.quantize(m, "nope", bits=1), ak.AdapterNotFoundError),
    "set_rank zero": (lambda m: ak.set_rank(m, 0), ak.ConfigError),
    "set_rank too large": (lambda m: ak.set_rank(m, 99), ak.ConfigError),
    "set_rank not dylora": (lambda m: ak.set_rank(m, 2, names=["lora"]), ak.AdapterError),
}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_names_and_values_in_model_operations_change_nothing(case, fused):
    model = adapted_model()
    ak.activate(model, ["lora", "bn"])
    if fused:
        ak.fuse(model, ["lora"])
    call, error = BAD_CALLS[case]
    refused(model, lambda: call(model), error)


def test_requests_that_conflict_with_the_fused_state_change_nothing():
    model = adapted_model()
    ak.fuse(model, ["lora", "sh"])
    refused(model, lambda: ak.activate(model, "dy"), ak.FusedStateError)
    refused(model, lambda: ak.quantize(model, "lora", bits=2), ak.FusedStateError)


def test_train_refuses_bad_options_before_touching_the_model():
    model = adapted_model()
    batches = [batch()]
    for options in ({"lr": -1.0}, {"lr": math.nan}, {"lr": "fast"}, {"epochs": -1}, {"epochs": 1.5},
                    {"warmup": 2.0}, {"weight_decay": -0.1}, {"max_grad_norm": 0.0}):
        refused(model, lambda: ak.train(model, batches, progress=False, **options), ak.ConfigError)
    refused(model, lambda: ak.train(model, batch(), progress=False), ak.ConfigError, "iterable")
    plain = mixed_model().requires_grad_(False)
    refused(plain, lambda: ak.train(plain, batches, progress=False), ak.ConfigError, "no trainable parameters")


def test_a_bad_batch_rolls_back_the_steps_already_taken_and_every_modules_mode():
    model = adapted_model()
    good, wrong_channels = batch(), {"pixel_values": torch.randn(4, 5, 8, 8), "labels": torch.zeros(4, dtype=torch.long)}
    for bad in (wrong_channels, {"pixel_values": batch()["pixel_values"]}, ["not", "a", "dict"],
                {"pixel_values": batch()["pixel_values"], "labels": torch.zeros(7, dtype=torch.long)}):
        refused(model, lambda: ak.train(model, [good, good, bad], progress=False), ak.ConfigError, "batch 2")
    losses = ak.train(model, [good, good], progress=False)  # a good run still trains ...
    assert len(losses) == 2
    assert model.norm.training is False and model.strided[1].training is False and model.fc.training  # ... keeping modes


def test_predict_and_accuracy_refuse_bad_batches_and_keep_every_modules_mode():
    model = adapted_model()
    good = batch()
    refused(model, lambda: ak.predict(model, [{"pixel_values": torch.randn(2, 5, 8, 8)}]), ak.ConfigError)
    refused(model, lambda: ak.predict(model, []), ak.ConfigError, "no batches")
    refused(model, lambda: ak.predict(model, [("pixel_values",)]), ak.ConfigError, "batch 0")
    refused(model, lambda: ak.accuracy(model, [{"pixel_values": good["pixel_values"]}]), ak.ConfigError, "labels")
    short = {"pixel_values": good["pixel_values"], "labels": good["labels"][:2]}
    refused(model, lambda: ak.accuracy(model, [short]), ak.ConfigError, "2 labels for 4 predictions")
    column = {"pixel_values": good["pixel_values"], "labels": good["labels"][:, None].expand(4, 4)}
    refused(model, lambda: ak.accuracy(model, [column]), ak.ConfigError)  # would broadcast silently
    before = snapshot(model)
    logits = ak.predict(model, [good])
    assert logits.shape == (4, 3)
    assert 0.0 <= ak.accuracy(model, [good]) <= 1.0
    assert_unchanged(model, before)  # eval for the call, every module's own mode afterwards


def test_metrics_refuse_bad_names_and_shapes():
    model = adapted_model()
    refused(model, lambda: ak.metrics.orthogonality(model, "nope", "lora"), ak.AdapterNotFoundError)
    refused(model, lambda: ak.metrics.orthogonality(model, "lora", ["sh"]), ak.ConfigError)
    refused(model, lambda: ak.metrics.orthogonality(model, "lora", "bn"), ak.ConfigError, "share no")
    assert 0.0 <= ak.metrics.orthogonality(model, "lora", "sh").awor <= 1.0
    a, b = torch.randn(3, 4), torch.randn(4, 3)
    with pytest.raises(ak.ConfigError, match="same 2-D weight"):
        ak.metrics.awor(a, b)
    with pytest.raises(ak.ConfigError, match="norm"):
        ak.metrics.awom(a, a, norm="nuclear")
    with pytest.raises(ak.ConfigError):
        ak.metrics.awom(a, "b")


@pytest.mark.parametrize("call", [
    lambda: vision.digits("val"),
    lambda: vision.digits(per_class=0),
    lambda: vision.digits(size=0),
    lambda: vision.digits(test_size=5000),
    lambda: vision.digits(test_size=0),
    lambda: vision.digits(seed=-1),
    lambda: vision.load_efficientnet_lite0(0),
    lambda: vision.Images(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)).batches(0),
])
def test_vision_helpers_refuse_bad_inputs(call):
    with pytest.raises(ak.ConfigError):
        call()

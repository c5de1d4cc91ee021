"""LoRA layer maths: the unfused forward, scaling, initialisation and what trains."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.core.host import AdaptedModule


def _linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_is_base_plus_scaled_low_rank_product(use_rslora):
    model = _linear_model()
    base = model[0]
    x = torch.randn(5, 12)
    ak.attach(model, ak.LoRAConfig(r=4, alpha=6, target_modules=["0"], init="random", use_rslora=use_rslora))
    layer = model[0].adapters["default"]
    scaling = 6 / (math.sqrt(4) if use_rslora else 4)
    assert layer.scaling == pytest.approx(scaling)
    expected = x @ base.weight.T + base.bias + scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_zero_initialised_b_gives_the_base_output_exactly(init):
    model = _linear_model()
    x = torch.randn(5, 12)
    before = model(x)
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0"], init=init))
    layer = model[0].adapters["default"]
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    assert torch.equal(model(x), before)


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 8))
    ak.attach(model, ak.LoRAConfig(r=8, target_modules=["0"], init="gaussian"))
    assert model[0].adapters["default"].lora_A.std().item() == pytest.approx(1 / 8, rel=0.05)


def test_only_adapter_parameters_receive_gradients(tiny_bert, token_ids):
    ak.attach(tiny_bert, ak.LoRAConfig(r=2, target_modules=["query", "value"], init="random"))
    tiny_bert(input_ids=token_ids).logits.sum().backward()
    for name, param in tiny_bert.named_parameters():
        if ".adapters." in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_trainable_parameter_count_matches_r_times_in_plus_out(tiny_bert):
    total_before = sum(p.numel() for p in tiny_bert.parameters())
    ak.attach(tiny_bert, ak.LoRAConfig(r=4, target_modules=["query", "value"]))
    trainable, total = ak.trainable_parameters(tiny_bert)
    assert trainable == 2 * 2 * 4 * (32 + 32)  # 2 layers x (query, value) x r(in + out)
    assert total == total_before + trainable


def test_rank_and_alpha_patterns_override_per_module(tiny_bert):
    config = ak.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"],
                           rank_pattern={"layer.1.attention.self.value": 2}, alpha_pattern={"query": 2})
    ak.attach(tiny_bert, config)
    layers = {n: m.adapters["default"] for n, m in tiny_bert.named_modules() if isinstance(m, AdaptedModule)}
    assert layers["bert.encoder.layer.1.attention.self.value"].rank == 2
    assert layers["bert.encoder.layer.0.attention.self.value"].rank == 4
    assert layers["bert.encoder.layer.0.attention.self.query"].scaling == pytest.approx(2 / 4)
    assert layers["bert.encoder.layer.1.attention.self.value"].scaling == pytest.approx(8 / 2)


def test_dropout_applies_to_the_adapter_branch_only_in_training():
    model = _linear_model()
    x = torch.randn(64, 12)
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0"], init="random", dropout=0.5))
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


def test_gpt2_conv1d_weights_are_handled_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 5))
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["c_attn"], init="random"))
    unfused = model(input_ids=ids).logits
    original = model.transformer.h[0].attn.c_attn.base_layer.weight.clone()
    ak.fuse(model)
    torch.testing.assert_close(model(input_ids=ids).logits, unfused, rtol=1e-5, atol=1e-5)
    ak.unfuse(model)
    assert torch.equal(model.transformer.h[0].attn.c_attn.base_layer.weight, original)


def test_bf16_base_runs_with_fp32_adapter():
    model = _linear_model().to(torch.bfloat16)
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0"], init="random"))
    assert model[0].adapters["default"].lora_A.dtype == torch.float32
    out = model(torch.randn(3, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-1), dict(r=2.5), dict(dropout=1.0), dict(alpha=float("nan")),
                                 dict(init="xavier"), dict(rank_pattern={"q": 0})])
def test_invalid_lora_config_values_raise(bad):
    with pytest.raises(ak.ConfigError):
        ak.LoRAConfig(target_modules=["q"], **bad)


def test_training_forward_and_backward_never_build_a_dense_delta():
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # skip views
                    self.shapes.append(tuple(t.shape))
            return out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80))
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0"], init="random"))
    x = torch.randn(5, 96)
    with RecordShapes() as recorder:
        model(x).sum().backward()
    assert (80, 96) not in recorder.shapes and (96, 80) not in recorder.shapes
    assert (4, 96) in recorder.shapes and (80, 4) in recorder.shapes  # the factors' gradients


def test_a_deep_copy_carries_independent_adapters(mlp):
    import copy

    ak.attach(mlp, ak.LoRAConfig(target_modules=["0", "2"], init="random"), "a")
    twin = copy.deepcopy(mlp)
    x = torch.randn(3, 8)
    ak.fuse(twin)
    assert ak.fused_adapters(twin) == [("a", 1.0)] and ak.fused_adapters(mlp) == []
    torch.testing.assert_close(twin(x), mlp(x), rtol=1e-5, atol=1e-6)
    ak.detach(twin, "a")
    assert ak.adapters(mlp) == ["a"] and isinstance(mlp[0], AdaptedModule)


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.point = nn.Conv2d(6, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.depthwise(torch.relu(self.point(torch.relu(self.stem(x))))).mean((2, 3)))


def test_lora_on_conv2d_matches_peft_unfused_fused_and_restores_exactly(tmp_path):
    import peft

    torch.manual_seed(0)
    base = _TinyCNN().eval()
    x = torch.randn(2, 3, 10, 10)
    model = copy.deepcopy(base)
    ak.attach(model, ak.LoRAConfig(r=2, alpha=4, target_modules=["stem", "point"], init="random"))
    layer = model.stem.layer("default")
    assert tuple(layer.lora_A.shape) == (2, 3, 3, 3) and tuple(layer.lora_B.shape) == (6, 2, 1, 1)
    unfused = model(x)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    ak.fuse(model)
    torch.testing.assert_close(model(x), unfused, rtol=1e-5, atol=1e-6)
    for _ in range(3):
        ak.unfuse(model)
        ak.fuse(model)
    ak.unfuse(model)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters() if "base_layer" in n)
    ak.save(model, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(loaded(x), unfused, rtol=1e-5, atol=1e-6)
    with pytest.raises(ak.TargetError, match="depthwise"):
        ak.attach(copy.deepcopy(base), ak.LoRAConfig(r=2, target_modules=["depthwise"]))

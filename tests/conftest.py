"""Shared fixtures: tiny randomly initialised models (fast) and helpers to prove a model is unchanged."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import adapterkit as ak
from hypothesis import settings
from torch import nn

torch.set_num_threads(2)

# Hypothesis budgets: the default run stays under a minute on 2 cores; `make test-nightly`
# (pytest --hypothesis-profile=nightly) explores far more sequences. No example database:
# a failure prints its reproduction, and no .hypothesis/ folder appears in the checkout.
settings.register_profile("adapterkit", max_examples=100, stateful_step_count=30, deadline=None, database=None)
settings.register_profile("nightly", settings.get_profile("adapterkit"), max_examples=2000, stateful_step_count=50)
settings.load_profile("adapterkit")


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    values = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture
def tiny_bert():
    """A tiny random BertForSequenceClassification in eval mode."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def tiny_llama():
    """A tiny random LlamaForCausalLM in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def mlp():
    """A plain nn.Module: two linear layers around a ReLU, plus an output head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.fixture
def token_ids():
    torch.manual_seed(1)
    return torch.randint(1, 100, (3, 7))


def snapshot(model: nn.Module) -> dict:
    """Everything that must not change after a failed call: tensors, module objects, requires_grad,
    every module's train/eval flag."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(name, id(m)) for name, m in model.named_modules()],
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "state": getattr(model, "adapterkit_state", None) and repr(model.adapterkit_state),
        "training": [(name, m.training) for name, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["state"] == before["state"]
    assert after["training"] == before["training"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


def randomise(model: nn.Module, name: str, *, seed: int = 0, scale: float = 0.1, add: bool = False) -> None:
    """Give adapter ``name`` seeded random values, so it visibly changes outputs: every tensor
    becomes ``scale · N(0, 1)`` noise (``add=True``: the noise is added to the current values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name):
            noise = torch.randn(param.shape, generator=g) * scale
            if add:
                param.add_(noise)
            else:
                param.copy_(noise)


def lora_of_ones(weight: torch.Tensor, name: str = "ones") -> nn.Module:
    """``nn.Sequential(Linear)`` with base weight ``weight`` (no bias) and a rank-1 LoRA ``name`` whose
    ΔW is all ones (A = B = 1, scale 1): fused, an fp32 entry w in [0, 1) becomes fl(1 + w), so
    subtracting ΔW again loses what fp32 cannot hold next to 1 (e.g. 1e-9 vanishes)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    model = nn.Sequential(layer)
    ak.attach(model, ak.LoRAConfig(r=1, alpha=1.0, target_modules=["0"]), name)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name):
            param.fill_(1.0)
    return model


@pytest.fixture
def one_thread():
    """Tiny models run on one thread: on a busy 2-core machine OpenMP's hand-offs cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


"""Shared fixtures: tiny randomly initialised models (fast) and helpers to prove a model is unchanged."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


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

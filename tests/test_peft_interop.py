"""Exchanging LoRA adapters with the real ``peft`` package, in both directions."""

from __future__ import annotations

import copy
import dataclasses
import json

import peft
import pytest
import torch
from safetensors import safe_open

import adapterkit as ak
from conftest import assert_unchanged, snapshot

PREFIX = "base_model.model."
BERT = dict(target_modules=["query", "value"], task_type="SEQ_CLS")
LLAMA = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_model(base, adapter_name="default", **lora):
    """A PEFT LoRA on a copy of ``base`` with random A, B and a random modules_to_save copy."""
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora), adapter_name=adapter_name
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))
    return model.eval()


def ak_model(base, name="sentiment", **lora):
    """An adapterkit LoRA on a copy of ``base`` with random A, B and a random modules_to_save copy."""
    model = ak.attach(copy.deepcopy(base), ak.LoRAConfig(init="random", **lora), name)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name):
            param.add_(torch.randn_like(param) * 0.1)
    return model


# -- peft → adapterkit ----------------------------------------------------------------------

PEFT_CASES = {
    "bert-seq-cls": ("tiny_bert", "default", dict(r=4, lora_alpha=8, **BERT)),
    "llama": ("tiny_llama", "default", dict(r=4, lora_alpha=8, **LLAMA)),
    "llama-rslora": ("tiny_llama", "default", dict(r=4, lora_alpha=8, use_rslora=True, **LLAMA)),
    "llama-patterns": ("tiny_llama", "default", dict(
        r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"q_proj": 3}, **LLAMA
    )),
    "bert-dropout-eval": ("tiny_bert", "default", dict(r=4, lora_alpha=8, lora_dropout=0.2, **BERT)),
    "llama-named-subfolder": ("tiny_llama", "other", dict(r=4, lora_alpha=16, **LLAMA)),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_loads_with_same_logits(case, request, token_ids, tmp_path):
    """A LoRA saved by peft.save_pretrained gives the same logits after ak.load into a fresh base."""
    fixture, adapter_name, lora = PEFT_CASES[case]
    base = request.getfixturevalue(fixture)
    reference = peft_model(base, adapter_name, **lora)
    expected = logits(reference, token_ids)
    assert not torch.allclose(expected, logits(base, token_ids), atol=1e-3)
    reference.save_pretrained(tmp_path)
    directory = tmp_path if adapter_name == "default" else tmp_path / adapter_name  # peft's sub-folder
    model = copy.deepcopy(base)
    assert ak.load(model, directory) == "default"
    torch.testing.assert_close(logits(model, token_ids), expected, atol=1e-5, rtol=0)


def test_peft_seq_cls_head_becomes_a_module_copy(tiny_bert, tmp_path):
    """PEFT's SEQ_CLS classifier copy is loaded as adapterkit's modules_to_save copy, leaving the base head alone."""
    reference = peft_model(tiny_bert, **BERT)
    reference.save_pretrained(tmp_path)
    model = copy.deepcopy(tiny_bert)
    ak.load(model, tmp_path, name="sst")
    head = reference.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(model.classifier.layer("sst").module.weight, head.weight)
    assert torch.equal(model.classifier.base_layer.weight, tiny_bert.classifier.weight)


@pytest.mark.parametrize("option", [{"use_dora": True}, {"bias": "all"}])
def test_peft_option_adapterkit_cannot_honour_is_refused(option, tiny_llama, tmp_path):
    """use_dora / bias="all" raise UnsupportedError naming the option, before the model is touched."""
    peft_model(tiny_llama, r=4, **option, **LLAMA).save_pretrained(tmp_path)
    model = copy.deepcopy(tiny_llama)
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["k_proj"], init="random"), "resident")
    before = snapshot(model)
    with pytest.raises(ak.UnsupportedError) as info:
        ak.load(model, tmp_path)
    assert next(iter(option)) in str(info.value) and "adapter_config.json" in str(info.value)
    assert_unchanged(model, before)


# -- adapterkit → peft ----------------------------------------------------------------------

AK_CASES = {
    "bert-with-head": ("tiny_bert", dict(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "llama-patterns-rslora": ("tiny_llama", dict(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
    )),
}


@pytest.mark.parametrize("case", AK_CASES)
def test_adapterkit_adapter_loads_in_peft_with_same_logits_unfused_and_fused(case, request, token_ids, tmp_path):
    """ak.save(format="peft") is read by peft.PeftModel.from_pretrained with the same logits, and
    ak.fuse gives the same logits as peft's merge_and_unload of that adapter."""
    fixture, lora = AK_CASES[case]
    base = request.getfixturevalue(fixture)
    model = ak_model(base, **lora)
    ak.save(model, tmp_path, "sentiment", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, token_ids), logits(model, token_ids), atol=1e-5, rtol=0)
    merged = loaded.merge_and_unload().eval()
    ak.fuse(model, "sentiment")
    torch.testing.assert_close(logits(model, token_ids), logits(merged, token_ids), atol=1e-5, rtol=1e-5)


def test_peft_files_written_by_adapterkit_are_standard(tiny_bert, tmp_path):
    """Keys are PEFT's (prefix, lora_A/B.weight, r×in / out×r, no adapter name); the JSON has only
    standard LoraConfig fields; adapterkit's version travels in the safetensors header."""
    model = ak_model(tiny_bert, **AK_CASES["bert-with-head"][1])
    ak.save(model, tmp_path, "sentiment", format="peft")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        metadata = handle.metadata()
    assert all(key.startswith(PREFIX) for key in shapes)
    assert not any("sentiment" in key or "default" in key for key in shapes)
    lora = {k: s for k, s in shapes.items() if ".lora_" in k}
    assert len(lora) == 8 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora)
    assert all(s == ((4, 32) if k.endswith("lora_A.weight") else (32, 4)) for k, s in lora.items())
    assert {k: s for k, s in shapes.items() if k not in lora} == {
        f"{PREFIX}classifier.weight": (3, 32), f"{PREFIX}classifier.bias": (3,)
    }
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(data) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert data["peft_type"] == "LORA" and data["modules_to_save"] == ["classifier"]
    assert isinstance(peft.PeftConfig.from_pretrained(str(tmp_path)), peft.LoraConfig)
    assert metadata["adapterkit_version"] == ak.__version__

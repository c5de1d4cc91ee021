"""Exchanging SHiRA adapters with the real ``peft`` package (``shira_weight`` + ``(2, nnz)`` ``shira_indices``)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel

import adapterkit as ak
from adapterkit.methods.shira import ShiraLayer
from adapterkit.core.state import get_state
from conftest import assert_unchanged, snapshot, tiny_bert_config

PEFT_WEIGHTS = "adapter_model.safetensors"
BERT = ["query", "value"]
LLAMA = ["q_proj", "v_proj", "down_proj"]


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def bert_model():
    """A tiny random BertModel (no head) in eval mode."""
    torch.manual_seed(0)
    return BertModel(tiny_bert_config()).eval()


def peft_shira(base, **config):
    """A PEFT SHiRA (random values: init_weights=False) on a copy of ``base``; head copies randomised too."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.ShiraConfig(r=2, init_weights=False, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param))
    return model.eval()


PEFT_CASES = {
    "bert-model": ("bert_model", dict(target_modules=BERT)),
    "bert-seq-cls": ("tiny_bert", dict(target_modules=BERT, task_type="SEQ_CLS")),
    "llama": ("tiny_llama", dict(target_modules=LLAMA, task_type="CAUSAL_LM")),
    "llama-seeded": ("tiny_llama", dict(target_modules=LLAMA, random_seed=42)),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_shira_loads_with_equal_outputs(case, request, token_ids, tmp_path):
    """A SHiRA saved by peft.save_pretrained loads with ak.load (same indices, same outputs, atol 1e-5)."""
    fixture, config = PEFT_CASES[case]
    base = request.getfixturevalue(fixture)
    reference = peft_shira(base, **config)
    expected = outputs(reference, token_ids)
    assert not torch.allclose(expected, outputs(base, token_ids), atol=1e-3)
    reference.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    assert ak.load(model, tmp_path) == "default"
    torch.testing.assert_close(outputs(model, token_ids), expected, atol=1e-5, rtol=0)
    saved = load_file(tmp_path / PEFT_WEIGHTS)
    shira = {p: l for p, l in get_state(model).layers("default") if isinstance(l, ShiraLayer)}
    assert len(shira) == sum(k.endswith(".shira_weight") for k in saved)
    for path, layer in shira.items():
        rows, cols = saved[f"base_model.model.{path}.shira_indices"].to(torch.int64)
        assert torch.equal(layer.indices, (rows * layer.shape[1] + cols).sort().values), path
        assert layer.nnz == 2 * sum(layer.shape) and not layer.regenerable
    ak.fuse(model)
    torch.testing.assert_close(outputs(model, token_ids), expected, atol=1e-5, rtol=1e-5)


def test_peft_shira_resaved_by_adapterkit_loads_again(tiny_llama, token_ids, tmp_path):
    """peft → ak.load → ak.save (adapterkit format) → ak.load: a loaded PEFT mask is not regenerable from a seed,
    so its indices are stored, and the file must load back with the same outputs."""
    reference = peft_shira(tiny_llama, target_modules=LLAMA)
    reference.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(tiny_llama)
    ak.load(model, tmp_path / "peft")
    expected = outputs(model, token_ids)
    ak.save(model, tmp_path / "native")
    again = copy.deepcopy(tiny_llama)
    ak.load(again, tmp_path / "native")
    torch.testing.assert_close(outputs(again, token_ids), expected, atol=0, rtol=0)


AK_CASES = {
    "llama-rand": ("tiny_llama", dict(mask="rand", target_modules=LLAMA), {}),
    "llama-wm": ("tiny_llama", dict(mask="wm", target_modules=LLAMA), {}),
    "bert-wm-with-head": ("tiny_bert", dict(mask="wm", target_modules=BERT, modules_to_save=["classifier"]), {}),
    "bert-snip": ("tiny_bert", dict(mask="snip", target_modules=BERT), "calibration"),
}


@pytest.mark.parametrize("case", AK_CASES)
def test_adapterkit_r_budget_shira_loads_in_peft(case, request, token_ids, tmp_path):
    """ak.save(format="peft") of an r-budget SHiRA (any mask but struct) is read by PeftModel.from_pretrained
    with the same outputs; peft's merge gives the fused outputs."""
    fixture, config, options = AK_CASES[case]
    base = request.getfixturevalue(fixture)
    if options == "calibration":
        options = dict(calibration=[dict(input_ids=token_ids, labels=torch.tensor([0, 1, 2]))])
    model = ak.attach(copy.deepcopy(base), ak.ShiraConfig(r=2, seed=5, **config), "task", **options)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, "task"):
            param.add_(torch.randn_like(param) * 0.1)
    expected = outputs(model, token_ids)
    ak.save(model, tmp_path, "task", format="peft")
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "SHIRA" and data["r"] == 2
    tensors = load_file(tmp_path / PEFT_WEIGHTS)
    indices = {k: v for k, v in tensors.items() if k.endswith(".shira_indices")}
    assert indices and all(v.dtype == torch.int32 and v.shape[0] == 2 for v in indices.values())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(outputs(loaded, token_ids), expected, atol=1e-5, rtol=0)
    merged = loaded.merge_and_unload().eval()
    ak.fuse(model)
    torch.testing.assert_close(outputs(model, token_ids), outputs(merged, token_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [dict(density=0.05), dict(r=2, mask="struct")], ids=["density", "struct"])
def test_peft_format_refuses_budgets_peft_cannot_express(config, tiny_llama, tmp_path):
    """PEFT needs exactly r·(in+out) entries: density budgets and struct masks raise UnsupportedError, nothing written."""
    model = ak.attach(tiny_llama, ak.ShiraConfig(target_modules=["q_proj"], **config), "task")
    with pytest.raises(ak.UnsupportedError, match="adapterkit"):
        ak.save(model, tmp_path / "out", "task", format="peft")
    assert not (tmp_path / "out").exists()
    ak.save(model, tmp_path / "native", "task")  # the native format takes it


def bad_indices(change):
    def mutate(directory):
        tensors = load_file(directory / PEFT_WEIGHTS)
        key = next(k for k in sorted(tensors) if k.endswith(".shira_indices"))
        tensors[key] = change(tensors[key].clone()).contiguous()
        save_file(tensors, directory / PEFT_WEIGHTS)
    return mutate


def out_of_range(idx):
    idx[1, 0] = 10_000
    return idx


def repeated(idx):
    idx[:, 1] = idx[:, 0]
    return idx


def one_more(idx):
    """An extra, distinct position: one index more than there are values."""
    present = set((idx[0] * 10_000 + idx[1]).tolist())
    extra = next((r, c) for r in range(16) for c in range(32) if r * 10_000 + c not in present)
    return torch.cat([idx, torch.tensor(extra, dtype=idx.dtype)[:, None]], 1)


BAD_INDICES = {
    "index-outside-weight": (out_of_range, ak.BaseModelMismatchError),
    "repeated-index": (repeated, ak.CorruptFileError),
    "fewer-indices-than-values": (lambda idx: idx[:, :-1], ak.CorruptFileError),
    "no-indices": (lambda idx: idx[:, :0], ak.CorruptFileError),
    "more-indices-than-values": (one_more, ak.CorruptFileError),
    "three-rows": (lambda idx: torch.cat([idx, idx[:1]]), ak.CorruptFileError),
    "one-dimensional": (lambda idx: idx[0], ak.CorruptFileError),
}


@pytest.mark.parametrize("change, error", BAD_INDICES.values(), ids=BAD_INDICES)
def test_bad_peft_indices_are_refused_and_model_unchanged(change, error, tiny_llama, tmp_path):
    """PEFT files whose indices leave the weight, repeat, miss or exceed the values, or have the wrong layout
    raise an adapterkit error before the model changes (never drop values silently)."""
    peft_shira(tiny_llama, target_modules=LLAMA).save_pretrained(tmp_path)
    bad_indices(change)(tmp_path)
    model = copy.deepcopy(tiny_llama)
    ak.attach(model, ak.ShiraConfig(r=1, target_modules=["k_proj"]), "resident")
    before = snapshot(model)
    with pytest.raises(error):
        ak.load(model, tmp_path)
    assert_unchanged(model, before)


def test_float_indices_as_peft_writes_them_on_windows_load(tiny_llama, token_ids, tmp_path):
    """PEFT saves shira_indices as float32 on Windows (exact below 2²⁴); they load to the same outputs."""
    reference = peft_shira(tiny_llama, target_modules=LLAMA)
    expected = outputs(reference, token_ids)
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / PEFT_WEIGHTS)
    save_file({k: v.float() if k.endswith(".shira_indices") else v for k, v in tensors.items()}, tmp_path / PEFT_WEIGHTS)
    model = copy.deepcopy(tiny_llama)
    ak.load(model, tmp_path)
    torch.testing.assert_close(outputs(model, token_ids), expected, atol=1e-5, rtol=0)

"""LT-SFT diffs fuse exactly, save and load bit for bit (own entries only, gap-packed indices,
metadata in the config JSON), go low-bit, and composable-sft files are read without unpickling
anything but tensors and integers."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.core.state import get_state
from adapterkit.io import sparse_indices
from test_sft_training import base_values, batches, same_values, supports

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import composable_sft  # noqa: E402  (tools/composable_sft.py: the one place a pickle is read)

KINDS = ("word_embeddings", "LayerNorm", "weight", "bias")


@pytest.fixture
def diffed(tiny_bert):
    """A trained-looking SFT over every kind of tensor of the encoder (random support, random values)."""
    ak.attach(tiny_bert, ak.SFTConfig(k=4000, target_modules="bert", modules_to_save=["classifier"],
                                      selection="random", seed=4), "sft")
    randomise(tiny_bert, "sft", seed=1, scale=0.2)
    return tiny_bert


def test_fifty_fuse_unfuse_cycles_are_bit_exact_over_every_kind_of_tensor(diffed):
    model, x = diffed, batches(1)[0]["input_ids"]
    chosen = supports(model, "sft")
    assert all(any(kind in name.split(".")[-2:] for name in chosen) for kind in KINDS)
    layers = {f"{p}.{t}": layer.part(t) for p, layer in get_state(model).layers("sft") if hasattr(layer, "part")
              for t in layer.delta_tensors()}
    theta0 = base_values(model)
    unfused = model(input_ids=x).logits
    for cycle in range(50):
        ak.fuse(model)
        if cycle in (0, 49):
            assert torch.equal(model(input_ids=x).logits, unfused)
        fused = base_values(model)
        for name, idx in chosen.items():
            flat, original = fused[name].reshape(-1), theta0[name].reshape(-1).clone()
            original[idx] += layers[name].values.detach()
            assert torch.equal(flat, original), name
        ak.unfuse(model)
        assert same_values(base_values(model), theta0)
    assert torch.equal(model(input_ids=x).logits, unfused)


def test_the_weight_delta_is_visible_to_analysis(diffed):
    wrapper = get_state(diffed).wrappers["bert.encoder.layer.1.intermediate.dense"]
    layer = wrapper.layer("sft")
    dense = torch.zeros(wrapper.weight.numel())
    dense[layer.part("weight").indices] = layer.part("weight").values.detach()
    assert torch.equal(layer.delta_weight(wrapper.weight.shape), dense.view(wrapper.weight.shape))
    for name, seed in (("x", 8), ("y", 9)):  # metrics compare 2-D weights: SFTs of the linear layers
        ak.attach(diffed, ak.SFTConfig(k=3000, target_modules="all-linear", selection="random", seed=seed), name)
        randomise(diffed, name, seed=seed)
    result = ak.metrics.orthogonality(diffed, "x", "y")
    assert len(result.layers) == 13 and 0 <= result.awor <= 1  # 2 × 6 encoder linears + the pooler


def test_save_and_load_are_bit_exact_with_only_the_adapters_entries_and_its_metadata(tiny_bert, tmp_path):
    from transformers import BertForSequenceClassification
    from conftest import tiny_bert_config

    torch.manual_seed(0)
    fresh = BertForSequenceClassification(tiny_bert_config()).eval()
    cfg = ak.SFTConfig(k=700, target_modules="bert", modules_to_save=["classifier"], full_steps=2, full_lr=1e-2,
                       sparse_steps=2, iterations=2)
    ak.sft.train_sft(tiny_bert, cfg, "sft", batches(), lr=1e-2, progress=False)
    tiny_bert.eval()
    x = batches(1)[0]["input_ids"]
    expected = tiny_bert(input_ids=x).logits
    ak.save(tiny_bert, tmp_path / "sft", "sft")
    data = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    saved = data["config"]
    assert (data["method"], saved["k"], saved["selection"], saved["iterations"]) == ("sft", 700, "most_changed", 2)
    assert saved["outcome"]["k"] == 700 and len(saved["outcome"]["iterations"]) == 2
    assert saved["outcome"]["density"] == pytest.approx(700 / saved["outcome"]["entries"])
    tensors = load_file(tmp_path / "sft" / "adapter.safetensors")
    values = {k: v for k, v in tensors.items() if k.endswith(".values")}
    assert sum(v.numel() for v in values.values()) == 700  # only the adapter's own entries (plus the head)
    assert all(k.startswith("classifier.") or ".parts." in k for k in tensors)
    assert {k.rsplit(".", 1)[1] for k in tensors if ".parts." in k} == {"values", "index_header", "index_unary", "index_low"}
    name = ak.load(fresh, tmp_path / "sft")
    assert name == "sft" and torch.equal(fresh(input_ids=x).logits, expected)
    a, b = supports(tiny_bert, "sft"), supports(fresh, "sft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ak.sft.outcome(fresh, "sft")["k"] == 700
    ak.fuse(fresh)
    assert torch.equal(fresh(input_ids=x).logits, expected)


def test_a_damaged_file_is_refused_and_the_model_is_unchanged(diffed, tiny_bert_twin, tmp_path):
    from safetensors.torch import save_file

    ak.save(diffed, tmp_path / "sft", "sft")
    tensors = load_file(tmp_path / "sft" / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith(".values") and tensors[k].numel() > 1)
    tensors[key] = tensors[key][:-1]
    save_file(tensors, tmp_path / "sft" / "adapter.safetensors")
    data = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    data.pop("tensors_sha256")  # as a file written without a digest: the layer's own checks must catch it
    (tmp_path / "sft" / "adapter_config.json").write_text(json.dumps(data))
    before = snapshot(tiny_bert_twin)
    with pytest.raises(ak.CorruptFileError, match="values for the"):
        ak.load(tiny_bert_twin, tmp_path / "sft")
    assert_unchanged(tiny_bert_twin, before)


@pytest.fixture
def tiny_bert_twin():
    from transformers import BertForSequenceClassification
    from conftest import tiny_bert_config

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


def test_low_bit_values_go_through_the_quantizer_fuse_exactly_and_round_trip(tiny_bert, tiny_bert_twin, tmp_path):
    ak.attach(tiny_bert, ak.SFTConfig(k=900, target_modules="bert", selection="random", bits=2), "low")
    randomise(tiny_bert, "low", seed=3, scale=0.1)
    x = batches(1)[0]["input_ids"]
    for _, layer in get_state(tiny_bert).layers("low"):
        for t in layer.delta_tensors():
            part = layer.part(t)
            if part.nnz > 8:
                assert part.sparse_delta(1.0).unique().numel() <= 4  # 2 bits: four levels per tensor
                assert not torch.equal(part.sparse_delta(1.0), part.values.detach())
    unfused = tiny_bert(input_ids=x).logits
    ak.fuse(tiny_bert)
    torch.testing.assert_close(tiny_bert(input_ids=x).logits, unfused, rtol=0, atol=1e-6)
    ak.unfuse(tiny_bert)
    tiny_bert(input_ids=x).logits.sum().backward()  # straight-through gradients reach the latent values
    assert all(p.grad is not None for p in ak.adapter_parameters(tiny_bert, "low") if p.numel())
    ak.save(tiny_bert, tmp_path / "low", "low")
    keys = load_file(tmp_path / "low" / "adapter.safetensors")
    assert any(k.endswith(".values.codes") for k in keys) and not any(k.endswith(".values") for k in keys)
    ak.load(tiny_bert_twin, tmp_path / "low")
    assert torch.equal(tiny_bert_twin(input_ids=x).logits, unfused)


def test_the_int64_rule_and_indices_beyond_two_to_the_31(tmp_path):
    assert ak.sft.index_dtype(2**31 - 1) == torch.int32 and ak.sft.index_dtype(2**31) == torch.int64
    big = torch.tensor([5, 2**31 - 1, 2**31, 2**31 + 7, 2**33 - 1])  # a 2**33-entry tensor, never allocated
    packed = sparse_indices.pack(big)
    assert torch.equal(sparse_indices.unpack(packed, 2**33, "big"), big)
    # composable-sft's column-major steps past 2**31 (its own int32 decoding would wrap around)
    rows, cols = 2**16, 2**17
    column_major = np.array([3, 2**31 + 11, 2**33 - 1], dtype=np.int64)
    encoding = {"size": torch.Size([rows, cols]), "index_steps": [np.int64(3)] + np.diff(column_major).tolist(),
                "values": torch.tensor([1.0, 2.0, 3.0])}
    diff = ak.sft.compat.decode(encoding, "big")
    r, c = column_major % rows, column_major // rows
    assert torch.equal(diff.indices, torch.from_numpy(np.sort(r * cols + c)))


def _column_major_encoding(delta: torch.Tensor) -> dict:
    """composable-sft's encoding of a dense delta, written from its description: nonzero positions
    flattened first-dimension-fastest, sorted, delta-encoded (first step a NumPy integer)."""
    fortran = delta.permute(*reversed(range(delta.dim()))).reshape(-1)
    positions = fortran.nonzero().view(-1).numpy().astype(np.int64)
    steps = [np.int64(positions[0])] + np.diff(positions).tolist()
    return {"size": delta.shape, "index_steps": steps, "values": fortran[torch.from_numpy(positions)].clone()}


def test_a_composable_sft_file_is_decoded_and_attached(tiny_bert, tmp_path):
    g = torch.Generator().manual_seed(0)
    model = tiny_bert
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.query.bias",
             "bert.embeddings.LayerNorm.weight", "bert.embeddings.word_embeddings.weight"]
    deltas = {}
    for n in names:
        shape = model.get_parameter(n).shape
        deltas[n] = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.2)
    head = {"classifier.weight": torch.randn(3, 32, generator=g), "classifier.bias": torch.randn(3, generator=g)}
    path = tmp_path / "sft"
    path.mkdir()
    torch.save({"diffs": {n: _column_major_encoding(d) for n, d in deltas.items()}, "abs": head},
               path / "pytorch_diff.bin")
    with pytest.raises(ak.MissingFileError, match="tools/composable_sft.py"):  # the library never unpickles
        ak.sft.read_composable_sft(path)
    composable_sft.convert(path)
    sft = ak.sft.read_composable_sft(path)
    for n, d in deltas.items():
        dense = torch.zeros(d.numel())
        dense[sft.diffs[n].indices] = sft.diffs[n].values
        assert torch.equal(dense.view(d.shape), d) and torch.equal(sft.diffs[n].indices, sft.diffs[n].indices.sort().values)
    # a 3-D tensor: the column-major rule over more than two dimensions
    cube = torch.randn(2, 3, 4, generator=g) * (torch.rand(2, 3, 4, generator=g) < 0.5)
    decoded = ak.sft.compat.decode(_column_major_encoding(cube), "cube")
    dense = torch.zeros(24)
    dense[decoded.indices] = decoded.values
    assert torch.equal(dense.view(2, 3, 4), cube)
    theta0, x = base_values(model), batches(1)[0]["input_ids"]
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        for n, d in deltas.items():
            by_hand.get_parameter(n).add_(d)
        for n, v in head.items():
            by_hand.get_parameter(n).copy_(v)
    assert ak.sft.attach_composable_sft(model, path, "xlmr-task") == "xlmr-task"
    torch.testing.assert_close(model(input_ids=x).logits, by_hand(input_ids=x).logits, rtol=0, atol=1e-6)
    assert same_values(base_values(model), theta0)
    assert ak.config_of(model, "xlmr-task").selection == "given"
    before = snapshot(model)
    with pytest.raises(ak.BaseModelMismatchError, match="no parameter"):
        ak.sft.attach_composable_sft(model, sft, "other", prefix="roberta.")
    assert_unchanged(model, before)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch composable_sft_payload_ran",))


def test_composable_sft_files_with_other_objects_are_refused_unexecuted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"diffs": {}, "abs": {"x": torch.zeros(1)}, "evil": _Payload()}, tmp_path / "pytorch_diff.bin")
    with pytest.raises(ak.UnsafeFileError, match="refusing to unpickle"):
        composable_sft.convert(tmp_path)
    assert not (tmp_path / "composable_sft_payload_ran").exists()
    (tmp_path / "pytorch_diff.bin").write_bytes(b"not a zip")
    with pytest.raises(ak.ArtefactError):
        composable_sft.convert(tmp_path)
    torch.save({"diffs": {"w": {"size": torch.Size([2, 2]), "index_steps": [0, 0], "values": torch.ones(2)}}},
               tmp_path / "pytorch_diff.bin")
    with pytest.raises(ak.CorruptFileError, match="strictly increasing"):
        composable_sft.convert(tmp_path)
    assert not (tmp_path / "composable_sft.safetensors").exists()  # nothing written for a bad file

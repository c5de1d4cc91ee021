"""Saving and loading adapters in adapterkit's own format, and every way a save or load can fail.

Every failure must raise its specific ``ak.AdapterError`` subclass, name the offending file or
module, and leave the model bit-identical (``assert_unchanged``).
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

import adapterkit as ak
from adapterkit.io.safefiles import tensors_digest
from conftest import assert_unchanged, snapshot, tiny_bert_config

CONFIG, WEIGHTS = "adapter_config.json", "adapter.safetensors"
Q0 = "bert.encoder.layer.0.attention.self.query"
BERT_LORA = dict(r=4, alpha=8.0, target_modules=["query", "value"], modules_to_save=["classifier"], init="random")
MLP_LORA = dict(r=2, alpha=4.0, target_modules=["0", "2"], init="random")


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def adapted(base, config, name="sentiment"):
    """A copy of ``base`` with a LoRA attached whose every tensor (head copy included) is random."""
    model = ak.attach(copy.deepcopy(base), ak.LoRAConfig(**config), name)
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name):
            param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture
def saved(tiny_bert, tmp_path):
    """A BERT LoRA (query/value + classifier copy) saved as "sentiment"; returns its directory."""
    ak.save(adapted(tiny_bert, BERT_LORA), tmp_path / "adapter", "sentiment")
    return tmp_path / "adapter"


@pytest.fixture
def target(tiny_bert):
    """A fresh copy of the base that already carries another adapter, so failed loads must keep it intact."""
    model = copy.deepcopy(tiny_bert)
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["key"], init="random"), "resident")
    return model


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["bert", "mlp"])
def test_round_trip_reproduces_logits_exactly(case, tiny_bert, mlp, token_ids, tmp_path):
    """save → load into a fresh copy of the base gives bit-identical outputs."""
    base, config, x = (tiny_bert, BERT_LORA, token_ids) if case == "bert" else (mlp, MLP_LORA, torch.randn(3, 8))
    model = adapted(base, config)
    expected = outputs(model, x)
    assert not torch.allclose(expected, outputs(base, x))  # the adapter really changes the output
    ak.save(model, tmp_path, "sentiment")
    fresh = copy.deepcopy(base)
    assert ak.load(fresh, tmp_path) == "sentiment"
    assert torch.equal(outputs(fresh, x), expected)
    assert ak.load(fresh, tmp_path, name="again") == "again"  # a second copy under another name
    assert ak.adapters(fresh) == ["sentiment", "again"]


def test_files_describe_adapter_and_base(saved):
    """adapter_config.json records method, version, name, full config and a base fingerprint;
    tensor keys are "<module path>.<key>" without the adapter name."""
    data = json.loads((saved / CONFIG).read_text())
    assert data["format"] == "adapterkit" and data["method"] == "lora" and data["name"] == "sentiment"
    assert data["adapterkit_version"] == ak.__version__
    assert data["config"] == ak.LoRAConfig(**BERT_LORA).to_dict()
    targets = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    base = data["base_model"]
    assert base["modules"] == {t: {"type": "Linear", "shape": [32, 32], "dtype": "float32"} for t in targets}
    assert base["copied_modules"] == ["classifier"]
    assert len(base["weights_sha256"]) == 64 and int(base["weights_sha256"], 16) >= 0
    with safe_open(str(saved / WEIGHTS), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert keys == {f"{t}.lora_{ab}" for t in targets for ab in "AB"} | {"classifier.weight", "classifier.bias"}
    assert not any("sentiment" in key for key in keys)
    assert metadata["adapterkit_version"] == ak.__version__


# -- fingerprint ----------------------------------------------------------------------------


def test_changed_base_weights_are_refused_unless_ignored(saved, target):
    """A base whose targeted weights differ raises FingerprintMismatchError; ignore_fingerprint loads it."""
    with torch.no_grad():
        target.get_submodule(Q0).weight[0, 0] += 0.01
    before = snapshot(target)
    with pytest.raises(ak.FingerprintMismatchError, match="ignore_fingerprint"):
        ak.load(target, saved)
    assert_unchanged(target, before)
    assert ak.load(target, saved, ignore_fingerprint=True) == "sentiment"


def test_bf16_copy_of_the_base_matches(saved, tiny_bert, token_ids):
    """The hash is over bf16-rounded weights, so a bf16 copy of the same base is accepted."""
    model = copy.deepcopy(tiny_bert).to(torch.bfloat16)
    assert ak.load(model, saved) == "sentiment"
    assert torch.isfinite(outputs(model, token_ids)).all()


@pytest.mark.parametrize("how", ["in_place", "through_data"])
def test_fingerprint_notices_a_weight_changed_after_it_was_hashed(how, tiny_bert, tmp_path):
    """Changing a base weight after save (which hashed it) must still be detected at load,
    whether the change goes through the tensor or through ``.data``."""
    model = adapted(tiny_bert, BERT_LORA)
    ak.save(model, tmp_path, "sentiment")
    ak.detach(model, "sentiment")
    weight = model.get_submodule(Q0).weight
    with torch.no_grad():
        (weight if how == "in_place" else weight.data)[0, 0] += 1.0
    with pytest.raises(ak.FingerprintMismatchError):
        ak.load(model, tmp_path)


# -- bad inputs to load ---------------------------------------------------------------------


def edit_json(change):
    def mutate(d):
        data = json.loads((d / CONFIG).read_text())
        change(data)
        (d / CONFIG).write_text(json.dumps(data))
    return mutate


def edit_tensors(change):
    """Rewrite the stored tensors and re-seal the digest, so the checks behind it are reached."""
    def mutate(d):
        tensors = load_file(d / WEIGHTS)
        change(tensors)
        save_file(tensors, d / WEIGHTS)
        edit_json(lambda c: c.update(tensors_sha256=tensors_digest(tensors)))(d)
    return mutate


def write(name, content):
    return lambda d: (d / name).write_bytes(content)


def poison(value):
    return edit_tensors(lambda t: t[f"{Q0}.lora_A"].view(-1)[:1].fill_(value))


def truncate(d):
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(raw[: len(raw) // 2])


# (id, mutate the saved directory, load kwargs, exception, text the message must contain)
BAD_LOADS = [
    ("missing-dir", lambda d: None, {"sub": "nowhere"}, ak.MissingFileError, "nowhere"),
    ("missing-config", lambda d: (d / CONFIG).unlink(), {}, ak.MissingFileError, CONFIG),
    ("missing-weights", lambda d: (d / WEIGHTS).unlink(), {}, ak.MissingFileError, WEIGHTS),
    ("invalid-json", write(CONFIG, b'{"format": "adapterkit",'), {}, ak.CorruptFileError, CONFIG),
    ("json-not-object", write(CONFIG, b"[1, 2]"), {}, ak.CorruptFileError, CONFIG),
    ("json-neither-format", write(CONFIG, b'{"hello": 1}'), {}, ak.CorruptFileError, CONFIG),
    ("truncated-weights", truncate, {}, ak.CorruptFileError, WEIGHTS),
    ("garbage-weights", write(WEIGHTS, b"\x07garbage!" * 64), {}, ak.CorruptFileError, WEIGHTS),
    ("nan-weight", poison(float("nan")), {}, ak.NonFiniteWeightsError, WEIGHTS),
    ("inf-weight", poison(float("inf")), {}, ak.NonFiniteWeightsError, WEIGHTS),
    ("unknown-method", edit_json(lambda c: c.update(method="dora")), {}, ak.UnknownMethodError, CONFIG),
    ("newer-format", edit_json(lambda c: c.update(format_version=99)), {}, ak.CorruptFileError, CONFIG),
    ("missing-field", edit_json(lambda c: c.pop("base_model")), {}, ak.CorruptFileError, CONFIG),
    ("bad-config-value", edit_json(lambda c: c["config"].update(r=0)), {}, ak.ConfigError, CONFIG),
    ("config-not-object", edit_json(lambda c: c.update(config=[])), {}, ak.CorruptFileError, CONFIG),
    ("base-model-not-object", edit_json(lambda c: c.update(base_model=[])), {}, ak.CorruptFileError, CONFIG),
    ("pattern-not-object", edit_json(lambda c: c["config"].update(rank_pattern=["query"])), {}, ak.ConfigError, CONFIG),
    ("module-not-in-model", edit_json(lambda c: c["base_model"]["modules"].update({"bert.encoder.layer.7.x": {}})),
     {}, ak.BaseModelMismatchError, "bert.encoder.layer.7.x"),
    ("missing-tensor", edit_tensors(lambda t: t.pop(f"{Q0}.lora_B")), {}, ak.CorruptFileError, Q0),
    ("extra-tensor", edit_tensors(lambda t: t.update({"bert.pooler.dense.lora_A": torch.zeros(4, 32)})),
     {}, ak.CorruptFileError, "bert.pooler.dense.lora_A"),
    ("extra-key-of-known-module", edit_tensors(lambda t: t.update({f"{Q0}.lora_C": torch.zeros(4, 32)})),
     {}, ak.CorruptFileError, f"{Q0}.lora_C"),
    ("wrong-tensor-shape", edit_tensors(lambda t: t.update({f"{Q0}.lora_A": torch.zeros(5, 32)})),
     {}, ak.BaseModelMismatchError, Q0),
    ("duplicate-name", lambda d: None, {"name": "resident"}, ak.DuplicateAdapterError, "resident"),
]


@pytest.mark.parametrize("mutate, kwargs, error, needle", [c[1:] for c in BAD_LOADS], ids=[c[0] for c in BAD_LOADS])
def test_bad_load_raises_and_leaves_model_unchanged(mutate, kwargs, error, needle, saved, target):
    """Each broken file or request raises its own error naming the culprit; the model is untouched."""
    mutate(saved)
    kwargs = dict(kwargs)
    directory = saved / kwargs.pop("sub") if "sub" in kwargs else saved
    before = snapshot(target)
    with pytest.raises(error) as info:
        ak.load(target, directory, **kwargs)
    assert needle in str(info.value)
    assert_unchanged(target, before)


def test_other_base_model_shape_is_refused(saved):
    """An adapter made for hidden size 32 does not load into a BERT with hidden size 48."""
    torch.manual_seed(0)
    wider = BertForSequenceClassification(tiny_bert_config(hidden_size=48)).eval()
    before = snapshot(wider)
    with pytest.raises(ak.BaseModelMismatchError) as info:
        ak.load(wider, saved)
    assert Q0 in str(info.value) and "48" in str(info.value)
    assert_unchanged(wider, before)


class _Exploit:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("fmt, stem", [("peft", "adapter_model"), ("adapterkit", "adapter")])
def test_pickle_weights_are_refused_without_unpickling(fmt, stem, tiny_bert, target, tmp_path, monkeypatch):
    """A pickle ``*.bin`` in place of the safetensors file raises UnsafeFileError; nothing unpickles it."""
    ak.save(adapted(tiny_bert, BERT_LORA), tmp_path, "sentiment", format=fmt)
    (tmp_path / f"{stem}.safetensors").unlink()
    (tmp_path / f"{stem}.bin").write_bytes(pickle.dumps(_Exploit(tmp_path / "pwned")))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle loader was called")

    for module, attr in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, attr, forbidden)
    before = snapshot(target)
    with pytest.raises(ak.UnsafeFileError, match=f"{stem}.bin"):
        ak.load(target, tmp_path)
    assert not (tmp_path / "pwned").exists()
    assert_unchanged(target, before)


# -- failed attach / fuse -------------------------------------------------------------------

BAD_ATTACHES = [
    ("rank-zero", lambda: ak.LoRAConfig(r=0, target_modules=["query"]), "x", ak.ConfigError),
    ("rank-float", lambda: ak.LoRAConfig(r=2.5, target_modules=["query"]), "x", ak.ConfigError),
    ("dropout-one", lambda: ak.LoRAConfig(dropout=1.0, target_modules=["query"]), "x", ak.ConfigError),
    ("alpha-nan", lambda: ak.LoRAConfig(alpha=float("nan"), target_modules=["query"]), "x", ak.ConfigError),
    ("unknown-init", lambda: ak.LoRAConfig(init="zeros", target_modules=["query"]), "x", ak.ConfigError),
    ("no-targets", lambda: ak.LoRAConfig(), "x", ak.ConfigError),
    ("not-a-config", lambda: {"r": 4}, "x", ak.ConfigError),
    ("empty-name", lambda: ak.LoRAConfig(target_modules=["query"]), "", ak.ConfigError),
    ("matches-nothing", lambda: ak.LoRAConfig(target_modules=["nonexistent"]), "x", ak.TargetError),
    ("layernorm", lambda: ak.LoRAConfig(target_modules=["LayerNorm"]), "x", ak.TargetError),
    ("missing-head", lambda: ak.LoRAConfig(target_modules=["query"], modules_to_save=["lm_head"]), "x", ak.TargetError),
    ("duplicate-name", lambda: ak.LoRAConfig(target_modules=["query"]), "resident", ak.DuplicateAdapterError),
]


@pytest.mark.parametrize("make_config, name, error", [c[1:] for c in BAD_ATTACHES], ids=[c[0] for c in BAD_ATTACHES])
def test_failed_attach_leaves_model_unchanged(make_config, name, error, target):
    """Invalid configs, targets matching nothing or unsupported modules raise; the model is untouched."""
    before = snapshot(target)
    with pytest.raises(error):
        ak.attach(target, make_config(), name)
    assert_unchanged(target, before)


@pytest.mark.parametrize("names, weights, error", [
    ("nope", None, ak.AdapterNotFoundError),
    (["resident", "nope"], None, ak.AdapterNotFoundError),
    ("resident", [1.0, 2.0], ak.ConfigError),
])
def test_failed_fuse_leaves_model_unchanged(names, weights, error, target):
    """Fusing an unknown adapter (or with mismatched weights) raises before any weight is written."""
    before = snapshot(target)
    with pytest.raises(error):
        ak.fuse(target, names, weights)
    assert_unchanged(target, before)


# -- bad inputs to save ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["adapterkit", "peft"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_refuses_non_finite_weights_and_writes_nothing(fmt, value, tiny_bert, tmp_path):
    """A NaN/Inf adapter is not saved; a fresh directory stays absent and an earlier save stays intact."""
    model = adapted(tiny_bert, BERT_LORA)
    ak.save(model, tmp_path / "old", "sentiment", format=fmt)
    old = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with torch.no_grad():
        model.get_submodule(Q0).layer("sentiment").lora_B[0, 0] = value
    for directory in (tmp_path / "new", tmp_path / "old"):
        with pytest.raises(ak.NonFiniteWeightsError, match=Q0):
            ak.save(model, directory, "sentiment", format=fmt)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == old


@pytest.mark.parametrize("name, fmt, error", [
    ("nope", "adapterkit", ak.AdapterNotFoundError),
    ("sentiment", "onnx", ak.ConfigError),
])
def test_save_rejects_unknown_adapter_or_format(name, fmt, error, tiny_bert, tmp_path):
    """Saving an adapter that is not attached, or in an unknown format, raises and creates nothing."""
    model = adapted(tiny_bert, BERT_LORA)
    with pytest.raises(error):
        ak.save(model, tmp_path / "out", name, format=fmt)
    assert not (tmp_path / "out").exists()

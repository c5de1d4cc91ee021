"""Adapter files under damage and misuse: fused loads of unfusable adapters, PEFT features adapterkit
cannot honour, low-bit exports, stale files of earlier saves, unsafe names, the stored-tensor digest,
and files that the parsers themselves reject (every failure an ``ak.AdapterError``, model unchanged)."""

from __future__ import annotations

import copy
import json
import struct

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit as ak
from conftest import assert_unchanged, snapshot
from test_artefact import edit_json

CONFIG, WEIGHTS, PEFT_WEIGHTS = "adapter_config.json", "adapter.safetensors", "adapter_model.safetensors"
BERT = dict(target_modules=["query", "value"], task_type="SEQ_CLS")


def out(model, x):
    with torch.no_grad():
        result = model(x) if x.is_floating_point() else model(input_ids=x)
    return getattr(result, "logits", result)


def lora(base, name="a", **overrides):
    config = dict(r=2, alpha=4.0, target_modules=["0", "2"], init="random")
    return ak.attach(copy.deepcopy(base), ak.LoRAConfig(**{**config, **overrides}), name)


# -- 1. load(fuse=True) of an adapter that cannot be fused ---------------------------------


def test_fused_load_of_an_inserted_module_adapter_is_refused_and_leaves_the_model_unchanged(mlp, tmp_path):
    source = ak.attach(copy.deepcopy(mlp), ak.BottleneckConfig(bottleneck=4, target_modules=["0"]), "bn")
    ak.save(source, tmp_path, "bn")
    model = lora(mlp, "resident")
    before = snapshot(model)
    with pytest.raises(ak.NotFusableError, match="fuse=False"):
        ak.load(model, tmp_path, fuse=True)
    assert_unchanged(model, before)
    assert ak.adapters(model) == ["resident"] and ak.fused_adapters(model) == []
    assert ak.load(model, tmp_path) == "bn"  # unfused it loads


# -- 2. PEFT features adapterkit cannot honour ----------------------------------------------


def peft_lora(base, tmp_path, **options):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **{**BERT, **options}))
    model.save_pretrained(tmp_path)
    return model.eval()


def refused(model, directory, error, *needles):
    before = snapshot(model)
    with pytest.raises(error) as info:
        ak.load(model, directory)
    assert all(n in str(info.value) for n in needles), str(info.value)
    assert_unchanged(model, before)


def test_peft_pissa_adapter_is_refused_naming_the_option(tiny_bert, tmp_path):
    """PiSSA moves the adapter's principal part out of the base weights: the file alone is not the adapter."""
    peft_lora(tiny_bert, tmp_path, init_lora_weights="pissa")
    refused(copy.deepcopy(tiny_bert), tmp_path, ak.UnsupportedError, "init_lora_weights='pissa'")


@pytest.mark.parametrize("init", ["pissa_niter_16", "olora", "corda", "loftq", "lora_ga", "something-new"])
def test_base_rewriting_or_unknown_inits_are_refused(init, tiny_bert, tmp_path):
    peft_lora(tiny_bert, tmp_path, init_lora_weights=False)
    data = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**data, "init_lora_weights": init}))
    refused(copy.deepcopy(tiny_bert), tmp_path, ak.UnsupportedError, f"init_lora_weights={init!r}")


def test_base_preserving_orthogonal_init_still_loads_with_peft_logits(tiny_bert, token_ids, tmp_path):
    reference = peft_lora(tiny_bert, tmp_path, init_lora_weights="orthogonal")
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    reference.save_pretrained(tmp_path)
    model = copy.deepcopy(tiny_bert)
    ak.load(model, tmp_path)
    torch.testing.assert_close(out(model, token_ids), out(reference, token_ids), atol=1e-5, rtol=0)


def test_peft_embedding_lora_is_unsupported_not_corrupt(tiny_bert, tmp_path):
    peft_lora(tiny_bert, tmp_path, target_modules=["word_embeddings", "query"])
    refused(copy.deepcopy(tiny_bert), tmp_path, ak.UnsupportedError, "lora_embedding_A", "embedding")


@pytest.mark.parametrize("key, needle", [("lora_magnitude_vector.weight", "DoRA"), ("lora_newthing.weight", "unknown LORA")])
def test_unknown_peft_tensor_keys_are_unsupported_not_corrupt(key, needle, tiny_bert, tmp_path):
    peft_lora(tiny_bert, tmp_path, init_lora_weights=False)
    tensors = load_file(tmp_path / PEFT_WEIGHTS)
    tensors[f"base_model.model.bert.encoder.layer.0.attention.self.query.{key}"] = torch.ones(32)
    save_file(tensors, tmp_path / PEFT_WEIGHTS)
    refused(copy.deepcopy(tiny_bert), tmp_path, ak.UnsupportedError, key.split(".")[0], needle)


# -- 3. low-bit adapters export what they compute -------------------------------------------

LOW_BIT = {
    "lora": lambda: ak.LoRAConfig(r=4, target_modules=["0", "2"], bits=2),
    "dylora": lambda: ak.DyLoRAConfig(r_max=4, target_modules=["0", "2"], bits=2),
    "shira": lambda: ak.ShiraConfig(r=2, target_modules=["0", "2"], bits=2),
    "bottleneck": lambda: ak.BottleneckConfig(bottleneck=4, target_modules=["0", "2"], bits=2),
    "mosa-lora": lambda: ak.MoSAConfig(base=ak.LoRAConfig(r=4, target_modules=["0", "2"]), split="both"),
    "mosa-bottleneck": lambda: ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=4, target_modules=["0", "2"])),
}
HAS_PEFT = {"lora", "dylora", "shira", "mosa-lora"}


def trained_low_bit(mlp, kind):
    """A 2-bit adapter after a few steps, so the fp32 latents differ from the dequantised weights."""
    model = ak.attach(copy.deepcopy(mlp), LOW_BIT[kind](), "q").train()
    optimizer = torch.optim.AdamW(list(ak.adapter_parameters(model, "q")), lr=3e-2)
    for _ in range(4):
        optimizer.zero_grad()
        model(torch.randn(6, 8)).square().sum().backward()
        optimizer.step()
        ak.step(model)
    if kind.startswith("mosa"):
        ak.to_plain(model, "q")
        ak.quantize(model, "q", 2)
    return model.eval()


@pytest.mark.parametrize("kind, fmt", [(k, "adapterkit") for k in LOW_BIT] + [(k, "peft") for k in LOW_BIT if k in HAS_PEFT])
def test_low_bit_export_reproduces_the_low_bit_outputs(kind, fmt, mlp, tmp_path):
    model = trained_low_bit(mlp, kind)
    options = {"rank": 3} if kind == "dylora" else {}
    if kind == "dylora":
        ak.set_rank(model, 3)
    x = torch.randn(5, 8)
    expected = out(model, x)
    ak.export(model, "q", tmp_path, format=fmt, **options)
    fresh = copy.deepcopy(mlp)
    ak.load(fresh, tmp_path)
    torch.testing.assert_close(out(fresh.eval(), x), expected, atol=1e-6, rtol=0)
    if fmt == "peft" and kind in ("lora", "dylora"):
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(mlp), tmp_path).eval()
        torch.testing.assert_close(out(loaded, x), expected, atol=1e-5, rtol=0)


def test_low_bit_dylora_to_plain_keeps_the_outputs(mlp):
    model = trained_low_bit(mlp, "dylora")
    ak.set_rank(model, 2)
    x = torch.randn(5, 8)
    expected = out(model, x)
    ak.to_plain(model, "q", rank=2)
    assert ak.config_of(model, "q").method == "lora"
    torch.testing.assert_close(out(model, x), expected, atol=1e-6, rtol=0)


# -- 4. stale files of earlier saves, unsafe names ------------------------------------------


def two_loras(mlp):
    model = lora(mlp, "a")
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["2"], init="random"), "b")
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["0"], init="random"), "c")
    return model


def test_single_save_over_a_saved_stack_replaces_it(mlp, tmp_path):
    model = two_loras(mlp)
    ak.save(model, tmp_path, ak.Stack("a", "b"))
    (tmp_path / "b" / "notes.txt").write_text("mine")  # not adapterkit's: kept, with its directory
    ak.save(model, tmp_path, "c")
    assert not (tmp_path / "composition.json").exists() and not (tmp_path / "a").exists()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["notes.txt"]
    fresh = copy.deepcopy(mlp)
    assert ak.load(fresh, tmp_path) == "c" and ak.adapters(fresh) == ["c"]


def test_stack_save_over_other_saves_drops_their_files(mlp, tmp_path):
    model = two_loras(mlp)
    ak.save(model, tmp_path, "c")
    ak.save(model, tmp_path, ak.Stack("a", "b"))
    assert not (tmp_path / CONFIG).exists() and not (tmp_path / WEIGHTS).exists()
    ak.save(model, tmp_path, ak.Stack("b", "c"))
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / CONFIG).is_file()
    fresh = copy.deepcopy(mlp)
    ak.load(fresh, tmp_path)
    assert ak.adapters(fresh) == ["b", "c"]


@pytest.mark.parametrize("first, second, stale", [("adapterkit", "peft", WEIGHTS), ("peft", "adapterkit", PEFT_WEIGHTS)])
def test_saving_in_the_other_format_removes_the_old_weights(first, second, stale, mlp, tmp_path):
    model = lora(mlp)
    ak.save(model, tmp_path, "a", format=first)
    ak.save(model, tmp_path, "a", format=second)
    assert not (tmp_path / stale).exists()


BAD_NAMES = ["../x", "a/b", "", "a\x00b", ".", "a b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_unsafe_names_are_refused_before_anything_is_written(bad, mlp, tmp_path):
    model = lora(mlp)
    with pytest.raises(ak.ConfigError, match="invalid adapter name"):
        ak.save(model, tmp_path / "out", bad)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()
    ak.save(model, tmp_path / "ok", "a")
    fresh = copy.deepcopy(mlp)
    before = snapshot(fresh)
    with pytest.raises(ak.ConfigError, match="invalid adapter name"):
        ak.load(fresh, tmp_path / "ok", name=bad)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("bad", ["../ok", "ok/..", "a\x00b"])
def test_stack_members_from_composition_json_are_checked(bad, mlp, tmp_path):
    model = two_loras(mlp)
    ak.save(model, tmp_path / "s", ak.Stack("a", "b"))
    ak.save(model, tmp_path / "ok", "a")  # what "../ok" would reach
    (tmp_path / "s" / "composition.json").write_text(json.dumps({"stack": ["a", bad]}))
    fresh = copy.deepcopy(mlp)
    before = snapshot(fresh)
    with pytest.raises(ak.ConfigError, match="composition.json"):
        ak.load(fresh, tmp_path / "s")
    assert_unchanged(fresh, before)


# -- 5. the stored-tensor digest -------------------------------------------------------------


def flip_stored_value(path):
    """Change one stored float32 value (keeps it finite): the last 4 bytes of the file belong to
    the last tensor's last value."""
    raw = bytearray(path.read_bytes())
    value = struct.unpack("<f", raw[-4:])[0]
    raw[-4:] = struct.pack("<f", value + 0.5)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("fmt, weights", [("adapterkit", WEIGHTS), ("peft", PEFT_WEIGHTS)])
def test_a_flipped_stored_value_is_refused_as_damaged(fmt, weights, mlp, tmp_path):
    ak.save(lora(mlp), tmp_path, "a", format=fmt)
    flip_stored_value(tmp_path / weights)
    refused(copy.deepcopy(mlp), tmp_path, ak.CorruptFileError, "damaged", weights)


def test_files_without_a_digest_still_load(mlp, tmp_path):
    model = lora(mlp)
    ak.save(model, tmp_path, "a")
    data = json.loads((tmp_path / CONFIG).read_text())
    assert len(data.pop("tensors_sha256")) == 64
    (tmp_path / CONFIG).write_text(json.dumps(data))
    fresh = copy.deepcopy(mlp)
    ak.load(fresh, tmp_path)
    x = torch.randn(3, 8)
    assert torch.equal(out(fresh, x), out(model, x))


# -- files the parsers reject ----------------------------------------------------------------


def header_length(n):
    return lambda d: (d / WEIGHTS).write_bytes(struct.pack("<Q", n) + (d / WEIGHTS).read_bytes()[8:])


def json_config(text):
    return lambda d: (d / CONFIG).write_text(text)


PARSER_CASES = [
    ("huge-header-length", header_length(2**63)),
    ("header-longer-than-file", header_length(10**6)),
    ("deeply-nested-json", json_config("[" * 100_000 + "]" * 100_000)),
    ("number-beyond-digit-limit", json_config('{"format": "adapterkit", "format_version": ' + "9" * 5000 + "}")),
    ("rank-of-a-trillion", edit_json(lambda c: c["config"].update(r=10**12))),
    ("rank-of-ten-million", edit_json(lambda c: c["config"].update(r=10**7))),
    ("rank-beyond-int64", edit_json(lambda c: c["config"].update(r=10**30))),
    ("module-info-not-object", edit_json(lambda c: c["base_model"]["modules"].update({"0": 5}))),
    ("copied-module-not-name", edit_json(lambda c: c["base_model"].update(copied_modules=[[1]]))),
]


@pytest.mark.parametrize("mutate", [c[1] for c in PARSER_CASES], ids=[c[0] for c in PARSER_CASES])
def test_files_that_break_the_parsers_raise_adapter_errors_quickly(mutate, mlp, tmp_path):
    ak.save(lora(mlp), tmp_path, "a")
    mutate(tmp_path)
    refused(copy.deepcopy(mlp), tmp_path, ak.AdapterError)


def test_a_bad_fingerprint_in_a_peft_header_is_corrupt(mlp, tmp_path):
    ak.save(lora(mlp), tmp_path, "a", format="peft")
    tensors = load_file(tmp_path / PEFT_WEIGHTS)
    save_file(tensors, tmp_path / PEFT_WEIGHTS, metadata={"format": "pt", "adapterkit_fingerprint": "{not json"})
    refused(copy.deepcopy(mlp), tmp_path, ak.CorruptFileError, "not valid JSON")


def test_a_mosa_with_a_billion_modules_is_refused_without_looping(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = ak.attach(copy.deepcopy(base), ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=4, target_modules=["0"])), "m")
    ak.save(model, tmp_path, "m")
    edit_json(lambda c: c["config"].update(n_modules=10**9))(tmp_path)
    refused(copy.deepcopy(base), tmp_path, ak.CorruptFileError, "far more memory or work")

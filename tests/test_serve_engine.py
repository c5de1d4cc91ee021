"""The serving engine and adapter store without HTTP: batching, ordering of loads/unloads between
batches, shutdown, memory accounting, causal-LM generation, and the ``adapterkit serve`` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.apps.serve import (AdapterStore, Engine, EngineSettings, ShuttingDownError, adapter_memory, status_of)
from adapterkit.errors import AdapterNotFoundError, ConfigError, UnsupportedError
from conftest import assert_unchanged, snapshot, tiny_bert_config
from serve_support import (LM_ADAPTERS, PROMPTS, TEXTS, Gate, chat_lm, classifier_engine, classifier_tokenizer,
                           lm_reference, save_adapters, saved_classifiers, tiny_classifier)

ATOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_classifiers(tmp_path_factory, "engine")


@pytest.mark.parametrize("field,value", [("max_batch", 0), ("max_queue", -1), ("max_wait_ms", -1.0),
                                         ("max_texts", 2.5), ("max_new_tokens", True)])
def test_settings_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        EngineSettings(**{field: value})


def test_waiting_requests_form_one_batch_and_an_unload_waits_its_turn(saved, one_thread):
    root, reference = saved
    with classifier_engine(root, EngineSettings(max_batch=16, max_length=64, max_wait_ms=0), ("lora", "shira")) as engine:
        gate = Gate(engine.model)
        blocker = engine.submit_predict(None, [TEXTS[0]])
        assert gate.entered.wait(20)
        before = [engine.submit_predict(name, [TEXTS[i], TEXTS[i + 1]]) for i, name in enumerate(("lora", None, "shira"))]
        unloaded = engine.unload("lora")
        after = engine.submit_predict("lora", [TEXTS[0]])  # accepted (still loaded now), refused when its turn comes
        also = engine.submit_predict("shira", [TEXTS[5]])
        gate.release()
        blocker.result(20)
        for future, (i, name) in zip(before, enumerate(("lora", None, "shira"))):
            result = future.result(20)
            for row, text in enumerate((TEXTS[i], TEXTS[i + 1])):
                assert torch.allclose(torch.tensor(result.logits[row]), reference(name, text), atol=ATOL)
        assert unloaded.result(20).name == "lora"
        with pytest.raises(AdapterNotFoundError):
            after.result(20)
        assert torch.allclose(torch.tensor(also.result(20).logits[0]), reference("shira", TEXTS[5]), atol=ATOL)
        # the held row; the three requests (6 rows) up to the unload; the refused one is dropped from "also"'s batch
        assert engine.metrics.batch_sizes == {1: 2, 6: 1}
        assert engine.store.names() == ["shira"] and ak.adapters(engine.model) == ["shira"]


def test_closing_refuses_new_work_and_is_final(saved):
    engine = classifier_engine(saved[0]).start()
    assert engine.close(20) and engine.close(20)  # idempotent
    with pytest.raises(ShuttingDownError):
        engine.submit_predict(None, ["x"])
    with pytest.raises(ShuttingDownError):
        engine.start()
    assert status_of(ShuttingDownError("x")) == 503


def test_store_memory_accounting_is_exact(saved):
    root, _ = saved
    model = tiny_classifier()
    store = AdapterStore(model, root)
    lora, shira, onebit = (store.load(n).memory for n in ("lora", "shira", "onebit"))
    weights = 4 * (4 * 32 + 32 * 4)  # weights of 4 modules (query, value × 2 layers), r=4 on 32×32
    assert (lora.parameters, lora.buffers, lora.codes, lora.held) == (4 * weights, 0, 0, 4 * weights)
    assert (shira.parameters, shira.buffers) == (4 * weights, 8 * weights)  # K = r·(m+n) values + int64 indices
    # 1 bit, loaded packed: 8 codes a byte and μ, σ per matrix (8 matrices), as in the file; no fp32 latents
    assert (onebit.parameters, onebit.codes, onebit.buffers) == (0, 0, weights // 8 + 8 * 2 * 4)
    assert (root / "onebit" / "adapter.safetensors").stat().st_size == onebit.file > onebit.held
    assert store.fits_in(2**20) == {"lora": 2**20 // lora.held, "shira": 2**20 // shira.held, "onebit": 2**20 // onebit.held}
    assert adapter_memory(model, "lora") == lora.__class__(lora.parameters, 0, 0, 0)


def test_store_refuses_compositions_and_unknown_names_without_touching_the_model(saved, tmp_path):
    root, _ = saved
    stack_dir = root / "stacked"
    if not stack_dir.exists():
        source = tiny_classifier()
        ak.attach(source, ak.LoRAConfig(r=2, target_modules=["query"]), "s1")
        ak.attach(source, ak.LoRAConfig(r=2, target_modules=["value"]), "s2")
        ak.save(source, stack_dir, ak.Stack("s1", "s2"))
    model = tiny_classifier()
    store = AdapterStore(model, root)
    before = snapshot(model)
    with pytest.raises(UnsupportedError, match="composition"):
        store.load("stacked")
    with pytest.raises(AdapterNotFoundError):
        store.unload("lora")
    with pytest.raises(ConfigError):
        store.load("lora", name="no/slashes")
    assert_unchanged(model, before)


def test_generate_batches_mixed_adapters_with_left_padding(tmp_path, one_thread):
    source, tokenizer = chat_lm()
    save_adapters(source, LM_ADAPTERS, tmp_path, scale=0.5)
    model, _ = chat_lm()
    store = AdapterStore(model, tmp_path)
    for name in LM_ADAPTERS:
        store.load(name)
    jobs = [(None, PROMPTS[0], 6), ("lm_lora", PROMPTS[1], 4), ("lm_shira", PROMPTS[2], 8), ("lm_lora", PROMPTS[3], 8)]
    with Engine(model, tokenizer, store, EngineSettings(max_wait_ms=0, max_new_tokens=8, max_prompt_tokens=64)) as engine:
        with pytest.raises(UnsupportedError):
            engine.submit_predict(None, ["x"])
        with pytest.raises(ConfigError):
            engine.submit_generate(None, "x", max_new_tokens=9)
        gate = Gate(model)
        blocker = engine.submit_generate(None, "hold", 1)
        assert gate.entered.wait(20)
        futures = [engine.submit_generate(a, p, n) for a, p, n in jobs]
        gate.release()
        blocker.result(30)
        results = [f.result(30) for f in futures]
    assert engine.metrics.batch_sizes[len(jobs)] == 1  # one generate call for the four prompts
    answers = {a: lm_reference(source, tokenizer, a, PROMPTS[1], 8) for a in (None, "lm_lora", "lm_shira")}
    assert len(set(answers.values())) == 3  # the adapters change the greedy answer
    for (adapter, prompt, limit), result in zip(jobs, results):
        assert result.text == lm_reference(source, tokenizer, adapter, prompt, limit), (adapter, prompt)
        assert result.adapter == adapter and 1 <= result.tokens <= limit


def _args(**overrides) -> argparse.Namespace:
    values = dict(model="minilm", adapters=[], root=None, host="127.0.0.1", port=0, max_batch=8, max_queue=4,
                  max_wait_ms=1.0, max_length=64, max_prompt_tokens=32, max_new_tokens=8, max_adapters=8,
                  max_adapter_bytes=2**30, max_body_bytes=2**20, graceful_timeout=5.0, num_labels=None, threads=None)
    return argparse.Namespace(**{**values, **overrides})


def test_cli_builds_an_engine_from_a_model_directory_and_confines_startup_adapters(tmp_path, one_thread, capsys):
    from transformers import BertModel

    from adapterkit.cli import serve as serve_cli
    from adapterkit.cli.main import build_parser, main
    from adapterkit.zoo.models import load_sentence_classifier

    model_dir, root = tmp_path / "encoder", tmp_path / "root"
    torch.manual_seed(0)
    BertModel(tiny_bert_config(), add_pooling_layer=False).save_pretrained(model_dir)
    classifier_tokenizer().save_pretrained(model_dir)
    source, tokenizer = load_sentence_classifier(model_dir, num_labels=3)
    ak.attach(source, ak.LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), "sst")
    ak.save(source, root / "sst", "sst")
    (root / "sst" / "labels.json").write_text(json.dumps({"label_names": ["neg", "neu", "pos"]}))

    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--adapters", str(root / "sst"),
                                      "--max-batch", "4", "--max-length", "64", "--port", "0"])
    assert (args.run, args.max_batch, args.port, args.root) == (serve_cli.serve, 4, 0, None)
    with serve_cli.build_engine(args) as engine:  # no --root: the directory holding the --adapters
        assert engine.task == "classification" and engine.store.names() == ["sst"]
        assert engine.store.root == root.resolve() and engine.store.loaded()[0].path == Path("sst")
        result = engine.predict("sst", [TEXTS[0]], timeout=20)
    encoded = tokenizer([TEXTS[0]], return_tensors="pt")
    with torch.no_grad():
        expected = source(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])["logits"][0]
    assert torch.allclose(torch.tensor(result.logits[0]), expected, atol=ATOL)
    assert result.label_names == ["neg", "neu", "pos"]

    assert main(["serve", "--model", str(model_dir), "--adapters", str(root / "sst"), "--root", str(model_dir)]) == 2
    assert "under the server's root" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--root"):
        serve_cli.adapter_root(_args())  # neither --root nor --adapters: never the current directory
    assert serve_cli.adapter_root(_args(adapters=[str(root / "a" / "x"), str(root / "b")])) == root.resolve()
    # served under the directory's name, or NAME=DIR; two directories of one name need NAME=DIR
    ak.save(source, root / "other" / "sst", "sst")
    assert [n for n, _ in serve_cli.startup_adapters(_args(adapters=[str(root / "sst"), f"b={root / 'other' / 'sst'}"]))] == ["sst", "b"]
    with pytest.raises(ConfigError, match="used twice"):
        serve_cli.startup_adapters(_args(adapters=[str(root / "sst"), str(root / "other" / "sst")]))
    with pytest.raises(ConfigError, match="invalid adapter name"):
        serve_cli.startup_adapters(_args(adapters=[f"a b={root / 'sst'}"]))
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--adapters", f"renamed={root / 'sst'}", "--max-length", "64"])
    with serve_cli.build_engine(args) as engine:
        assert engine.store.names() == ["renamed"]
    assert main(["serve", "--model", str(model_dir), "--adapters", str(root / "sst"), "--max-length", "65"]) == 2
    assert "65 tokens, the model has 64 positions" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_serves_mixed_batches_equal_to_cpu_references(saved):
    root, reference = saved
    engine = classifier_engine(root, EngineSettings(max_length=64, max_wait_ms=20), ("lora", "shira", "onebit", "head"))
    engine.model.cuda()
    with engine:
        futures = [(name, text, engine.submit_predict(name, [text]))
                   for name in (None, "lora", "shira", "onebit", "head") for text in TEXTS[:3]]
        for name, text, future in futures:
            assert torch.allclose(torch.tensor(future.result(60).logits[0]), reference(name, text), atol=1e-4)

"""The serving engine and store when things go wrong: every request gets an answer or an error (never
silence), one bad request fails alone, limits the model cannot run are refused at start, close()
keeps its timeout, the queue holds exactly max_queue, and a failed load leaves no trace."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import adapterkit as ak
import adapterkit.apps.serve.engine as engine_module
import adapterkit.apps.serve.store as store_module
from adapterkit.apps.serve import (AdapterStore, CapacityError, Engine, EngineSettings, InferenceError, OverloadedError,
                                   status_of)
from adapterkit.errors import ConfigError, CorruptFileError, UnsupportedError
from conftest import assert_unchanged, snapshot
from serve_support import (TEXTS, Gate, chat_lm, classifier_engine, classifier_tokenizer, edited_copy, saved_classifiers,
                           tiny_classifier, wait_for)

ATOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_classifiers(tmp_path_factory, "failures")


def test_a_prompt_the_tokenizer_fails_on_gets_a_500_and_never_hangs(one_thread, tmp_path):
    model, tokenizer = chat_lm()
    engine = Engine(model, tokenizer, AdapterStore(model, tmp_path),
                    EngineSettings(max_wait_ms=50, max_new_tokens=4, max_prompt_tokens=32))
    real = engine.generator.prompt_ids

    def prompt_ids(prompt, limit):
        if prompt == "boom":
            raise ValueError("the tokenizer exploded")  # not an AdapterError
        return real(prompt, limit)

    engine.generator.prompt_ids = prompt_ids
    with engine:
        gate = Gate(model)
        held = engine.submit_generate(None, "hold", 1)
        assert gate.entered.wait(20)
        bad, good = engine.submit_generate(None, "boom", 2), engine.submit_generate(None, "fine", 2)
        gate.release()
        held.result(20)
        with pytest.raises(InferenceError, match="exploded"):
            bad.result(20)  # before the fix: never resolved
        assert 1 <= good.result(20).tokens <= 2  # the other prompt of the same batch is answered


def test_a_worker_failure_before_the_forward_fails_the_batch_instead_of_hanging(saved, one_thread, monkeypatch):
    engine = classifier_engine(saved[0], EngineSettings(max_length=64, max_wait_ms=50), ("lora",))
    with engine:
        gate = Gate(engine.model)
        held = engine.submit_predict(None, ["hold"])
        assert gate.entered.wait(20)
        futures = [engine.submit_predict(a, [t]) for a, t in ((None, TEXTS[0]), ("lora", TEXTS[1]))]
        monkeypatch.setattr(engine, "_claim", lambda job: 1 / 0)  # a bug in the worker's own code
        gate.release()
        held.result(20)
        for future in futures:
            with pytest.raises(InferenceError, match="ZeroDivisionError"):
                future.result(20)
        monkeypatch.undo()
        assert engine.predict("lora", [TEXTS[2]], timeout=20).version == 1  # the worker lives on


@pytest.mark.parametrize("error", [RuntimeError("the kernel broke"), ConfigError("an AdapterError inside the forward")])
def test_one_failing_request_fails_alone_and_as_a_server_error(saved, one_thread, monkeypatch, error):
    root, reference = saved
    engine = classifier_engine(root, EngineSettings(max_length=64, max_wait_ms=50), ("lora", "shira"))
    real = engine_module.classify

    def classify(model, tokenizer, names, texts, max_length):
        if "poison" in texts:
            raise error
        return real(model, tokenizer, names, texts, max_length)

    monkeypatch.setattr(engine_module, "classify", classify)
    with engine:
        gate = Gate(engine.model)
        held = engine.submit_predict(None, ["hold"])
        assert gate.entered.wait(20)
        jobs = [("lora", [TEXTS[0]]), (None, ["poison", TEXTS[1]]), ("shira", [TEXTS[2], TEXTS[3]])]
        futures = [engine.submit_predict(a, t) for a, t in jobs]
        gate.release()
        held.result(20)
        with pytest.raises(InferenceError, match=str(error)) as failed:
            futures[1].result(20)
        assert status_of(failed.value) == 500  # the server's failure, not the client's input (422)
        for (adapter, texts), future in zip(jobs[::2], futures[::2]):
            logits = future.result(20).logits
            assert len(logits) == len(texts)
            for row, text in zip(logits, texts):
                assert torch.allclose(torch.tensor(row), reference(adapter, text), atol=ATOL)
    assert engine.metrics.batch_sizes == {1: 2, 2: 1}  # held; the batch of 5 failed; lora (1) and shira (2) alone


def test_limits_beyond_the_models_positions_are_refused_at_start(saved, tmp_path):
    model = tiny_classifier()  # 64 positions
    with pytest.raises(ConfigError, match="max_length is 65 tokens, the model has 64 positions"):
        Engine(model, classifier_tokenizer(), AdapterStore(model, saved[0]), EngineSettings(max_length=65))
    lm, tokenizer = chat_lm()  # 512 positions
    with pytest.raises(ConfigError, match="600 tokens, the model has 512 positions"):
        Engine(lm, tokenizer, AdapterStore(lm, tmp_path), EngineSettings(max_prompt_tokens=400, max_new_tokens=200))
    Engine(lm, tokenizer, AdapterStore(lm, tmp_path), EngineSettings(max_prompt_tokens=256, max_new_tokens=256))


def test_close_keeps_its_timeout_with_a_full_queue(saved, one_thread):
    engine = classifier_engine(saved[0], EngineSettings(max_queue=2, max_batch=1, max_length=64, max_wait_ms=0))
    gate = Gate(engine.model)
    engine.start()
    held = engine.submit_predict(None, [TEXTS[0]])
    assert gate.entered.wait(20)
    queued = [engine.submit_predict(None, [t]) for t in TEXTS[1:3]]  # the queue is full
    stopped: list[bool] = []
    closer = threading.Thread(target=lambda: stopped.append(engine.close(timeout=0.05)), daemon=True)
    closer.start()
    try:
        closer.join(20)  # before the fix: blocked on the full queue until the worker made room
        assert not closer.is_alive() and stopped == [False]
    finally:
        gate.release()
    assert engine.close(20)
    for future in (held, *queued):
        assert len(future.result(0).logits) == 1


def test_the_queue_holds_exactly_max_queue_with_a_carried_request(saved, one_thread):
    engine = classifier_engine(saved[0], EngineSettings(max_queue=2, max_batch=2, max_length=64, max_wait_ms=10_000))
    gate = Gate(engine.model)
    with engine:
        try:
            first = engine.submit_predict(None, [TEXTS[0]])
            carried = engine.submit_predict(None, TEXTS[1:3])  # 1 + 2 rows > max_batch: carried to the next batch
            assert gate.entered.wait(20)  # the worker runs "first" alone; "carried" left the queue but waits
            assert engine.queued == 1
            third = engine.submit_predict(None, TEXTS[3:5])  # 2 rows: a full batch, no waiting for more
            with pytest.raises(OverloadedError):
                engine.submit_predict(None, [TEXTS[5]])  # before the fix: accepted (2 in the queue + 1 carried)
        finally:
            gate.release()
        assert [len(f.result(20).logits) for f in (first, carried, third)] == [1, 2, 2]


def test_a_failure_after_the_attach_detaches_again(saved, monkeypatch):
    root, _ = saved
    model = tiny_classifier()
    store = AdapterStore(model, root)
    store.load("shira")
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("memory accounting failed")

    monkeypatch.setattr(store_module, "adapter_memory", broken)
    with pytest.raises(RuntimeError, match="accounting"):
        store.load("lora", "x")
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert store.names() == ["shira"] and ak.adapters(model) == ["shira"] and ak.active_adapters(model) == []
    with pytest.raises(CapacityError, match="max_adapter_bytes"):
        store.load("lora", "x", max_bytes=100)
    assert_unchanged(model, before)
    assert store.load("lora", "x").name == "x"  # the name is free again
    assert store.names() == ["shira", "x"]


def test_model_level_adapters_are_refused_before_the_attach(saved, monkeypatch):
    root, _ = saved
    edited_copy(root, "lora", "model_level", lambda c: c["base_model"]["modules"].update({"": {}}))
    model = tiny_classifier()
    store = AdapterStore(model, root)
    before = snapshot(model)
    monkeypatch.setattr(store_module.artefact, "load", lambda *a, **k: pytest.fail("attached"))
    with pytest.raises(UnsupportedError, match="model-level"):
        store.load("model_level")
    assert_unchanged(model, before)


def test_labels_must_match_the_head(saved, one_thread):
    root, _ = saved
    for name, count in (("labels3", 3), ("labels5", 5)):
        if not (root / name).exists():
            edited_copy(root, "head", name, lambda c: None)
            (root / name / "labels.json").write_text(json.dumps({"label_names": [f"c{i}" for i in range(count)]}))
    engine = classifier_engine(root)  # the tiny classifier has 3 classes: measured at start
    assert engine.store.classes == 3
    with engine:
        assert engine.load("labels3").result(20).label_names == ("c0", "c1", "c2")
        with pytest.raises(CorruptFileError, match="names 5 classes; the model's head has 3"):
            engine.load("labels5", "other").result(20)
    model = tiny_classifier()
    store = AdapterStore(model, root)
    store.load("labels5")  # without an engine the store cannot know the head
    with pytest.raises(CorruptFileError, match="5 classes"):
        Engine(model, classifier_tokenizer(), store, EngineSettings(max_length=64))


def test_capacity_limits_are_checked_when_the_engine_starts(saved):
    model = tiny_classifier()
    store = AdapterStore(model, saved[0])
    store.load("lora")
    store.load("shira")
    with pytest.raises(ConfigError, match="2 adapters"):
        Engine(model, classifier_tokenizer(), store, EngineSettings(max_length=64, max_adapters=1))
    with pytest.raises(ConfigError, match="bytes"):
        Engine(model, classifier_tokenizer(), store, EngineSettings(max_length=64, max_adapter_bytes=1000))
    engine = Engine(model, classifier_tokenizer(), store, EngineSettings(max_length=64, max_adapters=2)).start()
    try:
        with pytest.raises(CapacityError, match="unload one first") as full:
            engine.load("onebit")
        assert status_of(full.value) == 507
        engine.unload("shira").result(20)
        wait_for(lambda: len(engine.store) == 1)
        assert engine.load("onebit").result(20).name == "onebit"
    finally:
        engine.close(20)

"""``adapterkit serve`` over HTTP: every endpoint through Starlette's in-process TestClient, the error
statuses, path confinement, mixed-adapter batches equal to single-request references, no torn
weights under concurrent loads/unloads, and one real request over uvicorn on the loopback."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.apps.serve import EngineSettings, create_app  # noqa: E402
from conftest import assert_unchanged, snapshot, tiny_bert_config  # noqa: E402
from serve_support import (TEXTS, Gate, classifier_engine, saved_classifiers, uvicorn_server,  # noqa: E402
                           wait_for)

ATOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(root, reference)``: the classifier adapters saved under ``root/``, and single-request references."""
    return saved_classifiers(tmp_path_factory)


@pytest.fixture
def served(saved, one_thread):
    """A started engine with "lora" and "shira" loaded, its app, and a TestClient."""
    root, reference = saved
    engine = classifier_engine(root, preload=("lora", "shira"))
    with TestClient(create_app(engine)) as client:
        yield engine, client, reference
    engine.close()


def check_logits(reference, adapter, texts, body, served: str | None = "same") -> None:
    """``body`` answers ``texts`` exactly as ``adapter`` does alone (served under the name ``served``,
    by default ``adapter``'s own); a missing or extra row fails."""
    assert body["adapter"] == (adapter if served == "same" else served)
    assert len(body["logits"]) == len(body["labels"]) == len(texts), body
    for text, logits, label in zip(texts, body["logits"], body["labels"]):
        expected = reference(adapter, text)
        assert torch.allclose(torch.tensor(logits), expected, atol=ATOL), (adapter, text)
        assert label == int(expected.argmax())


def test_endpoints_list_load_predict_unload_and_report(served, saved):
    engine, client, reference = served
    assert client.get("/health").json()["status"] == "ok"
    listed = client.get("/adapters").json()
    assert [(a["name"], a["path"], a["version"]) for a in listed["adapters"]] == [("lora", "lora", 1), ("shira", "shira", 2)]
    shira = listed["adapters"][1]["memory"]
    assert shira["buffers"] > 0 and shira["held"] == shira["parameters"] + shira["buffers"]  # the int64 indices
    assert listed["fits_in_1gib"]["lora"] == 2**30 // listed["adapters"][0]["memory"]["held"]

    loaded = client.post("/adapters", json={"path": "onebit"})
    assert loaded.status_code == 201 and loaded.json()["bits"] == 1
    memory = loaded.json()["memory"]
    # loaded packed: only the codes (8 a byte) and μ, σ are held, the file's tensors
    assert memory["parameters"] == memory["codes"] == 0 and 0 < memory["held"] == memory["buffers"] < memory["file"]
    renamed = client.post("/adapters", json={"path": str(saved[0] / "lora"), "name": "lora2"})
    assert renamed.status_code == 201 and renamed.json()["name"] == "lora2"

    for adapter in (None, "lora", "shira", "onebit"):
        response = client.post("/predict", json={"adapter": adapter, "texts": list(TEXTS[:3])})
        assert response.status_code == 200, response.text
        check_logits(reference, adapter, TEXTS[:3], response.json())
    response = client.post("/predict", json={"adapter": "lora2", "texts": [TEXTS[0]]})
    assert torch.allclose(torch.tensor(response.json()["logits"][0]), reference("lora", TEXTS[0]), atol=ATOL)

    assert client.delete("/adapters/onebit").json() == {"unloaded": "onebit"}
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["lora", "shira", "lora2"]
    metrics = client.get("/metrics").json()
    assert metrics["adapters_loaded"] == 3 and set(metrics["adapters"]) == {"lora", "shira", "lora2"}
    assert metrics["responses_by_status"]["200"] >= 5 and metrics["latency_ms"]["p99"] >= metrics["latency_ms"]["p50"]
    assert sum(metrics["batch_size_histogram"].values()) == metrics["batches"] >= 5
    assert metrics["rss_bytes"] > 0


@pytest.mark.parametrize("body", [
    {},                                                       # no texts
    {"texts": []},                                            # empty
    {"texts": "one string"},                                  # not a list
    {"texts": ["ok", 3]},                                     # not strings
    {"texts": [""]},                                          # empty text
    {"texts": ["x"] * 65},                                    # more than max_texts
    {"texts": ["x" * 9000]},                                  # longer than max_text_chars
    {"texts": ["ok"], "adapter": "../lora"},                  # not an adapter name
    {"texts": ["ok"], "adapter": 5},                          # wrong type
    {"texts": ["ok"], "extra": 1},                            # unknown field
])
def test_bad_input_is_422_and_the_server_keeps_serving(served, body):
    engine, client, reference = served
    response = client.post("/predict", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] in ("RequestValidationError", "ConfigError") and response.json()["detail"]
    assert client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/adapters", json={"path": "lora", "name": "a b"}).status_code == 422
    ok = client.post("/predict", json={"adapter": "lora", "texts": ["still fine"]})
    assert ok.status_code == 200
    check_logits(reference, "lora", ["still fine"], ok.json())


def test_unknown_adapter_is_404(served):
    _, client, _ = served
    response = client.post("/predict", json={"adapter": "nope", "texts": ["x"]})
    assert response.status_code == 404 and response.json()["error"] == "AdapterNotFoundError"
    assert client.delete("/adapters/nope").status_code == 404


def test_wrong_task_and_duplicate_names(served):
    _, client, _ = served
    assert client.post("/generate", json={"prompt": "hi"}).status_code == 400  # a classifier cannot generate
    duplicate = client.post("/adapters", json={"path": "lora"})
    assert duplicate.status_code == 409 and duplicate.json()["error"] == "DuplicateAdapterError"


def test_paths_outside_the_root_are_403_and_nothing_changes(served, saved, tmp_path):
    engine, client, _ = served
    root = saved[0]
    outside = tmp_path / "outside"
    shutil.copytree(root / "lora", outside)
    (root / "escape").symlink_to(outside, target_is_directory=True) if not (root / "escape").exists() else None
    sneaky = root / "sneaky"
    if not sneaky.exists():  # a directory inside the root whose weights file links to a file outside it
        sneaky.mkdir()
        shutil.copy(root / "lora" / "adapter_config.json", sneaky)
        (sneaky / "adapter.safetensors").symlink_to(outside / "adapter.safetensors")
    before = snapshot(engine.model)
    for path in ("../outside", "lora/../../outside", str(outside), "escape", "sneaky", "/etc"):
        response = client.post("/adapters", json={"path": path, "name": "evil"})
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"] == "PathOutsideRootError"
    assert_unchanged(engine.model, before)
    assert "evil" not in client.get("/adapters").text


def test_unusable_directories_are_400_with_nothing_loaded(served, saved, tmp_path):
    engine, client, _ = served
    root = saved[0]
    broken = root / "broken"
    if not broken.exists():
        shutil.copytree(root / "onebit", broken)
        weights = broken / "adapter.safetensors"
        weights.write_bytes(weights.read_bytes()[:-7])  # truncated
        empty = root / "empty"
        empty.mkdir()
        from transformers import BertForSequenceClassification

        other = BertForSequenceClassification(tiny_bert_config(hidden_size=48)).eval()  # another base model
        ak.save(ak.attach(other, ak.LoRAConfig(r=2, target_modules=["key"]), "k"), root / "wrong_shape", "k")
    before = snapshot(engine.model)
    for path, error in (("broken", "CorruptFileError"), ("empty", "MissingFileError"), ("missing_dir", "MissingFileError"),
                        ("wrong_shape", "BaseModelMismatchError")):
        response = client.post("/adapters", json={"path": path, "name": "bad"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"] == error
        assert response.json()["detail"]
    assert_unchanged(engine.model, before)
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["lora", "shira"]


def test_overload_is_429_and_the_queue_drains_afterwards(saved, one_thread):
    root, reference = saved
    engine = classifier_engine(root, EngineSettings(max_queue=2, max_batch=1, max_length=64, max_wait_ms=0), ("lora",))
    gate = Gate(engine.model)  # a deliberately slow model: the worker stays inside the first forward
    with TestClient(create_app(engine)) as client:
        held = engine.submit_predict("lora", [TEXTS[0]])
        assert gate.entered.wait(20)
        queued = [engine.submit_predict(None, [t]) for t in TEXTS[1:3]]  # fills the queue of 2
        response = client.post("/predict", json={"adapter": "lora", "texts": ["one too many"]})
        assert response.status_code == 429 and response.json()["error"] == "OverloadedError"
        gate.release()
        assert torch.allclose(torch.tensor(held.result(20).logits[0]), reference("lora", TEXTS[0]), atol=ATOL)
        for future, text in zip(queued, TEXTS[1:3]):
            assert torch.allclose(torch.tensor(future.result(20).logits[0]), reference(None, text), atol=ATOL)
        assert client.post("/predict", json={"texts": ["ok"]}).status_code == 200
        assert client.get("/metrics").json()["errors_by_status"]["429"] == 1


def test_concurrent_mixed_adapter_requests_share_batches_and_equal_references(saved, one_thread):
    root, reference = saved
    names = (None, "lora", "shira", "onebit", "head", "bneck")
    engine = classifier_engine(root, EngineSettings(max_batch=64, max_length=64, max_wait_ms=50), names[1:])
    gate = Gate(engine.model)
    jobs = [(names[i % len(names)], TEXTS[(i * 5) % len(TEXTS)]) for i in range(18)]
    results: dict[int, dict] = {}
    with TestClient(create_app(engine)) as client:
        blocker = engine.submit_predict(None, ["hold the worker"])
        assert gate.entered.wait(20)

        def ask(i: int) -> None:
            adapter, text = jobs[i]
            results[i] = client.post("/predict", json={"adapter": adapter, "texts": [text]}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        wait_for(lambda: engine.queued == len(jobs))  # all 18 wait behind the held forward
        gate.release()
        for thread in threads:
            thread.join(30)
        blocker.result(20)
        histogram = client.get("/metrics").json()["batch_size_histogram"]
    assert histogram == {"1": 1, "18": 1}  # the held request, then all 18 in one mixed forward
    for i, (adapter, text) in enumerate(jobs):
        check_logits(reference, adapter, [text], results[i])


def test_no_torn_weights_while_another_thread_loads_and_unloads(saved, one_thread):
    """Every answer for "x" equals exactly the adapter loaded as "x" in the load (version) that answered."""
    root, reference = saved
    engine = classifier_engine(root, EngineSettings(max_batch=8, max_length=64, max_wait_ms=1), ("lora",))
    for text in TEXTS:  # the two adapters loaded as "x" answer differently: a swap would show
        assert not torch.allclose(reference("onebit", text), reference("shira", text), atol=ATOL)
    stop = threading.Event()
    outcomes: list[tuple[str | None, str, int, dict]] = []
    loaded_as: dict[int, str] = {}  # version of "x" -> the directory loaded under that version
    with TestClient(create_app(engine)) as client:
        def churn() -> None:  # load "x" (onebit's files, then shira's under the same name), ask it, unload, repeat
            for i in range(12):
                path, text = ("onebit", "shira")[i % 2], TEXTS[i % len(TEXTS)]
                loaded = client.post("/adapters", json={"path": path, "name": "x"})
                assert loaded.status_code == 201
                loaded_as[loaded.json()["version"]] = path
                own = client.post("/predict", json={"adapter": "x", "texts": [text]})  # one answer per version at least
                assert own.status_code == 200
                outcomes.append(("x", text, 200, own.json()))
                assert client.delete("/adapters/x").status_code == 200
            stop.set()

        def ask(k: int) -> None:
            i = 0
            while not stop.is_set() and i < 40:
                adapter = (None, "lora", "x")[(i + k) % 3]
                text = TEXTS[(i + k) % len(TEXTS)]
                response = client.post("/predict", json={"adapter": adapter, "texts": [text]})
                outcomes.append((adapter, text, response.status_code, response.json()))
                i += 1

        threads = [threading.Thread(target=churn)] + [threading.Thread(target=ask, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(loaded_as) == 12
    answered = set()
    for adapter, text, status, body in outcomes:
        if adapter == "x" and status == 404:  # asked while "x" was not loaded
            continue
        assert status == 200, body
        if adapter == "x":
            check_logits(reference, loaded_as[body["version"]], [text], body, served="x")
            answered.add(body["version"])
        else:
            check_logits(reference, adapter, [text], body)
            assert body["version"] == (None if adapter is None else 1)
    assert answered == set(loaded_as)


def test_graceful_shutdown_finishes_in_flight_and_queued_requests(saved, one_thread):
    root, reference = saved
    engine = classifier_engine(root, EngineSettings(max_batch=1, max_length=64, max_wait_ms=0), ("lora",))
    gate = Gate(engine.model)
    with TestClient(create_app(engine, close_engine=False)) as client:
        futures = [engine.submit_predict("lora", [t]) for t in TEXTS[:4]]
        assert gate.entered.wait(20)
        closer = threading.Thread(target=engine.close)
        closer.start()
        wait_for(lambda: not engine.accepting)
        assert client.post("/predict", json={"texts": ["late"]}).status_code == 503
        assert client.get("/health").status_code == 503
        gate.release()
        closer.join(30)
    assert not closer.is_alive()
    for future, text in zip(futures, TEXTS[:4]):  # in flight (1) and queued (3): all answered
        assert torch.allclose(torch.tensor(future.result(0).logits[0]), reference("lora", text), atol=ATOL)


def test_a_failing_forward_is_500_and_the_worker_survives(served):
    engine, client, _ = served
    handle = engine.model.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(RuntimeError("boom")))
    response = client.post("/predict", json={"texts": ["x"]})
    handle.remove()
    assert response.status_code == 500 and "boom" in response.json()["detail"]
    assert client.post("/predict", json={"texts": ["x"]}).status_code == 200


def test_uvicorn_serves_one_real_request_on_the_loopback(saved, one_thread):
    root, reference = saved
    engine = classifier_engine(root, preload=("lora",))
    with uvicorn_server(create_app(engine)) as (server, sock):
        request = urllib.request.Request(f"http://127.0.0.1:{sock.getsockname()[1]}/predict", method="POST",
                                         data=json.dumps({"adapter": "lora", "texts": [TEXTS[1]]}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=20) as response:
            body = json.loads(response.read())
        check_logits(reference, "lora", [TEXTS[1]], body)
    assert not engine.accepting  # the lifespan closed the engine


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinks_inside_the_root_are_fine(served, saved):
    _, client, reference = served
    link = saved[0] / "alias"
    if not link.exists():
        link.symlink_to(saved[0] / "head", target_is_directory=True)
    assert client.post("/adapters", json={"path": "alias"}).status_code == 201
    response = client.post("/predict", json={"adapter": "head", "texts": [TEXTS[2]]})
    check_logits(reference, "head", [TEXTS[2]], response.json())


def test_generate_endpoint_on_a_causal_lm(tmp_path, one_thread):
    from adapterkit.apps.serve import AdapterStore, Engine
    from serve_support import LM_ADAPTERS, PROMPTS, chat_lm, lm_reference, save_adapters

    source, tokenizer = chat_lm()
    save_adapters(source, {"lm_lora": LM_ADAPTERS["lm_lora"]}, tmp_path, scale=0.5)
    model, _ = chat_lm()
    store = AdapterStore(model, tmp_path)
    store.load("lm_lora")
    engine = Engine(model, tokenizer, store, EngineSettings(max_new_tokens=8, max_prompt_tokens=40, max_wait_ms=1))
    with TestClient(create_app(engine)) as client:
        for adapter in (None, "lm_lora"):
            response = client.post("/generate", json={"adapter": adapter, "prompt": PROMPTS[1], "max_new_tokens": 6})
            assert response.status_code == 200, response.text
            assert response.json()["text"] == lm_reference(source, tokenizer, adapter, PROMPTS[1], 6)
            assert response.json()["version"] == (None if adapter is None else 1)
        assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 9}).status_code == 422  # over the limit
        too_long = client.post("/generate", json={"prompt": "x" * 60})  # more prompt tokens than the server takes
        assert too_long.status_code == 422 and "tokens" in too_long.json()["detail"]
        assert client.post("/predict", json={"texts": ["x"]}).status_code == 400
        assert client.post("/generate", json={"adapter": "nope", "prompt": "x"}).status_code == 404
        assert client.get("/health").json()["task"] == "causal-lm"

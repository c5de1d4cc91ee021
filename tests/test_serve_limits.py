"""``adapterkit serve`` at its edges over HTTP: unusable adapter configs (400), oversized bodies (413),
full stores (507), paths that loop, cannot be read or change after the check, unforeseen errors (JSON
500), a running request when uvicorn stops, and the gathered per-row LoRA path."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import adapterkit.apps.serve.store as store_module  # noqa: E402
import adapterkit.core.rows as rows_module  # noqa: E402
from adapterkit.apps.serve import AdapterStore, EngineSettings, PathOutsideRootError, create_app  # noqa: E402
from adapterkit.errors import ConfigError  # noqa: E402
from conftest import assert_unchanged, snapshot  # noqa: E402
from serve_support import (TEXTS, Gate, classifier_engine, edited_copy, saved_classifiers, tiny_classifier,  # noqa: E402
                           uvicorn_server, wait_for)

ATOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_classifiers(tmp_path_factory, "limits")


@pytest.fixture
def served(saved, one_thread):
    engine = classifier_engine(saved[0], EngineSettings(max_length=64, max_wait_ms=1, max_adapters=3), ("lora",))
    with TestClient(create_app(engine, max_body_bytes=2000), raise_server_exceptions=False) as client:
        yield engine, client
    engine.close()


def _set(field, value):
    def edit(config):
        (config if field == "method" else config["config"])[field] = value
    return edit


@pytest.mark.parametrize("field,value", [("r", 0), ("r", "x"), ("target_modules", 5), ("method", "nope")])
def test_an_invalid_adapter_config_is_400_with_its_message(served, saved, field, value):
    engine, client = served
    directory = edited_copy(saved[0], "lora", f"bad_{field}_{value}", _set(field, value))
    before = snapshot(engine.model)
    response = client.post("/adapters", json={"path": directory.name, "name": "bad"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "CorruptFileError" and directory.name in body["detail"], body
    assert (field if field != "r" else "rank") in body["detail"] or "nope" in body["detail"]
    assert "adapterkit-serve-" not in body["detail"]  # names the requested directory, not the private copy
    assert_unchanged(engine.model, before)
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["lora"]


def test_oversized_bodies_are_413_before_parsing(served):
    engine, client = served
    big = json.dumps({"texts": ["x" * 1000, "y" * 1000]})
    response = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"] == "BodyTooLargeError"
    chunked = client.post("/predict", content=iter([big[:1000].encode(), big[1000:].encode()]),
                          headers={"content-type": "application/json"})  # no Content-Length: counted as it arrives
    assert chunked.status_code == 413 and "2,000 bytes" in chunked.json()["detail"]
    assert client.post("/predict", json={"texts": ["x" * 1000]}).status_code == 200
    assert engine.metrics.by_status[413] == 2


def test_a_full_store_is_507_and_nothing_changes(served):
    engine, client = served
    assert client.post("/adapters", json={"path": "shira"}).status_code == 201
    before = snapshot(engine.model)
    object.__setattr__(engine.settings, "max_adapter_bytes", engine.store.held_bytes() + 100)  # room for 100 bytes
    response = client.post("/adapters", json={"path": "onebit"})
    assert response.status_code == 507 and "max_adapter_bytes" in response.json()["detail"]
    assert_unchanged(engine.model, before)
    object.__setattr__(engine.settings, "max_adapter_bytes", 2**30)
    assert client.post("/adapters", json={"path": "onebit"}).status_code == 201  # 3 = max_adapters
    full = client.post("/adapters", json={"path": "head"})
    assert full.status_code == 507 and full.json()["error"] == "CapacityError"


def test_symlink_loops_and_unreadable_paths_are_clear_json_errors(served, saved, monkeypatch):
    engine, client = served
    root = saved[0]
    if not (root / "loop").is_symlink():
        (root / "loop").symlink_to(root / "loop")
        shutil.copytree(root / "lora", root / "inner_loop")
        (root / "inner_loop" / "x.lnk").symlink_to(root / "inner_loop" / "x.lnk")
    for path in ("loop", "inner_loop"):
        response = client.post("/adapters", json={"path": path})
        assert response.status_code == 400 and response.json()["error"] == "CorruptFileError", response.text
    real = pathlib.Path.iterdir

    def iterdir(self):
        if self.name == "lora":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    response = client.post("/adapters", json={"path": "lora", "name": "again"})
    assert response.status_code == 403 and response.json()["error"] == "UnreadablePathError", response.text


@pytest.mark.parametrize("swap", ["file", "directory", "file between its last check and its open"])
def test_a_path_swapped_for_a_symlink_after_the_check_is_refused(saved, tmp_path, monkeypatch, swap):
    root = saved[0]
    directory = root / f"swap_{len(swap)}"
    shutil.copytree(root / "lora", directory)
    outside = tmp_path / "outside"
    shutil.copytree(root / "shira", outside)
    weights = directory / "adapter.safetensors"
    checked = threading.Event()
    real, real_realpath = store_module.resolve_under, os.path.realpath

    def swap_file() -> None:
        weights.unlink()
        weights.symlink_to(outside / "adapter.safetensors")

    def resolve_then_swap(base, path):  # the check passes, then the directory changes under it
        resolved = real(base, path)
        if swap == "file":
            swap_file()
        elif swap == "directory":
            directory.rename(root / f"moved_{len(swap)}")
            directory.symlink_to(outside, target_is_directory=True)
        checked.set()
        return resolved

    def realpath(path, *args, **kwargs):  # the copy's own check of the file passes, then the file changes
        resolved = real_realpath(path, *args, **kwargs)
        if checked.is_set() and swap.startswith("file between") and Path(path) == weights and not weights.is_symlink():
            swap_file()
        return resolved

    model = tiny_classifier()
    store = AdapterStore(model, root)
    before = snapshot(model)
    monkeypatch.setattr(store_module, "resolve_under", resolve_then_swap)
    monkeypatch.setattr(os.path, "realpath", realpath)
    with pytest.raises(PathOutsideRootError, match="links outside" if swap == "file" else "changed into a symlink"):
        store.load(directory.name, "swapped")
    assert_unchanged(model, before)
    assert store.names() == []


def test_every_error_is_json(served, monkeypatch):
    engine, client = served
    missing = client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"] == "HTTPException"
    monkeypatch.setattr(engine, "status", lambda: 1 / 0)
    broken = client.get("/health")
    assert broken.status_code == 500 and broken.json() == {"error": "InternalServerError",
                                                           "detail": "ZeroDivisionError: division by zero"}
    handle = engine.model.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(ConfigError("inside")))
    failed = client.post("/predict", json={"texts": ["x"]})
    handle.remove()
    assert failed.status_code == 500 and failed.json()["error"] == "InferenceError"  # the server's failure, not 422


def test_a_request_running_when_uvicorn_stops_is_answered(saved, one_thread):
    root, reference = saved
    engine = classifier_engine(root, EngineSettings(max_batch=1, max_length=64, max_wait_ms=0), ("lora",))
    gate = Gate(engine.model)
    answers: list[dict] = []
    with uvicorn_server(create_app(engine), timeout_graceful_shutdown=30) as (server, sock):
        request = urllib.request.Request(f"http://127.0.0.1:{sock.getsockname()[1]}/predict", method="POST",
                                         data=json.dumps({"adapter": "lora", "texts": [TEXTS[0]]}).encode(),
                                         headers={"content-type": "application/json"})

        def ask() -> None:
            with urllib.request.urlopen(request, timeout=60) as response:
                answers.append(json.loads(response.read()))

        client = threading.Thread(target=ask)
        client.start()
        assert gate.entered.wait(20)  # the request is inside the forward
        server.should_exit = True
        wait_for(lambda: sock.fileno() == -1)  # uvicorn closed its listening socket: the shutdown is under way
        assert engine.accepting  # the engine closes only after the open requests
        gate.release()
        client.join(60)
    assert len(answers) == 1 and torch.allclose(torch.tensor(answers[0]["logits"][0]), reference("lora", TEXTS[0]),
                                                atol=ATOL)
    assert not engine.accepting and not engine.status()["worker_alive"]


def test_gathered_lora_rows_through_the_server(saved, one_thread, monkeypatch):
    root, reference = saved
    gathered: list[int] = []
    real = rows_module._gathered
    monkeypatch.setattr(rows_module, "GATHER_MIN_GROUPS", 1)  # gather even one LoRA group per shape
    monkeypatch.setattr(rows_module, "_gathered", lambda out, a, x, group: (gathered.append(len(group)),
                                                                           real(out, a, x, group))[1])
    names = (None, "lora", "head", "shira", "bneck")
    engine = classifier_engine(root, EngineSettings(max_batch=64, max_length=64, max_wait_ms=50), names[1:])
    gate = Gate(engine.model)
    jobs = [(names[i % len(names)], TEXTS[i % len(TEXTS)]) for i in range(10)]
    results: dict[int, dict] = {}
    with TestClient(create_app(engine)) as client:
        held = engine.submit_predict(None, ["hold"])
        assert gate.entered.wait(20)

        def ask(i: int) -> None:
            results[i] = client.post("/predict", json={"adapter": jobs[i][0], "texts": [jobs[i][1]]}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        wait_for(lambda: engine.queued == len(jobs))
        gate.release()
        for thread in threads:
            thread.join(30)
        held.result(20)
    assert engine.metrics.batch_sizes == {1: 1, len(jobs): 1} and gathered  # one mixed forward, gathered
    for i, (adapter, text) in enumerate(jobs):
        assert len(results[i]["logits"]) == 1
        assert torch.allclose(torch.tensor(results[i]["logits"][0]), reference(adapter, text), atol=ATOL), (adapter, text)

"""Shared pieces of the serving tests: tiny models with saved adapters, single-request references,
and a gate that holds the engine's worker inside a forward (to fill its queue deterministically)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.apps.serve import AdapterStore, Engine, EngineSettings
from conftest import randomise, tiny_bert_config
from lm_support import char_tokenizer, tiny_chat_lm

TEXTS = ("a good film", "bad!", "so-so, I guess", "the best thing in years", "no", "meh 2/10")
PROMPTS = ("hi", "say something", "1 2 3", "what?")
#: name -> config of the classifier adapters saved under the root
CLASSIFIER_ADAPTERS = {
    "lora": lambda: ak.LoRAConfig(r=4, target_modules=["query", "value"]),
    "shira": lambda: ak.ShiraConfig(r=4, target_modules=["query", "value"]),
    "onebit": lambda: ak.LoRAConfig(r=4, target_modules=["query", "value"], bits=1),
    "head": lambda: ak.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]),
    "bneck": lambda: ak.BottleneckConfig(bottleneck=8, target_modules=r"bert\.encoder\.layer\.\d+\.output\.dense"),
}
LM_ADAPTERS = {
    "lm_lora": lambda: ak.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "lm_shira": lambda: ak.ShiraConfig(r=4, target_modules=["q_proj", "v_proj"]),
}


def tiny_classifier():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


def classifier_tokenizer():
    return char_tokenizer(chat=False)  # 100 ids: the tiny BERT's vocabulary


def save_adapters(model, configs, root: Path, scale: float = 0.3) -> None:
    """Attach each adapter to ``model`` with seeded random values (so each visibly changes outputs)
    and save it to ``root/<name>``; ``model`` keeps them attached, for references."""
    for seed, (name, make) in enumerate(configs.items()):
        ak.attach(model, make(), name)
        randomise(model, name, seed=seed + 1, scale=scale)
        if ak.config_of(model, name).bits < 32:  # the saved codes are what the server uses
            ak.save(model, root / name, name)
            ak.detach(model, name)
            ak.load(model, root / name)
        else:
            ak.save(model, root / name, name)
    ak.activate(model, None)


def saved_classifiers(tmp_path_factory, name: str = "serve"):
    """``(root, reference)``: the classifier adapters saved under a fresh ``root/``, and
    single-request references on the model that made them."""
    root = tmp_path_factory.mktemp(name) / "root"
    root.mkdir()
    source = tiny_classifier()
    save_adapters(source, CLASSIFIER_ADAPTERS, root)
    return root, ClassifierReference(source, classifier_tokenizer())


def edited_copy(root: Path, source: str, target: str, edit) -> Path:
    """A copy of adapter directory ``root/source`` at ``root/target`` whose adapter_config.json
    went through ``edit(config_dict)`` (made once: a module-scoped root is shared)."""
    directory = root / target
    if not directory.exists():
        shutil.copytree(root / source, directory)
        config = json.loads((directory / "adapter_config.json").read_text())
        edit(config)
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


class ClassifierReference:
    """Single-request logits: one text at a time on a model holding the same adapters."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer, self.cache = model, tokenizer, {}

    def __call__(self, adapter, text: str) -> torch.Tensor:
        key = (adapter, text)
        if key not in self.cache:
            ak.activate(self.model, None if adapter is None else adapter)
            encoded = self.tokenizer([text], return_tensors="pt", truncation=True, max_length=64)
            with torch.no_grad():
                self.cache[key] = self.model(**encoded).logits[0].float()
            ak.activate(self.model, None)
        return self.cache[key]


def lm_reference(model, tokenizer, adapter, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer of one prompt alone, with only ``adapter`` active."""
    from adapterkit.train.causal import Sampling, generate

    ak.activate(model, None if adapter is None else adapter)
    try:
        return generate(model, tokenizer, [prompt], Sampling(max_new_tokens=max_new_tokens), progress=False)[0]
    finally:
        ak.activate(model, None)


class Gate:
    """A forward pre-hook that holds the worker inside a forward until :meth:`release`."""

    def __init__(self, model) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        self.handle = model.register_forward_pre_hook(self._hold)

    def _hold(self, module, args) -> None:
        self.entered.set()
        assert self.opened.wait(30), "the test never released the gate"

    def release(self) -> None:
        self.opened.set()
        self.handle.remove()


def wait_for(condition, seconds: float = 20.0) -> None:
    """Wait until ``condition()`` holds (a synchronisation point, not a timing assertion)."""
    done = threading.Event()
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        done.wait(0.005)
    raise AssertionError("condition not reached")


@contextlib.contextmanager
def uvicorn_server(app, **options):
    """``(server, sock)``: uvicorn serving ``app`` on a free loopback socket in a thread, until the block ends."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        yield server, sock
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


def classifier_engine(root: Path, settings: EngineSettings | None = None, preload=()) -> Engine:
    model = tiny_classifier()
    store = AdapterStore(model, root)
    for name in preload:
        store.load(name)
    return Engine(model, classifier_tokenizer(), store, settings or EngineSettings(max_length=64, max_wait_ms=2))


def chat_lm():
    return tiny_chat_lm(seed=0)

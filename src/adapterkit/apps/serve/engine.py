"""The serving engine: one worker thread owns the model; requests wait in a bounded queue and are
batched dynamically, whatever adapters they name.

* **Batching.** The worker takes the first waiting request, then keeps taking requests until the
  batch holds ``max_batch`` rows or ``max_wait_ms`` have passed, and runs them in one forward under
  :func:`adapterkit.per_row` (row ``i`` with its request's adapter; None is the base).
* **Overload.** A full queue refuses at once with :class:`~.errors.OverloadedError` (HTTP 429):
  waiting clients cost nothing but memory, and a bounded queue bounds that.
* **No torn weights.** Loads and unloads go through the same queue and run on the worker between
  two batches, so every forward sees the adapter set all-before or all-after a change.
* **Graceful shutdown.** :meth:`Engine.close` stops accepting (:class:`~.errors.ShuttingDownError`,
  HTTP 503), lets the worker finish what is running and everything queued, then stops it.

Submitting returns a :class:`concurrent.futures.Future`; the HTTP layer awaits it without blocking.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ...core.build import check_adapter_name
from ...errors import AdapterError, AdapterNotFoundError, ConfigError, UnsupportedError
from .batches import Generated, Generator, classify
from .errors import InferenceError, OverloadedError, ShuttingDownError
from .metrics import Metrics
from .store import AdapterStore, LoadedAdapter

CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)
DEFAULT_NEW_TOKENS = 32
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Limits of one engine.

    Attributes:
        max_batch: rows per forward (a request with more texts still runs, alone).
        max_queue: requests (and admin operations) waiting; one more is refused with 429.
        max_wait_ms: how long the worker waits for more requests to fill a batch.
        max_texts: texts per predict request.
        max_text_chars: characters per text or prompt.
        max_length: tokens per text (classification; longer texts are truncated).
        max_prompt_tokens: tokens per prompt (causal LM; a longer prompt is refused).
        max_new_tokens: the most tokens one generate request may ask for.
    """

    max_batch: int = 32
    max_queue: int = 256
    max_wait_ms: float = 5.0
    max_texts: int = 64
    max_text_chars: int = 8192
    max_length: int = 128
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            least = 0 if field.name == "max_wait_ms" else 1
            if not number or value < least or (field.type == "int" and not isinstance(value, int)):
                raise ConfigError(f"EngineSettings.{field.name} must be a {field.type} >= {least}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One predict request's answer: per text, the arg-max class and the logits."""

    adapter: str | None
    labels: list[int]
    logits: list[list[float]]
    label_names: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generate request's answer."""

    adapter: str | None
    text: str
    tokens: int


@dataclasses.dataclass
class _Job:
    future: Future = dataclasses.field(default_factory=Future, init=False)


@dataclasses.dataclass
class _Predict(_Job):
    adapter: str | None
    texts: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.texts)


@dataclasses.dataclass
class _Generate(_Job):
    adapter: str | None
    prompt: str
    max_new_tokens: int
    rows: int = 1
    ids: list[int] = dataclasses.field(default_factory=list)  # the prompt's tokens, set by the worker


@dataclasses.dataclass
class _Admin(_Job):
    action: Callable[[], Any]


_STOP = object()  # queued by close(): everything before it is finished first


def task_of(model: nn.Module) -> str:
    """``causal-lm`` for a model that generates (a Hugging Face causal LM), else ``classification``."""
    can_generate = getattr(model, "can_generate", None)
    return CAUSAL_LM if callable(can_generate) and can_generate() else CLASSIFICATION


class Engine:
    """Serves one model and the adapters of ``store`` from one worker thread (see the module docstring).

    ``task`` defaults to :func:`task_of` the model. Use as a context manager, or call :meth:`start`
    and :meth:`close`."""

    def __init__(self, model: nn.Module, tokenizer: Any, store: AdapterStore, settings: EngineSettings | None = None,
                 task: str | None = None, metrics: Metrics | None = None) -> None:
        task = task_of(model) if task is None else task
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
        if store.model is not model:
            raise ConfigError("the adapter store must hold the engine's model")
        self.model, self.tokenizer, self.store, self.task = model.eval(), tokenizer, store, task
        self.settings = settings or EngineSettings()
        self.metrics = metrics or Metrics()
        self.generator = Generator(model, tokenizer) if task == CAUSAL_LM else None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.settings.max_queue)
        self._lock = threading.Lock()  # orders "accepting?" checks against close()
        self._accepting = False
        self._closed = False
        self._carry: Any = None  # an item taken while filling a batch that belongs after it
        self._thread = threading.Thread(target=self._work, name="adapterkit-serve-worker", daemon=True)

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the engine was closed; make a new one")
            if not self._thread.is_alive():
                self._accepting = True
                self._thread.start()
        return self

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish the running batch and every queued request, stop the worker.
        Returns whether the worker stopped within ``timeout`` seconds (None: wait for it)."""
        with self._lock:
            first = not self._closed
            self._accepting, self._closed = False, True
        if first and self._thread.is_alive():
            self._queue.put(_STOP)  # blocks while the queue is full: the worker is draining it
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- submitting (any thread) ------------------------------------------------------------------
    def _submit(self, job: _Job) -> Future:
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down" if self._closed else "the engine is not started")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise OverloadedError(f"{self.settings.max_queue} requests are waiting; try again later") from None
        return job.future

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None:
            check_adapter_name(adapter)
            self.store.get(adapter)  # fails fast; the worker checks again when the batch runs

    def _check_text(self, text: Any, what: str) -> None:
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{what} must be a non-empty string")
        if len(text) > self.settings.max_text_chars:
            raise ConfigError(f"{what} has {len(text)} characters; this server takes at most {self.settings.max_text_chars}")

    def submit_predict(self, adapter: str | None, texts: Sequence[str]) -> Future:
        """Queue a predict request; the future gives a :class:`Prediction`."""
        if self.task != CLASSIFICATION:
            raise UnsupportedError(f"this server runs a {self.task} model; use generate")
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not 1 <= len(texts) <= self.settings.max_texts:
            raise ConfigError(f"texts must be a list of 1 to {self.settings.max_texts} strings")
        for i, text in enumerate(texts):
            self._check_text(text, f"texts[{i}]")
        self._check_adapter(adapter)
        return self._submit(_Predict(adapter, tuple(texts)))

    def submit_generate(self, adapter: str | None, prompt: str, max_new_tokens: int | None = None) -> Future:
        """Queue a greedy generate request; the future gives a :class:`Generation`. ``max_new_tokens``
        defaults to :data:`DEFAULT_NEW_TOKENS` or the server's limit, whichever is smaller."""
        if self.task != CAUSAL_LM:
            raise UnsupportedError(f"this server runs a {self.task} model; use predict")
        self._check_text(prompt, "prompt")
        limit = self.settings.max_new_tokens
        max_new_tokens = min(DEFAULT_NEW_TOKENS, limit) if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= limit:
            raise ConfigError(f"max_new_tokens must be an integer from 1 to {limit}, got {max_new_tokens!r}")
        self._check_adapter(adapter)
        return self._submit(_Generate(adapter, prompt, max_new_tokens))

    def load(self, path: str | Path, name: str | None = None) -> Future:
        """Queue loading the adapter in ``path`` (under the store's root); the future gives its
        :class:`~.store.LoadedAdapter`. The path is checked at once (403 before queueing)."""
        self.store.resolve(path)
        if name is not None:
            check_adapter_name(name)
        return self._submit(_Admin(lambda: self.store.load(path, name)))

    def unload(self, name: str) -> Future:
        """Queue unloading adapter ``name``; requests queued before it still see it."""
        check_adapter_name(name)
        self.store.get(name)
        return self._submit(_Admin(lambda: self.store.unload(name)))

    def predict(self, adapter: str | None, texts: Sequence[str], timeout: float | None = None) -> Prediction:
        return self.submit_predict(adapter, texts).result(timeout)

    def generate(self, adapter: str | None, prompt: str, max_new_tokens: int | None = None,
                 timeout: float | None = None) -> Generation:
        return self.submit_generate(adapter, prompt, max_new_tokens).result(timeout)

    # -- the worker -------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Any:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _work(self) -> None:
        while True:
            item = self._next(None)
            if item is _STOP:
                return
            try:
                if isinstance(item, _Admin):
                    self._run_admin(item)
                else:
                    self._run_batch(self._fill(item))
            except BaseException:  # the worker must outlive anything a batch does
                log.exception("adapterkit serve: worker error")

    def _fill(self, first: _Job) -> list[_Job]:
        """``first`` and the requests behind it, up to ``max_batch`` rows or ``max_wait_ms``."""
        batch, rows = [first], first.rows
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while rows < self.settings.max_batch:
            try:
                item = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if isinstance(item, _Admin) or item is _STOP or rows + item.rows > self.settings.max_batch:
                self._carry = item  # runs after this batch, in queue order
                break
            batch.append(item)
            rows += item.rows
        return batch

    def _run_admin(self, job: _Admin) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.action())
        except BaseException as error:
            job.future.set_exception(error)

    def _run_batch(self, batch: list[_Job]) -> None:
        jobs = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away
            adapter = getattr(job, "adapter", None)
            if adapter is not None and adapter not in self.store:
                job.future.set_exception(AdapterNotFoundError(f"adapter {adapter!r} is not loaded (unloaded after "
                                                              "the request was queued)"))
                continue
            jobs.append(job)
        if self.task == CAUSAL_LM:
            jobs = self._tokenized(jobs)
        if not jobs:
            return
        try:
            results = self._classify(jobs) if self.task == CLASSIFICATION else self._generate(jobs)
        except AdapterError as error:
            for job in jobs:
                job.future.set_exception(error)
            return
        except Exception as error:
            log.exception("adapterkit serve: a batch failed")
            failure = InferenceError(f"the forward failed: {type(error).__name__}: {error}")
            for job in jobs:
                job.future.set_exception(failure)
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _classify(self, jobs: list[_Job]) -> list[Prediction]:
        names = [job.adapter for job in jobs for _ in job.texts]
        texts = [text for job in jobs for text in job.texts]
        logits = classify(self.model, self.tokenizer, names, texts, self.settings.max_length)
        self.metrics.record_batch(len(texts))
        results, start = [], 0
        for job in jobs:
            rows = logits[start:start + job.rows]
            start += job.rows
            labels = None if job.adapter is None else self.store.get(job.adapter).label_names
            results.append(Prediction(job.adapter, rows.argmax(-1).tolist(), rows.tolist(),
                                      None if labels is None else list(labels)))
        return results

    def _tokenized(self, jobs: list[_Job]) -> list[_Job]:
        """The generate jobs whose prompts fit (their token ids set); a prompt too long fails alone."""
        assert self.generator is not None
        ready = []
        for job in jobs:
            try:
                job.ids = self.generator.prompt_ids(job.prompt, self.settings.max_prompt_tokens)
                ready.append(job)
            except AdapterError as error:
                job.future.set_exception(error)
        return ready

    def _generate(self, jobs: list[_Job]) -> list[Generation]:
        assert self.generator is not None
        answers: list[Generated] = self.generator.generate([j.adapter for j in jobs], [j.ids for j in jobs],
                                                           [j.max_new_tokens for j in jobs])
        self.metrics.record_batch(len(jobs))
        return [Generation(job.adapter, answer.text, answer.tokens) for job, answer in zip(jobs, answers)]

    # -- status -----------------------------------------------------------------------------------
    def adapters(self) -> list[LoadedAdapter]:
        return self.store.loaded()

    def status(self) -> dict[str, Any]:
        """Health: accepting, worker alive, queue depth, task, adapters loaded."""
        return {"status": "ok" if self._accepting and self._thread.is_alive() else "shutting down" if self._closed else "stopped",
                "task": self.task, "accepting": self._accepting, "worker_alive": self._thread.is_alive(),
                "queued": self.queued, "max_queue": self.settings.max_queue, "adapters": len(self.store.names())}

"""The serving engine: one worker thread owns the model; requests wait in a bounded queue and are
batched dynamically, whatever adapters they name.

* **Batching.** The worker takes the first waiting request, then keeps taking requests until the
  batch holds ``max_batch`` rows or ``max_wait_ms`` have passed, and runs them in one forward under
  :func:`adapterkit.per_row` (row ``i`` with its request's adapter; None is the base).
* **Overload.** With ``max_queue`` requests waiting (an item taken to fill a batch and carried to
  the next one included), another is refused at once with :class:`~.errors.OverloadedError` (HTTP
  429): waiting clients cost nothing but memory, and the bound bounds that.
* **Failures.** A batch whose forward raises is run again one request at a time, so only the
  request that fails gets the error (:class:`~.errors.InferenceError`, HTTP 500); whatever goes
  wrong in the worker, every request it took gets an answer or an error, never silence.
* **No torn weights.** Loads and unloads go through the same queue and run on the worker between
  two batches, so every forward sees the adapter set all-before or all-after a change.
* **Graceful shutdown.** :meth:`Engine.close` stops accepting (:class:`~.errors.ShuttingDownError`,
  HTTP 503), lets the worker finish what is running and everything queued, then stops it; it waits
  at most its ``timeout``, whatever the queue holds.

Submitting returns a :class:`concurrent.futures.Future`; the HTTP layer awaits it without blocking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ...core.build import check_adapter_name
from ...errors import AdapterError, AdapterNotFoundError, ConfigError, UnsupportedError
from .batches import Generated, Generator, classify
from .errors import CapacityError, InferenceError, OverloadedError, ShuttingDownError
from .metrics import Metrics
from .settings import CAUSAL_LM, CLASSIFICATION, TASKS, EngineSettings, Generation, Prediction, task_of
from .store import AdapterStore, LoadedAdapter

DEFAULT_NEW_TOKENS = 32
log = logging.getLogger(__name__)


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


_Request = _Predict | _Generate
_STOP = object()  # queued by close(): everything before it is finished first


class Engine:
    """Serves one model and the adapters of ``store`` from one worker thread (see the module docstring).

    ``task`` defaults to :func:`~.settings.task_of` the model. The settings are checked against the
    model and the store at once (:class:`ConfigError`); a classifier's head size is measured with one
    forward of the base model, and every adapter's ``labels.json`` must match it. Use as a context
    manager, or call :meth:`start` and :meth:`close`."""

    def __init__(self, model: nn.Module, tokenizer: Any, store: AdapterStore, settings: EngineSettings | None = None,
                 task: str | None = None, metrics: Metrics | None = None) -> None:
        task = task_of(model) if task is None else task
        if task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
        if store.model is not model:
            raise ConfigError("the adapter store must hold the engine's model")
        self.settings = settings or EngineSettings()
        self.settings.check_model(model, task)
        if len(store) > self.settings.max_adapters or store.held_bytes() > self.settings.max_adapter_bytes:
            raise ConfigError(f"the store holds {len(store)} adapters ({store.held_bytes():,} bytes); the settings allow "
                              f"{self.settings.max_adapters} ({self.settings.max_adapter_bytes:,} bytes)")
        self.model, self.tokenizer, self.store, self.task = model.eval(), tokenizer, store, task
        self.metrics = metrics or Metrics()
        self.generator = Generator(model, tokenizer) if task == CAUSAL_LM else None
        if task == CLASSIFICATION and store.classes is None:
            store.expect_classes(int(classify(model, tokenizer, [None], ["a"], self.settings.max_length).shape[-1]))
        self._queue: queue.Queue[Any] = queue.Queue()  # unbounded: _waiting bounds it, and close() never blocks
        self._lock = threading.Lock()  # orders submissions, the waiting count and close()
        self._waiting = 0  # submitted, not yet taken into work (a carried item still waits)
        self._accepting = False
        self._closed = False
        self._carry: Any = None  # an item taken while filling a batch that belongs after it
        self._thread = threading.Thread(target=self._work, name="adapterkit-serve-worker", daemon=True)

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the worker and accept requests; returns the engine. A closed engine cannot start
        again (:class:`ShuttingDownError`)."""
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
        """Whether new requests are taken."""
        return self._accepting

    @property
    def queued(self) -> int:
        """Requests and admin operations waiting to run (at most ``max_queue``)."""
        return self._waiting

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, finish the running batch and every queued request, stop the worker.
        Returns whether the worker stopped within ``timeout`` seconds (None: wait for it); the
        call never waits longer, however full the queue is."""
        with self._lock:
            first = not self._closed
            self._accepting, self._closed = False, True
        if first and self._thread.is_alive():
            self._queue.put_nowait(_STOP)  # the queue is unbounded: this never blocks
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- submitting (any thread) ------------------------------------------------------------------
    def _submit(self, job: _Job) -> Future:
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down" if self._closed else "the engine is not started")
            if self._waiting >= self.settings.max_queue:
                raise OverloadedError(f"{self.settings.max_queue} requests are waiting; try again later")
            self._waiting += 1
            self._queue.put_nowait(job)
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

    def _check_room(self) -> None:
        if len(self.store) >= self.settings.max_adapters:
            raise CapacityError(f"{len(self.store)} adapters are loaded, the most this server holds (max_adapters); "
                                "unload one first")

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
        :class:`~.store.LoadedAdapter`. The path (403) and ``max_adapters`` (507) are checked at once;
        ``max_adapters`` and ``max_adapter_bytes`` again when the load runs."""
        self.store.resolve(path)
        if name is not None:
            check_adapter_name(name)
        self._check_room()
        return self._submit(_Admin(lambda: self._load(path, name)))

    def _load(self, path: str | Path, name: str | None) -> LoadedAdapter:
        self._check_room()  # loads queued before this one may have filled the store
        return self.store.load(path, name, max_bytes=self.settings.max_adapter_bytes - self.store.held_bytes())

    def unload(self, name: str) -> Future:
        """Queue unloading adapter ``name``; requests queued before it still see it."""
        check_adapter_name(name)
        self.store.get(name)
        return self._submit(_Admin(lambda: self.store.unload(name)))

    def predict(self, adapter: str | None, texts: Sequence[str], timeout: float | None = None) -> Prediction:
        """:meth:`submit_predict` and wait (at most ``timeout`` seconds) for its answer."""
        return self.submit_predict(adapter, texts).result(timeout)

    def generate(self, adapter: str | None, prompt: str, max_new_tokens: int | None = None,
                 timeout: float | None = None) -> Generation:
        """:meth:`submit_generate` and wait (at most ``timeout`` seconds) for its answer."""
        return self.submit_generate(adapter, prompt, max_new_tokens).result(timeout)

    # -- the worker -------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Any:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _taken(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _work(self) -> None:
        while True:
            item = self._next(None)
            if item is _STOP:
                return
            self._taken()
            try:
                if isinstance(item, _Admin):
                    self._run_admin(item)
                else:
                    self._run_batch(self._fill(item))
            except BaseException:  # the worker must outlive anything a batch does
                log.exception("adapterkit serve: worker error")

    def _fill(self, first: _Request) -> list[_Request]:
        """``first`` and the requests behind it, up to ``max_batch`` rows or ``max_wait_ms``."""
        batch, rows = [first], first.rows
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while rows < self.settings.max_batch:
            try:
                item = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if isinstance(item, _Admin) or item is _STOP or rows + item.rows > self.settings.max_batch:
                self._carry = item  # runs after this batch, in queue order (and still counts as waiting)
                break
            self._taken()
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

    def _run_batch(self, batch: list[_Request]) -> None:
        """Answer every request of ``batch``: whatever raises here, none is left without an answer."""
        failure: BaseException | None = None
        try:
            jobs = [job for job in batch if self._claim(job)]
            if self.task == CAUSAL_LM:
                jobs = self._tokenized(jobs)
            if jobs:
                self._answer(jobs)
        except BaseException as error:
            failure = error
            raise
        finally:
            cause = "no answer was produced" if failure is None else f"{type(failure).__name__}: {failure}"
            for job in batch:
                if not job.future.done():
                    with contextlib.suppress(InvalidStateError):  # cancelled by its client meanwhile
                        job.future.set_exception(InferenceError(f"the server failed on this request ({cause})"))

    def _claim(self, job: _Request) -> bool:
        """Mark ``job`` running; False when its client went away or its adapter was unloaded since
        it was queued (then it is answered: 404)."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if job.adapter is not None and job.adapter not in self.store:
            job.future.set_exception(AdapterNotFoundError(f"adapter {job.adapter!r} is not loaded (unloaded after "
                                                          "the request was queued)"))
            return False
        return True

    def _answer(self, jobs: list[_Request]) -> None:
        """Run ``jobs`` in one forward and answer them; if it raises (an AdapterError included: a
        failure inside the forward is the server's, HTTP 500), run them again one at a time, so
        only the request that fails gets the error."""
        try:
            results = self._classify(jobs) if self.task == CLASSIFICATION else self._generate(jobs)
        except Exception as error:
            if len(jobs) > 1:
                log.warning("adapterkit serve: a batch of %d requests failed (%s: %s); running them one at a time",
                            len(jobs), type(error).__name__, error)
                for job in jobs:
                    self._answer([job])
                return
            log.exception("adapterkit serve: a request failed")
            jobs[0].future.set_exception(InferenceError(f"the forward failed: {type(error).__name__}: {error}"))
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _entries(self, jobs: list[_Request]) -> dict[str, LoadedAdapter]:
        return {job.adapter: self.store.get(job.adapter) for job in jobs if job.adapter is not None}

    def _classify(self, jobs: list[_Predict]) -> list[Prediction]:
        entries = self._entries(jobs)  # the worker alone loads and unloads: these are what the forward uses
        names = [job.adapter for job in jobs for _ in job.texts]
        texts = [text for job in jobs for text in job.texts]
        logits = classify(self.model, self.tokenizer, names, texts, self.settings.max_length)
        self.metrics.record_batch(len(texts))
        results, start = [], 0
        for job in jobs:
            rows = logits[start:start + job.rows]
            start += job.rows
            entry = entries.get(job.adapter)
            labels = None if entry is None or entry.label_names is None else list(entry.label_names)
            results.append(Prediction(job.adapter, rows.argmax(-1).tolist(), rows.tolist(), labels,
                                      None if entry is None else entry.version))
        return results

    def _tokenized(self, jobs: list[_Generate]) -> list[_Generate]:
        """The generate jobs whose prompts fit (their token ids set); a prompt too long (422) or one
        the tokenizer fails on (500) fails alone."""
        assert self.generator is not None
        ready = []
        for job in jobs:
            try:
                job.ids = self.generator.prompt_ids(job.prompt, self.settings.max_prompt_tokens)
                ready.append(job)
            except AdapterError as error:
                job.future.set_exception(error)
            except Exception as error:
                log.exception("adapterkit serve: tokenising a prompt failed")
                job.future.set_exception(InferenceError(f"tokenising the prompt failed: {type(error).__name__}: {error}"))
        return ready

    def _generate(self, jobs: list[_Generate]) -> list[Generation]:
        assert self.generator is not None
        entries = self._entries(jobs)
        answers: list[Generated] = self.generator.generate([j.adapter for j in jobs], [j.ids for j in jobs],
                                                           [j.max_new_tokens for j in jobs])
        self.metrics.record_batch(len(jobs))
        return [Generation(job.adapter, answer.text, answer.tokens,
                           None if job.adapter is None else entries[job.adapter].version)
                for job, answer in zip(jobs, answers)]

    # -- status -----------------------------------------------------------------------------------
    def adapters(self) -> list[LoadedAdapter]:
        """The loaded adapters, in load order (:meth:`AdapterStore.loaded`)."""
        return self.store.loaded()

    def status(self) -> dict[str, Any]:
        """Health: accepting, worker alive, queue depth, task, adapters loaded."""
        return {"status": "ok" if self._accepting and self._thread.is_alive() else "shutting down" if self._closed else "stopped",
                "task": self.task, "accepting": self._accepting, "worker_alive": self._thread.is_alive(),
                "queued": self.queued, "max_queue": self.settings.max_queue, "adapters": len(self.store),
                "max_adapters": self.settings.max_adapters}

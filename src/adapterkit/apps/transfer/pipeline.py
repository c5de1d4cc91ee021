"""The two commands of a transfer, as functions with resumable stages.

:func:`prepare` (the only step that sees the real data): seeds, source-model negatives, the
discriminator, and the bundle. :class:`Transfer` (data-free): sample synthetic inputs on the target,
filter them with the discriminator, label them with the source model + adapter, and distil a fresh
adapter of any method into the target. Each stage writes its result under ``OUT/transfer/`` when it
finishes; a rerun with the same settings skips finished stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from ...core import api
from ...core.config import AdapterConfig
from ...core.snapshot import ModelSnapshot, rollback_on_error
from ...errors import ConfigError
from ...io import artefact
from ...io.fingerprint import tensor_sample_digest
from ...io.safefiles import read_json, write_json
from ...train.causal import Sampling, attach_for_completions
from ...zoo.lm_tasks import LMTask
from .bundle import TransferBundle, check_identity, model_identity, save_bundle
from .discriminator import Discriminator, Verdict, train_discriminator
from .distill import MODES, Teacher, activated, check_same_vocabulary, distill
from .generator import CANDIDATE_SAMPLING, Generator, LMGenerator, candidates
from .prompts import SeedPrompt
from .sampler import RejectionSampler, SampleResult

DISCRIMINATOR = "discriminator"
SOURCE = "source"
STAGE_DIR = "transfer"
STAGES = ("sample", "label", "train")


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """How :func:`prepare` builds the bundle (defaults follow the paper: 5 seeds, a LoRA discriminator)."""

    n_seeds: int = 5
    negatives: int | None = None  # source-model negatives; default: as many as there are real inputs
    epochs: int = 1  # discriminator epochs (what bench/translora_bench.py measured)
    lr: float | None = None
    batch_size: int = 8
    holdout: float = 0.1  # share of real and synthetic inputs kept out of training to measure the discriminator
    max_calls: int = 2000
    candidate_sampling: Sampling = CANDIDATE_SAMPLING
    answer_tokens: int = 32
    seed: int = 0


def prepare(model: nn.Module, tokenizer: Any, source_adapter: str | Path, task: LMTask, out: str | Path,
            discriminator: AdapterConfig, *, source_model: str = "", settings: PrepareSettings = PrepareSettings(),
            progress: bool = True) -> TransferBundle:
    """Write a transfer bundle for ``source_adapter`` (trained on ``model``) to ``out``. The model is
    left with the adapters and activation it had."""
    if not 0 < settings.n_seeds < len(task.train):
        raise ConfigError(f"n_seeds must be between 1 and {len(task.train) - 1}, got {settings.n_seeds}")
    before = api.adapters(model)
    for name in (SOURCE, DISCRIMINATOR):
        if name in before:
            raise ConfigError(f"the source model already has an adapter named {name!r}; detach it first")
    with ModelSnapshot(model, values=False):  # a check only: refuses an adapter of another base model
        artefact.load(model, source_adapter, SOURCE)
    seeds = task.train[: settings.n_seeds]
    prompt = SeedPrompt(tuple(s.input for s in seeds))
    real = [e.input for e in task.train]
    count = settings.negatives or len(real)
    negatives = candidates(LMGenerator(model, tokenizer, prompt, settings.candidate_sampling), count,
                           seed=settings.seed, exclude=real, max_calls=settings.max_calls)
    rng = random.Random(settings.seed)
    real_order, negative_order = rng.sample(real, len(real)), rng.sample(negatives, len(negatives))
    cut_real, cut_neg = int(len(real) * settings.holdout), int(len(negatives) * settings.holdout)
    verdict = Verdict(task.descriptor, task.instruction)
    restore = ModelSnapshot(model, values=False)  # the model leaves with the adapters and flags it came with
    judge = train_discriminator(model, tokenizer, real_order[cut_real:], negative_order[cut_neg:], verdict, discriminator,
                                DISCRIMINATOR, epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
                                seed=settings.seed, progress=progress)
    try:
        accuracy = judge.accuracy(real_order[:cut_real], negative_order[:cut_neg]) if cut_real and cut_neg else None
        bundle = TransferBundle(task.name, task.instruction, tuple(seeds), verdict, prompt, settings.candidate_sampling,
                                settings.answer_tokens, source_model, model_identity(model), accuracy)
        with tempfile.TemporaryDirectory() as scratch:
            artefact.save(model, Path(scratch) / DISCRIMINATOR, DISCRIMINATOR)
            return save_bundle(bundle, out, Path(scratch) / DISCRIMINATOR, Path(source_adapter))
    finally:
        restore.restore()


def load_source(bundle: TransferBundle, model: nn.Module, tokenizer: Any,
                teacher_adapter: str | Path | None = None) -> tuple[Teacher, Discriminator]:
    """Attach the bundle's discriminator and the teacher adapter (the bundle's source adapter, or
    ``teacher_adapter`` for a continued transfer) to the source base model."""
    check_identity(model, bundle.source_identity, f"the bundle {bundle.directory}")
    with rollback_on_error(model, values=False):  # a bad teacher takes the discriminator off again, flags included
        artefact.load(model, bundle.discriminator_dir, DISCRIMINATOR)
        teacher = artefact.load(model, teacher_adapter or bundle.source_adapter_dir, SOURCE)
    return Teacher(model, tokenizer, teacher), Discriminator(model, tokenizer, DISCRIMINATOR, bundle.verdict)


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """The data-free stages: ``target_size`` filtered inputs (|D_syn|), distillation ``mode`` and
    training budget. ``filtered=False`` keeps every distinct candidate (the paper's ablation)."""

    target_size: int = 250
    filtered: bool = True
    max_calls: int = 2000
    calls_per_round: int = 16
    generator_batch: int = 16
    mode: str = "sequence"
    epochs: int = 2
    lr: float | None = None
    batch_size: int = 8
    seed: int = 0
    name: str = "default"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class TransferOutcome:
    """What a transfer produced: the filtered inputs, the acceptance rate, per-stage seconds
    (of the run that computed each stage), and the adapter directory."""

    sample: SampleResult
    answers: tuple[str, ...]
    losses: tuple[float, ...]
    seconds: dict[str, float]
    adapter_dir: Path


def _adapter_digest(model: nn.Module, adapter: str | None) -> list[str]:
    """Sample hashes of an adapter's tensors (``None``: the base model, nothing to hash)."""
    return [] if adapter is None else [tensor_sample_digest(p) for p in api.adapter_parameters(model, adapter)]


def sample_stream(seed: int) -> int:
    """The transfer's sampling seed: a stream of its own, so a target that is the source base model
    does not regenerate :func:`prepare`'s negatives (drawn from ``seed`` itself), which the
    discriminator was trained to reject."""
    return int.from_bytes(hashlib.sha256(f"transfer-sample:{seed}".encode()).digest()[:4], "big")


class Transfer:
    """Runs the stages into ``out`` (the adapter directory; stage files in ``out/transfer/``)."""

    def __init__(self, bundle: TransferBundle, out: str | Path, settings: TransferSettings = TransferSettings(),
                 progress: bool = True) -> None:
        self.bundle, self.out, self.settings, self.progress = bundle, Path(out), settings, progress
        self.stages = self.out / STAGE_DIR

    def run(self, teacher: Teacher, discriminator: Discriminator | None, target: nn.Module, target_tokenizer: Any,
            student: AdapterConfig, generator: Generator | None = None,
            on_stage: Callable[[str, float], None] | None = None) -> TransferOutcome:
        """``generator`` defaults to the target model continuing the seed prompt; ``discriminator``
        may be ``None`` only with ``filtered=False``."""
        if self.settings.filtered and discriminator is None:
            raise ConfigError("a filtered transfer needs the discriminator")
        if self.settings.name in api.adapters(target):
            raise ConfigError(f"the target model already has an adapter named {self.settings.name!r}")
        if self.settings.mode == "logits":  # fail before the sampling and labelling, not after them
            check_same_vocabulary(teacher, target, target_tokenizer)
        self._claim(teacher, discriminator, target, student)
        generator = generator or LMGenerator(target, target_tokenizer, self.bundle.seed_prompt,
                                             self.bundle.candidate_sampling, self.settings.generator_batch)
        seconds: dict[str, float] = {}

        def stage(name: str, compute: Callable[[], dict[str, Any]], inputs: Any = None) -> dict[str, Any]:
            """Reuse a finished stage only if it was computed from the same inputs (a recomputed
            sample must not be paired with the labels of the old one)."""
            path = self.stages / f"{name}.json"
            digest = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
            if path.is_file():
                done = read_json(path)
                if done.get("inputs_sha256") == digest:
                    return done
            start = time.perf_counter()
            result = {**compute(), "inputs_sha256": digest, "seconds": 0.0}
            result["seconds"] = seconds[name] = time.perf_counter() - start
            write_json(path, result)
            if on_stage is not None:
                on_stage(name, result["seconds"])
            return result

        sampled = stage("sample", lambda: self._sample(generator, discriminator))
        sample = SampleResult(tuple(sampled["accepted"]), tuple(sampled["candidates"]), sampled["calls"], sampled["duplicates"])
        prompts = [self.bundle.prompt(x) for x in sample.accepted]
        labelled = stage("label", lambda: {"answers": teacher.answers(
            prompts, Sampling(max_new_tokens=self.bundle.answer_tokens), progress=self.progress)}, prompts)
        trained = stage("train", lambda: self._train(teacher, target, target_tokenizer, student, prompts, labelled["answers"]),
                        [prompts, labelled["answers"]])
        for name in STAGES:
            seconds.setdefault(name, 0.0)
        return TransferOutcome(sample, tuple(labelled["answers"]), tuple(trained["losses"]), seconds, self.out)

    def _claim(self, teacher: Teacher, discriminator: Discriminator | None, target: nn.Module,
               student: AdapterConfig) -> None:
        """Record what this run computes; a rerun must match it to reuse the finished stages. The
        teacher's and discriminator's weights count, not only their names (a continued transfer
        swaps the teacher adapter under the same name)."""
        judge = discriminator if self.settings.filtered else None
        key = {"bundle": self.bundle.to_json(), "settings": dataclasses.asdict(self.settings),
               "student": {"method": type(student).__name__, "config": repr(student)},
               "teacher": {"adapter": teacher.adapter, "identity": model_identity(teacher.model),
                           "weights": _adapter_digest(teacher.model, teacher.adapter)},
               "discriminator": judge and _adapter_digest(judge.model, judge.adapter),
               "target": model_identity(target)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        self._claimed = digest
        claim = self.stages / "run.json"
        recorded = read_json(claim).get("sha256") if claim.is_file() else None
        if recorded == digest:
            return  # left as it is: a resumed run rewrites nothing
        # a claim binds only once a stage has finished: a run that failed before (budget, bad option) may be redone
        if recorded is not None and any((self.stages / f"{name}.json").is_file() for name in STAGES):
            raise ConfigError(f"{self.out} holds a transfer with other inputs or settings; use another output directory")
        write_json(claim, {"sha256": digest})

    def _sample(self, generator: Generator, discriminator: Discriminator | None) -> dict[str, Any]:
        """The sampling stage, checkpointed after every round (``sample.partial.json``, bound to this
        run's claim): a crash resumes at the last finished round, with the same result."""
        accept = discriminator.accept if self.settings.filtered else (lambda texts: [True] * len(texts))
        seeds = [s.input for s in self.bundle.seeds]
        partial = self.stages / "sample.partial.json"
        resume = None
        if partial.is_file():
            saved = read_json(partial)
            if saved.get("claim") == self._claimed:  # another run's leftovers are ignored
                resume = SampleResult(tuple(saved["accepted"]), tuple(saved["candidates"]), saved["calls"],
                                      saved["duplicates"])
                if self.progress:
                    print(f"resumed: sampling continues after {resume.calls} generator calls "
                          f"({len(resume.accepted)} accepted)", file=sys.stderr)

        def checkpoint(state: SampleResult) -> None:
            write_json(partial, {"claim": self._claimed, "accepted": list(state.accepted),
                                 "candidates": list(state.candidates), "calls": state.calls, "duplicates": state.duplicates})

        result = RejectionSampler(generator, accept, self.settings.target_size, max_calls=self.settings.max_calls,
                                  calls_per_round=self.settings.calls_per_round, exclude=seeds,
                                  progress=self.progress).run(sample_stream(self.settings.seed), resume, checkpoint)
        partial.unlink(missing_ok=True)
        return {"accepted": list(result.accepted), "candidates": list(result.candidates), "calls": result.calls,
                "duplicates": result.duplicates, "acceptance_rate": result.acceptance_rate}

    def _train(self, teacher: Teacher, target: nn.Module, tokenizer: Any, student: AdapterConfig,
               prompts: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
        return {"losses": train_student(target, tokenizer, student, self.settings.name, prompts, answers, self.out,
                                        mode=self.settings.mode, teacher=teacher, epochs=self.settings.epochs,
                                        lr=self.settings.lr, batch_size=self.settings.batch_size,
                                        seed=self.settings.seed, progress=self.progress)}


def train_student(target: nn.Module, tokenizer: Any, config: AdapterConfig, name: str, prompts: Sequence[str],
                  answers: Sequence[str], out: str | Path, *, mode: str = "sequence", teacher: Teacher | None = None,
                  epochs: int = 2, lr: float | None = None, batch_size: int = 8, seed: int = 0,
                  progress: bool = True) -> list[float]:
    """Attach a fresh adapter ``name`` of any method (initial values from ``seed``; gradient-chosen
    masks calibrate on the labelled pairs), distil ``answers`` into it, save it to ``out``. The target
    leaves as it came, crash or not (detach alone would leave its base weights frozen)."""
    pairs = [(p, a.strip()) for p, a in zip(prompts, answers) if a.strip()]
    with ModelSnapshot(target, values=False):
        attach_for_completions(target, tokenizer, config, name, pairs, seed=seed, batch_size=batch_size)
        with activated(target, name):
            losses = distill(target, tokenizer, prompts, answers, mode=mode, teacher=teacher, epochs=epochs, lr=lr,
                             batch_size=batch_size, seed=seed, progress=progress)
        artefact.save(target, out, name)
    return losses

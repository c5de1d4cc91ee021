"""apps/transfer bundle and stages on tiny LMs: the bundle's save/load round trip, corrupt or
missing parts, the wrong base model refused, and Transfer's resumable stages (a rerun recomputes
nothing, a deleted stage is redone alone, other settings into the same directory are refused)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import adapterkit as ak
from adapterkit.apps import transfer as tr
from adapterkit.apps.transfer import pipeline
from adapterkit.errors import AdapterError, BaseModelMismatchError, ConfigError, CorruptFileError, MissingFileError
from adapterkit.train.causal import Sampling
from adapterkit.zoo.lm_tasks import LMExample
from conftest import assert_unchanged, randomise, snapshot
from lm_support import tiny_base_lm, tiny_chat_lm

SEEDS = ("a", "b", "c", "d", "e")
LORA = ak.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def bundle(tmp_path):
    """A saved bundle for a tiny chat LM: the discriminator and a source adapter, both LoRA."""
    model, tokenizer = tiny_chat_lm()
    for name, seed in (("discriminator", 1), ("source", 2)):
        ak.attach(model, LORA, name)
        randomise(model, name, seed=seed)
        ak.save(model, tmp_path / "adapters" / name, name)
    seeds = tuple(LMExample(s, s.upper()) for s in SEEDS)
    made = tr.TransferBundle("toy", "Upper-case the letter.", seeds, tr.Verdict("toy", "Upper-case the letter."),
                             tr.SeedPrompt(SEEDS, n_total=8, header="Examples ({n}):"),
                             Sampling(max_new_tokens=12, do_sample=True, top_k=5), 6, "tiny-chat",
                             tr.model_identity(model), 0.75)
    saved = tr.save_bundle(made, tmp_path / "bundle", tmp_path / "adapters" / "discriminator",
                           tmp_path / "adapters" / "source")
    return saved, tmp_path / "bundle"


def test_bundle_round_trip(bundle):
    saved, directory = bundle
    loaded = tr.load_bundle(directory)
    assert loaded == saved and loaded.directory == directory
    assert loaded.seed_prompt.build() == saved.seed_prompt.build()
    assert loaded.prompt("q") == "Upper-case the letter.\n\nq"
    assert (directory / "discriminator").is_dir() and (directory / "source_adapter").is_dir()


def _edit(directory, change):
    path = directory / "bundle.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


CORRUPTIONS = {
    "format": lambda d: d.update(format="other"), "version": lambda d: d.update(format_version=2),
    "no-task": lambda d: d.pop("task"), "task-int": lambda d: d.update(task=3),
    "no-instruction": lambda d: d.pop("instruction"), "seeds-str": lambda d: d.update(seeds="a"),
    "seed-no-target": lambda d: d.update(seeds=[{"input": "a"}]), "seed-str": lambda d: d.update(seeds=["a"]),
    "no-seeds": lambda d: d.update(seeds=[]), "verdict-extra": lambda d: d["verdict"].update(extra=1),
    "verdict-same": lambda d: d["verdict"].update(yes="no"), "verdict-int": lambda d: d["verdict"].update(yes=1),
    "verdict-question": lambda d: d["verdict"].update(question=None),
    "n-total": lambda d: d["seed_prompt"].update(n_total=3), "header-int": lambda d: d["seed_prompt"].update(header=5),
    "tokens-0": lambda d: d["candidate_sampling"].update(max_new_tokens=0),
    "top-k-str": lambda d: d["candidate_sampling"].update(top_k="5"),
    "do-sample-str": lambda d: d["candidate_sampling"].update(do_sample="no"),
    "answer-bool": lambda d: d.update(answer_tokens=True), "answer-str": lambda d: d.update(answer_tokens="6"),
    "answer-0": lambda d: d.update(answer_tokens=0), "identity-list": lambda d: d.update(source_identity=[]),
}


@pytest.mark.parametrize("change", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_bundle_fields_are_refused(bundle, change):
    _, directory = bundle
    _edit(directory, change)
    with pytest.raises(CorruptFileError):
        tr.load_bundle(directory)


def test_bundle_file_unreadable_or_missing(bundle):
    _, directory = bundle
    (directory / "bundle.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        tr.load_bundle(directory)
    (directory / "bundle.json").unlink()
    with pytest.raises(MissingFileError, match="bundle.json"):
        tr.load_bundle(directory)


def test_bundle_without_its_discriminator_is_refused(bundle):
    saved, directory = bundle
    shutil.rmtree(directory / "discriminator")
    with pytest.raises(MissingFileError, match="discriminator"):
        tr.load_bundle(directory)
    with pytest.raises(MissingFileError):
        _ = dataclasses.replace(saved, directory=None).discriminator_dir


@pytest.mark.parametrize("other", [lambda: tiny_chat_lm(seed=1), tiny_base_lm], ids=["other-weights", "other-arch"])
def test_load_source_on_another_base_is_refused_and_attaches_nothing(bundle, other):
    model, tokenizer = other()
    before = snapshot(model)
    with pytest.raises(BaseModelMismatchError):
        tr.load_source(tr.load_bundle(bundle[1]), model, tokenizer)
    assert ak.adapters(model) == []
    assert_unchanged(model, before)


def test_load_source_attaches_the_teacher_and_discriminator_and_rolls_back_a_broken_teacher(bundle, tmp_path):
    model, tokenizer = tiny_chat_lm()
    teacher, judge = tr.load_source(tr.load_bundle(bundle[1]), model, tokenizer)
    assert teacher.adapter == "source" and judge.adapter == "discriminator"
    assert sorted(ak.adapters(model)) == ["discriminator", "source"]
    fresh, tokenizer = tiny_chat_lm()
    before = snapshot(fresh)
    broken = tmp_path / "broken"
    shutil.copytree(bundle[1] / "source_adapter", broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"garbage")
    with pytest.raises(AdapterError):
        tr.load_source(tr.load_bundle(bundle[1]), fresh, tokenizer, teacher_adapter=broken)
    assert ak.adapters(fresh) == []
    assert_unchanged(fresh, before)


# --- resumable Transfer stages ------------------------------------------------------------------

SETTINGS = tr.TransferSettings(target_size=6, filtered=False, calls_per_round=2, epochs=2, lr=0.01, batch_size=4)


def _generator(prompt):
    """Two new items per call, numbered by a counter: deterministic for a fresh generator."""
    count = iter(range(10_000))

    def complete(text):
        k = next(count)
        return f" cand {k}\n7. other {k}\nThat is all."

    return tr.FunctionGenerator(complete, prompt)


def _refuse(*args, **kwargs):
    raise AssertionError("a finished stage was computed again")


def _files(out):
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def parts(bundle):
    """The loaded bundle, its teacher and discriminator on the source model, and a tiny Gemma target."""
    loaded = tr.load_bundle(bundle[1])
    model, tokenizer = tiny_chat_lm()
    teacher, judge = tr.load_source(loaded, model, tokenizer)
    target, target_tokenizer = tiny_base_lm()
    return loaded, teacher, judge, target, target_tokenizer


def _run(parts, out, settings=SETTINGS, student=LORA, generator=None, judge=None, **options):
    loaded, teacher, _, target, tokenizer = parts
    return tr.Transfer(loaded, out, settings, progress=False).run(
        teacher, judge, target, tokenizer, student, generator or _generator(loaded.seed_prompt), **options)


def test_a_rerun_recomputes_nothing_and_a_deleted_stage_alone_is_redone(parts, tmp_path, monkeypatch):
    out, stages = tmp_path / "out", []
    target = parts[3]
    before = snapshot(target)
    first = _run(parts, out, on_stage=lambda name, seconds: stages.append(name))
    assert stages == ["sample", "label", "train"]
    assert first.sample.accepted == ("cand 0", "other 0", "cand 1", "other 1", "cand 2", "other 2")
    assert len(first.answers) == 6 and len(first.losses) == 4 and first.adapter_dir == out
    assert_unchanged(target, before)  # the student went to disk, the target is as it was
    files = _files(out)
    assert {"transfer/run.json", "transfer/sample.json", "transfer/label.json", "transfer/train.json"} <= set(files)
    fresh, _ = tiny_base_lm()
    assert ak.load(fresh, out) == "default"

    monkeypatch.setattr(pipeline, "distill", _refuse)
    monkeypatch.setattr(tr.Teacher, "answers", _refuse)
    refusing = tr.FunctionGenerator(_refuse, parts[0].seed_prompt)
    again = _run(parts, out, generator=refusing, on_stage=lambda name, seconds: stages.append(name))
    assert stages == ["sample", "label", "train"]  # no stage ran
    assert (again.sample, again.answers, again.losses) == (first.sample, first.answers, first.losses)
    assert again.seconds == {"sample": 0.0, "label": 0.0, "train": 0.0}
    assert _files(out) == files  # not a byte or a timestamp changed

    trained = []

    def counted(*args, **kwargs):
        trained.append(1)
        return tr.distill(*args, **kwargs)

    monkeypatch.setattr(pipeline, "distill", counted)
    (out / "transfer" / "train.json").unlink()
    torch.manual_seed(12345)  # the caller's RNG state must not change the student
    third = _run(parts, out, generator=refusing, on_stage=lambda name, seconds: stages.append(name))
    assert trained == [1] and stages[3:] == ["train"]
    assert third.losses == first.losses  # the same seeded training, the same student
    now = _files(out)
    for name in ("transfer/run.json", "transfer/sample.json", "transfer/label.json"):
        assert now[name] == files[name]


def test_a_crash_in_training_resumes_from_the_labels(parts, tmp_path, monkeypatch):
    out, target = tmp_path / "out", parts[3]
    before = snapshot(target)

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(pipeline, "distill", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _run(parts, out)
    assert sorted(p.name for p in (out / "transfer").iterdir()) == ["label.json", "run.json", "sample.json"]
    assert ak.adapters(target) == []
    assert_unchanged(target, before)
    monkeypatch.undo()
    monkeypatch.setattr(tr.Teacher, "answers", _refuse)
    outcome = _run(parts, out, generator=tr.FunctionGenerator(_refuse, parts[0].seed_prompt))
    assert len(outcome.losses) == 4 and (out / "transfer" / "train.json").is_file()
    assert_unchanged(target, before)


class _SeededCandidates:
    """Candidates that depend only on (seed, call), optionally failing at one call: a crash mid-sampling."""

    def __init__(self, crash_at=None):
        self.crash_at, self.calls = crash_at, 0

    def propose(self, calls, seed):
        if self.crash_at is not None and self.calls + calls > self.crash_at:
            raise RuntimeError("power cut")
        self.calls += calls
        return [f"cand {(seed + c) % 97}" for c in range(calls)]


def test_a_crash_while_sampling_resumes_after_the_last_finished_round(parts, tmp_path, monkeypatch):
    settings = dataclasses.replace(SETTINGS, filtered=True, calls_per_round=2)
    judge = parts[2]
    monkeypatch.setattr(judge, "accept", lambda texts: [int(t.split()[1]) % 2 == 0 for t in texts])
    clean = _run(parts, tmp_path / "clean", settings=settings, judge=judge, generator=_SeededCandidates())
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="power cut"):
        _run(parts, out, settings=settings, judge=judge, generator=_SeededCandidates(crash_at=5))
    partial = json.loads((out / "transfer" / "sample.partial.json").read_text())
    assert partial["calls"] == 4 and 0 < len(partial["accepted"]) < 6
    generator = _SeededCandidates()
    resumed = _run(parts, out, settings=settings, judge=judge, generator=generator)
    assert resumed.sample == clean.sample and resumed.answers == clean.answers
    assert generator.calls == clean.sample.calls - 4
    assert not (out / "transfer" / "sample.partial.json").exists()
    # a checkpoint left by a run with other inputs is not resumed from
    other = tmp_path / "other"
    with pytest.raises(RuntimeError):
        _run(parts, other, settings=settings, judge=judge, generator=_SeededCandidates(crash_at=3))
    fresh = _SeededCandidates()
    _run(parts, other, settings=dataclasses.replace(settings, epochs=1), judge=judge, generator=fresh)
    assert fresh.calls == clean.sample.calls  # sampled from the start


def test_other_settings_or_students_into_the_same_directory_are_refused(parts, tmp_path):
    out, target = tmp_path / "out", parts[3]
    _run(parts, out)
    files, before = _files(out), snapshot(target)
    for settings, student in ((dataclasses.replace(SETTINGS, epochs=3), LORA),
                              (SETTINGS, ak.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"])),
                              (dataclasses.replace(SETTINGS, target_size=5), LORA)):
        with pytest.raises(ConfigError, match="other inputs or settings"):
            _run(parts, out, settings=settings, student=student, generator=tr.FunctionGenerator(_refuse, parts[0].seed_prompt))
    assert _files(out) == files
    assert_unchanged(target, before)


def test_a_filtered_transfer_keeps_only_what_the_discriminator_accepts(parts, tmp_path, monkeypatch):
    judge = parts[2]
    with pytest.raises(ConfigError, match="discriminator"):
        _run(parts, tmp_path / "none", settings=dataclasses.replace(SETTINGS, filtered=True))
    monkeypatch.setattr(judge, "accept", lambda texts: [t.startswith("cand") for t in texts])
    outcome = _run(parts, tmp_path / "out", settings=dataclasses.replace(SETTINGS, filtered=True), judge=judge)
    assert outcome.sample.accepted == tuple(f"cand {k}" for k in range(6))
    recorded = json.loads((tmp_path / "out" / "transfer" / "sample.json").read_text())
    assert recorded["acceptance_rate"] == pytest.approx(6 / 11) == outcome.sample.acceptance_rate


# --- prepare ------------------------------------------------------------------------------------

def _task():
    from adapterkit.zoo.lm_tasks import LMTask

    train = tuple(LMExample(str(n), "even" if n % 2 == 0 else "odd") for n in range(1000, 1040, 2))
    return LMTask("parity", "Is the number even or odd?", "parity", train, train[:5], train[:2], ("even", "odd"), "test")


def _letters(model, tokenizer, prompt, sampling, *args, **kwargs):
    """Stands in for the source model's own candidates: letter strings, where the real inputs are digits."""
    count = iter(range(10_000))
    return tr.FunctionGenerator(lambda text: f" {'abcdefghij'[next(count) % 10] * 3}{next(count)}\n", prompt)


@pytest.fixture
def source_adapter(tmp_path):
    model, _ = tiny_chat_lm()
    ak.attach(model, LORA, "task")
    randomise(model, "task", seed=5)
    return ak.save(model, tmp_path / "task", "task")


def test_prepare_writes_a_loadable_bundle_and_leaves_the_model_as_it_was(source_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "LMGenerator", _letters)
    model, tokenizer = tiny_chat_lm()
    before = snapshot(model)
    made = tr.prepare(model, tokenizer, source_adapter, _task(), tmp_path / "bundle", LORA, source_model="tiny",
                      settings=tr.PrepareSettings(holdout=0.25), progress=False)
    assert ak.adapters(model) == []
    assert_unchanged(model, before)
    loaded = tr.load_bundle(tmp_path / "bundle")
    assert loaded == made and loaded.seeds == _task().train[:5] and loaded.source_model == "tiny"
    assert 0.0 <= loaded.discriminator_accuracy <= 1.0
    teacher, judge = tr.load_source(loaded, model, tokenizer)
    reference, _ = tiny_chat_lm()
    ak.load(reference, source_adapter, "task")
    prompt = ["1000", "1002"]  # the bundle's source adapter is the one given: same answers
    assert teacher.answers(prompt, progress=False) == tr.Teacher(reference, tokenizer, "task").answers(prompt, progress=False)


@pytest.mark.parametrize("case", ["no-seeds", "all-seeds", "taken-name", "other-base"])
def test_prepare_refuses_before_writing_anything(case, source_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "LMGenerator", _letters)
    model, tokenizer = tiny_chat_lm()
    settings, adapter, expected = tr.PrepareSettings(), source_adapter, ConfigError
    if case == "no-seeds":
        settings = tr.PrepareSettings(n_seeds=0)
    elif case == "all-seeds":
        settings = tr.PrepareSettings(n_seeds=len(_task().train))
    elif case == "taken-name":
        ak.attach(model, LORA, "source")
    else:
        other, _ = tiny_chat_lm(seed=1)
        ak.attach(other, LORA, "task")
        adapter, expected = ak.save(other, tmp_path / "other", "task"), BaseModelMismatchError
    before = snapshot(model)
    with pytest.raises(expected):
        tr.prepare(model, tokenizer, adapter, _task(), tmp_path / "bundle", LORA, settings=settings, progress=False)
    assert_unchanged(model, before)
    assert not (tmp_path / "bundle").exists()

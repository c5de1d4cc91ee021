"""Trans-LoRA end to end on the real SmolLM2-135M-Instruct (source and target), at toy sizes, through
the library API: a source LoRA, the bundle (round trip), the discriminator, sampling on the target,
labelling by the source adapter, a SHiRA student, and exact match with it on held-out examples.

SmolLM2 is in the base install; without it the test fails with the install line (no skip)."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.apps.transfer import PrepareSettings, Transfer, TransferSettings, load_bundle, load_source, prepare
from adapterkit.core import api
from adapterkit.train.causal import Completion, Sampling, exact_match, train_completions
from adapterkit.zoo.llm import load_lm
from adapterkit.zoo.lm_tasks import lm_task

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/conftest.py

TARGETS = ("q_proj", "v_proj")




def end_to_end(load, tmp_path) -> None:
    """The whole pipeline with ``load()`` giving a fresh ``(model, tokenizer)`` of the source = target LM."""
    task = lm_task("boolean_expressions", train_size=20, test_size=10)
    model, tokenizer = load()
    torch.manual_seed(0)
    api.attach(model, ak.LoRAConfig(r=4, target_modules=TARGETS), "task")
    train_completions(model, tokenizer, [Completion(task.prompt(e), e.target) for e in task.train], epochs=1,
                      batch_size=10, progress=False)
    ak.save(model, tmp_path / "source", "task")
    api.detach(model, "task")

    # short candidate lists keep generation cheap: about three items per call
    settings = PrepareSettings(negatives=10, epochs=1, batch_size=10, seed=0,
                               candidate_sampling=Sampling(max_new_tokens=48, do_sample=True, top_k=50))
    bundle = prepare(model, tokenizer, tmp_path / "source", task, tmp_path / "bundle",
                     ak.LoRAConfig(r=4, target_modules=TARGETS), source_model="smollm2", settings=settings, progress=False)
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded == bundle and loaded.seeds == task.train[:5] and 0.0 <= loaded.discriminator_accuracy <= 1.0
    assert api.adapters(model) == []  # prepare leaves the model as it found it

    teacher, judge = load_source(loaded, model, tokenizer)
    target, target_tokenizer = load()
    # unfiltered: a discriminator trained for one epoch on 28 inputs may reject everything; its
    # verdicts are still computed below, the count of kept inputs stays exact
    transfer = Transfer(loaded, tmp_path / "student", TransferSettings(
        target_size=4, filtered=False, max_calls=16, calls_per_round=2, generator_batch=2, epochs=1, batch_size=4),
        progress=False)
    student = ak.ShiraConfig(r=4, mask="grad", target_modules=TARGETS)  # LoRA -> SHiRA, masks from the labels
    outcome = transfer.run(teacher, None, target, target_tokenizer, student)
    accepted = outcome.sample.accepted
    assert len(accepted) == 4 and len(set(accepted)) == 4 and not set(accepted) & {s.input for s in task.train[:5]}
    assert len(outcome.answers) == 4 and any(a.strip() for a in outcome.answers) and outcome.losses
    verdicts = judge.accept(list(accepted) + [e.input for e in task.test[:2]])
    assert len(verdicts) == 6 and all(isinstance(v, bool) for v in verdicts)

    assert api.adapters(target) == []
    assert ak.load(target, tmp_path / "student") == "default"
    assert isinstance(api.config_of(target, "default"), ak.ShiraConfig)
    scored = exact_match(target, target_tokenizer, [task.prompt(e) for e in task.test], [e.target for e in task.test],
                         batch_size=10, progress=False)
    assert scored.total == 10 and 0.0 <= scored.accuracy <= 1.0


def test_smollm2_to_smollm2_end_to_end(tmp_path):
    end_to_end(lambda: load_lm("smollm2"), tmp_path)

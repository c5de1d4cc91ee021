"""apps/transfer distillation on tiny LMs: sequence-level KD supervises only the answer tokens,
logit-level KD is CE(student log-softmax, teacher softmax) and refuses other vocabularies, and a
student of every method kind trains through distill() and survives a save/load round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
from adapterkit.apps import transfer as tr
from adapterkit.errors import ConfigError, UnsupportedError
from adapterkit.train import causal
from adapterkit.train.causal import IGNORE, CompletionBatches, PromptFormat, completion_loss
from conftest import assert_unchanged, randomise, snapshot
from lm_support import char_tokenizer, tiny_base_lm, tiny_chat_lm

TARGETS = ["q_proj", "v_proj"]
PAIRS = [(f"{a}+{b}=?", str(a + b)) for a in range(4) for b in range(4)]
PROMPTS, ANSWERS = [p for p, _ in PAIRS], [a for _, a in PAIRS]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _with_lora(model, name, seed):
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=TARGETS + ["lm_head"]), name)
    randomise(model, name, seed=seed)
    ak.activate(model, name)
    return model


# --- sequence-level KD ---------------------------------------------------------------------------

def _captured_batches(monkeypatch, student, tokenizer, prompts, answers):
    """Run distill() and return the batches object it trained on."""
    seen = []
    real_train = causal.train

    def spy(model, batches, **kwargs):
        seen.append(batches)
        return real_train(model, batches, **kwargs)

    monkeypatch.setattr(causal, "train", spy)
    tr.distill(student, tokenizer, prompts, answers, epochs=1, batch_size=4, progress=False)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("make", [tiny_base_lm, tiny_chat_lm], ids=["base", "chat"])
def test_sequence_distillation_supervises_only_the_answer_tokens(make, monkeypatch):
    student, tokenizer = make()
    _with_lora(student, "student", seed=0)
    fmt = PromptFormat(tokenizer)
    answers = [" 3 ", "", "10", "  ", "7"]  # stripped; empty answers are dropped
    prompts = ["1+2=?", "skip me", "a longer prompt: 4+6=?", "skip me too", "3+4=?"]
    batches = _captured_batches(monkeypatch, student, tokenizer, prompts, answers)
    kept = [(p, a.strip()) for p, a in zip(prompts, answers) if a.strip()]
    assert [item for item in batches.items] == [(fmt.prompt_ids(p), fmt.completion_ids(a)) for p, a in kept]
    labelled = {}
    for batch in batches:
        for row in range(len(batch["labels"])):
            labels, ids = batch["labels"][row], batch["input_ids"][row]
            where = (labels != IGNORE).nonzero().flatten()
            assert torch.equal(labels[where], ids[where])  # a label is the token in its own position
            assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))  # one block, at the end
            prompt_end = int(where[0])
            assert int(batch["attention_mask"][row, :prompt_end].sum()) > 0  # the prompt is before it, unlabelled
            labelled[tokenizer.decode(ids[where], skip_special_tokens=True).strip()] = labels[where].tolist()
    assert labelled == {a: fmt.completion_ids(a) for _, a in kept}
    other = _captured_batches(monkeypatch, student, tokenizer, [p + " (said twice) " + p for p, _ in kept],
                              [a for _, a in kept])
    assert [a for _, a in other.items] == [a for _, a in batches.items]  # prompts change, the supervised part not


# --- logit-level KD ------------------------------------------------------------------------------

def _random_logits(seed, shape=(2, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2
    mask = torch.rand(shape[:2], generator=g) > 0.4
    mask[0, 0] = True
    return student, teacher, mask


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_soft_cross_entropy_matches_a_hand_computation(temperature):
    student, teacher, mask = _random_logits(0)
    terms = []
    for b, k in mask.nonzero().tolist():
        s = [v / temperature for v in student[b, k].tolist()]
        t = [v / temperature for v in teacher[b, k].tolist()]
        p = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
        log_q = [v - math.log(sum(math.exp(u) for u in s)) for v in s]
        terms.append(-sum(pi * qi for pi, qi in zip(p, log_q)))
    expected = sum(terms) / len(terms)
    assert tr.soft_cross_entropy(student, teacher, mask, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_soft_cross_entropy_with_a_one_hot_teacher_is_the_hard_label_loss():
    student, _, mask = _random_logits(1)
    targets = torch.randint(0, 7, mask.shape, generator=torch.Generator().manual_seed(2))
    one_hot = F.one_hot(targets, 7).float() * 1000.0  # softmax of this is exactly one-hot in fp32
    hard = F.cross_entropy(student[mask], targets[mask])
    assert tr.soft_cross_entropy(student, one_hot, mask).item() == pytest.approx(hard.item(), rel=1e-6)


def test_soft_cross_entropy_is_smallest_at_the_teacher_and_ignores_masked_positions():
    student, teacher, mask = _random_logits(3)
    at_teacher = tr.soft_cross_entropy(teacher, teacher, mask)
    entropy = -(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1)[mask].mean()
    assert at_teacher.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert tr.soft_cross_entropy(student, teacher, mask) > at_teacher
    noisy = student.clone()
    noisy[~mask] = 1e6  # masked positions do not count
    assert torch.equal(tr.soft_cross_entropy(noisy, teacher, mask), tr.soft_cross_entropy(student, teacher, mask))


def _hand_kd(teacher, teacher_adapter, student, student_adapter, tokenizer, pairs):
    """Mean soft CE over every answer token, one unpadded forward per pair and model."""
    fmt, terms = PromptFormat(tokenizer), []
    for prompt, answer in pairs:
        head, tail = fmt.prompt_ids(prompt), fmt.completion_ids(answer)
        ids = torch.tensor([head + tail])
        with torch.no_grad(), tr.activated(teacher, teacher_adapter):
            t_logits = teacher(ids).logits[0]
        with torch.no_grad(), tr.activated(student, student_adapter):
            s_logits = student(ids).logits[0]
        for i in range(len(tail)):
            k = len(head) - 1 + i
            terms.append(-(t_logits[k].softmax(-1) * s_logits[k].log_softmax(-1)).sum())
    return torch.stack(terms).mean().item()


@pytest.mark.parametrize("shared", [False, True], ids=["two-models", "one-model-two-adapters"])
def test_logit_kd_loss_matches_a_hand_computation(shared):
    teacher, tokenizer = tiny_chat_lm(seed=0)
    _with_lora(teacher, "src", seed=1)
    student = teacher if shared else tiny_chat_lm(seed=4)[0]
    _with_lora(student, "student", seed=2)
    ak.activate(student, "student")
    if not shared:
        ak.activate(teacher, None)
    teacher_active = ak.active_adapters(teacher)
    pairs = PAIRS[:3] + [("a much longer prompt so that the batch pads: 9+9=?", "18")]
    batch = next(iter(CompletionBatches(tokenizer, pairs, batch_size=4)))
    loss = tr.logit_kd_loss(tr.Teacher(teacher, tokenizer, "src"))(student, batch)
    expected = _hand_kd(teacher, "src", student, "student", tokenizer, pairs)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert ak.active_adapters(teacher) == teacher_active  # the teacher's activation is put back
    assert [n for n, _ in ak.active_adapters(student)] == ["student"]
    loss.backward()
    assert all(p.grad is not None for p in ak.adapter_parameters(student, "student"))
    assert all(p.grad is None for p in ak.adapter_parameters(teacher, "src"))  # the teacher only answers


def test_logit_distillation_refuses_other_vocabularies_before_touching_the_student():
    teacher, chat = tiny_chat_lm()
    student, base = tiny_base_lm()
    _with_lora(student, "student", seed=0)
    before = snapshot(student)
    with pytest.raises(UnsupportedError, match="vocabulary"):
        tr.distill(student, base, PROMPTS, ANSWERS, mode="logits", teacher=tr.Teacher(teacher, chat), progress=False)
    assert_unchanged(student, before)
    from transformers import LlamaConfig, LlamaForCausalLM  # one tokenizer, a wider output layer

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=len(chat) + 8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    _with_lora(wide, "student", seed=0)
    before = snapshot(wide)
    with pytest.raises(UnsupportedError, match="output size"):
        tr.distill(wide, char_tokenizer(chat=True), PROMPTS, ANSWERS, mode="logits", teacher=tr.Teacher(teacher, chat),
                   progress=False)
    assert_unchanged(wide, before)


@pytest.mark.parametrize("options", [dict(mode="bogus"), dict(mode="logits"), dict(answers=ANSWERS[:-1]),
                                     dict(answers=[" "] * len(PROMPTS)), dict(lr=-1.0), dict(batch_size=0)],
                         ids=["mode", "no-teacher", "lengths", "all-empty", "lr", "batch"])
def test_distill_refuses_bad_input_and_leaves_the_student_as_it_was(options):
    student, tokenizer = tiny_base_lm()
    _with_lora(student, "student", seed=0)
    before = snapshot(student)
    options = {"answers": ANSWERS, **options}
    with pytest.raises(ConfigError):
        tr.distill(student, tokenizer, PROMPTS, options.pop("answers"), progress=False, **options)
    assert_unchanged(student, before)


def test_logit_distillation_moves_the_student_towards_the_teacher():
    teacher, tokenizer = tiny_chat_lm(seed=0)
    _with_lora(teacher, "src", seed=1)
    student = _with_lora(tiny_chat_lm(seed=4)[0], "student", seed=2)
    kd = tr.logit_kd_loss(tr.Teacher(teacher, tokenizer, "src"))

    def measured():
        with torch.no_grad():
            return sum(kd(student, b).item() for b in CompletionBatches(tokenizer, PAIRS, 8))

    before = measured()
    losses = tr.distill(student, tokenizer, PROMPTS, ANSWERS, mode="logits", teacher=tr.Teacher(teacher, tokenizer, "src"),
                        epochs=3, lr=0.01, batch_size=4, progress=False)
    assert len(losses) == 12 and measured() < before


# --- every method kind as the student -----------------------------------------------------------

STUDENTS = {
    "lora": ak.LoRAConfig(r=4, target_modules=TARGETS),
    "shira-rand": ak.ShiraConfig(r=2, target_modules=TARGETS),
    "shira-grad": ak.ShiraConfig(r=2, mask="grad", target_modules=TARGETS),
    "dylora": ak.DyLoRAConfig(r_max=4, target_modules=TARGETS),
    "bottleneck": ak.BottleneckConfig(reduction_factor=4, target_modules=TARGETS),
    "lora-1bit": ak.LoRAConfig(r=4, bits=1, target_modules=TARGETS),
    "sft-random": ak.SFTConfig(density=0.05, selection="random", target_modules=TARGETS),
    "sft-most-changed": ak.SFTConfig(density=0.05, full_steps=3, target_modules=TARGETS),
}


@pytest.mark.parametrize("config", STUDENTS.values(), ids=STUDENTS.keys())
def test_a_student_of_every_method_kind_trains_through_distill_and_round_trips(config, tmp_path):
    student, tokenizer = tiny_base_lm()  # the Gemma-like target: its own tokenizer, no chat template
    options = {}
    if getattr(config, "needs_gradients", False):
        options = {"calibration": list(CompletionBatches(tokenizer, PAIRS, 8)), "loss_fn": completion_loss}
    ak.attach(student, config, "student", **options)
    ak.activate(student, "student")
    start = [p.detach().clone() for p in ak.adapter_parameters(student, "student")]

    def data_loss():
        with torch.no_grad():
            return sum(completion_loss(student, b).item() for b in CompletionBatches(tokenizer, PAIRS, 8))

    before = data_loss()
    losses = tr.distill(student, tokenizer, PROMPTS, ANSWERS, epochs=3, lr=0.01, batch_size=4, progress=False)
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert data_loss() < before
    assert any(not torch.equal(a, b) for a, b in zip(start, ak.adapter_parameters(student, "student")))
    ak.save(student, tmp_path / "student", "student")
    fresh, _ = tiny_base_lm()
    ak.load(fresh, tmp_path / "student")
    ak.activate(fresh, "student")
    batch = next(iter(CompletionBatches(tokenizer, PAIRS, 8)))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(fresh(**inputs).logits, student.eval()(**inputs).logits, atol=1e-5)

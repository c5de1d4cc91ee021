"""train/causal.py on tiny random LMs: batch layout, completion-only loss, LoRA training, batched
generation (padding-aware, seeded, side-effect free), exact match, and input checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.train.causal import (IGNORE, PLAIN_FRAME, Completion, CompletionBatches, PromptFormat, Sampling,
                                     completion_loss, exact_match, generate, normalise_answer, train_completions)
from conftest import assert_unchanged, snapshot
from lm_support import tiny_base_lm, tiny_chat_lm

PAIRS = [Completion("What is 2+3?", "5"), Completion("hi", "positive"),
         Completion("a much longer prompt than the others, to force padding", "no")]
PROMPTS = ["hi", "hello there friend, how are you doing today?", "x" * 40, "What is 2+3?", "ab cd " * 6]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(params=["chat", "base"])
def lm(request):
    return tiny_chat_lm() if request.param == "chat" else tiny_base_lm()


def _lora(model: nn.Module) -> nn.Module:
    # the output layer too: in a 2-layer random model with 0.02-scale weights the attention LoRAs
    # alone move the loss only slowly, and the test should show learning in a few steps
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]), "task")
    return model


def test_batch_layout_left_pads_prompts_right_pads_completions(lm):
    model, tokenizer = lm
    fmt = PromptFormat(tokenizer)
    batch = next(iter(CompletionBatches(tokenizer, PAIRS, batch_size=3)))
    prompts = [fmt.prompt_ids(p.prompt) for p in PAIRS]
    answers = [fmt.completion_ids(p.completion) for p in PAIRS]
    width = max(map(len, prompts))
    assert batch["input_ids"].shape == (3, width + max(map(len, answers)))
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids, mask = batch["input_ids"][row].tolist(), batch["attention_mask"][row].tolist()
        lo, hi = width - len(prompt), width + len(answer)
        assert ids[lo:width] == prompt and ids[width:hi] == answer  # every completion starts in column `width`
        assert mask == [0] * lo + [1] * (hi - lo) + [0] * (len(ids) - hi)
        assert all(t == fmt.pad_id for t in ids[:lo] + ids[hi:])
        labels = batch["labels"][row].tolist()
        assert labels == [IGNORE] * width + answer + [IGNORE] * (len(ids) - hi)
        assert answer[-1] in fmt.stop_ids  # the end marker is supervised: the model learns to stop
        assert batch["position_ids"][row, lo:hi].tolist() == list(range(hi - lo))


def test_plain_frame_and_eos_without_a_template_end_of_turn_with_one():
    _, base = tiny_base_lm()
    fmt = PromptFormat(base)
    assert not fmt.chat
    assert fmt.prompt_ids("2+2?") == base(PLAIN_FRAME.format(prompt="2+2?"))["input_ids"]
    assert base.decode(fmt.prompt_ids("2+2?")) == "<bos>2+2?\nAnswer:"
    assert fmt.completion_ids("4") == base(" 4", add_special_tokens=False)["input_ids"] + [base.eos_token_id]
    _, chat = tiny_chat_lm()
    fmt = PromptFormat(chat)
    assert fmt.chat and fmt.closer == "<|end|>"
    assert chat.decode(fmt.prompt_ids("2+2?")) == "<|user|>2+2?<|end|>\n<|assistant|>"
    end = chat.convert_tokens_to_ids("<|end|>")
    assert fmt.completion_ids("4") == chat("4", add_special_tokens=False)["input_ids"] + [end]
    assert end in fmt.stop_ids and chat.eos_token_id in fmt.stop_ids
    assert fmt.completion_ids("4", close=False) == chat("4", add_special_tokens=False)["input_ids"]


def test_completion_loss_is_cross_entropy_over_completion_tokens_only(lm):
    model, tokenizer = lm
    batch = next(iter(CompletionBatches(tokenizer, PAIRS, batch_size=3)))
    with torch.no_grad():
        loss = completion_loss(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    terms = [F.cross_entropy(full[b, t - 1], ids[b, t]) for b in range(len(ids)) for t in range(1, ids.shape[1])
             if labels[b, t] != IGNORE]
    assert len(terms) == int((labels != IGNORE).sum())
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    everything = [F.cross_entropy(full[b, t - 1], ids[b, t]) for b in range(len(ids)) for t in range(1, ids.shape[1])
                  if mask[b, t - 1] and mask[b, t]]
    assert not torch.allclose(loss, torch.stack(everything).mean(), atol=1e-3)  # prompt tokens would change it


class Bigram(nn.Module):
    """Logits at a position depend on that position's token only (no ``logits_to_keep``)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.table(input_ids))


def test_prompt_positions_are_never_supervised():
    _, tokenizer = tiny_base_lm()
    model = Bigram(len(tokenizer))
    # same last prompt character and answer; the earlier prompt tokens (and so their next-token
    # "labels") differ completely, which a bigram model sees only through those positions
    one = next(iter(CompletionBatches(tokenizer, [("aaaaaaaa?", "yes")])))
    two = next(iter(CompletionBatches(tokenizer, [("zq1!XY.?", "yes")])))
    with torch.no_grad():
        assert torch.equal(completion_loss(model, one), completion_loss(model, two))
        other = next(iter(CompletionBatches(tokenizer, [("zq1!XY.?", "yex")])))
        assert not torch.equal(completion_loss(model, one), completion_loss(model, other))


def test_lora_gets_gradients_and_training_lowers_the_loss():
    model, tokenizer = _lora(tiny_chat_lm()[0]), tiny_chat_lm()[1]
    batches = CompletionBatches(tokenizer, PAIRS, batch_size=3)
    loss = completion_loss(model, next(iter(batches)))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    layers = {n.split(".adapters.")[0] for n in grads}
    assert len(layers) == 5
    for layer in layers:  # each adapted layer receives a gradient
        assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith(layer + ".")), layer
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        before = completion_loss(model, next(iter(batches))).item()
    losses = train_completions(model, tokenizer, PAIRS * 4, epochs=4, lr=3e-2, batch_size=4, progress=False)
    assert len(losses) == 4 * 3 and all(math.isfinite(x) for x in losses)
    with torch.no_grad():
        after = completion_loss(model, next(iter(batches))).item()
    assert after < 0.7 * before


def test_a_prompt_over_the_budget_loses_its_first_tokens():
    _, tokenizer = tiny_chat_lm()
    fmt = PromptFormat(tokenizer)
    batches = CompletionBatches(tokenizer, [("0123456789" * 5, "ok")], max_length=20)
    (prompt, answer), = batches.items
    assert len(prompt) + len(answer) == 20 and prompt == fmt.prompt_ids("0123456789" * 5)[-len(prompt):]
    with pytest.raises(ak.ConfigError, match="max_length"):
        CompletionBatches(tokenizer, [("p", "a very long answer indeed")], max_length=10)


def test_batched_generation_equals_one_prompt_at_a_time(lm):
    model, tokenizer = lm
    sampling = Sampling(max_new_tokens=10)
    batched = generate(model, tokenizer, PROMPTS, sampling, progress=False)
    alone = [generate(model, tokenizer, [p], sampling, progress=False)[0] for p in PROMPTS]
    assert batched == alone
    assert len(set(batched)) > 1  # distinct prompts, distinct answers: the comparison is not vacuous
    assert generate(model, tokenizer, PROMPTS, sampling, batch_size=2, progress=False) == batched


def test_greedy_is_deterministic_and_seeded_sampling_reproducible_without_touching_global_rng(lm):
    model, tokenizer = lm
    assert generate(model, tokenizer, PROMPTS[:3], progress=False) == generate(model, tokenizer, PROMPTS[:3], progress=False)
    sampling = Sampling(max_new_tokens=12, do_sample=True, temperature=1.5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, sampling, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tokenizer, PROMPTS, sampling, seed=7, progress=False) == first
    assert generate(model, tokenizer, PROMPTS, sampling, seed=8, progress=False) != first
    assert torch.equal(torch.get_rng_state(), state)


def test_generation_restores_train_and_eval_flags():
    model, tokenizer = tiny_chat_lm()
    model.train()
    model.model.layers[0].eval()
    flags = [(n, m.training) for n, m in model.named_modules()]
    generate(model, tokenizer, ["hi"], Sampling(max_new_tokens=2), progress=False)
    assert [(n, m.training) for n, m in model.named_modules()] == flags


def test_exact_match_counts_and_standard_error():
    model, tokenizer = tiny_chat_lm()
    predictions = generate(model, tokenizer, PROMPTS, Sampling(max_new_tokens=6), progress=False)
    targets = [predictions[0].upper() + ".", predictions[1], predictions[2], "zz-wrong", "also wrong"]
    result = exact_match(model, tokenizer, PROMPTS, targets, max_new_tokens=6, progress=False)
    assert (result.correct, result.total) == (3, 5) and result.predictions == tuple(predictions)
    assert result.accuracy == pytest.approx(0.6)
    assert result.standard_error == pytest.approx(math.sqrt(0.6 * 0.4 / 5))


@pytest.mark.parametrize("text, expected", [
    ("Positive", "positive"), ("  positive.  ", "positive"), ('"Yes"', "yes"), ('"negative".', "negative"),
    ("\n\nTrue   or  False\nmore text", "true or false"), ("", ""), ("42.", "42"), ("`a b c`", "a b c"),
])
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


@pytest.mark.parametrize("call", [
    lambda m, t: train_completions(m, t, [("prompt", "")], progress=False),
    lambda m, t: train_completions(m, t, [("prompt", 3)], progress=False),
    lambda m, t: train_completions(m, t, [("prompt",)], progress=False),
    lambda m, t: train_completions(m, t, [], progress=False),
    lambda m, t: train_completions(m, t, PAIRS, batch_size=0, progress=False),
    lambda m, t: generate(m, t, "a single string", progress=False),
    lambda m, t: generate(m, t, ["ok", None], progress=False),
    lambda m, t: exact_match(m, t, ["a", "b"], ["x"], progress=False),
    lambda m, t: exact_match(m, t, [], [], progress=False),
    lambda m, t: generate(m, t, ["a"], Sampling(max_new_tokens=0), progress=False),
], ids=["empty-completion", "non-string", "not-a-pair", "no-examples", "batch-size", "str-prompts",
        "none-prompt", "mismatched", "empty-eval", "zero-tokens"])
def test_bad_inputs_raise_config_error_and_leave_the_model_unchanged(call):
    model, tokenizer = tiny_chat_lm()
    _lora(model)
    before = snapshot(model)
    with pytest.raises(ak.ConfigError):
        call(model, tokenizer)
    assert_unchanged(model, before)

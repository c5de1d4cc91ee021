"""apps/transfer pieces on tiny models: the seed prompt and its parser, the rejection sampler, the
discriminator's decision rule and training, answer_log_probs, and MMD. (Distillation:
tests/test_transfer_distill.py; the bundle and the resumable stages: tests/test_transfer_bundle.py.)"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import adapterkit as ak
from adapterkit.apps import transfer as tr
from adapterkit.apps.transfer import discriminator as disc_module
from adapterkit.apps.transfer.mmd import median_distance
from adapterkit.errors import AdapterError, BudgetExceededError, ConfigError
from adapterkit.train.causal import PromptFormat, answer_log_probs
from conftest import assert_unchanged, randomise, snapshot
from lm_support import tiny_base_lm, tiny_chat_lm

SEEDS = ("a", "b", "c", "d", "e")
LORA = ak.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- SeedPrompt --------------------------------------------------------------------------------

def test_seed_prompt_text_is_exact():
    prompt = tr.SeedPrompt(SEEDS)
    assert prompt.build() == "Here are 10 examples:\n1. a\n2. b\n3. c\n4. d\n5. e\n6."
    assert prompt.build([4, 3, 2, 1, 0]) == "Here are 10 examples:\n1. e\n2. d\n3. c\n4. b\n5. a\n6."
    assert tr.SeedPrompt(("x y ", "z"), n_total=4, header="{n} items:").build([1, 0]) == "4 items:\n1. z\n2. x y\n3."


@pytest.mark.parametrize("order", [[0, 0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
def test_seed_prompt_refuses_an_order_that_is_not_a_permutation(order):
    with pytest.raises(ConfigError, match="permutation"):
        tr.SeedPrompt(SEEDS).build(order)


@pytest.mark.parametrize("seeds, n_total", [((), 10), (("a", ""), 10), (("a", "  "), 10), (("a", "b\nc"), 10),
                                            (("a", 3), 10), (SEEDS, 5), (SEEDS, 3), (SEEDS, "10"), (SEEDS, 10.0)])
def test_seed_prompt_refuses_bad_seeds_and_sizes(seeds, n_total):
    with pytest.raises(ConfigError):
        tr.SeedPrompt(seeds, n_total=n_total)


@pytest.mark.parametrize("continuation, items", [
    (" f\n7. g\n8. h", ["f", "g", "h"]),
    (" f\nSure! Here are more:\n7. g\n(that was fun)\n8. h", ["f", "g", "h"]),  # commentary lines skipped
    (" f\n9. g\n10. h", ["f", "g", "h"]),  # a gap in the numbers is tolerated
    (" f\n7. g\n1. a\n8. h", ["f", "g"]),  # a restarted list ends the items
    (" f\n7. g\n7. h", ["f", "g"]),  # a repeated number ends it too
    (" f\n7. f\n8.   f \n9. g", ["f", "g"]),  # duplicates (up to whitespace) kept once
    (" f\n10. g\n11. h\n12. i", ["f", "g"]),  # beyond n_total ends the list
    (" f\n7) g\n 8 )h", ["f", "g", "h"]),  # "7)" style and loose spacing
    ("\n7. g\n8.\n9. h", ["g", "h"]),  # empty items skipped, their numbers still count
    ("", []),
    ("\nno numbers at all", []),
])
def test_seed_prompt_parse(continuation, items):
    assert tr.SeedPrompt(SEEDS).parse(continuation) == items


def test_seed_prompt_parse_reads_a_continuation_of_build():
    prompt = tr.SeedPrompt(("x",), n_total=3)
    completion = " first\n3. second\n4. too far"
    assert prompt.parse(completion) == ["first", "second"]
    assert (prompt.build() + completion).endswith("2. first\n3. second\n4. too far")


# --- generators and the rejection sampler -------------------------------------------------------

class ListGenerator:
    """A stub generator: each call yields the next ``per_call`` items of ``items`` (cycling)."""

    def __init__(self, items, per_call=3):
        self.items, self.per_call, self.position, self.calls, self.seeds = list(items), per_call, 0, 0, []

    def propose(self, calls, seed):
        self.calls += calls
        self.seeds.append(seed)
        out = []
        for _ in range(calls * self.per_call):
            out.append(self.items[self.position % len(self.items)])
            self.position += 1
        return out


class Judge:
    """A stub discriminator that accepts exactly ``accepted`` and records what it was shown."""

    def __init__(self, accepted):
        self.accepted, self.shown = set(accepted), []

    def __call__(self, texts):
        self.shown.extend(texts)
        return [t in self.accepted for t in texts]


def test_function_generator_numbers_items_and_shuffles_seed_orders():
    prompts = []

    def complete(prompt):
        prompts.append(prompt)
        return f" new{len(prompts)}\n7. other{len(prompts)}\nthanks"

    prompt = tr.SeedPrompt(SEEDS)
    items = tr.FunctionGenerator(complete, prompt).propose(4, seed=3)
    assert items == ["new1", "other1", "new2", "other2", "new3", "other3", "new4", "other4"]
    bodies = [p.splitlines()[1:6] for p in prompts]
    assert all(sorted(line[3:] for line in body) == list(SEEDS) for body in bodies)
    assert len({tuple(b) for b in bodies}) > 1  # shuffled per call
    prompts.clear()
    tr.FunctionGenerator(complete, prompt, shuffle_seeds=False).propose(2, seed=3)
    assert prompts == [prompt.build()] * 2


def test_sampler_stops_at_exactly_the_target_when_a_round_overshoots():
    generator = ListGenerator([f"item {i}" for i in range(100)], per_call=3)
    judge = Judge({f"item {i}" for i in range(0, 100, 2)})
    result = tr.RejectionSampler(generator, judge, 5, calls_per_round=4, progress=False).run(seed=7)
    assert result.accepted == ("item 0", "item 2", "item 4", "item 6", "item 8")
    assert result.candidates == tuple(f"item {i}" for i in range(9))  # judging stops at the 5th acceptance
    assert result.calls == 4 and generator.seeds == [7]  # one round of 4 calls gave 12 candidates
    assert result.acceptance_rate == pytest.approx(5 / 9)
    more = tr.RejectionSampler(ListGenerator([f"item {i}" for i in range(100)], 1), judge, 20, calls_per_round=4,
                               progress=False).run(seed=7)
    assert len(more.accepted) == 20 and more.calls == 40 and more.acceptance_rate == pytest.approx(20 / 39)


class SeededGenerator:
    """A stub generator whose items depend only on (seed, call): what a resumed run relies on."""

    def __init__(self, per_call=3, universe=40):
        self.per_call, self.universe, self.calls = per_call, universe, 0

    def propose(self, calls, seed):
        self.calls += calls
        return [f"x{(31 * (seed + c) + 7 * j) % self.universe}" for c in range(calls) for j in range(self.per_call)]


def test_a_resumed_sampler_gives_exactly_the_uninterrupted_result():
    judge = Judge({f"x{i}" for i in range(0, 40, 3)})
    states = []
    whole = tr.RejectionSampler(SeededGenerator(), judge, 10, calls_per_round=2, exclude=["x0"],
                                progress=False).run(seed=4, on_round=states.append)
    assert len(states) >= 3 and all(len(s.accepted) < 10 for s in states)
    assert [s.calls for s in states] == list(range(2, 2 * len(states) + 1, 2))
    for state in states:
        generator = SeededGenerator()
        again = tr.RejectionSampler(generator, judge, 10, calls_per_round=2, exclude=["x0"],
                                    progress=False).run(seed=4, resume=state)
        assert again == whole
        assert generator.calls == whole.calls - state.calls  # finished rounds are not generated again
    with pytest.raises(ConfigError, match="resume"):
        tr.RejectionSampler(SeededGenerator(), judge, 10, progress=False).run(seed=4, resume=whole)


def test_sampler_passes_a_new_seed_to_every_round():
    generator = ListGenerator([f"x{i}" for i in range(50)], per_call=1)
    tr.RejectionSampler(generator, Judge({f"x{i}" for i in range(50)}), 10, calls_per_round=3, progress=False).run(seed=5)
    assert generator.seeds == [5, 8, 11, 14] and generator.calls == 12


def test_sampler_dedups_against_exclude_and_itself_up_to_whitespace():
    items = ["a  b", " a b ", "c", "c ", "\tc", "", "   ", "d\ne", "d e", "x" * 50, "f"]
    judge = Judge({"c", "d\ne", "f", "x" * 50, "d e"})
    result = tr.RejectionSampler(ListGenerator(items, per_call=len(items)), judge, 3, exclude=["a b"], max_chars=40,
                                 calls_per_round=1, progress=False).run()
    assert result.accepted == ("c", "d\ne", "f")
    assert judge.shown == ["c", "d\ne", "f"]  # the judge never sees a duplicate, an empty or an over-long text
    assert result.duplicates == 5  # "a  b", " a b " (seeds); "c ", "\tc", "d e" (earlier candidates)


def test_sampler_dedup_counts_the_whitespace_variant_of_an_earlier_candidate():
    result = tr.RejectionSampler(ListGenerator(["d\ne", "d e", "g"], per_call=3), Judge({"g", "d e"}), 1,
                                 calls_per_round=1, progress=False).run()
    assert result.accepted == ("g",) and result.candidates == ("d\ne", "g") and result.duplicates == 1


def test_sampler_raises_after_its_budget_with_the_counts():
    generator = ListGenerator([f"y{i}" for i in range(1000)], per_call=2)
    judge = Judge({"y1", "y3"})
    with pytest.raises(BudgetExceededError) as caught:
        tr.RejectionSampler(generator, judge, 5, max_calls=10, calls_per_round=4, progress=False).run()
    assert isinstance(caught.value, AdapterError)
    assert generator.calls == 10 and generator.seeds == [0, 4, 8]  # the last round is cut to the budget
    message = str(caught.value)
    assert "10 generator calls" in message and "2 of 5 accepted" in message and "20 distinct candidates" in message


def test_sampler_refuses_a_wrong_verdict_count_and_bad_sizes():
    generator = ListGenerator(["p", "q", "r"], per_call=3)
    with pytest.raises(ConfigError, match="2 verdicts for 3 candidates"):
        tr.RejectionSampler(generator, lambda texts: [True, True], 2, progress=False).run()
    for bad in (0, -1, True, 1.5, None):
        with pytest.raises(ConfigError):
            tr.RejectionSampler(generator, Judge([]), bad, progress=False)
        with pytest.raises(ConfigError):
            tr.RejectionSampler(generator, Judge([]), 2, max_calls=bad, progress=False)


@settings(max_examples=60)
@given(universe=st.lists(st.text("ab \n", min_size=0, max_size=4), min_size=1, max_size=30),
       accept_mask=st.lists(st.booleans(), min_size=30, max_size=30), target=st.integers(1, 6),
       per_call=st.integers(1, 4), per_round=st.integers(1, 3), exclude=st.lists(st.text("ab ", max_size=3), max_size=3))
def test_sampler_properties(universe, accept_mask, target, per_call, per_round, exclude):
    accepted_set = {t for t, ok in zip(universe, accept_mask) if ok}
    judge = Judge(accepted_set)
    sampler = tr.RejectionSampler(ListGenerator(universe, per_call), judge, target, max_calls=12,
                                  calls_per_round=per_round, exclude=exclude, progress=False)
    key = lambda t: " ".join(t.split())  # noqa: E731
    seen, reachable = {key(t) for t in exclude}, []  # what the budget's 12 calls can offer, in order
    for i in range(12 * per_call):
        text = universe[i % len(universe)]
        if key(text) and key(text) not in seen:
            seen.add(key(text))
            reachable += [text.strip()] if text.strip() in accepted_set else []
    try:
        result = sampler.run()
    except BudgetExceededError:
        assert len(reachable) < target  # raised only when the target was out of reach
        return
    assert result.accepted == tuple(reachable[:target])
    assert all(t in accepted_set for t in result.accepted)  # never accepts what the judge rejects
    keys = [key(t) for t in result.candidates]
    assert len(set(keys)) == len(keys) and not set(keys) & {key(t) for t in exclude} and "" not in keys
    assert [t for t in result.candidates if t in accepted_set] == list(result.accepted)
    assert result.acceptance_rate == pytest.approx(target / len(result.candidates))
    assert result.candidates[-1] == result.accepted[-1]


# --- the discriminator -------------------------------------------------------------------------

@pytest.fixture
def judged_lm():
    model, tokenizer = tiny_chat_lm()
    ak.attach(model, LORA, "discriminator")
    return model, tokenizer


def _scores(yes, no):
    return torch.tensor([[y, n] for y, n in zip(yes, no)], dtype=torch.float32)


def test_decision_rule_is_strict_and_ties_are_rejected(judged_lm, monkeypatch):
    model, tokenizer = judged_lm
    judge = tr.Discriminator(model, tokenizer, "discriminator", tr.Verdict("toy"))
    above = torch.nextafter(torch.tensor(-1.0), torch.tensor(0.0)).item()
    below = torch.nextafter(torch.tensor(-1.0), torch.tensor(-2.0)).item()
    seen = []

    def fake(m, tok, prompts, answers, **kwargs):
        seen.append((list(prompts), list(answers)))
        return _scores([-1.0, above, below, 0.0, float("-inf")], [-1.0, -1.0, -1.0, 0.0, float("-inf")])

    monkeypatch.setattr(disc_module, "answer_log_probs", fake)
    assert judge.accept(list("vwxyz")) == [False, True, False, False, False]
    assert seen[0] == ([tr.Verdict("toy").render(t) for t in "vwxyz"], ["yes", "no"])
    assert judge.accept([]) == [] and len(seen) == 1


def test_verdict_render_and_checks():
    verdict = tr.Verdict("movie reviews", "Classify the sentiment.")
    assert verdict.render("great film") == ("Classify the sentiment.\n\ngreat film\n"
                                            "Is the above question from movie reviews dataset?")
    assert tr.Verdict("x").render("t") == "t\nIs the above question from x dataset?"
    for bad in (dict(descriptor=" "), dict(descriptor="x", yes="no"), dict(descriptor="x", no=""),
                dict(descriptor="x", yes=1), dict(descriptor="x", question=None)):
        with pytest.raises(ConfigError):
            tr.Verdict(**bad)


def _strings(rng, alphabet, n):
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(3, 6))) for _ in range(n)]


def test_trained_discriminator_separates_real_from_synthetic_and_keeps_the_model_state():
    model, tokenizer = tiny_chat_lm()
    ak.attach(model, LORA, "task")
    randomise(model, "task", seed=3)
    ak.activate(model, "task")
    task_before = [p.detach().clone() for p in ak.adapter_parameters(model, "task")]
    rng = random.Random(0)
    real, fake = _strings(rng, "0123456789", 48), _strings(rng, "abcdefghij", 48)
    held_real, held_fake = _strings(rng, "0123456789", 20), _strings(rng, "abcdefghij", 20)
    config = ak.LoRAConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"])
    # one-token answers, as "yes"/"no" are in a real LM's vocabulary (stable over 8 seeds; the 3- and 2-character
    # answers of this character tokenizer stay at chance for 1 seed in 8)
    verdict = tr.Verdict("digit strings", yes="Y", no="N")
    judge = tr.train_discriminator(model, tokenizer, real, fake, verdict, config, epochs=12, lr=0.005, batch_size=8,
                                   progress=False)
    assert judge.accuracy(held_real, held_fake) >= 0.85
    assert sorted(ak.adapters(model)) == ["discriminator", "task"]
    assert [n for n, _ in ak.active_adapters(model)] == ["task"]
    after = [p.detach() for p in ak.adapter_parameters(model, "task")]
    assert all(torch.equal(a, b) for a, b in zip(after, task_before))
    judge.accept(held_real[:2])
    assert [n for n, _ in ak.active_adapters(model)] == ["task"]  # judging restores the activation


def test_discriminator_training_depends_on_its_seed_not_on_the_callers_rng():
    trained = []
    for global_seed in (1, 2):
        model, tokenizer = tiny_chat_lm()
        torch.manual_seed(global_seed)
        tr.train_discriminator(model, tokenizer, ["123", "456"], ["abc", "def"], tr.Verdict("x"), LORA, epochs=1,
                               lr=0.01, progress=False)
        trained.append([p.detach() for p in ak.adapter_parameters(model, "discriminator")])
    assert all(torch.equal(a, b) for a, b in zip(*trained))


@pytest.mark.parametrize("real, fake, options", [(["1"], [], {}), ([], ["a"], {}), (["1"], ["a"], {"lr": -1.0}),
                                                 (["1"], ["a"], {"batch_size": 0})])
@pytest.mark.parametrize("others", [[], ["task"]], ids=["bare", "with-task"])
def test_failed_discriminator_training_leaves_no_adapter(real, fake, options, others):
    model, tokenizer = tiny_chat_lm()
    for name in others:
        ak.attach(model, LORA, name)
        ak.activate(model, name)
    before = snapshot(model)
    with pytest.raises(ConfigError):
        tr.train_discriminator(model, tokenizer, real, fake, tr.Verdict("x"), LORA, progress=False, **options)
    assert ak.adapters(model) == others
    assert_unchanged(model, before)


@pytest.mark.parametrize("make", [tiny_chat_lm, tiny_base_lm], ids=["chat", "base"])
def test_answer_log_probs_single_token_path_equals_the_multi_token_sum(make):
    model, tokenizer = make()
    prompts = ["is 3 > 2?", "a much longer prompt, to make the batch pad", "x"]
    fmt = PromptFormat(tokenizer)
    single = answer_log_probs(model, tokenizer, prompts, ["y", "n"], batch_size=2)
    multi = answer_log_probs(model, tokenizer, prompts, ["y", "no"], batch_size=2)
    if fmt.chat:
        assert len(fmt.completion_ids("y", close=False)) == 1  # the one-token path really ran
    assert torch.allclose(single[:, 0], multi[:, 0], atol=1e-5)
    for row, prompt in enumerate(prompts):  # by hand: one unpadded forward per (prompt, answer)
        for col, answer in enumerate(["y", "no"]):
            head, tail = fmt.prompt_ids(prompt), fmt.completion_ids(answer, close=False)
            with torch.no_grad():
                logp = model(torch.tensor([head + tail])).logits[0].log_softmax(-1)
            expected = sum(logp[len(head) - 1 + i, t] for i, t in enumerate(tail))
            assert multi[row, col].item() == pytest.approx(expected.item(), abs=1e-5)


def test_answer_log_probs_refuses_empty_inputs():
    model, tokenizer = tiny_chat_lm()
    with pytest.raises(ConfigError):
        answer_log_probs(model, tokenizer, [], ["yes"])
    with pytest.raises(ConfigError):
        answer_log_probs(model, tokenizer, ["p"], [])


# --- MMD ---------------------------------------------------------------------------------------

def test_mmd_small_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    bandwidth = median_distance(torch.cat([x, y]))
    same = tr.mmd(x, y, bandwidth)
    shifted = [tr.mmd(x, y + shift, bandwidth) for shift in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.02
    assert same < shifted[0] < shifted[1] < shifted[2]
    assert tr.mmd(x, y + 1.0) == pytest.approx(tr.mmd(y + 1.0, x))
    assert tr.mmd(x, x) == pytest.approx(0.0, abs=0.02)


@pytest.mark.parametrize("x, y", [(torch.zeros(5), torch.zeros(5, 1)), (torch.zeros(5, 2), torch.zeros(5, 3)),
                                  (torch.zeros(1, 2), torch.zeros(5, 2)), (torch.zeros(5, 2), torch.zeros(1, 2)),
                                  (torch.zeros(2, 2, 2), torch.zeros(2, 2))])
def test_mmd_refuses_bad_shapes(x, y):
    with pytest.raises(ConfigError):
        tr.mmd(x, y)

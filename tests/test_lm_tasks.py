"""Causal-LM task data: sizes, splits, determinism, answers checked by independent evaluators, files."""

from __future__ import annotations

import html
import json
import re

import pytest

from adapterkit.errors import ConfigError, CorruptFileError, MissingFileError
from adapterkit.zoo import lm_tasks
from adapterkit.zoo.data import _read_vader
from adapterkit.zoo.lm_tasks import LM_TASKS, lm_task, normalise_answer, read_task_dir, write_jsonl

GENERATED = ("boolean_expressions", "object_counting", "multistep_arithmetic_two", "dyck_languages")
VADER = {"vader_movies": "movies", "vader_tweets": "tweets"}


@pytest.fixture(scope="module")
def tasks():
    """Every task at the default sizes (built once: about a second in all)."""
    return {name: lm_task(name) for name in LM_TASKS}


def test_task_names():
    assert set(LM_TASKS) == set(GENERATED) | set(VADER)


@pytest.mark.parametrize("name", LM_TASKS)
def test_sizes_seeds_and_disjoint_splits(tasks, name):
    task = tasks[name]
    assert (len(task.train), len(task.seeds), len(task.test)) == (250, 5, 500)
    assert task.seeds == task.train[:5]
    train_inputs = [ex.input for ex in task.train]
    test_inputs = [ex.input for ex in task.test]
    assert len(set(train_inputs)) == 250 and len(set(test_inputs)) == 500  # no duplicates inside a split
    assert not set(train_inputs) & set(test_inputs)
    assert all(ex.input.strip() and ex.target.strip() for ex in task.train + task.test)
    if task.answers:
        assert {ex.target for ex in task.train + task.test} == set(task.answers)
    assert task.name == name and task.descriptor and task.source and str(0) in task.source
    assert task.prompt(task.test[0]) == f"{task.instruction}\n\n{task.test[0].input}"
    assert task.prompt("x y") == f"{task.instruction}\n\nx y"


@pytest.mark.parametrize("name", LM_TASKS)
def test_deterministic_for_a_seed_and_different_across_seeds(name):
    first = lm_task(name, train_size=20, test_size=30, seed=3)
    assert lm_task(name, train_size=20, test_size=30, seed=3) == first
    other = lm_task(name, train_size=20, test_size=30, seed=4)
    assert other.train != first.train and other.test != first.test
    assert other.source != first.source


@pytest.mark.parametrize("name", LM_TASKS)
def test_test_split_does_not_depend_on_train_size(name):
    small = lm_task(name, train_size=10, test_size=40, seed=1)
    large = lm_task(name, train_size=60, test_size=40, seed=1)
    assert small.test == large.test
    assert not {ex.input for ex in large.train} & {ex.input for ex in small.test}


def test_generated_train_never_meets_another_seeds_test():
    for name in GENERATED:
        train = {ex.input for ex in lm_task(name, train_size=200, test_size=5, seed=0).train}
        test = {ex.input for ex in lm_task(name, train_size=5, test_size=200, seed=1).test}
        assert not train & test, name


def _all(task):
    return task.train + task.test


def test_boolean_answers_match_python(tasks):
    for ex in _all(tasks["boolean_expressions"]):
        assert ex.input.endswith(" is")
        expression = ex.input[:-3]
        tokens = expression.split()
        assert set(tokens) <= {"True", "False", "not", "and", "or", "(", ")"}  # safe to eval
        assert sum(t not in "()" for t in tokens) == 5
        assert ex.target == str(eval(expression))  # noqa: S307 (sanitised above; test-only cross-check)


def test_arithmetic_format_and_answers_match_python(tasks):
    number, op = r"-?\d", r"[-+*]"
    group = rf"\({number}( {op} {number}){{3}}\)"
    for ex in _all(tasks["multistep_arithmetic_two"]):
        assert re.fullmatch(rf"\({group} {op} {group}\) =", ex.input), ex.input
        assert ex.target == str(eval(ex.input[:-2]))  # noqa: S307 (format checked above)


def _balanced(tokens: list[str]) -> bool:
    text = "".join(tokens)
    while any(pair in text for pair in ("()", "[]", "{}", "<>")):
        for pair in ("()", "[]", "{}", "<>"):
            text = text.replace(pair, "")
    return not text


def test_dyck_closing_balances_the_sequence(tasks):
    for ex in _all(tasks["dyck_languages"]):
        prefix, closing = ex.input.split(), ex.target.split()
        assert set(prefix) <= set("()[]{}<>") and set(closing) <= set(")]}>")
        assert closing and not _balanced(prefix)
        assert _balanced(prefix + closing)
        # the shortest completion: dropping the last closing token leaves the sequence unbalanced
        assert not _balanced(prefix + closing[:-1])


_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}


def test_object_counting_recount(tasks):
    kinds = {}
    for category, items in lm_tasks._ITEMS.items():
        for item in items:
            assert item not in kinds, f"{item} is in two categories"
            kinds[item] = category
    for ex in _all(tasks["object_counting"]):
        found = re.fullmatch(r"I have (.+)\. How many (.+) do I have\?", ex.input)
        assert found, ex.input
        phrases = re.split(r", (?:and )?", found.group(1))
        assert 3 <= len(phrases) <= 8
        total = 0
        for phrase in phrases:
            word, noun = phrase.split(" ", 1)
            matches = [item for item in kinds if noun in (item, lm_tasks._PLURALS.get(item, item + "s"))]
            assert len(matches) == 1 and (noun == matches[0]) == (_WORDS[word] == 1), phrase
            assert word != "an" or noun[0] in "aeiou"
            if kinds[matches[0]] == found.group(2):
                total += _WORDS[word]
        assert total >= 1 and ex.target == str(total)


@pytest.mark.parametrize("name", VADER)
def test_vader_balanced_clear_and_labelled_by_score_sign(tasks, name):
    scores = {" ".join(html.unescape(t).split()): s for t, s in reversed(_read_vader(VADER[name]))}
    task = tasks[name]
    for split, size in ((task.train, 250), (task.test, 500)):
        assert sum(ex.target == "positive" for ex in split) == size // 2
    for ex in _all(task):
        score = scores[ex.input]
        assert abs(score) >= 1.0 and len(ex.input) <= 300
        assert ex.target == ("positive" if score > 0 else "negative")
    assert {ex.target for ex in task.seeds} == {"positive", "negative"}
    odd = lm_task(name, train_size=11, test_size=7)
    assert sorted(sum(ex.target == a for ex in odd.train) for a in task.answers) == [5, 6]
    assert sorted(sum(ex.target == a for ex in odd.test) for a in task.answers) == [3, 4]


def test_random_texts():
    texts = lm_tasks.random_texts(50, seed=2)
    assert len(set(texts)) == 50 and texts == lm_tasks.random_texts(50, seed=2)
    assert texts != lm_tasks.random_texts(50, seed=3)
    nyt = {" ".join(html.unescape(t).split()) for t, _ in _read_vader("nyt")}
    assert set(texts) <= nyt and all(len(t) <= 300 for t in texts)
    with pytest.raises(ConfigError, match="NYT snippets available"):
        lm_tasks.random_texts(100_000)


@pytest.mark.parametrize("raw, expected", [
    ("positive", "positive"),
    ("  Positive.\nBecause the review praises it.", "positive"),
    ("\n\n  \"negative\"  \n", "negative"),
    ('"False."', "false"),
    ("'True'.", "true"),
    ("]   }\t)", "] } )"),
    ("-53.", "-53"),
    ("3.5", "3.5"),
    ("", ""),
    ("\u201cpositive\u201d", "positive"),
])
def test_normalise_answer(raw, expected):
    assert normalise_answer(raw) == expected


def test_jsonl_round_trip(tmp_path):
    for name in ("vader_tweets", "dyck_languages"):
        task = lm_task(name, train_size=12, test_size=9, seed=5)
        paths = write_jsonl(task, tmp_path / name)
        assert {p.name for p in paths.values()} == {"train.jsonl", "seeds.jsonl", "test.jsonl", "task.json"}
        assert len(paths["train"].read_text().splitlines()) == 12
        assert json.loads(paths["seeds"].read_text().splitlines()[0]) == {"input": task.seeds[0].input,
                                                                         "target": task.seeds[0].target}
        assert read_task_dir(tmp_path / name) == task


@pytest.mark.parametrize("line, message", [
    ('{"input": "x", "target": ', "malformed JSON line"),
    ('["x", "y"]', "must be a JSON object"),
    ('{"input": "x"}', "key 'target' missing"),
    ('{"input": 3, "target": "True"}', "key 'input' must be a non-empty string, got 3"),
    ('{"input": "x", "target": "maybe"}', "not one of the answers"),
])
def test_read_task_dir_names_file_and_line(tmp_path, line, message):
    paths = write_jsonl(lm_task("boolean_expressions", train_size=6, test_size=3), tmp_path)
    rows = paths["train"].read_text().splitlines()
    rows[3] = line
    paths["train"].write_text("\n".join(rows) + "\n")
    with pytest.raises(CorruptFileError, match=re.escape(f"{paths['train']}:4: ") + ".*" + re.escape(message)):
        read_task_dir(tmp_path)


def test_read_task_dir_refuses_leaks_missing_files_and_bad_metadata(tmp_path):
    paths = write_jsonl(lm_task("object_counting", train_size=6, test_size=3), tmp_path)
    train_line = paths["train"].read_text().splitlines()[2]
    paths["test"].write_text(paths["test"].read_text() + "\n" + train_line + "\n")
    with pytest.raises(CorruptFileError, match=re.escape(f"{paths['test']}:5: input also in train.jsonl")):
        read_task_dir(tmp_path)
    paths["task"].write_text(json.dumps({"name": "t", "instruction": "i", "descriptor": "d", "source": 1}))
    with pytest.raises(CorruptFileError, match="'source' must be a string"):
        read_task_dir(tmp_path)
    paths["task"].write_text("{\n  \"name\": \n}")
    with pytest.raises(CorruptFileError, match=re.escape(f"{paths['task']}:3: malformed JSON")):
        read_task_dir(tmp_path)
    paths["seeds"].unlink()
    paths["task"].write_text(json.dumps({"name": "t", "instruction": "i", "descriptor": "d", "source": "s"}))
    with pytest.raises(MissingFileError, match="seeds.jsonl"):
        read_task_dir(tmp_path)


def test_bad_requests_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown LM task 'bbh'.*" + ".*".join(LM_TASKS)):
        lm_task("bbh")
    for kwargs in ({"train_size": 4}, {"test_size": 0}, {"train_size": 10.0}, {"test_size": True}):
        with pytest.raises(ConfigError, match="must be an integer"):
            lm_task("dyck_languages", **kwargs)
    with pytest.raises(ConfigError, match="clear negative examples"):
        lm_task("vader_tweets", train_size=250, test_size=2000)
    with pytest.raises(ConfigError, match="found only .* unique inputs"):
        lm_task("boolean_expressions", train_size=2000, test_size=5)
    with pytest.raises(ConfigError, match="LMExample or a str"):
        lm_task("dyck_languages", train_size=5, test_size=1).prompt(3)  # type: ignore[arg-type]

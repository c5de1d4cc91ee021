"""Exact-match tasks for causal-LM adapters: zero-shot instruction + input -> one short answer string.

Sources (:data:`LM_TASKS`): VADER human-rated movie snippets and tweets (clear cases ``|rating| >= 1``,
"positive"/"negative", balanced), and BIG-Bench-Hard-style program generators with the published input
formats and exact answers from small parsers written here (never ``eval``). Every task is deterministic
for a seed, deduplicated before splitting, train/test disjoint by input text. :func:`write_jsonl` and
:func:`read_task_dir` store a task as JSONL + JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import random
import re
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, CorruptFileError, MissingFileError
from ..train.causal import normalise_answer  # noqa: F401  (re-exported: the one exact-match rule)
from .data import VADER_SUBSETS, VADER_VERSION, _read_vader, json_lines

NUM_SEEDS = 5
MAX_VADER_CHARS = 300  # keeps prompts short enough for CPU training and generation
SPLIT_FILES = ("train", "seeds", "test")


@dataclasses.dataclass(frozen=True)
class LMExample:
    """One task input (without the instruction) and its exact answer string."""

    input: str
    target: str


@dataclasses.dataclass(frozen=True)
class LMTask:
    """A zero-shot exact-match task: instruction, descriptor, splits and the closed answer set."""

    name: str
    instruction: str
    #: short task NAME for the Trans-LoRA discriminator template ("... from NAME dataset?")
    descriptor: str
    train: tuple[LMExample, ...]
    #: the few examples a user keeps once the data is gone (the first ones of ``train``)
    seeds: tuple[LMExample, ...]
    test: tuple[LMExample, ...]
    #: every possible target when the task has a closed answer set, else ``()``
    answers: tuple[str, ...]
    source: str

    def prompt(self, example_or_input: LMExample | str) -> str:
        """The zero-shot prompt: the instruction, a blank line, then the input."""
        text = example_or_input.input if isinstance(example_or_input, LMExample) else example_or_input
        if not isinstance(text, str):
            raise ConfigError(f"prompt() takes an LMExample or a str, got {type(example_or_input).__name__}")
        return f"{self.instruction}\n\n{text}"


# -- VADER sentiment ---------------------------------------------------------------------------
def _vader_rows(subset: str) -> list[tuple[str, float]]:
    """Unique (text, score) rows, HTML entities decoded (the tweets carry ``&amp;``), first occurrence kept."""
    seen: dict[str, float] = {}
    for text, score in _read_vader(subset):
        seen.setdefault(" ".join(html.unescape(text).split()), score)
    return [(t, s) for t, s in seen.items() if t]


def _vader_task(subset: str, train_size: int, test_size: int, seed: int) -> tuple[list, list]:
    """Balanced: per class the seeded shuffle's head is train, its tail test (independent of ``train_size``).
    Train alternates the classes (random first) so the five seeds hold both answers."""
    rows = [(t, s) for t, s in _vader_rows(subset) if abs(s) >= 1.0 and len(t) <= MAX_VADER_CHARS]
    rng = random.Random(f"vader-{subset}-{seed}")
    classes = {label: [LMExample(t, label) for t, s in rows if (s > 0) == (label == "positive")]
               for label in ("positive", "negative")}
    order = rng.sample(("positive", "negative"), 2)
    wanted_train = {order[0]: (train_size + 1) // 2, order[1]: train_size // 2}
    wanted_test = {order[0]: (test_size + 1) // 2, order[1]: test_size // 2}
    train: dict[str, list[LMExample]] = {}
    test: list[LMExample] = []
    for label, pool in classes.items():
        rng.shuffle(pool)
        if wanted_train[label] + wanted_test[label] > len(pool):
            raise ConfigError(f"VADER {subset}: {len(pool)} clear {label} examples, fewer than the "
                              f"{wanted_train[label]} (train) + {wanted_test[label]} (test) requested")
        train[label] = pool[:wanted_train[label]]
        test += pool[len(pool) - wanted_test[label]:]
    rng.shuffle(test)
    mixed = [ex for pair in zip(train[order[0]], train[order[1]] + [None]) for ex in pair if ex is not None]
    return mixed, test


def random_texts(n: int, seed: int = 0) -> tuple[str, ...]:
    """``n`` distinct VADER NYT editorial snippets (≤ 300 characters): the "random text" ablation input."""
    texts = sorted({t for t, _ in _vader_rows("nyt") if len(t) <= MAX_VADER_CHARS})
    if not 0 <= n <= len(texts):
        raise ConfigError(f"random_texts: n must be between 0 and {len(texts)} (NYT snippets available), got {n}")
    random.Random(f"nyt-{seed}").shuffle(texts)
    return tuple(texts[:n])


# -- BBH-style generators ----------------------------------------------------------------------
def _evaluate(text: str, levels: tuple[dict[str, Callable], ...], unary: dict[str, Callable],
              atom: Callable[[str], object]) -> object:
    """Evaluate space-separated infix ``text`` by precedence climbing; ``levels`` go from loosest to tightest."""
    tokens = re.findall(r"\(|\)|[^\s()]+", text)
    pos = 0

    def expression(level: int) -> object:
        nonlocal pos
        if level == len(levels):  # unary operators, parentheses, atoms
            token = tokens[pos]
            pos += 1
            if token in unary:
                return unary[token](expression(level))
            if token != "(":
                return atom(token)
            value = expression(0)
            if tokens[pos] != ")":
                raise ValueError(f"unbalanced parentheses in {text!r}")
            pos += 1
            return value
        value = expression(level + 1)
        while pos < len(tokens) and tokens[pos] in levels[level]:
            pos += 1
            value = levels[level][tokens[pos - 1]](value, expression(level + 1))
        return value

    result = expression(0)
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in {text!r}")
    return result


# Python's precedence: or < and < not; + - < *
_BOOLEAN = (({"or": lambda a, b: a or b}, {"and": lambda a, b: a and b}), {"not": lambda a: not a},
            {"True": True, "False": False}.__getitem__)
_ARITHMETIC = (({"+": lambda a, b: a + b, "-": lambda a, b: a - b}, {"*": lambda a, b: a * b}), {}, int)


def _bool_expr(rng: random.Random, size: int, paren_ok: bool = True) -> str:
    """A random expression with exactly ``size`` constants and operators (parentheses not counted)."""
    if paren_ok and rng.random() < 0.25:
        return f"( {_bool_expr(rng, size, False)} )"
    if size == 1:
        return rng.choice(("True", "False"))
    if size == 2 or rng.random() < 0.3:
        return f"not {_bool_expr(rng, size - 1)}"
    left = rng.randint(1, size - 2)
    return f"{_bool_expr(rng, left)} {rng.choice(('and', 'or'))} {_bool_expr(rng, size - 1 - left)}"


def _boolean_example(rng: random.Random) -> LMExample:
    expression = _bool_expr(rng, 5)
    return LMExample(f"{expression} is", str(_evaluate(expression, *_BOOLEAN)))


def _arithmetic_example(rng: random.Random) -> LMExample:
    """BBH's depth-two format: two parenthesised groups of four integers in -9..9, joined by one operator."""
    def group() -> str:
        parts = [str(rng.randint(-9, 9))]
        for _ in range(3):
            parts += [rng.choice("+-*"), str(rng.randint(-9, 9))]
        return f"({' '.join(parts)})"
    expression = f"({group()} {rng.choice('+-*')} {group()})"
    return LMExample(f"{expression} =", str(_evaluate(expression, *_ARITHMETIC)))


_PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def _dyck_example(rng: random.Random) -> LMExample:
    """A prefix of a Dyck word over ()[]{}<> (3-21 tokens, depth <= 5) that leaves brackets open."""
    length, tokens, stack = rng.randint(3, 20), [], []
    while len(tokens) < length or not stack:
        opening = not stack or (len(stack) < 5 and rng.random() < 0.55)
        if opening:
            stack.append(rng.choice(tuple(_PAIRS)))
            tokens.append(stack[-1])
        else:
            tokens.append(_PAIRS[stack.pop()])
    return LMExample(" ".join(tokens), " ".join(_PAIRS[t] for t in reversed(stack)))


_ITEMS = {  # no word that could belong to two categories ("tomato", "pumpkin" left out)
    "musical instruments": ("piano", "flute", "violin", "trumpet", "drum", "clarinet", "trombone",
                            "accordion", "cello", "harp", "saxophone", "banjo"),
    "fruits": ("apple", "banana", "orange", "plum", "grape", "strawberry", "raspberry", "blackberry",
               "peach", "nectarine", "apricot", "pear"),
    "vegetables": ("carrot", "potato", "onion", "cabbage", "yam", "radish", "lettuce head", "stalk of celery",
                   "head of broccoli", "head of cauliflower", "garlic bulb", "turnip"),
    "animals": ("cat", "dog", "goat", "pig", "cow", "rabbit", "donkey", "frog", "snake", "duck", "chicken",
                "bear"),
    "objects": ("chair", "table", "lamp", "bed", "couch", "microwave", "oven", "stove", "toaster", "fridge",
                "car", "kettle"),
}
_PLURALS = {"strawberry": "strawberries", "raspberry": "raspberries", "blackberry": "blackberries",
            "peach": "peaches", "potato": "potatoes", "radish": "radishes", "stalk of celery": "stalks of celery",
            "head of broccoli": "heads of broccoli", "head of cauliflower": "heads of cauliflower"}
_NUMBERS = ("", "", "two", "three", "four")


def _phrase(item: str, count: int) -> str:
    if count == 1:
        return f"{'an' if item[0] in 'aeiou' else 'a'} {item}"
    return f"{_NUMBERS[count]} {_PLURALS.get(item, item + 's')}"


def _counting_example(rng: random.Random) -> LMExample:
    """3-8 distinct items, counts 1-4 as words; distractors from other categories (none for "objects")."""
    category = rng.choice(tuple(_ITEMS))
    size = rng.randint(3, 8)
    asked = size if category == "objects" else rng.randint(1, min(size, 6))
    others = [item for name, items in _ITEMS.items() if name != category for item in items]
    items = [(i, True) for i in rng.sample(_ITEMS[category], asked)]
    items += [(i, False) for i in rng.sample(others, size - asked)]
    rng.shuffle(items)
    counts = [rng.choice((1, 1, 1, 2, 3, 4)) for _ in items]  # mostly singles, as in BBH
    phrases = [_phrase(item, count) for (item, _), count in zip(items, counts)]
    listed = ", ".join(phrases[:-1]) + ", and " + phrases[-1]
    total = sum(count for (_, wanted), count in zip(items, counts) if wanted)
    return LMExample(f"I have {listed}. How many {category} do I have?", str(total))


def _unique_split(make: Callable[[random.Random], LMExample], name: str, train_size: int, test_size: int,
                  seed: int) -> tuple[list, list]:
    """Unique generated examples, assigned to test or train by a hash of the input text.

    The hash (not the seed) decides the side, so no seed's train input is another seed's test input,
    and each split's content does not depend on the other split's size.
    """
    rng, seen, misses = random.Random(f"{name}-{seed}"), set(), 0
    train: list[LMExample] = []
    test: list[LMExample] = []
    while len(train) < train_size or len(test) < test_size:
        example = make(rng)
        if example.input in seen:
            misses += 1
            if misses > 20 * (train_size + test_size) + 10_000:
                raise ConfigError(f"{name}: found only {len(seen)} unique inputs; ask for fewer examples")
            continue
        seen.add(example.input)
        side = test if hashlib.sha256(example.input.encode()).digest()[0] % 2 else train
        if len(side) < (test_size if side is test else train_size):
            side.append(example)
    return train, test


@dataclasses.dataclass(frozen=True)
class _Spec:
    instruction: str
    descriptor: str
    answers: tuple[str, ...] = ()
    vader_subset: str = ""  # a VADER task, or else:
    generator: Callable[[random.Random], LMExample] | None = None


def _sentiment(subset: str, what: str) -> _Spec:
    return _Spec(f"Classify the sentiment of the {what} as positive or negative. Answer with one word.",
                 f"{what} sentiment", ("positive", "negative"), vader_subset=subset)


_SPECS: dict[str, _Spec] = {
    "vader_movies": _sentiment("movies", "movie review"),
    "vader_tweets": _sentiment("tweets", "tweet"),
    "boolean_expressions": _Spec("Evaluate the Boolean expression. Answer True or False.", "boolean expressions",
                                 ("False", "True"), generator=_boolean_example),
    "object_counting": _Spec("Count the items of the kind asked about. Answer with a number.", "object counting",
                             generator=_counting_example),
    "multistep_arithmetic_two": _Spec(
        "Solve the arithmetic expression, doing multiplication before addition and subtraction. "
        "Answer with an integer.", "multistep arithmetic", generator=_arithmetic_example),
    "dyck_languages": _Spec(
        "Complete the sequence so that every open bracket is closed properly. Answer with the closing "
        "brackets only, separated by spaces.", "dyck languages", generator=_dyck_example),
}
#: the task names :func:`lm_task` accepts
LM_TASKS: tuple[str, ...] = tuple(_SPECS)


def lm_task(name: str, train_size: int = 250, test_size: int = 500, seed: int = 0) -> LMTask:
    """A task by name with ``train_size`` training examples (the first 5 are the seeds) and ``test_size`` test ones.

    Deterministic for ``seed``; raises :class:`ConfigError` for unknown names, bad sizes, or more
    examples than the task has; VADER tasks raise ``DataNotFoundError`` when the data is not fetched.
    """
    if name not in _SPECS:
        raise ConfigError(f"unknown LM task {name!r}; choose from {', '.join(LM_TASKS)}")
    for label, value, least in (("train_size", train_size, NUM_SEEDS), ("test_size", test_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{label} must be an integer >= {least}, got {value!r}")
    spec = _SPECS[name]
    if spec.generator is None:
        train, test = _vader_task(spec.vader_subset, train_size, test_size, seed)
        source = (f"VADER {VADER_VERSION} {VADER_SUBSETS[spec.vader_subset]} (Hutto & Gilbert 2014), "
                  f"|mean rating| >= 1, <= {MAX_VADER_CHARS} chars, balanced, seed {seed}")
    else:
        train, test = _unique_split(spec.generator, name, train_size, test_size, seed)
        source = f"adapterkit.zoo.lm_tasks program generator {name} (BBH format), seed {seed}"
    return LMTask(name, spec.instruction, spec.descriptor, tuple(train), tuple(train[:NUM_SEEDS]), tuple(test),
                  spec.answers, source)


# -- files -------------------------------------------------------------------------------------
def write_jsonl(task: LMTask, directory: str | Path) -> dict[str, Path]:
    """Write ``train/seeds/test.jsonl`` ({"input", "target"} per line) and ``task.json``; return the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLIT_FILES:
        paths[split] = directory / f"{split}.jsonl"
        lines = (json.dumps(dataclasses.asdict(ex), ensure_ascii=False) + "\n" for ex in getattr(task, split))
        paths[split].write_text("".join(lines), encoding="utf-8")
    paths["task"] = directory / "task.json"
    meta = {"name": task.name, "instruction": task.instruction, "descriptor": task.descriptor,
            "answers": list(task.answers), "source": task.source}
    paths["task"].write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def _require(path: Path) -> None:
    if not path.is_file():
        raise MissingFileError(f"{path}: missing (a task directory needs task.json, train/seeds/test.jsonl)")


def _read_text(path: Path) -> str:
    _require(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_split(path: Path, answers: tuple[str, ...]) -> list[tuple[int, LMExample]]:
    """(line number, example) pairs of one split file."""
    examples = []
    _require(path)
    for number, row in json_lines(path, CorruptFileError):
        where = f"{path}:{number}"
        for key in ("input", "target"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                what = "missing" if key not in row else f"must be a non-empty string, got {json.dumps(row[key])}"
                raise CorruptFileError(f"{where}: key {key!r} {what}")
        if answers and row["target"] not in answers:
            raise CorruptFileError(f"{where}: target {row['target']!r} is not one of the answers {list(answers)}")
        examples.append((number, LMExample(row["input"], row["target"])))
    if not examples:
        raise CorruptFileError(f"{path}: no examples")
    return examples


def read_task_dir(directory: str | Path) -> LMTask:
    """The task :func:`write_jsonl` wrote, checked line by line; errors name the file and line.

    Also refused: a test input that is a train input (leakage), a target outside a closed answer set.
    """
    directory = Path(directory)
    meta_path = directory / "task.json"
    try:
        meta = json.loads(_read_text(meta_path))
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{meta_path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{meta_path}: must hold a JSON object, got {type(meta).__name__}")
    for key in ("name", "instruction", "descriptor", "source"):
        if not isinstance(meta.get(key), str):
            raise CorruptFileError(f"{meta_path}: {key!r} must be a string, got {json.dumps(meta.get(key))}")
    answers = meta.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise CorruptFileError(f"{meta_path}: 'answers' must be a list of strings, got {json.dumps(answers)}")
    splits = {split: _read_split(directory / f"{split}.jsonl", tuple(answers)) for split in SPLIT_FILES}
    train_inputs = {ex.input for _, ex in splits["train"]}
    for number, example in splits["test"]:
        if example.input in train_inputs:
            raise CorruptFileError(f"{directory / 'test.jsonl'}:{number}: input also in train.jsonl "
                                   f"({example.input[:60]!r})")
    train, seeds, test = (tuple(ex for _, ex in splits[split]) for split in SPLIT_FILES)
    return LMTask(meta["name"], meta["instruction"], meta["descriptor"], train, seeds, test, tuple(answers),
                  meta["source"])

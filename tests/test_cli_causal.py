"""``adapterkit train|eval --task causal-lm`` on tiny LMs saved as local directories: any method,
the adapter round trip through eval, the data forms, and bad input refused before a model loads."""

from __future__ import annotations

import json
import random

import pytest
import torch

import adapterkit as ak
from adapterkit.cli import causal
from adapterkit.cli.main import main
from adapterkit.train.causal import Sampling, generate
from adapterkit.zoo.llm import load_lm
from adapterkit.zoo.lm_tasks import lm_task, write_jsonl
from lm_support import tiny_base_lm, tiny_chat_lm

INSTRUCTION = "Is the first digit larger? Answer yes or no."
FAST = ["--max-length", "48", "--batch-size", "4", "--epochs", "2", "--lr", "0.05"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """Directories of the two tiny LMs (model + tokenizer), as ``--model DIR`` takes them."""
    root = tmp_path_factory.mktemp("lms")
    for name, (model, tokenizer) in {"chat": tiny_chat_lm(), "base": tiny_base_lm()}.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def _rows(n: int = 20) -> list[dict]:
    rng = random.Random(0)
    pairs = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n)]
    return [{"input": f"{a} vs {b}", "target": "yes" if a > b else "no"} for a, b in pairs]


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("lm, argv", [
    ("chat", ["--method", "lora", "--r", "4"]),
    ("chat", ["--method", "shira", "--mask", "grad", "--r", "2"]),  # calibration batches from the pairs
    ("base", ["--method", "bottleneck", "--reduction-factor", "4"]),
], ids=["lora-chat", "shira-grad-chat", "bottleneck-base"])
def test_train_then_eval_reproduces_the_adapter(lm, argv, lms, tmp_path, capsys):
    data, out = _jsonl(tmp_path / "d.jsonl", _rows()), tmp_path / "adapter"
    common = ["--task", "causal-lm", "--model", str(lms / lm), "--data", data, "--instruction", INSTRUCTION]
    assert main(["train", *common, "--out", str(out), *FAST, *argv]) == 0
    printed = capsys.readouterr().out
    assert "on 16 examples" in printed and "n=4)" in printed
    trained_score = printed.split("held-out exact match ")[1].split(" (")[0]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["method"] == argv[1] and saved["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert saved["config"]["modules_to_save"] is None

    predictions = tmp_path / "p.jsonl"
    assert main(["eval", *common, str(out), "--predictions", str(predictions)]) == 0
    printed = capsys.readouterr().out
    assert f"held-out exact match {trained_score} (binomial SE, n=4)" in printed
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    held_out = _rows()[16:]
    assert [r["prompt"] for r in rows] == [f"{INSTRUCTION}\n\n{r['input']}" for r in held_out]
    assert [r["target"] for r in rows] == [r["target"] for r in held_out]
    # the same answers from the API: base model + ak.load + greedy generation (longest target + 4 tokens)
    model, tokenizer = load_lm(str(lms / lm))
    sampling = Sampling(max_new_tokens=len(tokenizer(" yes", add_special_tokens=False)["input_ids"]) + 4)
    base = generate(model, tokenizer, [r["prompt"] for r in rows], sampling, progress=False)
    ak.load(model, out)
    adapted = generate(model, tokenizer, [r["prompt"] for r in rows], sampling, progress=False)
    assert [r["prediction"] for r in rows] == adapted
    assert adapted != base  # the trained adapter changed the answers

    assert main(["eval", *common]) == 0  # the base model alone
    assert f"base model {lms / lm}: held-out exact match" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ('{"input": "1 vs 2", "target": "no"', "malformed JSON line"),
    ('{"input": "1 vs 2"}', 'expected "prompt" and "completion" or "input" and "target"'),
    ('["1 vs 2", "no"]', "each line must be a JSON object"),
    ('{"input": "1 vs 2", "target": ""}', "'target' must be a non-empty string"),
    ('{"input": "1 vs 2", "target": 3}', "'target' must be a non-empty string"),
    ('{"prompt": "1 vs 2", "completion": "no"}', "one form per file"),
])
def test_a_bad_line_fails_with_file_and_line_before_the_model_loads(line, message, lms, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(causal, "load_lm", lambda *a, **k: pytest.fail("model loaded"))
    rows = _rows(6)
    data = _jsonl(tmp_path / "d.jsonl", rows[:2] + [line] + rows[2:])
    out = tmp_path / "adapter"
    assert main(["train", "--task", "causal-lm", "--model", str(lms / "chat"), "--data", data, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: " in err and message in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["eval", "--task", "causal-lm", "--model", str(lms / "chat"), "--data", data]) == 2
    assert f"{data}:3: " in capsys.readouterr().err


def test_unknown_task_unknown_data_and_misplaced_instruction_are_refused(lms, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(causal, "load_lm", lambda *a, **k: pytest.fail("model loaded"))
    model = ["--model", str(lms / "chat"), "--out", str(tmp_path / "a")]
    assert main(["train", "--task", "regression", "--data", "x.jsonl", *model]) == 2
    assert "invalid choice: 'regression'" in capsys.readouterr().err
    assert main(["train", "--task", "causal-lm", "--data", "no_such_task", *model]) == 2
    assert "boolean_expressions" in capsys.readouterr().err  # names the zoo tasks
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1 vs 2", "completion": "no"}] * 5)
    assert main(["train", "--task", "causal-lm", "--data", prompts, "--instruction", "x", *model]) == 2
    assert f"{prompts}:1: --instruction applies to" in capsys.readouterr().err
    assert main(["train", "--task", "causal-lm", "--data", prompts, "--test-size", "5", *model]) == 2
    assert "none for training" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_help_lists_the_causal_lm_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--task", "causal-lm", "--method", "shira", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--task", "--instruction", "--data", "--model", "--max-new-tokens", "--eval-batch-size", "--mask"):
        assert option in text
    assert "--max-length MAX_LENGTH tokens per training prompt + completion" in text and "(default: 256)" in text
    assert "(default: ('q_proj', 'v_proj'))" in text and "--text-column" not in text
    with pytest.raises(SystemExit):
        main(["eval", "--task", "causal-lm", "--help"])
    text = capsys.readouterr().out
    assert "--predictions" in text and "--instruction" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--task" in text and "--instruction" not in text and "--text-column" in text


def test_data_forms_task_directory_zoo_task_and_plain_files(tmp_path):
    task = lm_task("boolean_expressions", train_size=12, test_size=6)
    write_jsonl(task, tmp_path / "task")
    data = causal.lm_data(str(tmp_path / "task"))
    assert [p.prompt for p in data.train] == [task.prompt(x) for x in task.train]
    assert [p.completion for p in data.test] == [x.target for x in task.test]
    assert len(causal.lm_data(str(tmp_path / "task"), test_size=2, train_size=5).test) == 2
    zoo = causal.lm_data("boolean_expressions", train_size=12, test_size=6)
    assert zoo == data
    rows = _rows(11)
    plain = causal.lm_data(_jsonl(tmp_path / "d.jsonl", rows))
    assert len(plain.train) == 9 and [p.prompt for p in plain.test] == [r["input"] for r in rows[9:]]
    framed = causal.lm_data(str(tmp_path / "d.jsonl"), "Say.", test_size=3, train_size=4)
    assert len(framed.train) == 4 and framed.train[0].prompt == f"Say.\n\n{rows[0]['input']}" and len(framed.test) == 3
    pairs = causal.lm_data(_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]))
    assert [(p.prompt, p.completion) for p in pairs.test] == [("q4", "a4")]
    assert len(causal.lm_data(str(tmp_path / "p.jsonl"), test_size=5, training=False).test) == 5  # eval: all of it
    with pytest.raises(ak.ConfigError, match="own instruction"):
        causal.lm_data(str(tmp_path / "task"), "Say.")

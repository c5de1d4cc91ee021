"""``adapterkit transfer prepare|run`` on tiny LMs saved as directories (a Llama-like chat source and
a Gemma-like base target with different tokenizers): the bundle, students of several methods,
resumed runs, the filtered path with a stub discriminator, and bad input refused before models load."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil

import pytest
import torch

import adapterkit as ak
from adapterkit.apps.transfer import Discriminator, Teacher, load_bundle
from adapterkit.apps.transfer import pipeline
from adapterkit.cli import transfer as transfer_cli
from adapterkit.cli.main import main
from adapterkit.train.causal import Sampling
from adapterkit.zoo.llm import load_lm
from lm_support import tiny_base_lm, tiny_chat_lm

INSTRUCTION = "Is the first digit larger? Answer yes or no."
RUN = ["--size", "4", "--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--max-calls", "48"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run on one thread (OpenMP hand-offs on a busy 2-core machine cost more than the work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _main(argv: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three tiny LM directories, a source LoRA trained with ``adapterkit train``, and its bundle."""
    root = tmp_path_factory.mktemp("transfer")
    for name, (model, tokenizer) in {"chat": tiny_chat_lm(), "base": tiny_base_lm(), "other": tiny_chat_lm(seed=5)}.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    rows = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(16)]
    rows = [{"input": f"{a} vs {b}", "target": "yes" if a > b else "no"} for a, b in rows]
    data = root / "digits.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = root / "source"
    code, _ = _main(["train", "--task", "causal-lm", "--model", str(root / "chat"), "--data", str(data), "--instruction",
                     INSTRUCTION, "--test-size", "0", "--out", str(adapter), "--max-length", "48", "--batch-size", "4",
                     "--epochs", "10", "--lr", "0.02", "--r", "4", "--targets", "all-linear"])  # a tiny LM learns to answer "yes"
    assert code == 0
    code, printed = _main(["transfer", "prepare", "--model", str(root / "chat"), "--adapter", str(adapter), "--data",
                           str(data), "--instruction", INSTRUCTION, "--descriptor", "digit comparison", "--negatives",
                           "10", "--disc-epochs", "1", "--disc-r", "2", "--max-calls", "64"])
    assert code == 0
    return {"root": root, "rows": rows, "data": data, "adapter": adapter, "bundle": root / "source-transfer",
            "printed": printed}


def _run(prepared, out, *extra: str, target: str = "base") -> list[str]:
    return ["transfer", "run", "--bundle", str(prepared["bundle"]), "--target", str(prepared["root"] / target),
            "--out", str(out), *RUN, *extra]


@pytest.fixture(scope="module")
def lora_run(prepared):
    out = prepared["root"] / "lora-student"
    argv = _run(prepared, out, "--unfiltered", "--method", "lora", "--r", "2")
    code, printed = _main(argv)
    assert code == 0
    return out, argv, printed


def _no_models(monkeypatch) -> None:
    monkeypatch.setattr(transfer_cli, "load_lm", lambda *a, **k: pytest.fail("a model was loaded"))


def test_prepare_writes_a_bundle_beside_the_adapter_that_round_trips(prepared):
    bundle_dir = prepared["bundle"]
    assert {p.name for p in bundle_dir.iterdir()} >= {"bundle.json", "discriminator", "source_adapter"}
    bundle = load_bundle(bundle_dir)
    assert [(s.input, s.target) for s in bundle.seeds] == [(r["input"], r["target"]) for r in prepared["rows"][:5]]
    assert bundle.verdict.descriptor == "digit comparison" and bundle.instruction == INSTRUCTION
    assert bundle.source_model == str((prepared["root"] / "chat").resolve())
    assert 0.0 <= bundle.discriminator_accuracy <= 1.0  # 1 real + 1 synthetic input held out
    assert f"discriminator held-out accuracy {bundle.discriminator_accuracy:.3f} on 1 real + 1 synthetic" in prepared["printed"]
    assert f"bundle written to {bundle_dir}" in prepared["printed"]
    for file in prepared["adapter"].iterdir():
        assert (bundle_dir / "source_adapter" / file.name).read_bytes() == file.read_bytes()
    model, _ = load_lm(str(prepared["root"] / "chat"))
    assert ak.load(model, bundle_dir / "discriminator") == "discriminator"


def test_unfiltered_run_writes_an_adapter_for_the_target_and_a_rerun_resumes(prepared, lora_run, monkeypatch):
    out, argv, printed = lora_run
    for stage in ("sample", "label", "train"):
        assert f"\n{stage}: " in "\n" + printed
    assert "acceptance rate 1.000 (4 kept of 4 judged" in printed and f"saved to {out}" in printed
    sample = json.loads((out / "transfer" / "sample.json").read_text())
    assert len(sample["accepted"]) == 4 and not set(sample["accepted"]) & {r["input"] for r in prepared["rows"][:5]}
    model, _ = load_lm(str(prepared["root"] / "base"))
    assert ak.load(model, out) == "default" and isinstance(ak.config_of(model, "default"), ak.LoRAConfig)

    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    for name in ("RejectionSampler", "distill"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: pytest.fail(f"{name} ran again"))
    monkeypatch.setattr(pipeline.Teacher, "answers", lambda *a, **k: pytest.fail("the teacher labelled again"))
    code, printed = _main(argv)
    assert code == 0
    assert [line.split(" (")[0] for line in printed.splitlines() if line.startswith("resumed")] == \
        [f"resumed: stage {s} already done" for s in ("sample", "label", "train")]
    assert "sample: " not in printed
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("change, differs", [(["--method", "shira", "--r", "2"], "method"), (["--size", "5"], "settings")])
def test_another_run_into_the_same_out_is_refused_before_models_load(change, differs, prepared, lora_run, monkeypatch, capsys):
    out, argv, _ = lora_run
    _no_models(monkeypatch)
    assert main(_run(prepared, out, "--unfiltered", *change) if "--method" in change else [*argv, *change]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds another transfer run (it differs in {differs}" in err and err.count("\n") == 1


def test_a_wrong_source_model_is_a_base_model_mismatch(prepared, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(_run(prepared, out, "--unfiltered", "--source-model", str(prepared["root"] / "other"))) == 2
    err = capsys.readouterr().err
    assert "was made for another base model: embedding_sample_sha256" in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "bundle.json").write_text("{not json"), "bundle.json"),
    (lambda d: (d / "bundle.json").write_text((d / "bundle.json").read_text().replace('"seeds": [', '"seeds": [3, ')),
     "invalid bundle"),
    (lambda d: shutil.rmtree(d / "discriminator"), "lacks discriminator/"),
    (lambda d: (d / "bundle.json").unlink(), "missing bundle.json"),
], ids=["not-json", "bad-seed", "no-discriminator", "no-bundle-file"])
def test_a_damaged_bundle_is_refused_before_any_model_loads(damage, message, prepared, tmp_path, monkeypatch, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(prepared["bundle"], bundle)
    damage(bundle)
    _no_models(monkeypatch)
    argv = _run(prepared, tmp_path / "student", "--unfiltered")
    argv[argv.index("--bundle") + 1] = str(bundle)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, config", [
    (["--method", "shira", "--mask", "grad", "--r", "2"], ak.ShiraConfig),  # gradient masks: calibrated on the labels
    (["--method", "bottleneck", "--reduction-factor", "4"], ak.BottleneckConfig),
], ids=["shira-grad", "bottleneck"])
def test_students_of_other_methods(argv, config, prepared, tmp_path):
    out = tmp_path / "student"
    code, printed = _main(_run(prepared, out, "--unfiltered", *argv))
    assert code == 0 and f"{argv[1]} adapter 'default'" in printed
    model, _ = load_lm(str(prepared["root"] / "base"))
    ak.load(model, out)
    assert type(ak.config_of(model, "default")) is config


def test_the_filtered_path_keeps_only_what_the_discriminator_accepts(prepared, tmp_path, monkeypatch):
    """A stub verdict (even length) stands in for the tiny random discriminator, which rejects nearly everything."""
    judged: list[str] = []

    def accept(self, texts):
        judged.extend(texts)
        return [len(t) % 2 == 0 for t in texts]

    monkeypatch.setattr(Discriminator, "accept", accept)
    out = tmp_path / "student"
    code, printed = _main(_run(prepared, out, "--size", "3"))
    assert code == 0
    sample = json.loads((out / "transfer" / "sample.json").read_text())
    assert len(sample["accepted"]) == 3 and all(len(t) % 2 == 0 for t in sample["accepted"])
    assert set(sample["candidates"]) <= set(judged)
    assert f"acceptance rate {sample['acceptance_rate']:.3f} (3 kept of" in printed


def test_logit_mode_across_tokenizers_fails_before_sampling_and_the_out_stays_usable(prepared, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(_run(prepared, out, "--unfiltered", "--mode", "logits")) == 2
    assert "one vocabulary" in capsys.readouterr().err
    assert not (out / "transfer" / "sample.json").exists()
    assert main(_run(prepared, out, "--unfiltered", "--size", "2")) == 0  # nothing finished: other options may run there


def test_continued_transfer_uses_the_given_teacher_and_its_weights_bind_the_out(prepared, tmp_path, capsys):
    middle = tmp_path / "middle"  # source -> source with another method, then that adapter teaches the target
    assert main(_run(prepared, middle, "--unfiltered", "--method", "bottleneck", "--epochs", "10", "--lr", "0.02",
                     target="chat")) == 0
    teacher = tmp_path / "teacher"
    shutil.copytree(middle, teacher)
    out = tmp_path / "student"
    argv = _run(prepared, out, "--unfiltered", "--teacher-adapter", str(teacher))
    assert main(argv) == 0
    assert json.loads((out / "transfer" / "command.json").read_text())["teacher_adapter"] == str(teacher.resolve())
    # the labels are the given teacher's greedy answers on the source model
    model, tokenizer = load_lm(str(prepared["root"] / "chat"))
    ak.load(model, teacher, "teacher")
    bundle = load_bundle(prepared["bundle"])
    inputs = json.loads((out / "transfer" / "sample.json").read_text())["accepted"]
    expected = Teacher(model, tokenizer, "teacher").answers([bundle.prompt(x) for x in inputs],
                                                             Sampling(max_new_tokens=bundle.answer_tokens), progress=False)
    assert json.loads((out / "transfer" / "label.json").read_text())["answers"] == expected
    capsys.readouterr()
    shutil.rmtree(teacher)
    shutil.copytree(prepared["adapter"], teacher)  # same path, other weights: the library's claim refuses
    assert main(argv) == 2
    assert "holds a transfer with other inputs or settings" in capsys.readouterr().err


def test_prepare_refuses_bad_data_and_options_before_the_model_loads(prepared, tmp_path, monkeypatch, capsys):
    _no_models(monkeypatch)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} vs 1", "completion": "no"}) + "\n" for i in range(8)))
    common = ["transfer", "prepare", "--model", str(prepared["root"] / "chat"), "--adapter", str(prepared["adapter"]),
              "--out", str(tmp_path / "bundle")]
    for extra, message in [
        (["--data", str(prompts), "--descriptor", "d"], "not whole prompts"),
        (["--data", str(prepared["data"])], "--descriptor is needed"),
        (["--data", str(prepared["data"]), "--descriptor", "d", "--seeds", "16"], "--seeds 16 leaves no other"),
        (["--data", "boolean_expressions", "--descriptor", "d"], "its own instruction"),
        (["--data", str(prepared["data"]), "--descriptor", "d", "--disc-r", "0"], "--disc-r must be at least 1"),
    ]:
        assert main([*common, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main([*common[:-1], str(prepared["adapter"] / "inner"), "--data", str(prepared["data"]), "--descriptor", "d"]) == 2
    assert "inside the source adapter" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()

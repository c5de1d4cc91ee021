"""``adapterkit train --nproc 2``: two local processes (torch.distributed's elastic launcher, gloo)
write the adapter ``--nproc 1`` writes, up to float summation order; every check runs before
any process starts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapterkit.cli.main import main
from adapterkit.train import distributed


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny BERT encoder (no dropout: both runs then compute the same function) with MiniLM's
    tokenizer, as ``--model DIR`` takes it, and a small labelled CSV file."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from adapterkit.zoo.models import minilm_path

    root = tmp_path_factory.mktemp("cli")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = ["good", "bad", "great", "awful", "fine", "poor", "nice", "grim"]
    rows = [f"{words[i % 8]} film number {i},{'pos' if i % 2 == 0 else 'neg'}" for i in range(24)]
    (root / "data.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return root


def _argv(root, out, *extra: str) -> list[str]:
    return ["train", "--model", str(root / "model"), "--data", str(root / "data.csv"), "--test-size", "8",
            "--batch-size", "5", "--epochs", "2", "--max-length", "12", "--out", str(out), "--method", "dylora",
            "--r-max", "4", *extra]


def test_two_processes_write_the_adapter_one_process_writes(encoder, tmp_path, capfd):
    assert main(_argv(encoder, tmp_path / "one")) == 0
    one_output = capfd.readouterr().out
    assert main(_argv(encoder, tmp_path / "two", "--nproc", "2")) == 0
    printed = capfd.readouterr().out
    assert "on 2 processes" in printed and printed.count("held-out accuracy") == 1  # rank 0 reports, once
    one, two = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:  # 16 training rows in batches of 5: the last batch's single row leaves rank 1 without one
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
    assert json.loads((tmp_path / "two" / "labels.json").read_text()) == json.loads(
        (tmp_path / "one" / "labels.json").read_text())
    assert one_output.split("held-out accuracy")[1].split()[0] == printed.split("held-out accuracy")[1].split()[0]


def test_bad_options_fail_before_any_process_starts(encoder, tmp_path, capsys, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(distributed, "launch", launched)
    assert main(_argv(encoder, tmp_path / "x", "--nproc", "2", "--targets", "no_such_module")) == 2
    assert "no_such_module" in capsys.readouterr().err
    assert main(_argv(encoder, tmp_path / "x", "--nproc", "0")) == 2
    assert "--nproc must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["train", "--task", "causal-lm", "--model", "m", "--data", "d.jsonl", "--nproc", "2",
                 "--out", str(tmp_path / "y")]) == 2  # not offered for causal LMs
    assert "--nproc" in capsys.readouterr().err

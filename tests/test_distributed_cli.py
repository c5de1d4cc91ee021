"""``adapterkit train --nproc 2``: two local processes (torch.distributed's elastic launcher, gloo)
write the adapter ``--nproc 1`` writes, up to float summation order; every check runs before
any process starts. The launch runs in a child process with a time limit, its ranks with a short
collective timeout. :func:`distributed.launch` leaves the caller's signal handlers as they were and
turns Ctrl-C into KeyboardInterrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterkit.cli.main import main
from adapterkit.train import distributed

import distributed_support as support

HERE = Path(__file__).parent
LIMIT_S = 300  # the whole --nproc 2 run (two ranks start in ~5 s each; training takes seconds)


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


def _bounded(argv: list[str]) -> subprocess.CompletedProcess:
    """``adapterkit ARGV`` in a child process (its own process group), killed with its ranks after LIMIT_S."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-m", "adapterkit.cli.main", *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the launcher and the ranks it started
        child.communicate()
        pytest.fail(f"adapterkit {' '.join(argv[:1])} --nproc 2 did not finish within {LIMIT_S} s")
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def test_two_processes_write_the_adapter_one_process_writes(encoder, tmp_path, capfd):
    assert main(_argv(encoder, tmp_path / "one")) == 0
    one_output = capfd.readouterr().out
    done = _bounded(_argv(encoder, tmp_path / "two", "--nproc", "2", "--collective-timeout", "60"))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "on 2 processes" in printed and printed.count("held-out accuracy") == 1  # rank 0 reports, once
    # what launch returned: each process's own rank from its process group, and its steps (24 - 8 held out
    # = 16 rows in batches of 5: 4 steps an epoch, 2 epochs)
    assert "2 processes (ranks 0, 1) trained 8 optimizer steps each" in printed
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


def _custom(signum, frame):  # a handler of the caller's that launch must leave in place
    raise AssertionError(f"signal {signum} reached the test's handler")


def test_launch_leaves_the_callers_signal_handlers_in_place():
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    originals = {name: signal.getsignal(getattr(signal, name)) for name in names}
    try:
        for name in ("SIGTERM", "SIGHUP", "SIGQUIT"):
            signal.signal(getattr(signal, name), _custom)
        before = {name: signal.getsignal(getattr(signal, name)) for name in names}
        assert distributed.launch(support.returns_rank, 1) == {0: 0}
        assert {name: signal.getsignal(getattr(signal, name)) for name in names} == before
    finally:
        for name, handler in originals.items():
            signal.signal(getattr(signal, name), handler)


def test_ctrl_c_during_a_launch_stops_the_processes_and_raises_keyboard_interrupt(tmp_path):
    flag = tmp_path / "started"
    before = signal.getsignal(signal.SIGINT)

    def interrupt() -> None:
        deadline = time.monotonic() + 120
        while not flag.exists() or not flag.read_text():
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the launching process gets SIGINT

    pressing = threading.Thread(target=interrupt)
    pressing.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            distributed.launch(support.waits, 1, (str(flag),))
    finally:
        pressing.join()
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(ProcessLookupError):  # the rank was stopped, not left running
        os.kill(int(flag.read_text()), 0)

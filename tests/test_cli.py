"""The command line: one-line errors, info/export/fuse/eval on real adapters."""

from __future__ import annotations

import json
import re

import pytest

import adapterkit as ak
from adapterkit.cli.main import main


def test_errors_are_one_line_without_traceback(capsys, tmp_path):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adapterkit: error:") and "missing" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    assert main(["info", str(tmp_path / "bad")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_info_reports_method_size_parameters_and_fingerprint(mlp, tmp_path, capsys):
    ak.attach(mlp, ak.LoRAConfig(r=2, target_modules=["0", "2"]), "small")
    ak.save(mlp, tmp_path / "a", "small")
    ak.save(mlp, tmp_path / "p", "small", format="peft")
    assert main(["info", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"method: lora", out) and re.search(r"parameters: 112\b", out)  # 2*(8+16) + 2*(16+16)
    assert "base_weights_sha256" in out and "bytes_on_disk" in out
    assert main(["info", str(tmp_path / "p")]) == 0
    assert "format: peft" in capsys.readouterr().out


@pytest.mark.integration
def test_train_export_fuse_eval_end_to_end(tmp_path, capsys):
    common = ["--test-size", "64", "--max-length", "32"]
    assert main(["train", "--out", str(tmp_path / "a"), "--train-size", "64", "--r", "2", *common]) == 0
    out = capsys.readouterr().out
    trained = float(re.search(r"held-out accuracy ([0-9.]+)", out).group(1))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["base_model"]["copied_modules"] == ["classifier"]

    assert main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "peft")]) == 0
    assert main(["fuse", str(tmp_path / "a"), "--out", str(tmp_path / "fused")]) == 0
    capsys.readouterr()
    accuracies = []
    for args in (["eval", str(tmp_path / "a")], ["eval", str(tmp_path / "peft")], ["eval", "--model", str(tmp_path / "fused")]):
        assert main([*args, *common]) == 0
        accuracies.append(float(re.search(r"held-out accuracy ([0-9.]+)", capsys.readouterr().out).group(1)))
    assert accuracies == [trained] * 3
    assert (tmp_path / "fused" / "model.safetensors").is_file()

"""``adapterkit info`` reports the adapter's logical parameter count (what the attached adapter trains),
not the number of stored elements of packed low-bit codes or SHiRA's index storage."""

from __future__ import annotations

import re

import pytest

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.io.safefiles import read_tensors

TARGETS = ["0", "2"]


def _info(capsys, path) -> dict[str, str]:
    assert main(["info", str(path)]) == 0
    return dict(re.findall(r"^\s*(\w+): (.*)$", capsys.readouterr().out, re.M))


@pytest.mark.parametrize("config", [
    ak.LoRAConfig(r=3, target_modules=TARGETS, bits=1),
    ak.LoRAConfig(r=3, target_modules=TARGETS, bits=2, modules_to_save=["4"]),
    ak.ShiraConfig(density=0.3, target_modules=TARGETS),
    ak.ShiraConfig(density=0.3, target_modules=TARGETS, bits=1),
    ak.ShiraConfig(density=0.3, mask="wm", target_modules=TARGETS, bits=4),  # Rice-coded indices
    ak.BottleneckConfig(bottleneck=3, target_modules=TARGETS, bits=1),
    ak.DyLoRAConfig(r_max=3, target_modules=TARGETS, bits=2),
], ids=["lora-1bit", "lora-2bit-head", "shira", "shira-1bit", "shira-wm-4bit", "bottleneck-1bit", "dylora-2bit"])
def test_parameters_are_the_attached_adapters_trainable_count(config, mlp, tmp_path, capsys):
    ak.attach(mlp, config, "a")
    trainable, _ = ak.trainable_parameters(mlp)
    ak.save(mlp, tmp_path / "a", "a")
    info = _info(capsys, tmp_path / "a")
    assert int(info["parameters"]) == trainable
    assert int(info["tensors"]) == len(read_tensors(tmp_path / "a" / "adapter.safetensors"))
    assert int(info["bytes_on_disk"]) > int(info["tensor_bytes"]) > 0


def test_packed_codes_alone_would_have_been_counted_as_bytes(mlp, tmp_path, capsys):
    ak.attach(mlp, ak.LoRAConfig(r=4, target_modules=TARGETS, bits=1), "a")
    ak.save(mlp, tmp_path / "a", "a")
    stored = read_tensors(tmp_path / "a" / "adapter.safetensors")
    assert int(_info(capsys, tmp_path / "a")["parameters"]) == ak.trainable_parameters(mlp)[0] == 4 * (8 + 16) + 4 * (16 + 16)
    assert sum(t.numel() for t in stored.values()) != ak.trainable_parameters(mlp)[0]  # what info used to print


def test_peft_directories_count_their_float_tensors(mlp, tmp_path, capsys):
    ak.attach(mlp, ak.ShiraConfig(r=1, target_modules=TARGETS), "a")
    ak.save(mlp, tmp_path / "p", "a", format="peft")
    info = _info(capsys, tmp_path / "p")
    assert info["format"] == "peft" and int(info["parameters"]) == ak.trainable_parameters(mlp)[0] == 1 * (8 + 16) + 1 * (16 + 16)

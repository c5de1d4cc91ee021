"""DyLoRA at inference: set_rank (also while fused, bit-exact), export to a plain LoRA (adapterkit and the
real peft package load it with the same outputs), files, rank sweeps and bad inputs."""

from __future__ import annotations

import copy
import json
import re

import peft
import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from torch import nn

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.core.state import get_state


def dylora_bert(base: nn.Module, **config) -> nn.Module:
    model = copy.deepcopy(base)
    ak.attach(model, ak.DyLoRAConfig(**{"r_max": 6, "target_modules": ["query", "value"],
                                        "modules_to_save": ["classifier"], **config}), "d")
    randomise(model, "d", seed=5)
    return model.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: w.base_layer.weight.detach().clone() for p, w in get_state(model).wrappers.items()
            if hasattr(w.base_layer, "weight")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_set_rank_while_fused_lands_on_the_new_rank_and_unfuse_is_bit_exact(tiny_bert, token_ids, dtype):
    model = dylora_bert(tiny_bert.to(dtype))
    original = base_weights(model)
    unfused = {}
    for rank in (1, 3, 6):
        ak.set_rank(model, rank)
        unfused[rank] = logits(model, token_ids)
    ak.fuse(model, ["d"])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for cycle in range(60):
        rank = (1, 3, 6)[cycle % 3]
        ak.set_rank(model, rank)
        if cycle < 3:
            torch.testing.assert_close(logits(model, token_ids), unfused[rank], **tol)
            query = model.bert.encoder.layer[0].attention.self.query
            layer = query.layer("d")
            delta = layer.lora_B[:, :rank] @ layer.lora_A[:rank] * (16.0 / rank)
            expected = (original["bert.encoder.layer.0.attention.self.query"].float() + delta).to(dtype)
            torch.testing.assert_close(query.weight, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert ak.fused_adapters(model) == [("d", 1.0)]
    ak.unfuse(model)
    assert all(torch.equal(w, original[p]) for p, w in base_weights(model).items())


def test_set_rank_after_inexact_fuse_subtracts_the_old_rank(tiny_bert, token_ids):
    model = dylora_bert(tiny_bert)
    ak.fuse(model, ["d"], exact=False)
    ak.set_rank(model, 2)
    fused = logits(model, token_ids)
    ak.unfuse(model)
    torch.testing.assert_close(fused, logits(model, token_ids), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model, token_ids), logits(_at(tiny_bert, 2), token_ids))


def _at(base: nn.Module, rank: int) -> nn.Module:
    model = dylora_bert(base)
    ak.set_rank(model, rank)
    return model


@pytest.mark.parametrize("scaling", ["alpha_over_b", "alpha_over_rmax"])
@pytest.mark.parametrize("rank", [1, 4, 6])
def test_export_at_rank_b_is_a_plain_lora_with_identical_outputs_in_adapterkit_and_peft(
        tiny_bert, token_ids, tmp_path, scaling, rank):
    model = dylora_bert(tiny_bert, scaling=scaling, alpha=12.0)
    before = snapshot(model)
    ak.export(model, "d", tmp_path / "peft", rank=rank)
    ak.export(model, "d", tmp_path / "native", rank=rank, format="adapterkit")
    assert_unchanged(model, before)  # exporting builds the LoRA beside the model
    ak.set_rank(model, rank)
    expected = logits(model, token_ids)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == rank and not config["use_rslora"]
    assert config["lora_alpha"] / config["r"] == pytest.approx(12.0 / (rank if scaling == "alpha_over_b" else 6))
    for directory in ("peft", "native"):
        fresh = copy.deepcopy(tiny_bert)
        ak.load(fresh, tmp_path / directory)
        assert ak.config_of(fresh, ak.adapters(fresh)[0]).method == "lora"
        torch.testing.assert_close(logits(fresh.eval(), token_ids), expected, rtol=0, atol=1e-6)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, token_ids), expected, rtol=0, atol=1e-5)


def test_export_defaults_to_the_current_inference_rank(tiny_bert, tmp_path):
    model = dylora_bert(tiny_bert)
    ak.set_rank(model, 3)
    ak.export(model, "d", tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 3


def test_save_and_load_round_trip_keeps_every_rank(tiny_bert, token_ids, tmp_path):
    model = dylora_bert(tiny_bert, r_min=2, scaling="alpha_over_rmax", frozen=False)
    ak.save(model, tmp_path, "d")
    fresh = copy.deepcopy(tiny_bert)
    ak.load(fresh, tmp_path)
    assert ak.config_of(fresh, "d") == ak.config_of(model, "d")
    for rank in (2, 5, 6):
        ak.set_rank(model, rank)
        ak.set_rank(fresh, rank)
        assert torch.equal(logits(fresh.eval(), token_ids), logits(model, token_ids))
    with pytest.raises(ak.UnsupportedError, match="ak.export|format='adapterkit'"):
        ak.save(model, tmp_path / "p", "d", format="peft")


def test_rank_sweep_picks_the_smallest_rank_near_the_best_and_restores_the_rank(tiny_bert, tmp_path):
    model = dylora_bert(tiny_bert)
    ak.set_rank(model, 5)
    scores = {1: 0.70, 2: 0.80, 3: 0.845, 4: 0.85, 5: 0.84, 6: 0.852}
    seen = []

    def evaluate(m: nn.Module) -> float:
        rank = get_state(m).wrappers["bert.encoder.layer.0.attention.self.query"].layer("d").eval_rank
        seen.append(rank)
        return scores[rank]

    sweep = ak.rank_sweep(model, "d", evaluate, tolerance=0.01, progress=False)
    assert seen == [1, 2, 3, 4, 5, 6] and sweep.best_rank == 6 and sweep.chosen_rank == 3
    assert ak.dylora.current_rank(model, "d") == 5
    sweep.write(tmp_path)
    assert json.loads((tmp_path / "rank_sweep.json").read_text())["chosen_rank"] == 3
    assert "| 3 | 0.8450 (chosen) |" in (tmp_path / "rank_sweep.md").read_text()
    assert (tmp_path / "rank_sweep.png").read_bytes()[:4] == b"\x89PNG"
    losses = ak.rank_sweep(model, "d", lambda m: 1 - evaluate(m), ranks=[2, 4, 6], higher_is_better=False,
                           tolerance=0.0, progress=False)
    assert losses.best_rank == 6 and losses.chosen_rank == 6

    def failing(m: nn.Module) -> float:
        raise RuntimeError("evaluation broke")

    with pytest.raises(RuntimeError):
        ak.rank_sweep(model, "d", failing, progress=False)
    assert ak.dylora.current_rank(model, "d") == 5


BAD_CONFIGS = [
    (dict(r_min=5, r_max=4), "must not exceed"),
    (dict(r_min=0), "positive integers"),
    (dict(r_max=2.5), "positive integers"),
    (dict(distribution="zipf"), "distribution must be one of"),
    (dict(scaling="sqrt"), "scaling must be one of"),
    (dict(scope="block"), "scope must be one of"),
    (dict(alpha=0), "alpha must be a positive"),
    (dict(geometric_p=1.0), "geometric_p"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ak.ConfigError, match=message):
        ak.DyLoRAConfig(target_modules=["q"], **overrides)


def test_bad_ranks_and_wrong_adapters_raise_and_leave_the_model_unchanged(tiny_bert, tmp_path):
    model = dylora_bert(tiny_bert, r_min=2)
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["key"]), "lora")
    ak.fuse(model, ["d"])
    before = snapshot(model)
    calls = [
        (lambda: ak.set_rank(model, 1), ak.ConfigError, r"\[2, 6\]"),
        (lambda: ak.set_rank(model, 7), ak.ConfigError, r"\[2, 6\]"),
        (lambda: ak.set_rank(model, 2.0), ak.ConfigError, "integer"),
        (lambda: ak.set_rank(model, True), ak.ConfigError, "integer"),
        (lambda: ak.set_rank(model, 2, "lora"), ak.ConfigError, "not DyLoRA"),
        (lambda: ak.set_rank(model, 2, "missing"), ak.AdapterNotFoundError, "missing"),
        (lambda: ak.export(model, "d", tmp_path / "x", rank=9), ak.ConfigError, r"\[2, 6\]"),
        (lambda: ak.export(model, "lora", tmp_path / "y", rank=2), ak.ConfigError, "no export options"),
        (lambda: ak.rank_sweep(model, "d", lambda m: 0.0, ranks=[1, 2]), ak.ConfigError, "subset"),
        (lambda: ak.rank_sweep(model, "lora", lambda m: 0.0), ak.ConfigError, "not DyLoRA"),
    ]
    for call, error, message in calls:
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(model, before)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    plain = nn.Sequential(nn.Linear(4, 4))
    ak.attach(plain, ak.LoRAConfig(r=1, target_modules=["0"]))
    with pytest.raises(ak.ConfigError, match="no DyLoRA adapter"):
        ak.set_rank(plain, 1)


@pytest.mark.integration
def test_cli_trains_a_dylora_adapter_sweeps_its_ranks_and_exports_the_chosen_one(tmp_path, capsys):
    common = ["--test-size", "64", "--max-length", "32"]
    assert main(["train", "--method", "dylora", "--r-max", "4", "--out", str(tmp_path / "a"), "--train-size", "64",
                 *common]) == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["method"] == "dylora"
    capsys.readouterr()
    assert main(["rank-sweep", str(tmp_path / "a"), "--out", str(tmp_path / "sweep"), *common]) == 0
    out = capsys.readouterr().out
    chosen = int(re.search(r"within 0.01 of the best: (\d)", out).group(1))
    sweep = json.loads((tmp_path / "sweep" / "rank_sweep.json").read_text())
    assert sweep["ranks"] == [1, 2, 3, 4] and sweep["chosen_rank"] == chosen
    assert (tmp_path / "sweep" / "rank_sweep.png").is_file()
    assert main(["export", str(tmp_path / "a"), "--rank", str(chosen), "--out", str(tmp_path / "plain")]) == 0
    assert main(["eval", str(tmp_path / "plain"), *common]) == 0
    accuracy = float(re.search(r"held-out accuracy ([0-9.]+)", capsys.readouterr().out).group(1))
    assert accuracy == round(sweep["scores"][chosen - 1], 3)  # eval prints three decimals

"""``adapterkit train`` options come from the method's config dataclass; everything is checked before
any model is loaded or trained; --debug re-raises; default learning rates per method."""

from __future__ import annotations

import dataclasses
import re

import pytest
from torch import nn

import adapterkit as ak
from adapterkit.cli import train as train_command
from adapterkit.cli.main import build_parser, main
from adapterkit.cli.options import build_config, flag
from adapterkit.train.loop import default_learning_rate


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    calls = []
    monkeypatch.setattr(train_command, "load_model", lambda *a, **k: calls.append(a) or pytest.fail("model loaded"))
    return calls


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adapterkit: error:"), err
    return err


@pytest.mark.parametrize("method", [m.name for m in ak.registered_methods()])
def test_every_config_field_of_every_method_is_an_option_with_help_and_default(method, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--method", method, "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    config_class = ak.get_method(method).config_class
    for field in dataclasses.fields(config_class):
        if field.name == "seed":  # shared with the command's own --seed
            continue
        option = flag(field.name) + ("-method" if field.name == "base" else "")
        assert option in text, option
    assert text.count("(default:") >= len(dataclasses.fields(config_class))


def test_options_are_converted_by_field_type():
    args = build_parser({"method": "lora"}).parse_args(
        ["train", "--out", "x", "--r", "4", "--alpha", "8", "--use-rslora", "--rank-pattern", '{"query": 2}',
         "--layers-to-transform", "0,1", "--exclude-modules", "none"])
    config = build_config(ak.LoRAConfig, args)
    assert (config.r, config.alpha, config.use_rslora, config.layers_to_transform) == (4, 8.0, True, (0, 1))
    assert dict(config.rank_pattern) == {"query": 2} and config.exclude_modules is None
    assert config.target_modules == ("query", "value") and config.modules_to_save == ("classifier",)
    shira = build_config(ak.ShiraConfig, build_parser({"method": "shira"}).parse_args(
        ["train", "--out", "x", "--method", "shira", "--mask", "wm", "--r", "3", "--seed", "5", "--targets", "query"]))
    assert (shira.mask, shira.r, shira.density, shira.seed, shira.target_modules) == ("wm", 3, None, 5, ("query",))


def test_nested_config_takes_its_method_and_own_options():
    args = build_parser({"method": "mosa", "base": "lora"}).parse_args(
        ["train", "--out", "x", "--method", "mosa", "--base-method", "lora", "--base-r", "3", "--n-modules", "2"])
    config = build_config(ak.MoSAConfig, args)
    assert isinstance(config.base, ak.LoRAConfig) and config.base.r == 3 and config.n_modules == 2
    assert config.base.target_modules == ("query", "value")


@pytest.mark.parametrize("argv, expected", [
    (["--method", "lora", "--mask", "rand"], r"--mask is not an option of method 'lora' \(it belongs to (.*, )?shira[,)]"),
    (["--method", "dylora", "--r", "4"], r"--r is not an option of method 'dylora' \(it belongs to (.*, )?lora, (.*, )?shira[,)]"),
    (["--method", "mosa", "--base-r", "4"], r"--base-r does not apply"),
    (["--bogus", "1"], r"unknown option --bogus for method 'lora'"),
    (["--r", "x"], r"argument --r: invalid int value"),
    (["--method", "nope"], r"invalid choice: 'nope'"),
    (["--rank-pattern", "[1]"], r"not a JSON object"),
    (["--bits", "3"], r"bits must be one of"),
    (["--method", "bottleneck", "--format", "peft"], r"method 'bottleneck' has no PEFT file format"),
    (["--method", "shira", "--mask", "wm", "--density", "0.1", "--r", "2"], r"either density or r"),
])
def test_bad_options_fail_in_one_line_before_any_model_or_data(argv, expected, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--data", str(tmp_path / "missing.csv"), *argv]) == 2
    assert re.search(expected, _one_line_error(capsys))
    assert not out.exists() and not no_model


def test_debug_reraises_with_the_traceback(tmp_path, capsys):
    with pytest.raises(ak.MissingFileError):
        main(["--debug", "info", str(tmp_path / "missing")])
    with pytest.raises(ak.MissingFileError):
        main(["info", str(tmp_path / "missing"), "--debug"])
    with pytest.raises(ak.ConfigError, match="--mask is not an option"):
        main(["--debug", "train", "--out", str(tmp_path / "o"), "--mask", "rand"])
    assert main(["info", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys)


def test_default_learning_rate_is_the_largest_active_method_default_times_four_at_low_bits():
    def model():
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    assert default_learning_rate(model()) == ak.AdapterMethod.default_learning_rate == 1e-3
    lora = ak.attach(model(), ak.LoRAConfig(r=2, target_modules=["0"]), "a")
    assert default_learning_rate(lora) == ak.get_method("lora").default_learning_rate == 3e-3
    ak.attach(lora, ak.BottleneckConfig(bottleneck=2, target_modules=["2"]), "b")
    ak.activate(lora, ["a", "b"])
    assert default_learning_rate(lora) == 3e-3  # max(lora 3e-3, bottleneck 1e-3)
    assert default_learning_rate(ak.attach(model(), ak.ShiraConfig(r=1, target_modules=["0"]), "s")) == 1e-2
    one_bit = ak.attach(model(), ak.LoRAConfig(r=2, target_modules=["0"], bits=1), "q")
    assert default_learning_rate(one_bit) == pytest.approx(4 * 3e-3)
    four_bit = ak.attach(model(), ak.LoRAConfig(r=2, target_modules=["0"], bits=4), "q")
    assert default_learning_rate(four_bit) == 3e-3
    shipped = {"bottleneck": 1e-3, "dylora": 3e-3, "lora": 3e-3, "mosa": 3e-3, "shira": 1e-2}
    assert {name: ak.get_method(name).default_learning_rate for name in shipped} == shipped


def test_ak_train_uses_the_default_learning_rate_when_none_is_given(monkeypatch):
    import torch

    seen = []
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **kw: seen.append(lr) or real(params, lr=lr, **kw))
    model = ak.attach(nn.Sequential(nn.Linear(4, 2)), ak.ShiraConfig(r=1, target_modules=["0"]), "s")
    batch = {"input": torch.randn(3, 4)}
    ak.train(model, [batch], loss_fn=lambda m, b: m(b["input"]).pow(2).sum(), progress=False)
    ak.train(model, [batch], lr=0.5, loss_fn=lambda m, b: m(b["input"]).pow(2).sum(), progress=False)
    assert seen == [1e-2, 0.5]


def test_a_method_with_unresolvable_annotations_and_required_fields_does_not_break_the_cli(monkeypatch, tmp_path, capsys):
    from adapterkit.core import registry

    class Local:  # a type only this function can name: get_type_hints cannot resolve the annotation
        pass

    @dataclasses.dataclass(frozen=True)
    class OddConfig(ak.AdapterConfig):
        width: "Local" = dataclasses.field(kw_only=True)  # required, no default
        depth: int = 2

    class OddMethod(ak.AdapterMethod):
        name = "odd-cli-test"
        config_class = OddConfig

    monkeypatch.setitem(registry._METHODS, OddMethod.name, OddMethod())
    monkeypatch.setattr(OddConfig, "method", OddMethod.name, raising=False)
    assert main(["info", str(tmp_path / "missing")]) == 2  # other commands still parse
    assert "adapter directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--method", OddMethod.name, "--help"])
    assert "--width" in capsys.readouterr().out

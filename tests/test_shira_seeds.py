"""SHiRA mask seeds and non-overlapping masks.

Every (seed, adapter, module) has its own random mask (PEFT reuses one seed for every layer and adapter);
``avoid`` gives the paper's non-overlapping "next top-K" masks, for rand, wm, grad and snip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.methods.shira import masks
from adapterkit.core.state import get_state
from conftest import assert_unchanged, snapshot


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 48))


def batches(n: int = 3, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 48, generator=g) for _ in range(n)]


def square_loss(model, x):
    return model(x).pow(2).mean()


def indices(model, name: str) -> dict[str, torch.Tensor]:
    return {path: layer.indices.clone() for path, layer in get_state(model).layers(name)}


def dense(idx: torch.Tensor, shape) -> torch.Tensor:
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[idx] = True
    return mask.view(shape)


# -- seeds ----------------------------------------------------------------------------------


def stack(width: int = 64, depth: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def test_rand_masks_differ_between_layers_and_adapters_but_reproduce():
    """Same shape, same seed: every layer and every adapter gets its own mask; (seed, name, module) reproduces it."""
    config = ak.ShiraConfig(density=0.05, seed=123, target_modules=["0", "1", "2"])
    model = ak.attach(stack(), config, "a")
    ak.attach(model, config, "b")
    a, b = indices(model, "a"), indices(model, "b")
    pairs = [(a["0"], a["1"]), (a["0"], a["2"]), (a["1"], a["2"])] + [(a[p], b[p]) for p in a]
    for x, y in pairs:
        assert torch.isin(x, y).float().mean() < 0.2  # independent masks overlap ≈ density
    again = ak.attach(stack(seed=5), config, "a")  # other base weights, same (seed, name, module)
    assert all(torch.equal(indices(again, "a")[p], a[p]) for p in a)
    other_seed = ak.attach(stack(), config.replace(seed=124), "a")
    assert all(not torch.equal(indices(other_seed, "a")[p], a[p]) for p in a)
    renamed = ak.attach(stack(), ak.ShiraConfig(density=0.05, seed=123, target_modules=["1"]), "a")
    assert torch.equal(indices(renamed, "a")["1"], a["1"])  # does not depend on the other targets


def test_rand_mask_is_uniform_over_rows_and_columns():
    """Row and column counts of a rand mask pass a loose χ² test (no clustering, no bias to low indices)."""
    model = ak.attach(stack(width=128, depth=1), ak.ShiraConfig(density=0.1, target_modules=["0"]), "a")
    mask = dense(model[0].layer("a").indices, (128, 128)).float()
    expected = mask.sum() / 128
    for counts in (mask.sum(1), mask.sum(0)):
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert 127 - 5 * 16 < chi2 < 127 + 5 * 16  # dof 127, sd ≈ 16
    flat = model[0].layer("a").indices.float()
    assert abs(flat.mean().item() / (128 * 128 - 1) - 0.5) < 0.02


# -- non-overlapping masks ------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["rand", "wm"])
def test_avoid_gives_disjoint_supports_of_full_size(rule):
    """avoid=("a",) and ("a", "b"): per layer no shared entry, still exactly K each."""
    model = stack()
    config = ak.ShiraConfig(density=0.05, mask=rule, target_modules=["0", "1"])
    ak.attach(model, config, "a")
    ak.attach(model, config.replace(avoid=("a",)), "b")
    ak.attach(model, config.replace(avoid=("a", "b"), target_modules=["1", "2"]), "c")
    a, b, c = indices(model, "a"), indices(model, "b"), indices(model, "c")
    k = round(0.05 * 64 * 64)
    for path in ("0", "1"):
        assert b[path].numel() == k and not torch.isin(b[path], a[path]).any()
    assert not torch.isin(c["1"], torch.cat([a["1"], b["1"]])).any() and c["1"].numel() == k
    assert c["2"].numel() == k and model[2].layer("c").regenerable == (rule == "rand")  # nothing to avoid there


def test_wm_with_avoid_takes_the_next_largest_magnitudes():
    """Non-overlapping WM (paper §5.3.2): adapter t takes |W| ranks [(t−1)K, tK)."""
    model = stack(depth=1)
    order = torch.argsort(model[0].weight.detach().abs().flatten(), descending=True)
    config = ak.ShiraConfig(density=0.02, mask="wm", target_modules=["0"])
    ak.attach(model, config, "t1")
    ak.attach(model, config.replace(avoid=("t1",)), "t2")
    ak.attach(model, config.replace(avoid=("t1", "t2")), "t3")
    k = round(0.02 * 64 * 64)
    for t, name in enumerate(("t1", "t2", "t3")):
        assert torch.equal(model[0].layer(name).indices, order[t * k:(t + 1) * k].sort().values), name


def test_avoid_that_leaves_too_little_room_is_refused():
    """avoid with K new entries that no longer fit beside the avoided ones → ConfigError, model unchanged."""
    model = stack(width=8, depth=1)
    ak.attach(model, ak.ShiraConfig(density=0.75, mask="wm", target_modules=["0"]), "a")
    before = snapshot(model)
    with pytest.raises(ak.ConfigError):
        ak.attach(model, ak.ShiraConfig(density=0.5, mask="rand", avoid=("a",), target_modules=["0"]), "b")
    assert_unchanged(model, before)


@pytest.mark.parametrize("rule", ["grad", "snip"])
def test_calibrating_beside_an_active_shira_adapter_uses_the_base_gradient(rule):
    """Non-overlapping grad/snip masks (avoid) need calibration while the first SHiRA adapter is active.

    The calibration gradient must be the base model's (spec §3); a freshly attached adapter is zero,
    so "b" must take the next K entries of the same score order that "a" took its top K from.
    """
    reference = net()
    gradients = masks.calibration_gradients(reference, {"0": reference[0], "2": reference[2]}, batches(), square_loss)
    model = net()
    config = ak.ShiraConfig(density=0.02, mask=rule, target_modules=["0", "2"])
    ak.attach(model, config, "a", calibration=batches(), loss_fn=square_loss)
    ak.attach(model, config.replace(avoid=("a",)), "b", calibration=batches(), loss_fn=square_loss)
    for path, g in gradients.items():
        weight = reference.get_submodule(path).weight.detach()
        order = torch.argsort((g if rule == "grad" else weight * g).abs().flatten(), descending=True)
        k = round(0.02 * weight.numel())
        assert torch.equal(model.get_submodule(path).layer("a").indices, order[:k].sort().values)
        assert torch.equal(model.get_submodule(path).layer("b").indices, order[k:2 * k].sort().values)

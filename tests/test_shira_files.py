"""SHiRA files: exact round trips for every mask, compact index storage, and corrupt index streams.

rand and struct masks are regenerated from the seed (checked by a sha256 digest); other masks store
Rice-coded flat indices. Any inconsistency raises CorruptFileError and leaves the model untouched.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adapterkit as ak
from adapterkit.io.safefiles import tensors_digest
from adapterkit.io import sparse_indices as storage
from adapterkit.core.state import get_state
from conftest import assert_unchanged, randomise, snapshot

CONFIG, WEIGHTS = "adapter_config.json", "adapter.safetensors"
TARGETS = ["0", "2"]
REGENERATED = {"values", storage.SEED, storage.DIGEST}
PACKED = {"values", storage.HEADER, storage.UNARY, storage.LOW}


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).eval()


def calibration():
    g = torch.Generator().manual_seed(7)
    return dict(calibration=[torch.randn(16, 48, generator=g) for _ in range(3)], loss_fn=lambda m, x: m(x).pow(2).mean())


def diagonal_band(weight, budget, *, generator, gradient):
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask.view(-1)[torch.randperm(weight.numel(), generator=generator)[:budget]] = True
    return mask


def layers(model, name):
    return dict(get_state(model).layers(name))


def keys_by_module(path):
    out: dict[str, set[str]] = {}
    for key in load_file(path):
        module, _, local = key.rpartition(".")
        out.setdefault(module, set()).add(local)
    return out


# (config, attach options, regenerable)
MASKS = {
    "rand": (dict(mask="rand"), {}, True),
    "struct-rows": (dict(mask="struct", density=0.1), {}, True),
    "struct-cols": (dict(mask="struct", density=0.1, struct_axis="cols"), {}, True),
    "wm": (dict(mask="wm"), {}, False),
    "grad": (dict(mask="grad"), "calibration", False),
    "snip": (dict(mask="snip", grad_accumulate="abs"), "calibration", False),
    "callable": (dict(mask=diagonal_band), {}, False),
}


@pytest.mark.parametrize("case", MASKS)
def test_round_trip_is_exact_for_every_mask(case, tmp_path):
    """Indices, values and outputs come back bit-for-bit; rand/struct files hold no indices, others packed ones."""
    extra, options, regenerable = MASKS[case]
    options = calibration() if options == "calibration" else options
    model = net()
    ak.attach(model, ak.ShiraConfig(**{"density": 0.05, **extra}, seed=11, target_modules=TARGETS), "task", **options)
    randomise(model, "task")
    x = torch.randn(5, 48)
    expected = model(x)
    ak.save(model, tmp_path, "task")
    stored = keys_by_module(tmp_path / WEIGHTS)
    assert stored == {p: REGENERATED if regenerable else PACKED for p in TARGETS}
    saved = layers(model, "task")
    assert all(layer.regenerable == regenerable for layer in saved.values())
    fresh = net()
    assert ak.load(fresh, tmp_path) == "task"
    for path, layer in layers(fresh, "task").items():
        assert torch.equal(layer.indices, saved[path].indices), path
        assert torch.equal(layer.values, saved[path].values), path
        assert layer.regenerable == regenerable and layer.mask_rule == saved[path].mask_rule
    assert torch.equal(fresh(x), expected)
    assert json.loads((tmp_path / CONFIG).read_text())["config"]["mask"] == ak.config_of(model, "task").to_dict()["mask"]


def test_round_trip_of_a_non_overlapping_rand_adapter(tmp_path):
    """rand with avoid cannot be regenerated from the seed alone, so its indices are stored — and load back."""
    model = net()
    config = ak.ShiraConfig(density=0.05, target_modules=TARGETS)
    ak.attach(model, config, "a")
    ak.attach(model, config.replace(avoid=("a",)), "b")
    randomise(model, "b")
    ak.activate(model, "b")
    x = torch.randn(5, 48)
    expected = model(x)
    ak.save(model, tmp_path, "b")
    assert keys_by_module(tmp_path / WEIGHTS) == {p: PACKED for p in TARGETS}
    fresh = net()
    ak.load(fresh, tmp_path)
    for path, layer in layers(fresh, "b").items():
        assert torch.equal(layer.indices, model.get_submodule(path).layer("b").indices)
    assert torch.equal(fresh(x), expected)


def test_saving_while_fused_records_the_base_weights(tmp_path):
    """A fused SHiRA adapter saves its values and the *original* weights' fingerprint (verify="full" passes)."""
    model = net()
    ak.attach(model, ak.ShiraConfig(density=0.05, mask="wm", target_modules=TARGETS), "task")
    randomise(model, "task")
    x = torch.randn(5, 48)
    expected = model(x)
    ak.fuse(model)
    ak.save(model, tmp_path, "task")
    fresh = net()
    ak.load(fresh, tmp_path, verify="full")
    assert torch.equal(fresh(x), expected)
    assert all(torch.equal(fresh.get_submodule(p).layer("task").indices, model.get_submodule(p).layer("task").indices)
               for p in TARGETS)


# -- file size ------------------------------------------------------------------------------


def stack_256(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])


def file_size(model, directory, name, fmt="adapterkit"):
    ak.save(model, directory, name, format=fmt)
    return (directory / (WEIGHTS if fmt == "adapterkit" else "adapter_model.safetensors")).stat().st_size


@pytest.mark.parametrize("mask, bound", [("rand", 1.25), ("wm", 1.25)])
def test_file_is_close_to_a_lora_with_the_same_parameter_count(mask, bound, tmp_path):
    """256×256 stack at r=8: K = 8·(256+256) = LoRA r=8's parameter count. rand stores no indices (≤ 1.02×),
    wm stores ~6.5 bits per index (measured 1.18×); PEFT's (2, nnz) int32 layout is ~3×."""
    targets = ["0", "1", "2", "3"]
    lora = ak.attach(stack_256(), ak.LoRAConfig(r=8, target_modules=targets, init="random"), "lora")
    shira = ak.attach(stack_256(), ak.ShiraConfig(r=8, mask=mask, target_modules=targets), "shira")
    randomise(shira, "shira")
    assert ak.trainable_parameters(shira)[0] == ak.trainable_parameters(lora)[0] == 4 * 4096
    lora_bytes = file_size(lora, tmp_path / "lora", "lora")
    shira_bytes = file_size(shira, tmp_path / "shira", "shira")
    peft_bytes = file_size(shira, tmp_path / "peft", "shira", "peft")
    ratio = shira_bytes / lora_bytes
    assert ratio <= bound
    assert ratio <= 1.02 if mask == "rand" else ratio > 1.1  # the index streams cost something, but little
    assert peft_bytes / lora_bytes > 2.9


# -- corrupt files --------------------------------------------------------------------------


def saved_adapter(directory, mask: str):
    model = net()
    ak.attach(model, ak.ShiraConfig(density=0.1 if mask == "struct" else 0.05, mask=mask, target_modules=TARGETS), "task")
    randomise(model, "task")
    ak.save(model, directory, "task")
    return directory


def edit(change):
    def mutate(d):
        tensors = load_file(d / WEIGHTS)
        change(tensors)
        save_file(tensors, d / WEIGHTS)
        edit_config(lambda c: c.update(tensors_sha256=tensors_digest(tensors)))(d)  # re-seal: reach the checks behind it
    return mutate


def edit_config(change):
    def mutate(d):
        data = json.loads((d / CONFIG).read_text())
        change(data)
        (d / CONFIG).write_text(json.dumps(data))
    return mutate


def replace(key, make):
    return edit(lambda t: t.update({f"2.{key}": make(t[f"2.{key}"])}))


def set_header(position, value):
    def make(header):
        header = header.clone()
        header[position] = value(header[position])
        return header
    return replace(storage.HEADER, make)


def beyond_the_weight(t):
    """Well-formed streams whose last index is past the 64×64 weight."""
    indices = torch.arange(0, 4096, 20)
    indices[-1] = 4096 + 3
    t.update({f"2.{k}": v for k, v in storage.pack(indices).items()})
    t["2.values"] = torch.zeros(indices.numel())


def flip_first_zero_bit(unary):
    bits = unary.clone()
    position = int((bits != 255).nonzero()[0])
    bits[position] = 255
    return bits


# (id, mask of the saved adapter, mutation, text the message must contain)
CORRUPTIONS = [
    ("unary-truncated", "wm", replace(storage.UNARY, lambda u: u[: u.numel() // 2]), "header"),
    ("low-truncated", "wm", replace(storage.LOW, lambda low: low[:-3]), "header"),
    ("unary-bit-flipped", "wm", replace(storage.UNARY, flip_first_zero_bit), "header says"),
    ("header-count-plus-one", "wm", set_header(0, lambda c: c + 1), "header says"),
    ("header-count-minus-one", "wm", set_header(0, lambda c: c - 1), "header says"),
    ("header-count-zero", "wm", set_header(0, lambda c: 0), "header"),
    ("header-width-too-large", "wm", set_header(1, lambda w: 41), "header"),
    ("header-wrong-dtype", "wm", replace(storage.HEADER, lambda h: h.to(torch.int32)), storage.HEADER),
    ("header-wrong-shape", "wm", replace(storage.HEADER, lambda h: torch.cat([h, h])), storage.HEADER),
    ("low-wrong-dtype", "wm", replace(storage.LOW, lambda low: low.to(torch.int16)), "header"),
    ("index-beyond-weight", "wm", edit(beyond_the_weight), "outside"),
    ("values-shorter-than-indices", "wm", replace("values", lambda v: v[:-1]), "indices for"),
    ("values-not-1d", "wm", replace("values", lambda v: v[None]), "values"),
    ("packed-stream-missing", "wm", edit(lambda t: t.pop(f"2.{storage.LOW}")), "2"),
    ("seed-edited", "rand", replace(storage.SEED, lambda s: s + 1), "differs"),
    ("digest-edited", "rand", replace(storage.DIGEST, lambda d: d.flip(0)), "differs"),
    ("values-count-edited", "rand", replace("values", lambda v: v[:-4]), "differs"),
    ("digest-missing", "rand", edit(lambda t: t.pop(f"2.{storage.DIGEST}")), "2"),
    ("struct-digest-edited", "struct", replace(storage.DIGEST, lambda d: d.flip(0)), "differs"),
    ("struct-budget-edited", "struct", edit_config(lambda c: c["config"].update(density=0.2)), "differs"),
]


@pytest.mark.parametrize("mask, mutate, needle", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_index_data_raises_and_leaves_model_unchanged(mask, mutate, needle, tmp_path):
    """Truncated streams, header mismatches, out-of-range indices and regenerated-mask digest mismatches all raise
    CorruptFileError naming the module, before the model is touched."""
    directory = saved_adapter(tmp_path, mask)
    mutate(directory)
    target = net()
    ak.attach(target, ak.ShiraConfig(density=0.05, target_modules=["2"]), "resident")
    before = snapshot(target)
    with pytest.raises(ak.CorruptFileError, match=needle):
        ak.load(target, directory)
    assert_unchanged(target, before)
    assert ak.adapters(target) == ["resident"]

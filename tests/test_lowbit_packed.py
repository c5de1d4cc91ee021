"""Packed low-bit adapters (ak.pack / ak.unpack / ak.load(..., packed=True)): the forward is bit-identical to
the fake-quantised one, only codes (8/bits a byte) and μ, σ are held, files are unchanged, training is refused
until unpacking, and fusing, switching, per-row batches, dtype/device moves, copies, state dicts and threads work."""

from __future__ import annotations

import copy
import json
import math
import struct
import threading

import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from safetensors.torch import load_file
from torch import nn

import adapterkit as ak
from adapterkit.apps.serve import adapter_memory
from adapterkit.core import layers as layers_module
from adapterkit.core import quantization
from adapterkit.core.packed import PackedTensor
from adapterkit.core.quantization import Quantizer
from adapterkit.core.state import get_state

CONFIGS = {
    "lora": lambda bits, method: ak.LoRAConfig(r=4, target_modules=["0", "2"], bits=bits, quantization=method),
    "dylora": lambda bits, method: ak.DyLoRAConfig(r_max=4, target_modules=["0", "2"], bits=bits, quantization=method),
    "shira": lambda bits, method: ak.ShiraConfig(r=4, target_modules=["0", "2"], bits=bits, quantization=method),
    "bottleneck": lambda bits, method: ak.BottleneckConfig(bottleneck=4, target_modules=["0", "2"], bits=bits,
                                                           quantization=method),
    "sft": lambda bits, method: ak.SFTConfig(density=0.3, selection="random", target_modules=["0", "2"], bits=bits,
                                             quantization=method),
}
PRECISIONS = [(1, "gaussian_median"), (2, "gaussian_median"), (4, "gaussian_median"), (8, "gaussian_median"),
              (1, "sign_mean")]
X = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))


def attach(model: nn.Module, kind: str, bits: int = 1, method: str = "gaussian_median", name: str = "q",
           seed: int = 0) -> nn.Module:
    ak.attach(model, CONFIGS[kind](bits, method), name)
    randomise(model, name, seed=seed, scale=0.3)
    return model


def layers(model: nn.Module, name: str = "q") -> list:
    return [layer for _, layer in get_state(model).layers(name)]


def held_bytes(model: nn.Module, name: str = "q") -> tuple[int, int]:
    """(parameter bytes, buffer bytes) of the adapter's modules, as the tensors say."""
    mods = layers(model, name)
    params = sum(p.numel() * p.element_size() for m in mods for p in m.parameters())
    bufs = sum(b.numel() * b.element_size() for m in mods for b in m.buffers())
    return params, bufs


def quantized(model: nn.Module, name: str = "q") -> list[tuple[object, str, Quantizer]]:
    return [(sub, key, q) for layer in layers(model, name) for sub in layer.modules()
            if isinstance(sub, ak.AdapterLayer) for key, q in sub.quantizers.items()]


def run(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("bits,method", PRECISIONS)
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_packed_forward_equals_the_fake_quantised_forward_bit_for_bit(mlp, kind, bits, method):
    model = attach(mlp, kind, bits, method)
    before, weights = run(model), [sub.weight_of(key).detach().clone() for sub, key, _ in quantized(model)]
    ak.pack(model, "q")
    assert ak.is_packed(model, "q")
    assert all(isinstance(getattr(*_leaf(sub, key)), PackedTensor) for sub, key, _ in quantized(model))
    assert torch.equal(run(model), before)
    assert all(torch.equal(sub.weight_of(key), w) for (sub, key, _), w in zip(quantized(model), weights))
    ak.pack(model, "q")  # packing again changes nothing
    assert torch.equal(run(model), before)


def _leaf(sub, key):
    path, _, leaf = key.rpartition(".")
    return (sub.get_submodule(path) if path else sub), leaf


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["lora", "shira", "bottleneck"])
def test_bytes_held_drop_to_the_codes_plus_mean_and_std(mlp, kind, bits):
    model = attach(mlp, kind, bits)
    tensors = [(key, sub.weight_of(key).numel()) for sub, key, _ in quantized(model)]
    params_before, buffers_before = held_bytes(model)
    other_params = params_before - 4 * sum(n for _, n in tensors)  # fp32 biases of the bottleneck stay
    run(model)  # the quantizers now cache int64 codes
    assert adapter_memory(model, "q").codes > 0
    ak.pack(model, "q")
    params, buffers = held_bytes(model)
    assert params == other_params
    assert buffers - buffers_before == sum(math.ceil(n * bits / 8) + 2 * 4 for _, n in tensors)
    assert all(q._codes is None for _, _, q in quantized(model))  # the int64 codes are released
    memory = adapter_memory(model, "q")
    assert memory.codes == 0 and memory.held == params + buffers


def save_low_bit(mlp, tmp_path, kind: str, bits: int = 1, method: str = "gaussian_median"):
    model = attach(mlp, kind, bits, method)
    ak.save(model, tmp_path / kind, "q")
    return model, tmp_path / kind


def fresh(mlp_state: dict) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    model.load_state_dict(mlp_state)
    return model


@pytest.mark.parametrize("kind", ["lora", "dylora", "bottleneck"])
def test_packed_load_reads_the_codes_straight_in_and_never_dequantises(mlp, tmp_path, kind, monkeypatch):
    base = {k: v.clone() for k, v in mlp.state_dict().items()}
    _, directory = save_low_bit(mlp, tmp_path, kind, bits=2)
    reference = fresh(base)
    ak.load(reference, directory)
    expected = run(reference)

    def never(*args, **kwargs):
        raise AssertionError("a packed load dequantised a tensor")

    monkeypatch.setattr(quantization, "decode", never)
    monkeypatch.setattr(layers_module, "decode", never)
    monkeypatch.setattr(Quantizer, "dequantize", never)
    model = fresh(base)
    ak.load(model, directory, packed=True)
    monkeypatch.undo()
    assert ak.is_packed(model, "q") and torch.equal(run(model), expected)
    smallest = min(n.numel() for sub, key, _ in quantized(model) for n in [getattr(*_leaf(sub, key))])
    for layer in layers(model):
        # nothing of a latent's size: uint8 codes and two-element μ, σ; only the bottleneck's fp32 biases
        assert all(p.dim() == 1 and not p.requires_grad for p in layer.parameters())
        for buffer in layer.buffers():
            assert buffer.dtype == torch.uint8 or buffer.numel() == 2
            assert buffer.numel() < smallest
    assert all(q._codes is None for _, _, q in quantized(model))


@pytest.mark.parametrize("kind", ["shira", "sft"])
def test_packed_load_of_layers_with_their_own_loading_holds_only_codes(mlp, tmp_path, kind):
    base = {k: v.clone() for k, v in mlp.state_dict().items()}
    _, directory = save_low_bit(mlp, tmp_path, kind, bits=4)
    reference, model = fresh(base), fresh(base)
    ak.load(reference, directory)
    ak.load(model, directory, packed=True)
    assert torch.equal(run(model), run(reference))
    for layer in layers(model):
        assert not any(p.is_floating_point() for p in layer.parameters() if p.numel())
        assert all(q._codes is None for q in layer.quantizers.values())


def file_parts(directory):
    raw = (directory / "adapter.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:], (directory / "adapter_config.json").read_bytes()


@pytest.mark.parametrize("kind", ["lora", "shira", "bottleneck", "sft"])
def test_saving_a_packed_adapter_writes_the_same_file(mlp, tmp_path, kind):
    """Same config bytes (its digest covers every tensor's dtype, shape and bytes), header and data section
    (safetensors writes its metadata map in hash order, so whole files differ between any two saves)."""
    base = {k: v.clone() for k, v in mlp.state_dict().items()}
    model, directory = save_low_bit(mlp, tmp_path, kind, bits=2)
    ak.pack(model, "q")
    ak.save(model, tmp_path / "again", "q")
    assert file_parts(tmp_path / "again") == file_parts(directory)
    loaded = fresh(base)
    ak.load(loaded, directory, packed=True)
    ak.save(loaded, tmp_path / "third", "q")
    assert file_parts(tmp_path / "third") == file_parts(directory)


def test_peft_export_of_a_packed_adapter_is_the_dequantised_one(mlp, tmp_path):
    model = attach(mlp, "lora", 2)
    ak.save(model, tmp_path / "plain", "q", format="peft")
    ak.pack(model, "q")
    ak.save(model, tmp_path / "packed", "q", format="peft")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "packed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unpacked_adapter_trains_from_the_dequantised_values(mlp):
    model = attach(mlp, "lora", 1)
    before = run(model)
    ak.pack(model, "q")
    ak.unpack(model, "q")
    assert not ak.is_packed(model, "q") and torch.equal(run(model), before)
    params = list(ak.adapter_parameters(model, "q"))
    assert len(params) == 4 and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    start = [p.detach().clone() for p in params]
    batches = [{"x": torch.randn(4, 8)} for _ in range(3)]
    losses = ak.train(model, batches, lr=0.05, progress=False, loss_fn=lambda m, b: m(b["x"]).square().mean())
    assert len(losses) == 3 and all(not torch.equal(p, s) for p, s in zip(params, start))


def test_refusals_leave_the_model_bit_identical(mlp):
    model = attach(mlp, "bottleneck", 1)
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["4"]), "full")
    ak.activate(model, "q")
    ak.pack(model, "q")
    batches = [{"x": torch.randn(4, 8)}]
    train = dict(lr=0.01, progress=False, loss_fn=lambda m, b: m(b["x"]).square().mean())
    before = snapshot(model)
    with pytest.raises(ak.UnsupportedError, match="unpack"):
        ak.train(model, batches, **train)  # nothing else trainable is active
    with pytest.raises(ak.UnsupportedError, match="unpack"):
        ak.quantize(model, "q", 4)
    with pytest.raises(ak.ConfigError, match="full precision"):
        ak.pack(model, "full")
    with pytest.raises(ak.AdapterNotFoundError):
        ak.pack(model, "missing")
    assert_unchanged(model, before)
    for layer in layers(model):
        layer.requires_grad_(True)  # the bottleneck's fp32 biases: someone tries to train the packed adapter
    before = snapshot(model)
    with pytest.raises(ak.UnsupportedError, match=r"\['q'\]"):
        ak.train(model, batches, **train)
    assert_unchanged(model, before)


def test_another_adapter_trains_on_top_of_a_packed_one_which_stays_frozen(mlp):
    model = attach(mlp, "lora", 1)
    ak.pack(model, "q")
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["4"], init="random"), "top")
    ak.activate(model, ["q", "top"])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".adapters.q." in k}
    ak.train(model, [{"x": torch.randn(4, 8)}] * 2, lr=0.05, progress=False,
             loss_fn=lambda m, b: m(b["x"]).square().mean())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


@pytest.mark.parametrize("kind", ["lora", "shira", "sft"])
def test_fuse_unfuse_and_switch_are_exact_with_packed_adapters(mlp, kind):
    model = attach(mlp, kind, 2)
    attach(model, kind, 4, name="other", seed=1)
    twin = copy.deepcopy(model)
    originals = [model[i].base_layer.weight.detach().clone() for i in (0, 2)]
    ak.pack(model, "q")
    ak.pack(model, "other")
    for current in (model, twin):
        ak.fuse(current, "q")
    assert all(torch.equal(model[i].base_layer.weight, twin[i].base_layer.weight) for i in (0, 2))
    ak.switch(model, "other")
    ak.switch(twin, "other")
    assert all(torch.equal(model[i].base_layer.weight, twin[i].base_layer.weight) for i in (0, 2))
    assert torch.equal(run(model), run(twin))
    ak.unfuse(model)
    assert all(torch.equal(model[i].base_layer.weight, w) for i, w in zip((0, 2), originals))


def test_per_row_batches_mix_packed_and_unpacked_adapters(mlp):
    model = attach(mlp, "lora", 1)
    attach(model, "bottleneck", 2, name="b", seed=1)
    attach(model, "lora", 8, name="c", seed=2)
    twin = copy.deepcopy(model)
    ak.pack(model, "q")
    ak.pack(model, "b")
    rows = ["q", None, "b", "c", "q", "b"]
    with ak.per_row(model, rows):
        got = run(model)
    with ak.per_row(twin, rows):
        expected = run(twin)
    assert torch.equal(got, expected)


def test_deep_copies_and_state_dict_keys(mlp):
    model = attach(mlp, "bottleneck", 1)
    keys = list(model.state_dict())
    twin = copy.deepcopy(model)
    ak.pack(model, "q")
    packed_keys = list(model.state_dict())
    renamed = {k for k in keys if k.endswith("down.weight") or k.endswith("up.weight")}
    assert set(packed_keys) == (set(keys) - renamed) | {f"{k}_{s}" for k in renamed for s in ("codes", "quant_stats")}
    clone = copy.deepcopy(model)
    assert torch.equal(run(clone), run(twin)) and list(clone.state_dict()) == packed_keys
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.buffers(), model.buffers()) if a.numel())
    run(model)
    assert list(model.state_dict()) == packed_keys  # a forward changes nothing
    other = copy.deepcopy(twin)  # a second packed model, other values, takes this one's state dict
    randomise(other, "q", seed=5, scale=0.3)
    ak.pack(other, "q")
    assert not torch.equal(run(other), run(model))
    other.load_state_dict(model.state_dict())
    assert torch.equal(run(other), run(model))
    ak.unpack(model, "q")
    assert set(model.state_dict()) == set(keys) and torch.equal(run(model), run(twin))


@pytest.mark.parametrize("kind", ["lora", "shira"])
def test_a_packed_adapter_follows_dtype_moves(mlp, kind):
    model = attach(mlp, kind, 2)
    twin = copy.deepcopy(model)
    ak.pack(model, "q")
    keys = list(model.state_dict())
    for current in (model, twin):
        current.double()
    assert torch.equal(run(model, X.double()), run(twin, X.double()))
    assert run(model, X.double()).dtype == torch.float64 and list(model.state_dict()) == keys
    for current in (model, twin):
        current.float()
    assert torch.equal(run(model), run(twin))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_packed_adapter_moves_to_the_gpu(mlp):
    model = attach(mlp, "lora", 2)
    twin = copy.deepcopy(model)
    ak.pack(model, "q")
    model.cuda()
    twin.cuda()
    x = X.cuda()
    assert torch.equal(run(model, x), run(twin, x))
    assert all(b.is_cuda for b in model.buffers())


def test_threads_run_packed_adapters_with_their_own_rows(mlp, one_thread):
    model = attach(mlp, "lora", 1)
    attach(model, "shira", 2, name="s", seed=1)
    ak.pack(model, "q")
    ak.pack(model, "s")
    plans = [["q", "s", None, "q", "s", "q"], ["s", "s", "q", None, None, "q"], ["q"] * 6, [None, "s"] * 3]
    inputs = [torch.randn(6, 8, generator=torch.Generator().manual_seed(i)) for i in range(len(plans))]
    expected = []
    for rows, x in zip(plans, inputs):
        with ak.per_row(model, rows):
            expected.append(run(model, x))
    runs, wrong = [0] * len(plans), []
    start = threading.Barrier(len(plans))

    def work(i: int) -> None:
        start.wait()
        for _ in range(20):
            with ak.per_row(model, plans[i]):
                out = run(model, inputs[i])
            runs[i] += 1
            if not torch.equal(out, expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runs == [20] * len(plans) and wrong == []


def test_adapter_trainer_refuses_a_packed_adapter(tiny_bert, tmp_path):
    from transformers import TrainingArguments

    ak.attach(tiny_bert, ak.LoRAConfig(r=2, target_modules=["query"], bits=1), "q")
    ak.pack(tiny_bert, "q")
    rows = [{"input_ids": torch.randint(1, 100, (6,)), "labels": torch.tensor(i % 3)} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, save_strategy="no",
                             logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    before = snapshot(tiny_bert)
    with pytest.raises(ak.UnsupportedError, match="packed"):
        ak.AdapterTrainer(model=tiny_bert, args=args, train_dataset=rows).train()
    assert_unchanged(tiny_bert, before)

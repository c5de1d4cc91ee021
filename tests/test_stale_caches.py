"""Caches that must notice when a tensor is replaced, converted or moved: the low-bit codes, SHiRA's
fused originals and CSR pattern, MoSA's module indices. Each result is compared with one
computed afresh from the current tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomise
from torch import nn

import adapterkit as ak
from adapterkit.core.quantization import Quantizer
from adapterkit.core.state import get_state
from adapterkit.methods.mosa import SplitWeight, partition

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6)).eval()


def fresh_codes(bits: int, tensor: torch.Tensor) -> torch.Tensor:
    return Quantizer(bits).quantize(tensor).codes


def test_quantizer_codes_follow_a_replaced_tensor_and_a_reused_address():
    model = mlp()
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0", "2"], bits=2), "q")
    layer = model[0].layer("q")
    x = torch.randn(5, 12)
    model(x)  # codes of the current A are cached
    new = torch.randn_like(layer.lora_A)
    layer.lora_A.data = new.clone()  # same Parameter object, same version counter
    assert torch.equal(layer.quantizers["lora_A"].quantize(layer.lora_A).codes, fresh_codes(2, new))
    reference = copy.deepcopy(model)
    reference[0].layer("q").quantizers["lora_A"] = Quantizer(2)
    assert torch.equal(model(x), reference(x))
    quantizer = Quantizer(1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # dead tensors' ids and addresses are reused: never a stale hit
        tensor = torch.randn(64, generator=g)
        assert torch.equal(quantizer.quantize(tensor).codes, fresh_codes(1, tensor))
        del tensor


def test_loaded_codes_survive_dtype_round_trips_and_copies(tmp_path):
    model = mlp()
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0", "2"], bits=1), "q")
    randomise(model, "q", scale=0.3)
    ak.save(model, tmp_path / "a", "q")
    loaded = mlp()
    ak.load(loaded, tmp_path / "a")
    x = torch.randn(5, 12)
    expected = loaded(x)
    for trip in (lambda m: m.double().float(), lambda m: m.to(torch.float64).to(torch.float32), copy.deepcopy):
        loaded = trip(loaded)
        assert torch.equal(loaded(x), expected)
    ak.save(loaded, tmp_path / "b", "q")
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


def assert_same_tensors(first, second) -> None:
    from safetensors.torch import load_file

    a, b = load_file(first / "adapter.safetensors"), load_file(second / "adapter.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".codes") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def shira_model(density: float = 0.2) -> nn.Sequential:
    model = mlp()
    for i, name in enumerate(("a", "b")):
        ak.attach(model, ak.ShiraConfig(density=density, target_modules=["0", "2"], seed=i), name)
        randomise(model, name, seed=i, scale=0.5)
    return model


def with_entries(weight: torch.Tensor, layer, values: torch.Tensor) -> torch.Tensor:
    out = weight.detach().clone().view(-1)
    out[layer.indices] = values
    return out.view(weight.shape)


@pytest.mark.parametrize("fused_while_replacing", [True, False])
def test_shira_originals_follow_a_replaced_weight(fused_while_replacing):
    model = shira_model()
    original = model[0].weight.detach().clone()
    a, b = model[0].layer("a"), model[0].layer("b")
    ak.switch(model, "a")
    ak.switch(model, "b")  # the originals at a's entries are cached now
    if not fused_while_replacing:
        ak.fuse(model, [])  # unfused, the cache kept
    replacement = torch.randn_like(original)
    model[0].weight.data = replacement.clone()
    # what restoring makes of it: b's entries (if fused) go back to the original values
    base = with_entries(replacement, b, original.view(-1)[b.indices]) if fused_while_replacing else replacement
    ak.switch(model, "a")
    expected = with_entries(base, a, base.view(-1)[a.indices] + a.values.detach())
    assert torch.equal(model[0].weight, expected)
    ak.unfuse(model)
    assert torch.equal(model[0].weight, base)


@pytest.mark.parametrize("trip", ["double", "to"])
def test_fused_weights_survive_dtype_round_trips(trip):
    for name, attach in (("shira", shira_model), ("lora", None)):
        if attach is None:
            model = mlp()
            for i, adapter in enumerate(("a", "b")):
                ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0", "2"]), adapter)
                randomise(model, adapter, seed=i, scale=0.3)
        else:
            model = attach()
        reference = copy.deepcopy(model)
        originals = [model[i].weight.detach().clone() for i in (0, 2)]
        x = torch.randn(5, 12)
        ak.switch(model, "a")
        model.double() if trip == "double" else model.to(torch.float64)
        ak.switch(model, "b")
        model.float() if trip == "double" else model.to(torch.float32)
        ak.switch(model, "a")
        ak.switch(reference, "a")
        assert torch.equal(model(x), reference(x)), name
        ak.unfuse(model)
        assert all(torch.equal(model[i].weight, w) for i, w in zip((0, 2), originals)), name


def test_shira_pattern_follows_indices_written_in_place():
    model = mlp()
    ak.attach(model, ak.ShiraConfig(density=0.2, target_modules=["0"]), "s")
    randomise(model, "s", scale=0.5)
    layer, x = model[0].layer("s"), torch.randn(7, 12)
    model.train()
    model(x).sum().backward()  # builds the CSR pattern of the current indices
    layer.values.grad = None
    g = torch.Generator().manual_seed(5)
    new = torch.randperm(16 * 12, generator=g)[: layer.indices.numel()].sort().values
    with torch.no_grad():
        layer.indices.copy_(new)  # the same tensor object, new entries
    model(x).sum().backward()
    weight = model[0].base_layer.weight.detach()
    values = layer.values.detach().clone().requires_grad_(True)
    dense = weight.reshape(-1).index_add(0, new, values).view(weight.shape)
    nn.functional.linear(x, dense, model[0].base_layer.bias).relu().matmul(model[2].weight.t()).sum().backward()
    assert torch.allclose(layer.values.grad, values.grad, atol=1e-5)


def test_mosa_indices_follow_a_replaced_partition():
    split = SplitWeight(torch.randn(6, 8), None, n_modules=3, seed=0, legacy=False)
    with torch.no_grad():
        for values in split.values:
            values.normal_()
    split.module_weight(0)  # indices of the first partition cached
    new = partition(48, 3, seed=1).view(6, 8)
    assert not torch.equal(new, split.part)
    for replace in (lambda: setattr(split.part, "data", new.clone()), lambda: split.part.copy_(new)):
        split.part.copy_(partition(48, 3, seed=0).view(6, 8))
        split.module_weight(0)
        replace()
        for k in range(3):
            expected = split.initial.clone().view(-1)
            expected[(new.view(-1) == k).nonzero().view(-1)] += split.values[k].detach()
            assert torch.equal(split.module_weight(k)[0].detach(), expected.view(6, 8))


@cuda
@pytest.mark.cuda
def test_cuda_round_trips_of_fused_and_low_bit_and_mosa_adapters(tmp_path):
    model = shira_model()
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["0", "2"], bits=2), "q")
    randomise(model, "q", seed=7, scale=0.3)
    ak.save(model, tmp_path / "q", "q")
    originals = [model[i].weight.detach().clone() for i in (0, 2)]
    x = torch.randn(5, 12)
    ak.switch(model, "a")
    model.cuda()
    ak.switch(model, "b")
    model.cpu()
    ak.unfuse(model)
    assert all(torch.equal(model[i].weight, w) for i, w in zip((0, 2), originals))
    ak.activate(model, "q")
    expected = model(x)
    model.cuda()
    assert torch.allclose(model(x.cuda()).cpu(), expected, atol=1e-5)
    ak.save(model, tmp_path / "q2", "q")
    assert_same_tensors(tmp_path / "q", tmp_path / "q2")
    mosa = mlp()
    ak.attach(mosa, ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=4, target_modules=["0"]), n_modules=2), "m")
    randomise(mosa, "m", scale=0.3)
    expected = mosa(x)
    assert torch.allclose(mosa.cuda()(x.cuda()).cpu(), expected, atol=1e-5)
    assert get_state(mosa).wrappers  # still adapted

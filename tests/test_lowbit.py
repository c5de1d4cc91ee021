"""Low-bit adapters: the codebook, fake quantisation with a straight-through gradient, bit-packed files
(exact sizes, the paper's ViT-B test vectors), bit-exact reloads at every precision, exact fusing, errors
(spec: shared/docs/methods/lowbit-adapters.md §8)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors import safe_open
from torch import nn

import adapterkit as ak
from adapterkit.cli.main import main
from adapterkit.core.quantization import Quantizer, codebook, encode, pack, packed_bytes, unpack
from adapterkit.core.state import get_state

TABLE = {
    1: ([0.6745], [0.0]),
    2: ([0.3778, 1.2657], [0.0, 0.8217]),
    4: ([0.1056, 0.3190, 0.5401, 0.7752, 1.0340, 1.3331, 1.7077, 2.2655],
        [0.0, 0.2123, 0.4296, 0.6576, 0.9046, 1.1836, 1.5204, 1.9866]),
}


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gaussian_median_codebook_matches_the_spec_table(bits):
    levels, thresholds = codebook(bits)
    positive, cuts = TABLE[bits]
    torch.testing.assert_close(levels, torch.tensor([-v for v in reversed(positive)] + positive), atol=1e-4, rtol=0)
    expected_cuts = sorted({-c for c in cuts} | set(cuts))
    torch.testing.assert_close(thresholds, torch.tensor(expected_cuts), atol=1e-4, rtol=0)
    assert len(codebook(8)[0]) == 256


def test_packing_is_low_bits_first():
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]), 1).tolist() == [0b10001101]
    assert pack(torch.tensor([3, 0, 2, 1]), 2).tolist() == [0b01100011]
    codes = torch.randint(0, 16, (37,))
    assert torch.equal(unpack(pack(codes, 4), 4, 37), codes)


def lowbit(model: nn.Module, kind: str, bits: int, method: str = "gaussian_median") -> nn.Module:
    configs = {
        "lora": ak.LoRAConfig(r=4, target_modules=["0", "2"], bits=bits, quantization=method),
        "dylora": ak.DyLoRAConfig(r_max=4, target_modules=["0", "2"], bits=bits, quantization=method),
        "shira": ak.ShiraConfig(r=4, target_modules=["0", "2"], bits=bits, quantization=method),
        "bottleneck": ak.BottleneckConfig(bottleneck=4, target_modules=["0", "2"], bits=bits, quantization=method),
    }
    ak.attach(model, configs[kind], "q")
    return model


KINDS = ["lora", "dylora", "shira", "bottleneck"]


def quantized_tensors(model: nn.Module) -> list[tuple[object, str]]:
    return [(layer, key) for _, layer in get_state(model).layers("q") for key in layer.quantizers]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_uses_at_most_2_to_the_b_values_and_gradients_pass_straight_through(mlp, kind, bits):
    model = lowbit(mlp, kind, bits).train()
    pairs = quantized_tensors(model)
    assert pairs and all(not layer.get_parameter(key).eq(0).all() for layer, key in pairs)  # zero init replaced
    model(torch.randn(6, 8)).square().sum().backward()
    for layer, key in pairs:
        latent = layer.get_parameter(key)
        used = layer.weight_of(key).detach()
        assert used.unique().numel() <= 2 ** bits
        if bits == 1:
            mu, sigma = latent.detach().mean(), latent.detach().std()
            torch.testing.assert_close(used.unique(), torch.stack([mu - 0.6745 * sigma, mu + 0.6745 * sigma]),
                                       atol=1e-4 * float(sigma), rtol=1e-4)
        assert latent.grad is not None and torch.isfinite(latent.grad).all() and latent.grad.abs().sum() > 0


def test_eight_bit_gradients_are_close_to_full_precision(mlp):
    x = torch.randn(16, 8)
    grads = {}
    for bits in (32, 8):
        model = copy.deepcopy(mlp)
        torch.manual_seed(3)
        ak.attach(model, ak.LoRAConfig(r=4, target_modules=["2"], init="random"), "q")
        if bits == 8:
            ak.quantize(model, "q", 8)
        model(x).square().sum().backward()
        grads[bits] = torch.cat([p.grad.view(-1) for p in ak.adapter_parameters(model, "q")])
    assert torch.nn.functional.cosine_similarity(grads[32], grads[8], dim=0) > 0.99
    assert not torch.allclose(grads[32], grads[8], rtol=1e-4, atol=0)  # close, yet the 8-bit weights are in the path


def test_sign_mean_is_xnors_rule(mlp):
    model = lowbit(mlp, "lora", 1, "sign_mean")
    layer = model[2].layer("q")
    used, latent = layer.weight_of("lora_A").detach(), layer.lora_A.detach()
    torch.testing.assert_close(used, torch.where(latent > 0, 1.0, -1.0) * latent.abs().mean())


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("kind", KINDS)
def test_every_precision_round_trips_bit_exactly_with_the_exact_byte_count(mlp, tmp_path, kind, bits):
    model = lowbit(copy.deepcopy(mlp), kind, bits).train()
    optimizer = torch.optim.AdamW(list(ak.adapter_parameters(model, "q")), lr=1e-2)
    for _ in range(3):  # train: latent weights differ from their dequantised values
        optimizer.zero_grad()
        model(torch.randn(6, 8)).square().sum().backward()
        optimizer.step()
    model.eval()
    ak.save(model, tmp_path, "q")
    fresh = copy.deepcopy(mlp)
    ak.load(fresh, tmp_path)
    assert ak.config_of(fresh, "q").bits == bits
    for (path, layer), (_, loaded) in zip(get_state(model).layers("q"), get_state(fresh).layers("q")):
        for key in layer.quantizable():
            assert torch.equal(loaded.weight_of(key), layer.weight_of(key)), (path, key)
    x = torch.randn(5, 8)
    assert torch.equal(fresh.eval()(x), model(x))
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    expected = 0
    for path, layer in get_state(model).layers("q"):
        for key, tensor in layer.tensors().items():
            expected += packed_bytes(tensor.numel(), bits) if key in layer.quantizers else tensor.numel() * tensor.element_size()
    assert sum(t.numel() * t.element_size() for t in stored.values()) == expected


def test_vit_b_sizes_equal_the_papers_checkpoints():
    """Spec §3 test vectors: the byte sizes of binary_adapter/models_bin/*.bin, from real encoded tensors."""

    def encoded_bytes(shapes: list[tuple[int, int]], bits: int) -> int:
        quantizers = {str(i): Quantizer(bits) for i in range(len(shapes))}
        tensors = {str(i): torch.randn(shape) for i, shape in enumerate(shapes)}
        return sum(t.numel() * t.element_size() for t in encode(tensors, quantizers).values())

    adaptformer = lambda d: [(d, 768), (768, d)] * 12  # noqa: E731  Down and Up, no biases
    lora = lambda d: [(d, 768), (768, d)] * 24  # noqa: E731  q and v
    head_1bit = encoded_bytes([(100, 768)], 1)
    head_fp32 = (768 * 100 + 100) * 4
    assert encoded_bytes(adaptformer(32), 1) + head_1bit == 83_528
    assert encoded_bytes(adaptformer(1), 1) + head_1bit == 12_104
    assert encoded_bytes(lora(32), 1) + head_1bit == 157_448
    assert encoded_bytes(adaptformer(32), 1) + head_fp32 == 381_520


def test_one_bit_storage_is_at_least_31x_smaller_at_minilm_width(tmp_path):
    """LoRA r=8 on 384-wide layers (MiniLM's width): 3,072-entry matrices take 392 bytes at 1 bit vs 12,288."""
    base = nn.Sequential(*[nn.Linear(384, 384) for _ in range(4)])
    data = {}
    for bits in (32, 1):
        model = copy.deepcopy(base)
        ak.attach(model, ak.LoRAConfig(r=8, target_modules=["0", "1", "2", "3"], bits=bits), "q")
        ak.save(model, tmp_path / str(bits), "q")
        with safe_open(str(tmp_path / str(bits) / "adapter.safetensors"), framework="pt") as handle:
            data[bits] = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    assert data[32] == 8 * 3072 * 4 and data[1] == 8 * (3072 // 8 + 8)
    assert data[32] / data[1] >= 31


def test_one_bit_bottleneck_without_biases_is_31x_smaller_and_merges_from_mosa(tmp_path):
    base = nn.Sequential(*[nn.Linear(384, 384) for _ in range(2)])
    data = {}
    for bits in (32, 1):
        model = copy.deepcopy(base)
        ak.attach(model, ak.BottleneckConfig(bottleneck=32, bias=False, target_modules=["0", "1"], bits=bits), "q")
        ak.save(model, tmp_path / str(bits), "q")
        with safe_open(str(tmp_path / str(bits) / "adapter.safetensors"), framework="pt") as handle:
            data[bits] = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    assert data[32] / data[1] >= 31
    model = copy.deepcopy(base)
    ak.attach(model, ak.MoSAConfig(base=ak.BottleneckConfig(bottleneck=32, bias=False, target_modules=["0"])), "m")
    ak.to_plain(model, "m")
    ak.quantize(model, "m", 1)
    assert model[0].layer("m").up.bias is None and set(model[0].layer("m").quantizers) == {"down.weight", "up.weight"}


def test_low_bit_lora_fuses_exactly_and_exports_dequantised_to_peft(tiny_bert, token_ids, tmp_path):
    model = copy.deepcopy(tiny_bert)
    ak.attach(model, ak.LoRAConfig(r=4, target_modules=["query", "value"], init="random", bits=2), "q")
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unfused = model(input_ids=token_ids).logits
    for _ in range(20):
        ak.fuse(model)
        ak.unfuse(model)
    ak.fuse(model)
    torch.testing.assert_close(model(input_ids=token_ids).logits, unfused, rtol=1e-4, atol=1e-5)
    layer = model.bert.encoder.layer[0].attention.self.query
    lora = layer.layer("q")
    expected = original["bert.encoder.layer.0.attention.self.query.base_layer.weight"] + \
        lora.scaling * lora.weight_of("lora_B").detach() @ lora.weight_of("lora_A").detach()
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    ak.unfuse(model)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters() if "base_layer" in n)
    ak.save(model, tmp_path, "q", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_bert), tmp_path).eval()
    torch.testing.assert_close(loaded(input_ids=token_ids).logits, unfused, rtol=0, atol=1e-5)


def test_bad_precisions_raise_and_leave_the_model_unchanged(mlp, tmp_path, capsys):
    for overrides, message in ((dict(bits=3), "bits must be one of"), (dict(bits=2, quantization="sign_mean"), "1-bit"),
                               (dict(quantization="kmeans"), "quantization method")):
        with pytest.raises(ak.ConfigError, match=message):
            ak.LoRAConfig(target_modules=["0"], **overrides)
    with pytest.raises(ak.ConfigError, match="merge"):
        ak.MoSAConfig(base=ak.BottleneckConfig(target_modules=["0"]), bits=1)
    ak.attach(mlp, ak.LoRAConfig(r=2, target_modules=["0"], init="random"), "q")
    before = snapshot(mlp)
    with pytest.raises(ak.ConfigError, match="bits"):
        ak.quantize(mlp, "q", 16)
    ak.fuse(mlp)
    before = snapshot(mlp)
    with pytest.raises(ak.FusedStateError, match="unfuse"):
        ak.quantize(mlp, "q", 1)
    assert_unchanged(mlp, before)
    ak.unfuse(mlp)
    ak.quantize(mlp, "q", 4)
    ak.save(mlp, tmp_path, "q")
    assert main(["info", str(tmp_path)]) == 0
    assert "bits: 4" in capsys.readouterr().out

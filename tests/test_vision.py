"""Convolutional bottleneck adapters (plain and MoSA) on the real pretrained EfficientNet-Lite0 with
scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot

import adapterkit as ak
from adapterkit.zoo.vision import digits, load_efficientnet_lite0

pytestmark = pytest.mark.integration
BLOCKS = r"backbone\._blocks\.\d+"


@pytest.fixture(scope="module")
def images():
    return digits("train", per_class=2, size=32), digits("test", size=32, test_size=40)


def test_conv_adapters_start_as_identity_use_1x1_convs_and_train_only_themselves(images):
    train, test = images
    model = load_efficientnet_lite0(10)
    x = test.pixels[:8]
    expected = model(x)["logits"]
    ak.attach(model, ak.BottleneckConfig(reduction_factor=4, target_modules=BLOCKS, modules_to_save=["backbone._fc"]), "a")
    assert torch.equal(model(x)["logits"], expected)
    block = model.backbone._blocks[3]
    layer = block.layer("a")
    channels = block.base_layer._block_args.output_filters
    assert isinstance(layer.down, torch.nn.Conv2d) and layer.down.kernel_size == (1, 1)
    assert (layer.down.in_channels, layer.down.out_channels, layer.up.out_channels) == (channels, channels // 4, channels)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = ak.train(model, train.batches(10, shuffle=True) * 2, lr=5e-3, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters." in k for k in changed), sorted(changed)[:5]
    assert losses[-1] < losses[0]


def test_parallel_conv_adapter_beside_a_strided_block_says_to_use_a_sequential_style(images):
    _, test = images
    model = load_efficientnet_lite0(10)
    before = snapshot(model)
    with pytest.raises(ak.TargetError, match=r"_blocks\.3.*sequential style"):  # refused at attach
        ak.attach(model, ak.BottleneckConfig(bottleneck=4, style="parallel", target_modules=[r"backbone._blocks.3"],
                                             init="random"), "p")  # block 3 halves the resolution
    assert_unchanged(model, before)
    ak.attach(model, ak.BottleneckConfig(bottleneck=4, style="parallel", target_modules=[r"backbone._blocks.2"],
                                         init="random"), "q")  # block 2 keeps shape and channels
    assert model(test.pixels[:2])["logits"].shape == (2, 10)


def test_mosa_conv_adapter_merges_into_a_plain_conv_adapter(images):
    train, test = images
    model = load_efficientnet_lite0(10)
    ak.attach(model, ak.MoSAConfig(base=ak.BottleneckConfig(reduction_factor=4, target_modules=BLOCKS), n_modules=2), "m")
    ak.train(model, train.batches(10), lr=5e-3, progress=False, loss_fn=ak.mosa.two_pass_loss)
    model.eval()
    before = model(test.pixels[:8])["logits"]
    ak.to_plain(model, "m")
    assert ak.config_of(model, "m").method == "bottleneck"
    torch.testing.assert_close(model(test.pixels[:8])["logits"], before, rtol=1e-4, atol=1e-5)

"""Comparison rows of the ranking benchmark: heuristics, ridge probes, tail fine-tuning and LoRA."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from torch import nn

import adapterkit as ak
from adapterkit.apps.ranking.baselines import compute_statistics, evaluate_scores, heuristic_for, training_items
from adapterkit.apps.ranking.baselines_ridge import RidgeSettings, fit_ridge_probes, pooled_features
from adapterkit.apps.ranking.baselines_finetune import (FrontSplit, TailSettings, efficientnet_split, fit_finetune,
                                                        fit_lora, front_activations)
from adapterkit.apps.ranking.sampler import InstructionPool, pools_from_targets

from conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
LEVELS = range(5)


def _crops() -> list[Image.Image]:
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("china.jpg")).resize((320, 214), Image.BICUBIC)
    return [photo.crop((x, y, x + 96, y + 96)) for x, y in ((10, 10), (120, 60), (200, 100))]


def _degrade(image: Image.Image, kind: str, level: int, seed: int) -> Image.Image:
    t = level / 4
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(3.0 * t))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=round(90 * (5 / 90) ** t))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    x = np.asarray(image, dtype=np.float64)
    if kind == "noise":
        x = x + np.random.default_rng(seed).normal(0, 25 * t, x.shape)
    elif kind == "dark":
        x = 255 * (x / 255) ** (1 + t) * (1 - 0.5 * t)
    else:  # contrast
        x = x.mean() + (1 - 0.75 * t) * (x - x.mean())
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


INSTRUCTIONS = {"blur": "Sort the images by how blurry they are.", "noise": "Sort the images by how noisy they are.",
                "jpeg": "Sort the images by how strong their JPEG compression artefacts are.",
                "dark": "Sort the images by how dark they are.", "contrast": "Sort the images by how low their contrast is."}


@pytest.mark.parametrize("kind", sorted(INSTRUCTIONS))
def test_each_heuristic_orders_its_degradation_levels_on_a_real_photo(kind):
    crops = _crops()
    images = [_degrade(c, kind, level, seed=10 * i + level) for i, c in enumerate(crops) for level in LEVELS]
    levels = [level for _ in crops for level in LEVELS]
    scores = compute_statistics(images, progress=False).scores(INSTRUCTIONS[kind])
    for i in range(len(crops)):  # within one photo: exactly the level order
        assert stats.spearmanr(scores[5 * i:5 * i + 5], LEVELS).statistic == pytest.approx(1.0)
    # across photos content moves the statistics too (measured: blur 0.78, dark 0.92, the others 0.96–0.98)
    assert stats.spearmanr(scores, levels).statistic >= 0.75


def test_sharpness_survives_added_noise_where_the_classic_laplacian_does_not():
    crops, rng = _crops(), np.random.default_rng(0)
    images, blur = [], []
    for i, crop in enumerate(crops):
        for level in LEVELS:  # noise at an unrelated random level on top of each blur level
            images.append(_degrade(_degrade(crop, "blur", level, 0), "noise", int(rng.integers(0, 5)), 10 * i + level))
            blur.append(level)
    statistics = compute_statistics(images, progress=False)
    within = {name: [stats.spearmanr(-getattr(statistics, name)[5 * i:5 * i + 5], LEVELS).statistic
                     for i in range(len(crops))] for name in ("sharpness", "laplacian")}
    assert within["sharpness"] == pytest.approx([1.0] * len(crops))  # the blur order within each photo
    assert min(within["laplacian"]) < 0.5, within  # noise swamps the classic measure


def test_keywords_pick_the_statistic_and_counting_has_none():
    assert heuristic_for(INSTRUCTIONS["blur"]).statistic == "sharpness" and heuristic_for(INSTRUCTIONS["blur"]).sign < 0
    assert heuristic_for("Sort by how sharp they are").sign > 0
    assert heuristic_for(INSTRUCTIONS["contrast"]).sign < 0 and heuristic_for("by contrast").sign > 0
    assert heuristic_for("Sort by brightness").statistic == "luminance"
    counting = heuristic_for("Sort the images by the number of dark sheep.")
    assert counting.statistic is None and "counting" in counting.reason
    statistics = compute_statistics(torch.rand(3, 3, 32, 32), progress=False)  # pixel tensors in [0, 1]
    assert statistics.scores("Sort by the number of cats") is None
    assert statistics.scores("Sort by how dark they are").shape == (3,)
    with pytest.raises(ak.ConfigError, match="not normalised"):
        compute_statistics(torch.rand(2, 3, 32, 32) * 2 - 1, progress=False)


def test_evaluate_scores_ranks_each_pools_positives_and_skips_missing_scores():
    pools = pools_from_targets({"a": {0: 0.0, 1: 1.0, 2: 2.0}, "b": {3: 0.0, 4: 1.0}})
    scores = {"a": np.array([0.0, 1.0, 2.0, 9.0, 9.0]), "b": None}
    out = evaluate_scores(scores.get, pools)
    assert set(out) == {"a"} and out["a"].srcc == pytest.approx(1.0)
    with pytest.raises(ak.ConfigError, match="refers to image"):
        evaluate_scores(lambda _: np.zeros(3), pools)


def _conflicting_tokens(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """16 patches each empty / A / B under a fixed projection: more A patches leave room for fewer B."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.randint(0, 3, (n, 16), generator=g)
    codes = torch.randn(3, 12, generator=torch.Generator().manual_seed(99))
    return codes[kinds] + 0.1 * torch.randn(n, 16, 12, generator=g), {"A": (kinds == 1).sum(1).float(),
                                                                        "B": (kinds == 2).sum(1).float()}


def _pools(targets: dict[str, torch.Tensor], offset: int = 0) -> list[InstructionPool]:
    return pools_from_targets({k: {i + offset: float(v) for i, v in enumerate(t.tolist())} for k, t in targets.items()})


def test_the_per_instruction_ridge_probe_beats_the_text_agnostic_one_on_conflicting_attributes():
    x, y = _conflicting_tokens(200, seed=1)
    x_test, y_test = _conflicting_tokens(80, seed=2)
    probes = fit_ridge_probes(x, _pools(y), RidgeSettings(alphas=(0.1, 10.0, 1e3)))
    test = _pools(y_test)
    oracle = evaluate_scores(lambda k: probes.scores(x_test, k), test)
    agnostic = evaluate_scores(lambda k: probes.scores(x_test), test)
    assert all(oracle[k].srcc > 0.95 for k in "AB"), oracle
    assert np.mean([agnostic[k].srcc for k in "AB"]) < np.mean([oracle[k].srcc for k in "AB"]) - 0.4, agnostic
    assert probes.trainable_params == {"agnostic": 13, "per_instruction": 26}
    assert probes.per_instruction["A"].alpha in (0.1, 10.0, 1e3) and np.isfinite(probes.per_instruction["A"].val_srcc)
    # given validation pools choose alpha the same way and give the same kind of heads
    with_val = fit_ridge_probes(x, _pools(y), RidgeSettings(), val_tokens=x_test, val_pools=test)
    assert with_val.per_instruction["B"].val_srcc > 0.95
    again = fit_ridge_probes(x, _pools(y), RidgeSettings(alphas=(0.1, 10.0, 1e3)))
    assert np.array_equal(again.scores(x_test, "A"), probes.scores(x_test, "A"))  # deterministic
    assert pooled_features(x, "mean+max").shape == (200, 24)


def test_training_items_add_the_share_of_relabelled_negatives():
    pools = pools_from_targets({"sheep": {i: float(i % 4) for i in range(40)}, "cows": {i: 1.0 for i in range(40, 60)}},
                               min_positive=1.0)
    items = training_items(pools, negative_ratio=0.2, seed=0)
    sheep = items["sheep"]
    assert sheep.positives == 30 and len(sheep.indices) == 30 + round(30 * 0.25)
    assert set(sheep.indices[30:].tolist()) <= set(pools[0].negatives) and not sheep.targets[30:].any()
    assert len(training_items(pools, 0.0)["sheep"].indices) == 30


@pytest.mark.parametrize("bad", [dict(alphas=()), dict(alphas=(-1.0,)), dict(pooling="max"), dict(val_fraction=1.0),
                                 dict(negative_ratio=1.0), dict(seed=-1)])
def test_bad_ridge_settings_raise(bad):
    with pytest.raises(ak.ConfigError):
        RidgeSettings(**bad)


def test_bad_ridge_inputs_raise():
    x, y = _conflicting_tokens(40, seed=1)
    with pytest.raises(ak.ConfigError, match="refers to image"):
        fit_ridge_probes(x[:20], _pools(y))
    with pytest.raises(ak.ConfigError, match=r"\(N, P, D\)"):
        fit_ridge_probes(x[:, 0], _pools(y))
    with pytest.raises(ak.ConfigError, match="both"):
        fit_ridge_probes(x, _pools(y), val_tokens=x)


# -- tail fine-tuning and LoRA on a tiny stand-in encoder ------------------------------------------


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self._expand_conv, self.bn = nn.Conv2d(cin, 2 * cout, 1), nn.BatchNorm2d(2 * cout)
        self._project_conv = nn.Conv2d(2 * cout, cout, 1)

    def forward(self, x):
        return self._project_conv(torch.relu(self.bn(self._expand_conv(x))))


class _TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([_Block(8, 8), _Block(8, 12)])
        self.conv_head = nn.Conv2d(12, 16, 1)
        for conv in (self.stem, *(m for m in self.modules() if isinstance(m, nn.Conv2d) and m is not self.stem)):
            nn.init.normal_(conv.weight, std=(2.0 / conv.weight[0].numel()) ** 0.5)  # unit-scale features, as with BN
        for block in self.blocks:  # pretrained-looking statistics, so eval mode matters
            block.bn.running_mean.uniform_(-0.2, 0.2)
            block.bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, pixels):
        x = torch.relu(self.stem(pixels))
        for block in self.blocks:
            x = block(x)
        return self.conv_head(x)


def _tail_task(n: int = 48):
    encoder = _TinyEncoder()
    split = FrontSplit(encoder, encoder.blocks[1],
                       nn.Sequential(collections.OrderedDict(block1=encoder.blocks[1], conv_head=encoder.conv_head)))
    g = torch.Generator().manual_seed(3)
    colour = torch.rand(n, 3, 1, 1, generator=g)  # two independent attributes: the red and the green level
    pixels = 2 * (0.6 * colour + 0.4 * torch.rand(n, 3, 16, 16, generator=g)) - 1
    targets = {"red": torch.round(colour[:, 0, 0, 0] * 8), "green": torch.round(colour[:, 1, 0, 0] * 8)}
    return encoder, split, pixels, _pools(targets)


def test_front_activations_feed_the_tail_to_the_encoders_exact_output_and_change_nothing():
    encoder, split, pixels, _ = _tail_task()
    encoder.blocks[0].train()  # a module in training mode is run in eval mode and left in training mode
    before = snapshot(encoder)
    activations = front_activations(split, pixels, batch_size=48, progress=False)
    assert activations.shape == (48, 8, 8, 8)
    assert torch.allclose(front_activations(split, pixels, batch_size=5, progress=False), activations, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(split.tail(activations), encoder.eval()(pixels))  # the same batch: bit-identical
    encoder.blocks[0].train()
    assert_unchanged(encoder, before)


@pytest.mark.parametrize("fit", [fit_finetune, fit_lora])
def test_tail_baselines_learn_each_instruction_and_leave_the_encoder_bit_identical(fit):
    encoder, split, pixels, pools = _tail_task()
    before = snapshot(encoder)
    activations = front_activations(split, pixels, progress=False)
    kwargs = dict(lora=ak.LoRAConfig(r=2, target_modules=["_expand_conv", "_project_conv", "conv_head"])) \
        if fit is fit_lora else {}
    settings = TailSettings(epochs=30, lr=3e-3, head_lr=1e-2, batch_size=12, pair_weight=0.5, negative_ratio=0.0)
    result = fit(split, activations, pools, settings=settings, progress=False, **kwargs)
    assert_unchanged(encoder, before)
    for pool in pools:
        losses = result.losses[pool.instruction]
        assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses[:4] + losses[-4:]
    metrics = evaluate_scores(lambda k: result.scores(activations, k), pools)
    assert all(m.srcc > 0.9 for m in metrics.values()), metrics
    head = 16 + 1
    if fit is fit_finetune:
        expected = sum(p.numel() for p in split.tail.parameters()) + head
        assert result.tails["red"] is not result.tails["green"]
    else:  # r × (in + out) per 1×1 conv: expand 8→24, project 24→12, conv_head 12→16
        expected = 2 * (8 + 24) + 2 * (24 + 12) + 2 * (12 + 16) + head
        tail = result.tails["red"]
        assert result.adapters["red"] != result.adapters["green"] and tail is result.tails["green"]
        assert ak.trainable_parameters(tail)[1] - sum(p.numel() for p in split.tail.parameters()) == 2 * (expected - head)
    assert result.trainable_params == {"red": expected, "green": expected}
    assert result.train_seconds > 0
    again = fit(split, activations, pools, settings=settings, progress=False, **kwargs)
    assert torch.equal(again.scores(activations, "red"), result.scores(activations, "red"))  # seeded
    original = split.tail.state_dict()
    if fit is fit_finetune:  # every tensor of the copy may train
        assert any(not torch.equal(v, original[k]) for k, v in result.tails["red"].state_dict().items())
    else:  # LoRA trains only its factors: without them the shared copy is the original tail
        for name in result.adapters.values():
            ak.detach(tail, name)
        assert tail.state_dict().keys() == original.keys()
        assert all(torch.equal(v, original[k]) for k, v in tail.state_dict().items())


def test_bad_tail_inputs_raise_before_training_and_change_nothing():
    encoder, split, pixels, pools = _tail_task()
    before = snapshot(encoder)
    activations = front_activations(split, pixels, progress=False)
    for bad in (dict(epochs=0), dict(lr=-1.0), dict(head_lr=0.0), dict(batch_size=1), dict(negative_ratio=1.0)):
        with pytest.raises(ak.ConfigError):
            TailSettings(**bad)
    with pytest.raises(ak.ConfigError, match="refers to image"):
        fit_finetune(split, activations[:10], pools, progress=False)
    with pytest.raises(ak.ConfigError, match="do not fit the tail"):
        fit_finetune(split, activations[:, :5], pools, progress=False)
    with pytest.raises(ak.ConfigError, match="LoRAConfig"):
        fit_lora(split, activations, pools, lora=ak.BottleneckConfig(target_modules=["conv_head"]), progress=False)
    with pytest.raises(ak.ConfigError, match="not part of the encoder"):
        FrontSplit(encoder, nn.Linear(2, 2), split.tail)
    with pytest.raises(ak.ConfigError, match="pixel tensor"):
        front_activations(split, [Image.new("RGB", (16, 16))], progress=False)
    with pytest.raises(ak.ConfigError, match="efficientnet_split needs"):
        efficientnet_split(encoder, 1)
    assert_unchanged(encoder, before)


def test_the_real_efficientnet_split_reproduces_its_tokens_and_takes_lora_on_its_1x1_convs():
    from adapterkit.apps.ranking.encoders import EfficientNetTokens
    from adapterkit.zoo.vision import load_efficientnet_lite0

    try:
        backbone = load_efficientnet_lite0(1).backbone
    except ak.DataNotFoundError as exc:
        pytest.skip(str(exc))
    encoder = EfficientNetTokens(backbone, size=64)
    split = efficientnet_split(encoder, trainable_blocks=1)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    activations = front_activations(split, pixels, progress=False)
    with torch.no_grad():
        tokens = encoder(pixels)
        assert torch.equal(split.tail(activations).flatten(2).transpose(1, 2), tokens)
    pools = [InstructionPool("x", (0, 1), (0.0, 1.0))]
    result = fit_lora(split, activations, pools, settings=TailSettings(epochs=1), progress=False)
    lora_layers = [n for n, m in result.tails["x"].named_modules() if isinstance(m, ak.methods.lora.LoRALayer)]
    assert len(lora_layers) == 3  # block15's expand and project convs and conv_head; the depthwise conv is not 1×1
    with pytest.raises(ak.ConfigError):
        efficientnet_split(encoder, trainable_blocks=17)


def test_pair_loss_is_ranknet_on_strictly_ordered_pairs():
    from adapterkit.apps.ranking.baselines_finetune import pair_loss

    scores, targets = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    # ordered pairs: (0, 2) and (1, 2); the tie (0, 1) and the diagonal carry no order
    expected = (np.log1p(np.exp(-(0.5 - 2.0))) + np.log1p(np.exp(-(-1.0 - 2.0)))) / 2
    assert pair_loss(scores, targets).item() == pytest.approx(expected, rel=1e-6)
    assert pair_loss(scores, torch.ones(3)).item() == 0.0

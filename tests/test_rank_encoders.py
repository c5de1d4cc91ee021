"""Frozen token encoders and the on-disk token cache of the ranking-aware adapter (issue 13):
a tiny random CLIPModel for plumbing, the real EfficientNet-Lite0 + MiniLM pair on three images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.apps.ranking import RankingEncoders, TokenCache, clip_pair, efficientnet_minilm
from adapterkit.apps.ranking.cache import pool_grid, projection_matrix
from adapterkit.core.host import ModelHost
from adapterkit.errors import (BaseModelMismatchError, ConfigError, CorruptFileError, UnsupportedError)
from conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
INSTRUCTIONS = ["Sort images by how blurry they are.", "Sort images by the number of sheep."]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from adapterkit.zoo.models import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def tiny_clip(seed: int = 0):
    """A random CLIPModel: 32 px images in 8 px patches (4×4 grid), width 32; its vocabulary fits
    the MiniLM tokenizer (no CLIP tokenizer exists offline)."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=101, eos_token_id=102, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


@pytest.fixture
def pair(tokenizer) -> RankingEncoders:
    return clip_pair(tiny_clip(), tokenizer)


def photos(n: int = 3, seed: int = 0) -> list:
    """Small seeded images of different sizes and modes (RGB, RGBA, palette)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 30 + 5 * i, 3), dtype=np.uint8)) for i in range(n)]
    if n > 1:
        images[1] = images[1].convert("RGBA")
    if n > 2:
        images[2] = images[2].convert("P")
    return images


class Calls:
    """Counts the images and instructions that actually go through the encoders."""

    def __init__(self, encoders: RankingEncoders) -> None:
        self.images = self.texts = 0
        encoders.image_encoder.register_forward_hook(self._image)
        encoders.text_encoder.register_forward_hook(self._text)

    def _image(self, module, args, output) -> None:
        self.images += args[0].shape[0]

    def _text(self, module, args, output) -> None:
        self.texts += args[0].shape[0]


# -- encoders ---------------------------------------------------------------------------------------
def test_real_pair_shapes_frozen_and_buffer_fingerprint():
    from sklearn.datasets import load_sample_images
    from PIL import Image

    encoders = efficientnet_minilm()
    images = [Image.fromarray(a) for a in load_sample_images().images] + photos(1)
    assert (encoders.image_token_dim, encoders.num_image_tokens, encoders.text_token_dim) == (1280, 49, 384)
    tokens = encoders.image_tokens(images)
    assert tokens.shape == (3, 49, 1280) and tokens.dtype == torch.float32 and not tokens.requires_grad
    pixels = encoders.image_encoder.pixels(images)
    assert pixels.shape == (3, 3, 224, 224) and -1.0 <= pixels.min() and pixels.max() <= 1.0  # mean = std = 0.5
    assert torch.equal(encoders.image_tokens(pixels), tokens)
    # ImageNet features tell a photo from noise: the two photos are closer to each other
    pooled = nn.functional.normalize(tokens.mean(1), dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]
    text, mask = encoders.text_tokens(INSTRUCTIONS + ["sheep"])
    assert text.shape[::2] == (3, 384) and mask.dtype == torch.bool and mask.sum(1).tolist()[2] == 3  # [CLS] sheep [SEP]
    assert not any(p.requires_grad for p in encoders.parameters())
    encoders.train()
    assert encoders.training and not encoders.image_encoder.training and not encoders.text_encoder.training
    before = encoders.image_encoder.fingerprint
    with torch.no_grad():  # BatchNorm statistics are buffers, not parameters: they change the tokens too
        encoders.image_encoder.backbone._bn1.running_mean.add_(0.1)
    assert encoders.image_encoder.fingerprint != before
    assert not torch.allclose(encoders.image_tokens(pixels), tokens)


def test_tiny_clip_pair_end_to_end(tokenizer):
    clip = tiny_clip()
    encoders = clip_pair(clip, tokenizer)
    assert (encoders.image_token_dim, encoders.num_image_tokens, encoders.text_token_dim) == (32, 16, 32)
    assert encoders.image_encoder.grid == (4, 4)
    tokens = encoders.image_tokens(photos())
    pixels = encoders.image_encoder.pixels(photos())
    expected = clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(tokens, expected)  # patch tokens, class token dropped
    text, mask = encoders.text_tokens(INSTRUCTIONS)
    ids = tokenizer(INSTRUCTIONS, padding=True, return_tensors="pt")
    torch.testing.assert_close(text, clip.text_model(**ids).last_hidden_state)
    assert torch.equal(mask, ids["attention_mask"].bool())
    kept = clip_pair(clip, tokenizer, keep_class_token=True)
    assert kept.num_image_tokens == 17 and kept.image_encoder.grid is None
    torch.testing.assert_close(kept.image_tokens(photos())[:, 1:], tokens)
    assert kept.image_encoder.fingerprint != encoders.image_encoder.fingerprint


def test_frozen_encoders_get_no_gradient(pair):
    head = nn.Linear(pair.image_token_dim + pair.text_token_dim, 1)
    text, mask = pair.text_tokens(INSTRUCTIONS[:1])
    image = pair.image_tokens(photos())
    assert not image.requires_grad and not text.requires_grad
    score = head(torch.cat([image.mean(1), text[:, mask[0]].mean(1).expand(3, -1)], -1)).sum()
    score.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in pair.parameters() if p is not head.weight)


def test_fingerprints_ignore_the_state_a_call_leaves_in_the_tokenizer(tokenizer):
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    encoders = clip_pair(tiny_clip(), fresh)
    before = encoders.text_encoder.fingerprint
    encoders.text_tokens(INSTRUCTIONS)  # turns on the fast tokenizer's padding and truncation
    assert encoders.text_encoder.fingerprint == before
    fresh.backend_tokenizer.normalizer = None  # no lower-casing any more: other tokens
    assert encoders.text_encoder.fingerprint != before


def test_bad_inputs_are_refused(pair, tokenizer):
    for bad in ([], "a.png", [3]):
        with pytest.raises(ConfigError):
            pair.image_tokens(bad)
    with pytest.raises(ConfigError):
        pair.image_tokens(torch.zeros(2, 3, 16, 16))  # not the tower's 32 px
    for bad in ([], "one string", [""]):
        with pytest.raises(ConfigError):
            pair.text_tokens(bad)
    with pytest.raises(ConfigError):
        clip_pair(tiny_clip())  # a random model has no tokenizer saved beside it
    with pytest.raises(ConfigError):
        RankingEncoders(pair.text_encoder, pair.image_encoder)


# -- a model-level adapter on the encoders --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenHeadConfig(ak.AdapterConfig):
    requires_targets = False
    hidden: int = 8


class TokenHead(ak.ModelLayer):
    """Scores images from mean image tokens and mean instruction tokens (a stand-in for the ranking adapter)."""

    def __init__(self, name: str, image_dim: int, text_dim: int, hidden: int) -> None:
        super().__init__(name)
        self.mlp = nn.Sequential(nn.Linear(image_dim + text_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def score(self, encoders: RankingEncoders, images: list, instruction: str) -> Tensor:
        text, _ = encoders.text_tokens([instruction])
        image = encoders.image_tokens(images).mean(1)
        return self.mlp(torch.cat([image, text.mean(1).expand(len(image), -1)], -1)).squeeze(-1)


@ak.register_method
class TokenHeadMethod(ak.AdapterMethod):
    name = "test-rank-token-head"
    config_class = TokenHeadConfig

    def select(self, model, config):
        return [""], []

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, RankingEncoders)

    def create_layer(self, config, adapter_name, module_name, module, context=None):
        return TokenHead(adapter_name, module.image_token_dim, module.text_token_dim, config.hidden)


def test_model_level_adapter_attaches_trains_and_round_trips(pair, tokenizer, tmp_path):
    ak.attach(pair, TokenHeadConfig(), "head")
    head = pair.get_submodule(ModelHost.CHILD).adapters["head"]
    optimizer = torch.optim.Adam(ak.adapter_parameters(pair, "head"), lr=0.05)
    target = torch.tensor([1.0, 0.0, -1.0])
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(head.score(pair, photos(), INSTRUCTIONS[0]), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5
    assert all(p.grad is None for n, p in pair.named_parameters() if ModelHost.CHILD not in n)
    ak.save(pair, tmp_path / "head", "head")
    same = clip_pair(tiny_clip(), tokenizer)
    ak.load(same, tmp_path / "head")
    loaded = same.get_submodule(ModelHost.CHILD).adapters["head"]
    assert torch.equal(loaded.score(same, photos(), INSTRUCTIONS[0]), head.score(pair, photos(), INSTRUCTIONS[0]))
    other = clip_pair(tiny_clip(seed=1), tokenizer)
    before = snapshot(other)
    with pytest.raises(BaseModelMismatchError):
        ak.load(other, tmp_path / "head")
    assert_unchanged(other, before)


# -- the token cache --------------------------------------------------------------------------------
def test_cache_miss_then_hit_without_running_the_encoder(pair, tmp_path):
    calls = Calls(pair)
    first = TokenCache(tmp_path, pair, progress=False, batch_size=2)
    images = photos()
    tokens = first.image_tokens(images + images[:1])  # a repeated image is computed once
    assert tokens.shape == (4, 16, 32) and tokens.dtype == torch.float32 and torch.equal(tokens[0], tokens[3])
    assert (first.misses, first.hits, calls.images) == (3, 0, 3)
    again = TokenCache(tmp_path, pair, progress=False)
    assert torch.equal(again.image_tokens(images[::-1]), tokens[:3].flip(0))  # stored exactly as returned
    assert (again.misses, again.hits, calls.images) == (0, 3, 3)
    text, mask = first.text_tokens(INSTRUCTIONS[0])
    assert calls.texts == 1 and mask.all() and text.shape == (mask.shape[0], 32)
    batch, batch_mask = again.text_batch(INSTRUCTIONS[::-1])
    assert calls.texts == 2 and again.misses == 1 and again.hits == 4  # only the new instruction was encoded
    assert torch.equal(batch[1, :mask.shape[0]], text) and batch_mask.sum(1)[1] == mask.shape[0]
    assert not batch[~batch_mask].any()
    torch.testing.assert_close(text, pair.text_tokens(INSTRUCTIONS[:1])[0][0])  # the encoder's own states


def test_paths_and_images_share_keys_and_results_are_deterministic(pair, tokenizer, tmp_path):
    images = photos()
    images[0].save(tmp_path / "a.png")
    cache = TokenCache(tmp_path / "one", pair, progress=False)
    assert cache.image_key(tmp_path / "a.png") == cache.image_key(images[0]) != cache.image_key(images[1])
    tokens = cache.image_tokens([tmp_path / "a.png", *images[1:]])
    twin = TokenCache(tmp_path / "two", clip_pair(tiny_clip(), tokenizer), progress=False)
    assert torch.equal(twin.image_tokens(images), tokens)
    assert twin.hits == 0 and cache.image_key(images[2]) == twin.image_key(images[2])


def test_a_changed_encoder_or_setting_reads_other_entries(pair, tmp_path):
    images = photos(2)
    base = TokenCache(tmp_path, pair, progress=False)
    tokens = base.image_tokens(images)
    base.text_tokens(INSTRUCTIONS[0])
    for settings in (dict(dtype="float32"), dict(pool=2), dict(project_dim=8), dict(project_dim=8, project_seed=1)):
        other = TokenCache(tmp_path, pair, progress=False, **settings)
        other.image_tokens(images)
        assert (other.misses, other.hits) == (2, 0), settings
        other.text_tokens(INSTRUCTIONS[0])  # image settings do not touch the text entries
        assert other.hits == 1, settings
    with torch.no_grad():
        pair.image_encoder.tower.embeddings.patch_embedding.weight.mul_(1.5)
    changed = TokenCache(tmp_path, pair, progress=False)
    assert not torch.allclose(changed.image_tokens(images), tokens) and changed.misses == 2
    changed.text_tokens(INSTRUCTIONS[0])
    assert changed.hits == 1  # the text encoder did not change
    with torch.no_grad():
        pair.text_encoder.model.embeddings.token_embedding.weight.mul_(1.5)
    changed.text_tokens(INSTRUCTIONS[0])
    assert changed.misses == 3


def test_pooling_and_projection(pair, tmp_path):
    images = photos()
    full = TokenCache(tmp_path, pair, dtype="float32", progress=False).image_tokens(images)
    pooled = TokenCache(tmp_path, pair, dtype="float32", pool=2, progress=False)
    assert pooled.num_tokens == 4
    out = pooled.image_tokens(images)
    assert out.shape == (3, 4, 32)
    torch.testing.assert_close(out[:, 0], full[:, [0, 1, 4, 5]].mean(1))  # the top-left 2×2 window
    torch.testing.assert_close(out[:, 3], full[:, [10, 11, 14, 15]].mean(1))
    assert pool_grid(torch.arange(49.0).view(1, 49, 1), (7, 7), 2).shape == (1, 16, 1)  # 7×7 → 4×4
    assert pool_grid(torch.arange(49.0).view(1, 49, 1), (7, 7), 2)[0, 3, 0] == 9.5  # an edge window: (6 + 13) / 2
    projected = TokenCache(tmp_path, pair, dtype="float32", pool=3, project_dim=8, project_seed=5, progress=False)
    assert (projected.num_tokens, projected.token_dim) == (4, 8)
    matrix = projection_matrix(32, 8, 5)
    torch.testing.assert_close(matrix.T @ matrix, torch.eye(8), atol=1e-6, rtol=0)
    assert torch.equal(matrix, projection_matrix(32, 8, 5)) and not torch.equal(matrix, projection_matrix(32, 8, 6))
    torch.testing.assert_close(projected.image_tokens(images), pool_grid(full, (4, 4), 3) @ matrix)
    with pytest.raises(ConfigError):
        TokenCache(tmp_path, pair, project_dim=33)
    for bad in (dict(dtype="int8"), dict(pool=0), dict(project_dim=0), dict(batch_size=0)):
        with pytest.raises(ConfigError):
            TokenCache(tmp_path, pair, **bad)


def test_pooling_needs_a_grid(tokenizer, tmp_path):
    with pytest.raises(ConfigError):
        TokenCache(tmp_path, clip_pair(tiny_clip(), tokenizer, keep_class_token=True), pool=2)


def test_half_precision_storage_round_trip(pair, tmp_path):
    images = photos()
    exact = TokenCache(tmp_path, pair, dtype="float32", progress=False).image_tokens(images)
    half = TokenCache(tmp_path, pair, progress=False).image_tokens(images)  # float16 by default
    brain = TokenCache(tmp_path, pair, dtype="bfloat16", progress=False).image_tokens(images)
    assert not torch.equal(half, exact)
    assert ((half - exact).abs() <= exact.abs() * 2.0 ** -11 + 1e-7).all()  # round to nearest, 11 significant bits
    assert ((brain - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-7).all()
    assert (brain - exact).abs().max() > (half - exact).abs().max()
    files = sorted((tmp_path / "images").rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    assert len(files) == 9 and files[0].stat().st_size < 0.6 * files[-1].stat().st_size


def test_a_damaged_entry_raises_corrupt_file_error(pair, tmp_path):
    images = photos(2)
    cache = TokenCache(tmp_path, pair, progress=False)
    cache.image_tokens(images)
    path = cache.path("image", cache.image_key(images[0]))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of one stored token
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=path.name):
        cache.image_tokens(images)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptFileError):
        cache.image_tokens(images)
    other = cache.path("image", cache.image_key(images[1]))
    path.write_bytes(other.read_bytes())  # a valid entry stored under another key
    with pytest.raises(CorruptFileError, match="not the token-cache entry"):
        cache.image_tokens(images)
    path.unlink()  # deleting the file recomputes it
    assert TokenCache(tmp_path, pair, progress=False).image_tokens(images).shape == (2, 16, 32)


def test_cache_refuses_while_an_encoder_adapter_is_active(pair, tmp_path):
    cache = TokenCache(tmp_path, pair, progress=False)
    ak.attach(pair, TokenHeadConfig(), "head")  # model-level, beside the encoders: allowed
    cache.image_tokens(photos(1))
    ak.attach(pair, ak.LoRAConfig(r=2, target_modules=["q_proj"], init="gaussian"), "lora")
    ak.activate(pair, ["head", "lora"])
    with pytest.raises(UnsupportedError, match="lora"):
        cache.image_tokens(photos(1))
    with pytest.raises(UnsupportedError):
        cache.text_tokens(INSTRUCTIONS[0])
    ak.activate(pair, ["head"])
    assert cache.image_tokens(photos(1)).shape == (1, 16, 32) and (cache.misses, cache.hits) == (1, 1)

"""The ranking-aware adapter: pair attention, heads, losses, the model-level contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit as ak
from adapterkit.analysis.ranking_metrics import (kendall_tau_a, mean_metrics, offset_pairwise_accuracy,
                                                 ordering_metrics, pairwise_accuracy)
from adapterkit.methods.ranking import (RankingAdapter, RankingAdapterConfig, RankingOutput, log_smooth_l1,
                                        pair_labels, pairwise_rank_loss, ranking_layer, ranking_loss)

from conftest import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(width=16, heads=2, fusion_layers=1, encoder_layers=1, prompt_tokens=4, relation_tokens=3, dropout=0.0)


class TinyEncoders(nn.Module):
    """Stands in for a frozen image encoder + text encoder pair."""

    image_token_dim, text_token_dim = 12, 10

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the other tests' RNG stays as it was
            torch.manual_seed(seed)
            self.image = nn.Linear(6, self.image_token_dim)
            self.text = nn.Embedding(20, self.text_token_dim)
        self.requires_grad_(False)


def _tokens(n: int = 5, p: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, p, 12, generator=g)
    text = torch.randn(6, 10, generator=g)
    mask = torch.tensor([True, True, True, True, False, False])
    return image, text, mask


def _adapter(**overrides) -> RankingAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return RankingAdapter(RankingAdapterConfig(**{**SMALL, **overrides}), 12, 10).eval()


def test_pair_difference_is_exactly_antisymmetric_with_a_zero_diagonal():
    adapter = _adapter()
    image, text, mask = _tokens(n=6)
    tokens = adapter.encoder(image, text, mask)
    diff = adapter.pairs.difference(tokens)
    assert diff.shape == (6, 6, 3, 16)
    assert torch.equal(diff, -diff.transpose(0, 1))
    assert torch.equal(diff.diagonal(dim1=0, dim2=1), torch.zeros_like(diff.diagonal(dim1=0, dim2=1)))
    assert diff.abs().amax() > 0


def test_one_softmax_over_both_images_tokens_matches_the_naive_computation():
    adapter = _adapter()
    branch = adapter.pairs
    tokens = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)) * 4  # large logits: stability matters
    first, second = branch.halves(tokens)
    heads, dh = 2, 8
    q = branch.q_norm(branch.q_proj(branch.queries)).view(3, heads, dh).transpose(0, 1)  # (H, M, dh)
    kv = branch.kv_norm(branch.kv_proj(tokens)).view(3, 5, heads, dh).transpose(1, 2)  # (N, H, P, dh)
    for i in range(3):
        for j in range(3):
            keys = torch.cat([kv[i], kv[j]], dim=1)  # (H, 2P, dh): one softmax over 2P tokens
            attention = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(dh), dim=-1)
            o_i, o_j = attention[..., :5] @ kv[i], attention[..., 5:] @ kv[j]  # (H, M, dh)
            merge = lambda o: o.transpose(0, 1).reshape(3, 16)  # noqa: E731
            assert torch.allclose(first[i, j], merge(o_i), atol=1e-6)
            assert torch.allclose(second[i, j], merge(o_j), atol=1e-6)
            # the two halves share the mass: a separate softmax per image would give rows summing to 1 each
            assert torch.allclose(attention.sum(-1), torch.ones(heads, 3))


def test_pair_logits_are_n_by_n_row_major_and_labels_follow_the_targets():
    adapter = _adapter()
    image, text, mask = _tokens(n=4)
    out = adapter(image, text, mask, pairs=True)
    assert out.scores.shape == (4,) and out.pair_logits.shape == (4, 4)
    flat = out.pair_logits.reshape(-1)
    assert torch.equal(flat[1 * 4 + 2], out.pair_logits[1, 2])
    y = torch.tensor([2.0, 0.0, 2.0, 1.0])
    labels = pair_labels(y)
    expected = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(labels, expected)  # ties (0, 2) and the diagonal are 0
    assert adapter(image, text, mask).pair_logits is None  # pairs only when asked


def test_a_score_does_not_depend_on_the_other_images_in_the_batch():
    adapter = _adapter()
    image, text, mask = _tokens(n=6)
    full = adapter(image, text, mask).scores
    reordered = adapter(image[[5, 3, 1]], text, mask).scores
    alone = adapter(image[3:4], text, mask).scores
    assert torch.allclose(reordered, full[[5, 3, 1]], atol=1e-5)
    assert torch.allclose(alone, full[3:4], atol=1e-5)


def test_the_instruction_changes_the_scores_and_padding_is_ignored():
    adapter = _adapter()
    image, text, mask = _tokens()
    base = adapter(image, text, mask).scores
    padded = text.clone()
    padded[~mask] = 100.0  # padded positions must not matter
    assert torch.allclose(adapter(image, padded, mask).scores, base, atol=1e-6)
    assert not torch.allclose(adapter(image, text + 1.0, mask).scores, base, atol=1e-3)
    per_image = adapter(image, text.expand(5, -1, -1), mask.expand(5, -1)).scores  # one instruction per image
    assert torch.allclose(per_image, base, atol=1e-6)


@pytest.mark.parametrize("style,shape", [("vector", (4, 16)), ("scalar", (4, 1))])
def test_prompt_styles(style, shape):
    adapter = _adapter(prompt_style=style)
    assert adapter.encoder.prompt.shape == shape
    image, text, mask = _tokens()
    adapter(image, text, mask, pairs=True).scores.sum().backward()
    assert adapter.encoder.prompt.grad is not None and adapter.encoder.prompt.grad.abs().sum() > 0
    assert not hasattr(_adapter(prompt_style="none").encoder, "prompt")


def test_ablations_change_the_modules():
    assert _adapter(pair_branch=False).pairs is None
    assert _adapter(pair_combine="concat").pairs.out_proj.in_features == 32
    out = _adapter(pair_combine="concat")(*_tokens(n=3), pairs=True)
    assert out.pair_logits.shape == (3, 3)


def test_losses_match_their_closed_forms():
    scores, y = torch.tensor([0.5, 3.0, -1.0]), torch.tensor([1.0, 1.2, -0.5])
    errors = [0.5 * 0.5 ** 2, 1.8 - 0.5, 0.5 * 0.5 ** 2]  # SmoothL1 with beta 1
    assert torch.isclose(log_smooth_l1(scores, y), torch.tensor(math.log(1 + sum(errors) / 3)))
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.5], [3.0, -2.0, 0.0]])
    labels = pair_labels(y)
    by_hand = sum(-(l * math.log(torch.sigmoid(torch.tensor(z)).item())
                    + (1 - l) * math.log(1 - torch.sigmoid(torch.tensor(z)).item()))
                  for z, l in zip(logits.reshape(-1).tolist(), labels.reshape(-1).tolist())) / 9
    assert math.isclose(pairwise_rank_loss(logits, y).item(), by_hand, rel_tol=1e-6)
    loss = ranking_loss(RankingOutput(scores, logits), y)
    assert torch.isclose(loss.total, loss.rank + 0.2 * loss.regression)
    regression_only = ranking_loss(RankingOutput(scores), y, regression_weight=0.5)
    assert regression_only.rank is None and torch.isclose(regression_only.total, 0.5 * regression_only.regression)


def test_metrics_strict_pairs_and_the_official_offset_variant():
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=12), rng.permutation(12).astype(float)
    assert math.isclose(pairwise_accuracy(s, y), (kendall_tau_a(s, y) + 1) / 2)
    # a perfectly reversed order: no strict pair is right; the offset variant still counts the diagonal
    assert pairwise_accuracy([3, 2, 1], [1, 2, 3]) == 0.0
    assert offset_pairwise_accuracy([3, 2, 1], [1, 2, 3]) > 0.0
    assert pairwise_accuracy([1, 1, 2], [1, 2, 3]) == pytest.approx((0.5 + 1 + 1) / 3)  # score ties count half
    assert math.isnan(pairwise_accuracy([1, 2], [3, 3]))  # no ordered pair
    m = ordering_metrics(s, y)
    ranks = lambda a: np.argsort(np.argsort(a)).astype(float)  # noqa: E731  (no ties here)
    assert math.isclose(m.srcc, np.corrcoef(ranks(s), ranks(y))[0, 1], rel_tol=1e-9)
    assert math.isclose(m.plcc, np.corrcoef(s, y)[0, 1], rel_tol=1e-9)
    assert math.isclose(m.mae, np.abs(s - y).mean())
    averaged = mean_metrics({"a": m, "b": ordering_metrics(y, y)})
    assert math.isclose(averaged["srcc"], (m.srcc + 1.0) / 2)
    collapsed = ordering_metrics([0.5] * 12, y)  # a collapsed model scores as chance, not NaN
    assert (collapsed.srcc, collapsed.kendall, collapsed.pairwise) == (0.0, 0.0, 0.5)
    assert math.isnan(ordering_metrics(s, [2.0] * 12).srcc)  # nothing to order
    with pytest.raises(ak.ConfigError):
        ordering_metrics([1.0, 2.0], [1.0])


def test_attach_train_save_load_round_trip_and_a_wrong_encoder_is_refused(tmp_path):
    model = TinyEncoders()
    ak.attach(model, RankingAdapterConfig(**SMALL), "rank")
    layer = ranking_layer(model, "rank").eval()
    image, text, mask = _tokens()
    y = torch.arange(5, dtype=torch.float32)
    optimizer = torch.optim.AdamW(ak.adapter_parameters(model, "rank"), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        ranking_loss(layer(image, text, mask, pairs=True), y).total.backward()
        optimizer.step()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(("image", "text")))
    ak.save(model, tmp_path / "rank", "rank")
    other = TinyEncoders()
    ak.load(other, tmp_path / "rank")
    loaded = ranking_layer(other, "rank").eval()
    assert torch.equal(loaded(image, text, mask).scores, layer(image, text, mask).scores)
    stranger = TinyEncoders(seed=1)
    before = snapshot(stranger)
    with pytest.raises(ak.errors.BaseModelMismatchError):
        ak.load(stranger, tmp_path / "rank")
    assert_unchanged(stranger, before)


def test_a_model_without_token_widths_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(3, 3))
    before = snapshot(model)
    with pytest.raises(ak.ConfigError, match="token widths"):
        ak.attach(model, RankingAdapterConfig(**SMALL), "rank")
    assert_unchanged(model, before)
    assert ak.adapters(model) == []
    ak.attach(model, RankingAdapterConfig(**SMALL, image_dim=12, text_dim=10), "rank")  # widths given: fine
    ak.attach(model, ak.LoRAConfig(r=2, target_modules=["0"]), "lora")
    with pytest.raises(ak.ConfigError, match="not a ranking adapter"):
        ranking_layer(model, "lora")


@pytest.mark.parametrize("bad", [dict(width=10, heads=3), dict(prompt_style="deep"), dict(pair_combine="add"),
                                 dict(dropout=1.0), dict(regression_weight=-1), dict(bits=1), dict(heads=0)])
def test_bad_configs_raise(bad):
    with pytest.raises(ak.ConfigError):
        RankingAdapterConfig(**bad)


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """§7's stand-in: 16 patches, each empty / object A / object B under a fixed random projection."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.randint(0, 3, (n, 16), generator=g)
    codes = torch.randn(3, 12, generator=torch.Generator().manual_seed(99))
    image = codes[kinds] + 0.1 * torch.randn(n, 16, 12, generator=g)
    return image, {"A": (kinds == 1).sum(1).float(), "B": (kinds == 2).sum(1).float()}


def test_the_adapter_learns_both_instructions_from_one_set_of_weights():
    adapter = _adapter().train()
    g = torch.Generator().manual_seed(5)
    texts = {"A": torch.randn(4, 10, generator=g), "B": torch.randn(4, 10, generator=g)}
    train_x, train_y = _synthetic(256, seed=1)
    test_x, test_y = _synthetic(64, seed=2)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    for step in range(160):
        which = "AB"[step % 2]
        rows = torch.randint(0, 256, (16,), generator=g)
        optimizer.zero_grad()
        ranking_loss(adapter(train_x[rows], texts[which], pairs=True), train_y[which][rows]).total.backward()
        optimizer.step()
    adapter.eval()
    with torch.no_grad():
        taus = {k: ordering_metrics(adapter(test_x, texts[k]).scores, test_y[k]).kendall for k in "AB"}
        swapped = ordering_metrics(adapter(test_x, texts["B"]).scores, test_y["A"]).kendall
    assert min(taus.values()) > 0.6, taus
    assert swapped < min(taus.values()) - 0.3  # the instruction, not the image alone, decides the order

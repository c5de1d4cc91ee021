"""Instruction-grouped batches and the ranking adapter's training loop on cached tokens."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import adapterkit as ak
from adapterkit.apps.ranking.sampler import InstructionBatches, InstructionPool, pools_from_targets
from adapterkit.apps.ranking.train import (InstructionTokens, RankingTrainSettings, evaluate_ranking, score_images,
                                           train_ranking)
from adapterkit.methods.ranking import RankingAdapterConfig

from conftest import assert_unchanged, snapshot
from test_ranking_adapter import SMALL, TinyEncoders, _synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


def _pools() -> list[InstructionPool]:
    counts = {"sheep": {i: float(i % 5) for i in range(0, 30)}, "apples": {i: float(i % 3) for i in range(20, 50)}}
    return pools_from_targets(counts, min_positive=1.0)


def test_every_batch_holds_one_instruction_and_the_negative_share_relabelled():
    pools = _pools()
    batches = InstructionBatches(pools, batch_size=10, negative_ratio=0.2, seed=3).epoch(0)
    by_name = {p.instruction: p for p in pools}
    seen = Counter()
    for batch in batches:
        pool = by_name[batch.instruction]
        cut = len(batch.indices) - batch.negatives
        positives, negatives = batch.indices[:cut], batch.indices[cut:]
        assert batch.negatives == min(2, round(len(positives) * 0.25)) and len(batch.indices) <= 10  # 20 % share
        assert set(negatives.tolist()) <= set(pool.negatives)  # from other pools, target relabelled to 0
        assert torch.equal(batch.targets[cut:], torch.zeros(batch.negatives))
        assert all(batch.targets[k].item() == pool.targets[pool.positives.index(i)] >= 1
                   for k, i in enumerate(positives.tolist()))
        seen.update((batch.instruction, i) for i in positives.tolist())
    assert seen == Counter((p.instruction, i) for p in pools for i in p.positives)  # each positive once an epoch
    assert {b.instruction for b in batches[:4]} == {"sheep", "apples"}  # instructions interleave


def test_batches_are_deterministic_per_seed_and_epoch_and_leave_global_rngs_alone():
    import random

    pools = _pools()
    state, py_state = torch.random.get_rng_state(), random.getstate()
    a, b = InstructionBatches(pools, 8, seed=1), InstructionBatches(pools, 8, seed=1)
    assert [x.indices.tolist() for x in a.epoch(2)] == [x.indices.tolist() for x in b.epoch(2)]
    assert [x.indices.tolist() for x in a.epoch(0)] != [x.indices.tolist() for x in a.epoch(1)]
    assert torch.equal(state, torch.random.get_rng_state()) and py_state == random.getstate()


def test_pools_without_min_positive_rank_every_image_and_use_no_negatives():
    pools = pools_from_targets({"blur": {0: 0.0, 1: 4.0, 2: 2.0}})
    assert pools[0].positives == (0, 1, 2) and pools[0].negatives == ()
    assert all(b.negatives == 0 for b in InstructionBatches(pools, 4).epoch(0))


@pytest.mark.parametrize("bad", [dict(batch_size=1), dict(negative_ratio=1.0), dict(pools=[])])
def test_bad_sampler_settings_raise(bad):
    with pytest.raises(ak.ConfigError):
        InstructionBatches(**{"pools": _pools(), **bad})


def test_a_pool_of_one_image_is_refused():
    with pytest.raises(ak.ConfigError):
        InstructionPool("x", (1,), (1.0,))  # one image cannot be ranked


def _data():
    images, targets = _synthetic(160, seed=1)
    g = torch.Generator().manual_seed(5)
    texts = {k: InstructionTokens(torch.randn(4, 10, generator=g), torch.ones(4, dtype=torch.bool)) for k in "AB"}
    train = pools_from_targets({k: {i: float(v) for i, v in enumerate(targets[k][:128].tolist())} for k in "AB"})
    test = pools_from_targets({k: {i: float(v) for i, v in enumerate(targets[k].tolist()) if i >= 128} for k in "AB"})
    return images, texts, train, test


def test_training_on_cached_tokens_ranks_held_out_images_and_keeps_the_callers_rng():
    from adapterkit.apps.ranking.train import attach_ranking

    images, texts, train, test = _data()
    model = TinyEncoders()
    attach_ranking(model, RankingAdapterConfig(**SMALL), "rank", seed=0)  # deterministic, whatever ran before
    before = evaluate_ranking(model, "rank", images, texts, test)
    state = torch.random.get_rng_state()
    losses = train_ranking(model, "rank", images, texts, train, RankingTrainSettings(epochs=12, lr=3e-3, batch_size=16),
                           progress=False)
    assert torch.equal(state, torch.random.get_rng_state())
    assert sum(losses[-10:]) < sum(losses[:10])
    after = evaluate_ranking(model, "rank", images, texts, test)
    assert all(after[k].kendall > max(0.8, before[k].kendall + 0.1) for k in "AB"), (before, after)
    assert sum(after[k].kendall - before[k].kendall for k in "AB") > 0.5
    scores = score_images(model, "rank", images[128:], texts["A"], batch_size=7)  # batching does not matter
    assert torch.allclose(scores, score_images(model, "rank", images[128:], texts["A"]), atol=1e-5)


def test_bad_training_inputs_raise_before_any_step():
    images, texts, train, _ = _data()
    model = TinyEncoders()
    ak.attach(model, RankingAdapterConfig(**SMALL), "rank")
    before = snapshot(model)
    with pytest.raises(ak.ConfigError, match="no text tokens"):
        train_ranking(model, "rank", images, {"A": texts["A"]}, train, progress=False)
    with pytest.raises(ak.ConfigError, match="refers to image"):
        train_ranking(model, "rank", images[:50], texts, train, progress=False)
    with pytest.raises(ak.ConfigError, match="width"):
        train_ranking(model, "rank", images[..., :8], texts, train, progress=False)
    bad_pool = [InstructionPool("A", (-1, 3), (0.0, 1.0))]
    with pytest.raises(ak.ConfigError, match="refers to image"):
        train_ranking(model, "rank", images, texts, bad_pool, progress=False)
    for bad in (dict(epochs=0), dict(lr=-1.0), dict(batch_size=1.5)):
        with pytest.raises(ak.ConfigError):
            RankingTrainSettings(**bad)
    with pytest.raises(ak.ConfigError):
        InstructionTokens(torch.zeros(3, 10), torch.zeros(3, dtype=torch.bool))
    assert_unchanged(model, before)


def test_attach_ranking_seeds_the_initial_weights_and_leaves_the_callers_rng():
    from adapterkit.apps.ranking.train import attach_ranking

    state = torch.random.get_rng_state()
    a = attach_ranking(TinyEncoders(), RankingAdapterConfig(**SMALL), "rank", seed=3)
    b = attach_ranking(TinyEncoders(), RankingAdapterConfig(**SMALL), "rank", seed=3)
    c = attach_ranking(TinyEncoders(), RankingAdapterConfig(**SMALL), "rank", seed=4)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))

"""Data-parallel training (adapterkit.train.distributed) on 2 CPU ranks with gloo, spawned once for
every case (tests/distributed_support.py): for each method, 2-rank DDP training on the shards of the
same global batches equals single-process training, the per-step draws are identical on both
ranks, a rank that drew differently is refused, rank 0 alone saves; FSDP2 (fully_shard) likewise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.train import distributed, draws

import distributed_support as support

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """The directory the spawned ranks wrote their results to (one spawn for all tests here)."""
    out = tmp_path_factory.mktemp("ranks")
    support.spawn(out, WORLD)
    return out


def _report(out: Path, rank: int) -> dict:
    return json.loads((out / f"report_rank{rank}.json").read_text())


def _run(out: Path, key: str, rank: int) -> support.Run:
    errors = _report(out, rank)["errors"]
    assert key not in errors, f"rank {rank} failed {key}:\n{errors[key]}"
    record = json.loads((out / f"{key}_rank{rank}.json").read_text())
    return support.Run(load_file(str(out / f"{key}_rank{rank}.safetensors")), record["draws"], record["losses"])


def _assert_equivalent(out: Path, key: str, case: str) -> None:
    reference = support.single_process(case)
    runs = [_run(out, key, rank) for rank in range(WORLD)]
    for rank, run in enumerate(runs):
        assert run.params.keys() == reference.params.keys()
        for name, value in reference.params.items():
            assert torch.allclose(run.params[name], value, atol=2e-6, rtol=1e-4), (rank, name)
        assert run.draws == reference.draws  # every rank drew what one process draws
    assert any(not torch.equal(v, support.trainable(support.adapted(case))[k]) for k, v in runs[0].params.items())
    if key.startswith("ddp_"):  # losses of the global batches, gathered
        assert runs[0].losses == pytest.approx(reference.losses, rel=1e-4, abs=1e-6)
        assert all(torch.equal(runs[0].params[k], runs[1].params[k]) for k in runs[0].params)  # bit-identical ranks


@pytest.mark.parametrize("case", list(support.ATTACH))
def test_two_rank_ddp_equals_one_process(ranks, case):
    _assert_equivalent(ranks, f"ddp_{case}", case)


@pytest.mark.parametrize("case", support.FSDP_CASES)
def test_two_rank_fsdp2_equals_one_process(ranks, case):
    _assert_equivalent(ranks, f"fsdp_{case}", case)


@pytest.mark.parametrize("case", ["mosa", "mosa_bottleneck"])
def test_mosa_two_passes_inside_one_forward_of_a_plainly_wrapped_model_equal_one_process(ranks, case):
    _assert_equivalent(ranks, f"ddpplain_{case}", case)


def test_per_step_draws_vary_and_agree_across_ranks(ranks):
    for key in ("ddp_dylora", "ddp_mosa", "ddp_mosa_bottleneck"):
        first, second = (_run(ranks, key, rank).draws for rank in range(WORLD))
        assert first == second
        assert len({tuple(d) for d in first}) > 1, key  # the draws do change from step to step


def test_a_rank_that_drew_differently_is_refused_on_every_rank_before_any_change(ranks):
    for rank in range(WORLD):
        outcome = _report(ranks, rank)["desync"]
        assert outcome.startswith("RankMismatchError unchanged=True"), outcome


def test_mosa_fails_loudly_under_a_static_graph_or_without_the_unused_parameter_search(ranks):
    for rank in range(WORLD):
        outcome = _report(ranks, rank)["mosa_settings"]
        assert "graph has changed" in outcome["static_graph"], outcome
        assert outcome["no_unused_search"].startswith("adapter 'a' on ['l1', 'l2'] got no gradient in the first step"), \
            outcome


def test_an_adapter_on_a_module_the_forward_never_runs_is_named_after_the_first_step(ranks):
    for rank in range(WORLD):
        outcome = _report(ranks, rank)["unused"]
        assert outcome.startswith("AdapterError unchanged=True: adapter 'a' on ['spare'] got no gradient"), outcome
        assert "find_unused_parameters" in outcome


def test_a_rank_given_other_global_batches_is_refused_before_any_change(ranks):
    for rank in range(WORLD):
        outcome = _report(ranks, rank)["batch_desync"]
        assert outcome.startswith("RankMismatchError unchanged=True: global batches"), outcome


def test_batches_without_a_length_train_like_one_process(ranks):
    reference = support.single_process_iterable()
    for rank in range(WORLD):
        run = _run(ranks, "ddp_iterable", rank)
        for name, value in reference.params.items():
            assert torch.allclose(run.params[name], value, atol=2e-6, rtol=1e-4), (rank, name)
        assert run.losses == pytest.approx(reference.losses, rel=1e-4, abs=1e-6)
    sharded = distributed.ShardedBatches(iter(support.global_batches()), rank=0, world=2)
    assert not hasattr(sharded, "__len__") and [s.rows for s in sharded] == [2, 3, 2, 1]
    assert len(distributed.ShardedBatches(support.global_batches(), rank=0, world=2)) == 4


def test_only_rank_zero_saves_and_its_errors_reach_every_rank(ranks):
    main, other = (_report(ranks, rank)["on_main"] for rank in range(WORLD))
    assert main["returned"] == str(ranks / "saved") and other["returned"] is None
    torch.manual_seed(0)
    assert ak.load(support.Tiny(), ranks / "saved") == "a"
    assert main["error"] == "ConfigError: disk full"
    assert other["error"].startswith("RankMismatchError: rank 0 failed: ConfigError: disk full")


def test_the_ranking_adapter_trains_with_its_ranks_in_sync(ranks):
    first, second = (_run(ranks, "ranking", rank) for rank in range(WORLD))
    assert all(torch.equal(first.params[k], second.params[k]) for k in first.params)
    assert first.losses[-1] > 0  # the values moved


def test_shards_cover_the_global_batch_in_order_with_weights_that_average_to_one():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5), "flag": True}
    shards = [distributed.shard_batch(batch, rank, 2) for rank in range(2)]
    assert torch.equal(torch.cat([s.batch["input_ids"] for s in shards]), batch["input_ids"])
    assert [s.rows for s in shards] == [3, 2] and sum(s.weight for s in shards) / 2 == pytest.approx(1.0)
    assert shards[1].batch["flag"] is True
    lonely = distributed.shard_batch({"x": torch.ones(1, 3)}, 1, 2)  # no row of its own: one row at weight 0
    assert lonely.rows == 0 and lonely.weight == 0 and lonely.batch["x"].shape == (1, 3)
    assert shards[0].fingerprint == shards[1].fingerprint == distributed.batch_fingerprint(batch)
    other = {**batch, "input_ids": batch["input_ids"].flip(0)}
    assert distributed.shard_batch(other, 0, 2).fingerprint != shards[0].fingerprint
    with pytest.raises(ak.ConfigError):
        distributed.shard_batch({"a": torch.ones(2), "b": torch.ones(3)}, 0, 2)
    with pytest.raises(ak.ConfigError):
        distributed.ShardedBatches([batch], rank=2, world=2)


def test_unused_parameter_search_is_on_exactly_when_a_step_may_skip_parameters():
    assert not distributed.may_skip_parameters(support.adapted("lora"))
    assert not distributed.may_skip_parameters(support.adapted("dylora"))  # every rank prefix trains component b
    assert distributed.may_skip_parameters(support.adapted("mosa"))  # unchosen modules get no gradient
    legacy = support.Tiny()
    ak.attach(legacy, ak.MoSAConfig(base=ak.LoRAConfig(r=2, target_modules=["l1"]), update_unselected="legacy"), "m")
    assert not distributed.may_skip_parameters(legacy)  # zero gradients for the others
    two = support.adapted("lora")
    ak.attach(two, ak.LoRAConfig(r=2, target_modules=["l1"]), "b")
    ak.activate(two, "a")
    assert distributed.may_skip_parameters(two)  # "b" requires gradients but is inactive


def test_a_rank_without_rows_has_an_exact_zero_loss_even_when_its_row_is_nan():
    model = support.adapted("lora")
    ignored = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "labels": torch.tensor([-100])}  # loss 0/0 = NaN
    assert torch.isnan(distributed.LossModule(model)(ignored, 1.0))
    loss = distributed.LossModule(model)(ignored, 0.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)  # the same parameters as row 0 uses


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not torch.distributed.is_nccl_available(),
                    reason="needs a CUDA device and NCCL")
def test_the_collective_helpers_and_training_work_on_an_nccl_group(tmp_path):
    world = min(2, torch.cuda.device_count())  # NCCL wants one device per rank
    support.spawn(tmp_path, world, timeout=240, target=support.cuda_worker)
    reference = support.single_process("dylora")
    for rank in range(world):
        report = json.loads((tmp_path / f"cuda_rank{rank}.json").read_text())
        assert "error" not in report, report["error"]
        assert report["device"] == f"cuda:{rank}"
        assert report["on_main"] == ("done" if rank == 0 else None)
        assert report["losses"] == pytest.approx(reference.losses, rel=1e-3, abs=1e-5)


def test_without_a_process_group_the_helpers_refuse_or_do_nothing():
    model = support.adapted("dylora")
    with pytest.raises(ak.ConfigError, match="process group"):
        distributed.wrap(model)
    with pytest.raises(ak.ConfigError, match="process group"):
        distributed.train(model, support.global_batches())
    distributed.check_draws(model)  # one process: nothing to compare
    assert distributed.on_main(lambda: 7) == 7 and distributed.is_main()


def test_generator_states_round_trip_through_a_checkpoint_file_and_bad_ones_are_refused(tmp_path):
    model = support.adapted("dylora")
    ak.step(model)
    ak.step(model)
    assert draws.save_draws(model, tmp_path) == tmp_path / draws.DRAWS_FILE
    fresh = support.adapted("dylora")
    assert draws.fingerprint(fresh) != draws.fingerprint(model)
    draws.restore_generator_states(fresh, draws.read_draws(fresh, tmp_path))
    assert draws.fingerprint(fresh) == draws.fingerprint(model)
    ak.step(model)
    ak.step(fresh)
    assert support.draws(fresh) == support.draws(model)
    with pytest.raises(ak.CorruptFileError, match="no generator"):
        draws.read_draws(support.adapted("lora"), tmp_path)  # LoRA has no per-step draws
    assert draws.read_draws(model, tmp_path / "elsewhere") == {}
    assert draws.save_draws(support.adapted("lora"), tmp_path / "lora") is None

"""AdapterTrainer / MoSATrainer under ``accelerate launch`` on 2 CPU processes (gloo), one launch
for all checks (tests/distributed_trainer_script.py): adapter-only checkpoints written by rank 0
alone, a run resumed from its first checkpoint ends bit-identical to the uninterrupted one (draws
included), StepCallback draws exactly once per optimizer step (gradient accumulation 2) and alike
on both ranks, MoSA's two-pass loss trains under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

HERE = Path(__file__).parent
WORLD = 2
STEPS = 4


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trainer")
    # --multi_gpu selects accelerate's torchrun launcher; the script's TrainingArguments(use_cpu=True)
    # makes it a multi-CPU gloo run ("--cpu --num_processes 2" alone would start one process)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(HERE / "distributed_trainer_script.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _reports(out: Path) -> list[dict]:
    reports = [json.loads((out / f"report_rank{rank}.json").read_text()) for rank in range(WORLD)]
    for report in reports:
        assert "error" not in report, report["error"]
    return reports


def test_checkpoints_hold_only_adapters_and_only_rank_zero_writes_them(launched):
    main, other = _reports(launched)
    assert main["saves"] == [str(launched / "full" / f"checkpoint-{s}" / "a") for s in (2, STEPS)]
    assert other["saves"] == []  # rank 1 never wrote an adapter
    for step in (2, STEPS):
        files = {p.name for p in (launched / "full" / f"checkpoint-{step}").iterdir()}
        # the adapter, its draws, and the Trainer's own state; rng_state_1 is rank 1's RNG (for resuming)
        assert files == {"a", "adapterkit_draws.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                         "rng_state_0.pth", "rng_state_1.pth"}
        assert {p.name for p in (launched / "full" / f"checkpoint-{step}" / "a").iterdir()} == \
            {"adapter.safetensors", "adapter_config.json"}


def test_step_callback_draws_once_per_optimizer_step_alike_on_every_rank(launched):
    reports = _reports(launched)
    for report in reports:
        assert [step for step, _ in report["full_steps"]] == list(range(1, STEPS + 1))
        assert report["draws_made"] == STEPS  # 4 optimizer steps of 2 micro-batches: 4 draws, not 8
    assert reports[0]["full_steps"] == reports[1]["full_steps"]
    assert len({tuple(d) for _, d in reports[0]["full_steps"]}) > 1


def test_a_resumed_run_ends_where_the_uninterrupted_one_did(launched):
    for report in _reports(launched):
        assert [s for s, _ in report["resumed_steps"]] == [3, 4]
        assert report["resumed_steps"] == report["full_steps"][2:]  # the draws continue, not restart
        assert report["resume_max_diff"] == 0.0 and report["resume_moved"] > 0


def test_mosa_trainer_two_pass_loss_trains_under_ddp_in_sync(launched):
    first, second = _reports(launched)
    assert first["mosa_steps"] == second["mosa_steps"] and len(first["mosa_steps"]) == 2


def test_the_unused_parameter_search_follows_the_adapters_unless_the_user_set_it(tiny_bert, tmp_path):
    """In process: what AdapterTrainer hands accelerate's DDP settings (``ddp_find_unused_parameters``)."""
    import copy

    from transformers import TrainingArguments

    import adapterkit as ak

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    lora, mosa = copy.deepcopy(tiny_bert), copy.deepcopy(tiny_bert)
    ak.attach(lora, ak.LoRAConfig(r=2, target_modules=["query", "value"]), "a")
    ak.attach(mosa, ak.MoSAConfig(base=ak.LoRAConfig(r=2, target_modules=["query", "value"]), n_modules=2), "a")
    mosa.activation_checkpointing_enable()  # the Trainer's own default would then switch the search off
    for model, expected in ((lora, False), (mosa, True)):
        for trainer in (ak.AdapterTrainer(model=model, args=args), ak.AdapterTrainer(model, args)):
            assert trainer.args.ddp_find_unused_parameters is expected
            assert trainer.accelerator.ddp_handler.find_unused_parameters is expected
    assert args.ddp_find_unused_parameters is None  # the caller's arguments are not changed
    chosen = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], ddp_find_unused_parameters=True)
    assert ak.AdapterTrainer(model=lora, args=chosen).accelerator.ddp_handler.find_unused_parameters is True

"""Run by tests/test_distributed_trainer.py under ``accelerate launch`` (2 CPU processes): an
AdapterTrainer with a DyLoRA adapter (gradient accumulation 2, a checkpoint every 2 optimizer
steps), the same run resumed from its first checkpoint, and a MoSATrainer. Each rank writes
``report_rank<r>.json`` into the directory given as the first argument."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments

import adapterkit as ak
from adapterkit.train import hf
from adapterkit.core.state import get_state
from adapterkit.train import distributed, draws

STEPS = 4


def model_with(config: ak.AdapterConfig) -> torch.nn.Module:
    torch.manual_seed(0)  # every rank builds the same model and adapter
    bert = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(bert)
    ak.attach(model, config, "a")
    return model


def dylora() -> torch.nn.Module:
    return model_with(ak.DyLoRAConfig(r_max=4, target_modules=["query", "value"], scope="per_layer"))


def examples() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 100, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(32)]


class Record(TrainerCallback):
    """Per optimizer step on this rank: DyLoRA's drawn ranks (or MoSA's choices)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.steps = model, []

    def on_step_end(self, args, state, control, **kwargs):
        drawn = []
        for _, layer in get_state(self.model).layers("a"):
            drawn += [layer.train_rank] if hasattr(layer, "train_rank") else []
            drawn += [s.selected for s in getattr(layer, "split_modules", lambda: [])()]
        self.steps.append([state.global_step, drawn])


def arguments(out: Path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS,
                  save_strategy="steps", save_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", seed=0,
                  report_to="none", use_cpu=True, logging_steps=1, dataloader_num_workers=0, ddp_timeout=120,
                  disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


def values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def draws_made(trained: torch.nn.Module) -> int | None:
    """How many ak.step calls a fresh adapter needs to reach the trained one's generator states."""
    fresh = dylora()
    for count in range(3 * STEPS):
        if draws.fingerprint(fresh) == draws.fingerprint(trained):
            return count
        ak.step(fresh)
    return None


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])  # set by the launcher (the process group starts with the Trainer)
    report: dict = {"rank": rank}
    saves: list[str] = []
    original = hf.save

    def counted(model, directory, *args, **kwargs):  # which rank writes adapter files
        saves.append(str(directory))
        return original(model, directory, *args, **kwargs)

    hf.save = counted
    try:
        model = dylora()
        record = Record(model)
        hf.AdapterTrainer(model=model, args=arguments(out / "full"), train_dataset=examples(), callbacks=[record]).train()
        report["full_steps"] = record.steps
        report["draws_made"] = draws_made(model)
        report["saves"] = list(saves)
        full = values(model)

        resumed = dylora()
        record = Record(resumed)
        hf.AdapterTrainer(model=resumed, args=arguments(out / "resumed"), train_dataset=examples(),
                          callbacks=[record]).train(resume_from_checkpoint=str(out / "full" / "checkpoint-2"))
        report["resumed_steps"] = record.steps
        report["resume_max_diff"] = max(float((v - full[k]).abs().max()) for k, v in values(resumed).items())
        report["resume_moved"] = max(float((v - values(dylora())[k]).abs().max()) for k, v in values(resumed).items())

        mosa = model_with(ak.MoSAConfig(base=ak.LoRAConfig(r=4, target_modules=["query", "value"]), n_modules=3))
        record = Record(mosa)
        hf.MoSATrainer(model=mosa, args=arguments(out / "mosa", max_steps=2, save_strategy="no"),
                       train_dataset=examples(), callbacks=[record]).train()
        distributed.check_in_sync(mosa)  # raises if the ranks' values differ
        report["mosa_steps"] = record.steps
    except Exception:
        report["error"] = traceback.format_exc()
    finally:
        hf.save = original
        (out / f"report_rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

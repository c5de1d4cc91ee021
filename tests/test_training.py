"""Training with the thin loop and with transformers.Trainer (adapter-only checkpoints)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import adapterkit as ak


def _batches(n_batches: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 100, (8, 6), generator=g)
        labels = (ids[:, 0] > 50).long()  # learnable from the first token
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_train_helper_reduces_loss_and_touches_only_adapters(tiny_bert):
    frozen = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    ak.attach(tiny_bert, ak.LoRAConfig(r=4, target_modules="all-linear", exclude_modules=["classifier"],
                                       modules_to_save=["classifier"]))
    batches = _batches()
    steps = []
    losses = ak.train(tiny_bert, batches, epochs=6, lr=1e-2, progress=False, on_step=lambda i, l: steps.append(i))
    assert len(losses) == 48 and steps == list(range(1, 49))
    assert sum(losses[-8:]) < sum(losses[:8])
    assert not tiny_bert.training  # restored to eval mode
    ak.activate(tiny_bert, None)
    for key, value in tiny_bert.state_dict().items():
        base_key = key.replace(".base_layer", "")
        if base_key in frozen:
            assert torch.equal(value, frozen[base_key]), key


def test_accuracy_and_predict(tiny_bert):
    batches = _batches(2)
    logits = ak.predict(tiny_bert, batches)
    assert logits.shape == (16, 3)
    labels = torch.cat([b["labels"] for b in batches])
    assert ak.accuracy(tiny_bert, batches) == (logits.argmax(-1) == labels).float().mean().item()


def test_text_batches_tokenise_once_pad_per_batch_and_reshuffle():
    from adapterkit.zoo.data import LabelledTexts
    from adapterkit.zoo.models import minilm_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    texts = LabelledTexts(tuple(f"sentence number {i} " + "word " * (i % 7) for i in range(40)), tuple(i % 2 for i in range(40)))
    batches = ak.TextBatches(tokenizer, texts, batch_size=16, shuffle=True, seed=1)
    first, second = list(batches), list(batches)
    assert len(batches) == 3 and sorted(len(b["labels"]) for b in first) == [8, 16, 16]
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    for batch in first:
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert (batch["attention_mask"].sum(1) > 0).all()
    ordered = list(ak.TextBatches(tokenizer, texts, batch_size=16))
    assert ordered[0]["labels"].tolist() == [i % 2 for i in range(16)]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_adapter_trainer_writes_adapter_only_checkpoints_that_reload(tiny_bert, tmp_path, token_ids):
    from transformers import TrainingArguments

    base = copy.deepcopy(tiny_bert)
    base_logits = base(input_ids=token_ids).logits
    ak.attach(tiny_bert, ak.LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), "task")
    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in _batches(4) for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-2, save_strategy="epoch", logging_strategy="no", report_to=[],
                             use_cpu=True, save_only_model=True, disable_tqdm=True)
    trainer = ak.AdapterTrainer(model=tiny_bert, args=args, train_dataset=_ListDataset(rows))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    checkpoint = tmp_path / "run" / "checkpoint-8" / "task"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert not list((tmp_path / "run" / "checkpoint-8").glob("model.safetensors"))
    tiny_bert.eval()
    expected = tiny_bert(input_ids=token_ids).logits
    ak.load(base, tmp_path / "final" / "task")
    assert not torch.allclose(expected, base_logits)  # training changed the model
    torch.testing.assert_close(base(input_ids=token_ids).logits, expected, rtol=0, atol=0)


def test_plain_trainer_also_trains_only_the_adapter(tiny_bert, tmp_path):
    from transformers import Trainer, TrainingArguments

    ak.attach(tiny_bert, ak.LoRAConfig(r=2, target_modules=["query"], init="default"))
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in _batches(2) for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-2,
                             save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=tiny_bert, args=args, train_dataset=_ListDataset(rows)).train()
    after = tiny_bert.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".adapters." in k for k in changed)


def test_adapter_trainer_resumes_from_a_checkpoint_exactly_where_an_uninterrupted_run_ends(tiny_bert, tmp_path):
    """Regression: resume_from_checkpoint was not wired (the Trainer looked for full model weights)."""
    from transformers import TrainingArguments

    def run(model, output, epochs, resume=None):
        ak.attach(model, ak.LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], init="random"), "task")
        rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in _batches(4) for i in range(8)]
        args = TrainingArguments(output_dir=str(output), per_device_train_batch_size=8, num_train_epochs=epochs,
                                 learning_rate=1e-2, save_strategy="epoch", logging_strategy="no", report_to=[],
                                 use_cpu=True, disable_tqdm=True, seed=3, data_seed=3)
        ak.AdapterTrainer(model=model, args=args, train_dataset=_ListDataset(rows)).train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}

    fresh = copy.deepcopy(tiny_bert)
    torch.manual_seed(11)
    straight = run(tiny_bert, tmp_path / "a", epochs=2)
    torch.manual_seed(12)  # a different init: only the checkpoint can make the runs agree
    resumed = run(fresh, tmp_path / "b", epochs=2, resume=str(tmp_path / "a" / "checkpoint-4"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)

"""The core contract for adapter kinds still to come, proved by methods registered from this file
(no edit under src/):

* a sparse diff over several tensors of a module — weight and bias of a linear layer, a LayerNorm's
  scale and shift, an embedding table — whose entries are chosen by a procedure that trains the
  model in ``setup`` (LT-SFT's shape); it trains, fuses and unfuses exactly, saves and loads;
* a learnable prompt of k virtual tokens on a causal LM (a model-level adapter extending the
  input, attention mask and labels), and a head living beside the frozen model.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import pytest
import torch
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.core.host import ModelHost
from adapterkit.core.sparse import SparseTensorDelta
from conftest import assert_unchanged, snapshot


# -- a sparse diff chosen by a training procedure ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiffConfig(ak.AdapterConfig):
    """Train the targeted modules densely for ``steps`` steps, keep the ``k`` most-changed entries."""

    k: int = 1500
    steps: int = 3
    lr: float = 0.5


def _key(tensor: str) -> str:
    return tensor.replace(".", "__")  # ModuleDict keys cannot hold dots


def _own_tensors(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


class DiffLayer(ak.DeltaLayer):
    """One :class:`SparseTensorDelta` per base tensor of the module that has chosen entries."""

    def __init__(self, name: str, module: nn.Module, chosen: Mapping[str, Tensor]) -> None:
        super().__init__(name)
        self.tensor_names = tuple(_own_tensors(module))
        self.parts = nn.ModuleDict({_key(t): SparseTensorDelta(module.get_parameter(t).shape, idx, module.get_parameter(t).device)
                                    for t, idx in chosen.items()})

    def delta_tensors(self) -> tuple[str, ...]:
        return tuple(t for t in self.tensor_names if _key(t) in self.parts)

    def part(self, tensor: str) -> SparseTensorDelta:
        return self.parts[_key(tensor)]

    def accepted_keys(self) -> set[str]:  # a layer built for loading learns its entries from the file
        return {f"parts.{_key(t)}.{leaf}" for t in self.tensor_names for leaf in ("indices", "values")}

    def load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        for t in self.tensor_names:
            if f"parts.{_key(t)}.indices" in tensors:
                self.parts[_key(t)] = SparseTensorDelta(self.parts_shape[t], tensors[f"parts.{_key(t)}.indices"])
                self.parts[_key(t)].values.data.copy_(tensors[f"parts.{_key(t)}.values"])


def most_changed(model: nn.Module, targets: Mapping[str, nn.Module], batches: list[dict], config: DiffConfig) -> dict:
    """Phase 1 of LT-SFT, written plainly: dense SGD on the targeted tensors, then one global
    top-k of |change| across all of them."""
    params = {(path, t): module.get_parameter(t) for path, module in targets.items() for t in _own_tensors(module)}
    model.requires_grad_(False)
    before = {key: p.detach().clone() for key, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params.values(), lr=config.lr)
    model.train()
    for step in range(config.steps):
        optimizer.zero_grad()
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
    changes = torch.cat([(params[key].detach() - before[key]).abs().reshape(-1) for key in params])
    threshold = changes.topk(config.k).values[-1]
    chosen: dict[str, dict[str, Tensor]] = {}
    for key, p in params.items():
        idx = torch.nonzero((p.detach() - before[key]).abs().reshape(-1) >= threshold).reshape(-1)
        if idx.numel():
            chosen.setdefault(key[0], {})[key[1]] = idx
    return chosen


@ak.register_method
class DiffMethod(ak.AdapterMethod):
    name = "test-sparse-diff"
    config_class = DiffConfig
    setup_trains_model = True

    def supports(self, module: nn.Module) -> bool:
        return any(True for _ in module.parameters())

    def setup(self, model, config, adapter_name, targets, calibration=None):
        if calibration is None:
            raise ak.ConfigError("test-sparse-diff needs calibration=batches")
        return most_changed(model, targets, list(calibration), config)

    def create_layer(self, config, adapter_name, module_name, module, context=None):
        return DiffLayer(adapter_name, module, context.get(module_name, {}))

    def empty_layer(self, config, adapter_name, module_name, module):
        layer = DiffLayer(adapter_name, module, {})
        layer.parts_shape = {t: module.get_parameter(t).shape for t in layer.tensor_names}
        return layer


DIFF_TARGETS = r"bert\.embeddings\.(word_embeddings|LayerNorm)|bert\.encoder\.layer\.0\.attention\.output"


def _batches(n: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(1, 100, (4, 7), generator=generator),
             "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(n)]


def _chosen(model: nn.Module, name: str) -> dict[tuple[str, str], Tensor]:
    return {(path, t): layer.part(t).indices for path, layer in ak.core.state.get_state(model).layers(name)
            for t in layer.delta_tensors()}


def test_a_setup_procedure_trains_the_model_and_the_core_restores_it_bit_identical(tiny_bert):
    batches = _batches()
    tiny_bert.requires_grad_(False)  # as attaching leaves a base model, so detaching shows the rest
    twin = copy.deepcopy(tiny_bert)
    twin_targets = {p: twin.get_submodule(p) for p in
                    ("bert.embeddings.word_embeddings", "bert.embeddings.LayerNorm", "bert.encoder.layer.0.attention.output")}
    torch.manual_seed(7)  # the procedure trains with dropout: same draws for the reference and the method
    reference = most_changed(twin, twin_targets, batches, DiffConfig(target_modules=DIFF_TARGETS))
    before = snapshot(tiny_bert)
    base = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    ak.attach(tiny_bert, DiffConfig(target_modules=DIFF_TARGETS), "diff", calibration=batches)
    # the procedure trained the model in place; detaching the adapter shows everything else is back
    ak.detach(tiny_bert, "diff")
    assert_unchanged(tiny_bert, before)
    assert all(torch.equal(tiny_bert.state_dict()[k], v) for k, v in base.items())
    torch.manual_seed(7)
    ak.attach(tiny_bert, DiffConfig(target_modules=DIFF_TARGETS), "diff", calibration=batches)
    chosen = _chosen(tiny_bert, "diff")
    expected = {(p, t): idx for p, tensors in reference.items() for t, idx in tensors.items()}
    assert chosen.keys() == expected.keys() and all(torch.equal(chosen[k], expected[k]) for k in expected)
    kinds = {t.split(".")[-1] for _, t in chosen} | {p.split(".")[-1] for p, _ in chosen}
    assert {"weight", "bias", "LayerNorm", "word_embeddings"} <= kinds  # several tensors, several module kinds
    assert sum(i.numel() for i in chosen.values()) >= 1500  # ties at the threshold may add entries


def test_a_failing_procedure_leaves_the_model_bit_identical(tiny_bert):
    tiny_bert.requires_grad_(False)
    before = snapshot(tiny_bert)
    with pytest.raises(Exception):
        ak.attach(tiny_bert, DiffConfig(target_modules=DIFF_TARGETS, steps=5), "diff", calibration=_batches(1) + [{"bad": 1}])
    assert_unchanged(tiny_bert, before)


@pytest.fixture
def diffed(tiny_bert):
    ak.attach(tiny_bert, DiffConfig(target_modules=DIFF_TARGETS), "diff", calibration=_batches())
    return tiny_bert


def test_the_diff_trains_only_its_entries_and_fuses_exactly_over_many_cycles(diffed):
    model, batches = diffed, _batches()
    base = {k: v.clone() for k, v in model.state_dict().items() if "adapters" not in k}
    optimizer = torch.optim.Adam(ak.adapter_parameters(model, "diff"), lr=1e-2)
    model.train()
    losses = []
    for step in range(12):
        optimizer.zero_grad()
        loss = model(**batches[step % 3]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    x = batches[0]["input_ids"]
    unfused = model(input_ids=x).logits
    # unfused forward == the module run on base + Δ computed by hand
    for (path, tensor), idx in _chosen(model, "diff").items():
        values = ak.core.state.get_state(model).wrappers[path].adapters["diff"].part(tensor).values
        assert values.abs().sum() > 0
    for cycle in range(50):
        ak.fuse(model)
        fused_logits = model(input_ids=x).logits
        assert torch.equal(fused_logits, unfused)
        for (path, tensor), idx in _chosen(model, "diff").items():
            wrapper = ak.core.state.get_state(model).wrappers[path]
            fused = wrapper.base_layer.get_parameter(tensor).detach().reshape(-1)
            original = base[f"{path}.base_layer.{tensor}"].reshape(-1)
            outside = torch.ones_like(fused, dtype=torch.bool)
            outside[idx] = False
            assert torch.equal(fused[outside], original[outside])
            assert torch.equal(fused[idx], original[idx] + wrapper.adapters["diff"].part(tensor).values.detach())
        ak.unfuse(model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    assert torch.equal(model(input_ids=x).logits, unfused)


def test_the_diff_saves_and_loads_per_tensor(diffed, tiny_bert_fresh, tmp_path):
    with torch.no_grad():
        for p in ak.adapter_parameters(diffed, "diff"):
            p.normal_()
    x = _batches(1)[0]["input_ids"]
    expected = diffed(input_ids=x).logits
    ak.save(diffed, tmp_path / "diff", "diff")
    name = ak.load(tiny_bert_fresh, tmp_path / "diff")
    assert name == "diff" and torch.equal(tiny_bert_fresh(input_ids=x).logits, expected)
    assert _chosen(tiny_bert_fresh, "diff").keys() == _chosen(diffed, "diff").keys()
    ak.fuse(tiny_bert_fresh)
    assert torch.equal(tiny_bert_fresh(input_ids=x).logits, expected)
    # a changed LayerNorm (not a .weight of a linear layer) is seen by the fingerprint
    ak.detach(tiny_bert_fresh, "diff")
    with torch.no_grad():
        tiny_bert_fresh.bert.embeddings.LayerNorm.bias.add_(0.5)
    with pytest.raises(ak.FingerprintMismatchError):
        ak.load(tiny_bert_fresh, tmp_path / "diff")


@pytest.fixture
def tiny_bert_fresh():
    from transformers import BertForSequenceClassification
    from conftest import tiny_bert_config

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


# -- a learnable prompt on a causal LM ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PromptConfig(ak.AdapterConfig):
    """``n_tokens`` virtual tokens prepended to the input embeddings (prompt tuning)."""

    requires_targets = False
    n_tokens: int = 4


class PromptLayer(ak.ModelLayer):
    def __init__(self, name: str, model: nn.Module, n_tokens: int) -> None:
        super().__init__(name)
        table = model.get_input_embeddings().weight
        rows = torch.arange(n_tokens) % table.shape[0]
        self.prompt = nn.Parameter(table.detach()[rows].clone().float())  # init from real token embeddings

    def before(self, model, args, kwargs, scale):
        kwargs = dict(kwargs)
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None and args:
            input_ids, args = args[0], args[1:]
        embeds = model.get_input_embeddings()(input_ids)
        batch, k = embeds.shape[0], self.prompt.shape[0]
        kwargs["inputs_embeds"] = torch.cat([self.prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
        if kwargs.get("attention_mask") is not None:
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, k), mask], dim=1)
        if kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, k), -100), labels], dim=1)
        if kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"]
            kwargs["position_ids"] = torch.cat([torch.arange(k).expand(batch, -1), positions + k], dim=1)
        return args, kwargs


@ak.register_method
class PromptMethod(ak.AdapterMethod):
    name = "test-prompt"
    config_class = PromptConfig

    def select(self, model, config):
        return [""], list(config.modules_to_save or ())

    def supports(self, module: nn.Module) -> bool:
        return callable(getattr(module, "get_input_embeddings", None))

    def create_layer(self, config, adapter_name, module_name, module, context=None):
        return PromptLayer(adapter_name, module, config.n_tokens)


def _lm_batch() -> dict:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (2, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_a_prompt_extends_inputs_mask_and_labels_and_equals_the_hand_built_input(tiny_llama):
    batch = _lm_batch()
    base_logits = tiny_llama(**batch).logits
    ak.attach(tiny_llama, PromptConfig(n_tokens=4), "prompt")
    out = tiny_llama(**batch)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] + 4
    prompt = tiny_llama.get_submodule(ModelHost.CHILD).adapters["prompt"].prompt
    ak.activate(tiny_llama, None)
    assert torch.equal(tiny_llama(**batch).logits, base_logits)  # inactive: the plain model
    embeds = tiny_llama.get_input_embeddings()(batch["input_ids"])
    by_hand = tiny_llama(inputs_embeds=torch.cat([prompt.expand(2, -1, -1), embeds], 1),
                         attention_mask=torch.ones(2, 10, dtype=torch.long),
                         labels=torch.cat([torch.full((2, 4), -100), batch["labels"]], 1))
    torch.testing.assert_close(out.logits, by_hand.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, by_hand.loss, rtol=0, atol=0)
    # the loss ignores the virtual positions: it equals the loss over the real tokens alone
    # (the last virtual position predicts the first real token, as in PEFT's prompt tuning)
    shifted = out.logits[:, 3:-1].reshape(-1, out.logits.shape[-1])
    manual = nn.functional.cross_entropy(shifted, batch["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_a_prompt_trains_alone_saves_loads_and_detaches_cleanly(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # a livelier init than the fixture's (std 0.02), so a prompt can steer the output
    tiny_llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)).eval()
    pristine = copy.deepcopy(tiny_llama)
    base_keys = set(tiny_llama.state_dict())
    base = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    batch = _lm_batch()
    batch["labels"] = torch.full_like(batch["labels"], 7)  # a task a prompt can learn: always say token 7
    ak.attach(tiny_llama, PromptConfig(n_tokens=3), "prompt")
    assert [n for n, p in tiny_llama.named_parameters() if p.requires_grad] == [f"{ModelHost.CHILD}.adapters.prompt.prompt"]
    optimizer = torch.optim.Adam(ak.adapter_parameters(tiny_llama, "prompt"), lr=0.5)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = tiny_llama(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert all(torch.equal(tiny_llama.state_dict()[k], v) for k, v in base.items())
    with pytest.raises(ak.NotFusableError):
        ak.fuse(tiny_llama, ["prompt"])
    expected = tiny_llama(**batch).logits
    ak.save(tiny_llama, tmp_path / "prompt", "prompt")
    ak.load(pristine, tmp_path / "prompt")
    assert torch.equal(pristine(**batch).logits, expected)
    ak.detach(tiny_llama, "prompt")
    assert set(tiny_llama.state_dict()) == base_keys and not hasattr(tiny_llama, ModelHost.CHILD)
    assert not tiny_llama._forward_pre_hooks and not tiny_llama._forward_hooks


def test_prompts_and_module_adapters_combine_and_all_linear_ignores_model_level_modules(tiny_llama):
    batch = _lm_batch()
    ak.attach(tiny_llama, PromptConfig(n_tokens=2), "prompt")
    ak.attach(tiny_llama, ak.LoRAConfig(r=2, target_modules="all-linear", init="random"), "lora")
    targets = ak.core.state.get_state(tiny_llama).adapters["lora"].targets
    assert not any(ModelHost.CHILD in t for t in targets) and "lm_head" not in targets
    ak.activate(tiny_llama, ["prompt", "lora"])
    both = tiny_llama(**batch).logits
    ak.fuse(tiny_llama, ["lora"])  # the prompt stays active beside the fused LoRA
    assert ak.active_adapters(tiny_llama) == [("lora", 1.0), ("prompt", 1.0)]
    torch.testing.assert_close(tiny_llama(**batch).logits, both, rtol=1e-5, atol=1e-5)


# -- a head beside the frozen model ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeadConfig(ak.AdapterConfig):
    requires_targets = False
    outputs: int = 1


class HeadLayer(ak.ModelLayer):
    """Scores a batch from the model's last hidden state; applications call :meth:`score`."""

    def __init__(self, name: str, hidden: int, outputs: int) -> None:
        super().__init__(name)
        self.head = nn.Sequential(nn.Linear(hidden, 8), nn.Tanh(), nn.Linear(8, outputs))

    def score(self, model: nn.Module, batch: dict) -> Tensor:
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        return self.head(hidden[:, -1])


@ak.register_method
class HeadMethod(ak.AdapterMethod):
    name = "test-head"
    config_class = HeadConfig

    def select(self, model, config):
        return [""], []

    def supports(self, module: nn.Module) -> bool:
        return hasattr(module, "config")

    def create_layer(self, config, adapter_name, module_name, module, context=None):
        return HeadLayer(adapter_name, module.config.hidden_size, config.outputs)


def test_a_head_beside_the_frozen_model_trains_and_round_trips(tiny_llama, tmp_path):
    pristine = copy.deepcopy(tiny_llama)
    batch = {"input_ids": _lm_batch()["input_ids"]}
    ak.attach(tiny_llama, HeadConfig(outputs=2), "head")
    layer = tiny_llama.get_submodule(ModelHost.CHILD).adapters["head"]
    target = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    optimizer = torch.optim.Adam(ak.adapter_parameters(tiny_llama, "head"), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(layer.score(tiny_llama, batch), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    assert all(p.grad is None for n, p in tiny_llama.named_parameters() if ModelHost.CHILD not in n)
    ak.save(tiny_llama, tmp_path / "head", "head")
    ak.load(pristine, tmp_path / "head")
    loaded = pristine.get_submodule(ModelHost.CHILD).adapters["head"]
    assert torch.equal(loaded.score(pristine, batch), layer.score(tiny_llama, batch))

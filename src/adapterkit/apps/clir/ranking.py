"""The ranking module, trained on English relevance data with the English language module active.

Kinds: ``adapter`` (a Pfeiffer ranking adapter trained as ``Stack(lang_en, rank)`` with ``lang_en``
frozen), ``sft`` (a ranking LT-SFT trained on top of the English language SFT, K matched to the
ranking adapter's size), ``lora`` (a LoRA ranking module on the plain cross-encoder), and ``full``
(full fine-tuning of the cross-encoder — every decoder weight and norm plus the head; the 262k token
embeddings stay frozen — the zero-shot baseline). Every ranking module carries the scoring head
(``modules_to_save=["head"]``). Training data: one relevant document and ``negatives`` first-stage
negatives per query, scored listwise (softmax cross-entropy over the group) or pointwise (BCE).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import api
from ...core.composition import Stack
from ...errors import ConfigError, CorruptFileError
from ...io import artefact
from ...io.safefiles import read_tensors, write_tensors
from ...methods.bottleneck import BottleneckConfig
from ...methods.lora import LoRAConfig
from ...train.loop import train as train_loop
from .modules import (ADAPTER_TARGETS, LINEAR_TARGETS, Backbone, ModuleRecord, Trained, adapter_size, sft_config,
                      train_adapter, train_sft)
from .reranker import CrossEncoder, PairEncoder, PairFormat, cross_encoder

KINDS = ("sft", "adapter", "lora", "full")
LOSSES = ("listwise", "pointwise")
FULL_FILE = "full.safetensors"
RANK = "rank"
LANG_EN = "lang_en"
DEFAULT_LR = {"adapter": 1e-3, "lora": 1e-3, "sft": 1e-4, "full": 3e-5}


@dataclasses.dataclass(frozen=True)
class RankingExample:
    """A query, its relevant document and first-stage negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RankingOptions:
    """How a ranking module is trained.

    Attributes:
        kind: ``"sft"``, ``"adapter"``, ``"lora"`` or ``"full"``.
        steps: optimizer steps (LT-SFT: per phase).
        queries_per_batch, negatives: a step scores ``queries_per_batch * (1 + negatives)`` pairs.
        reduction_factor: the ranking adapter's; the ranking SFT's K is that adapter's size.
        lora_rank: rank of the LoRA ranking module (over every decoder linear layer).
        loss: ``"listwise"`` (CE over each query's group) or ``"pointwise"`` (BCE).
        lr: learning rate (None: :data:`DEFAULT_LR` of the kind).
        max_query_tokens, max_doc_tokens: truncation of the two texts.
        seed: data order and negatives.
    """

    kind: str = "adapter"
    steps: int = 60
    queries_per_batch: int = 2
    negatives: int = 3
    reduction_factor: int = 8
    lora_rank: int = 8
    loss: str = "listwise"
    lr: float | None = None
    max_query_tokens: int = 32
    max_doc_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"ranking module kind must be one of {KINDS}, got {self.kind!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("steps", "queries_per_batch", "lora_rank", "max_query_tokens", "max_doc_tokens", "reduction_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.negatives, int) or self.negatives < (1 if self.loss == "listwise" else 0):
            raise ConfigError(f"negatives must be an integer >= 1 for the listwise loss, got {self.negatives!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]

    @property
    def pair_format(self) -> PairFormat:
        return PairFormat(max_query_tokens=self.max_query_tokens, max_doc_tokens=self.max_doc_tokens)


class RankingBatches:
    """``steps`` batches of ``queries_per_batch`` groups (positive first, then ``negatives``);
    examples are visited in a seeded order and reused when there are fewer than needed."""

    def __init__(self, encoder: PairEncoder, examples: Sequence[RankingExample], queries_per_batch: int,
                 negatives: int, steps: int, seed: int = 0) -> None:
        usable = [e for e in examples if len(e.negatives) >= negatives]
        if not usable:
            raise ConfigError(f"no training query has {negatives} negatives")
        self.encoder = encoder
        self.examples = usable
        self.queries_per_batch = queries_per_batch
        self.negatives = negatives
        self.steps = steps
        self.order = list(range(len(usable)))
        random.Random(seed).shuffle(self.order)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        group = 1 + self.negatives
        for step in range(self.steps):
            chosen = [self.examples[self.order[(step * self.queries_per_batch + j) % len(self.order)]]
                      for j in range(self.queries_per_batch)]
            queries = [e.query for e in chosen for _ in range(group)]
            docs = [d for e in chosen for d in (e.positive, *e.negatives[:self.negatives])]
            pairs = self.encoder.encode(queries, docs)
            labels = torch.tensor([1.0 if i % group == 0 else 0.0 for i in range(len(docs))])
            yield {**pairs.inputs(), "labels": labels, "group": torch.tensor(group)}


def listwise_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Softmax cross-entropy of each group's scores with the positive (first) as the target."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    groups = scores.view(-1, int(batch["group"]))
    return F.cross_entropy(groups, torch.zeros(groups.shape[0], dtype=torch.long, device=groups.device))


def pointwise_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Binary cross-entropy of every pair's score against its 0/1 label."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    return F.binary_cross_entropy_with_logits(scores, batch["labels"].to(scores.dtype))


def ranking_budget(backbone: Backbone, reduction_factor: int) -> int:
    """K of a ranking SFT: the size of the ranking adapter (the head travels separately)."""
    return adapter_size(backbone.hidden, backbone.layers, reduction_factor)


def full_parameters(model: CrossEncoder) -> dict[str, nn.Parameter]:
    """What full fine-tuning trains: every parameter except the token embeddings."""
    embeddings = {id(p) for p in model.body.get_input_embeddings().parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in embeddings}


def save_full(model: CrossEncoder, directory: str | Path) -> None:
    """Write what full fine-tuning trained (``full.safetensors``; the embeddings are the base's)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_tensors(out / FULL_FILE, {n: p.detach() for n, p in full_parameters(model).items()},
                  metadata={"format": "adapterkit-clir-full"})


def load_full(model: CrossEncoder, directory: str | Path) -> None:
    """Load a full fine-tuning (the saved tensors replace the cross-encoder's), all checked first."""
    path = Path(directory) / FULL_FILE
    tensors = read_tensors(path)
    own = full_parameters(model)
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors))[:3], sorted(set(tensors) - set(own))[:3]
        raise CorruptFileError(f"{path} does not fit this cross-encoder (missing {missing}, unexpected {extra})")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise CorruptFileError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)


def check_lang_module(kind: str, lang_module: Any) -> None:
    """SFT and adapter ranking modules are trained on top of the English language module; LoRA and
    full fine-tuning without one."""
    needs_lang = kind in ("adapter", "sft")
    if needs_lang and lang_module is None:
        raise ConfigError(f"a {kind} ranking module is trained on top of the English language module; "
                          "give its directory")
    if not needs_lang and lang_module is not None:
        raise ConfigError(f"a {kind} ranking module is trained without a language module")


def train_ranking_module(backbone: Backbone, examples: Sequence[RankingExample], options: RankingOptions,
                         out: str | Path, lang_module: str | Path | None = None) -> ModuleRecord:
    """Train the ranking module of ``options.kind`` on ``examples`` and save it into ``out``.

    ``lang_module``: the English language module (an adapter for ``adapter``, an SFT for ``sft``);
    required for those kinds, refused for ``lora`` and ``full``."""
    check_lang_module(options.kind, lang_module)
    model = cross_encoder(backbone.fresh())
    encoder = PairEncoder(backbone.tokenizer, options.pair_format)
    batches = RankingBatches(encoder, examples, options.queries_per_batch, options.negatives, options.steps,
                             options.seed)
    loss_fn = listwise_loss if options.loss == "listwise" else pointwise_loss
    torch.manual_seed(options.seed)
    lr = options.learning_rate
    if lang_module is not None:
        artefact.load(model, lang_module, LANG_EN)
        _check_kind(model, LANG_EN, options.kind, lang_module)
    if options.kind == "adapter":
        config = BottleneckConfig(target_modules=ADAPTER_TARGETS, reduction_factor=options.reduction_factor,
                                  modules_to_save=["head"])
        trained = train_adapter(model, config, RANK, batches, lr, loss_fn, frozen=(LANG_EN,),
                                activation=Stack(LANG_EN, RANK))
    elif options.kind == "sft":
        config = sft_config(ranking_budget(backbone, options.reduction_factor), LINEAR_TARGETS, options.steps, lr,
                            modules_to_save=("head",))
        trained = train_sft(model, config, RANK, batches, lr, loss_fn)
    elif options.kind == "lora":
        config = LoRAConfig(r=options.lora_rank, alpha=2.0 * options.lora_rank, target_modules=LINEAR_TARGETS,
                            modules_to_save=["head"])
        trained = train_adapter(model, config, RANK, batches, lr, loss_fn)
    else:
        trained = _train_full(model, batches, lr, loss_fn)
    if options.kind == "full":
        save_full(model, out)
    else:
        artefact.save(model, out, RANK)
    first, last = trained.summary()
    record = ModuleRecord("ranking", options.kind, "en", RANK, trained.trainable, trained.seconds,
                          trained.steps, first, last, {**dataclasses.asdict(options), "lr": lr,
                                                             "model": backbone.name},
                          on_top_of=None if lang_module is None else str(lang_module))
    record.write(out)
    return record


def _check_kind(model: nn.Module, name: str, kind: str, where: Any) -> None:
    method = api.config_of(model, name).method
    wanted = "bottleneck" if kind == "adapter" else "sft"
    if method != wanted:
        raise ConfigError(f"{where} holds a {method} module; a {kind} ranking module needs a {wanted} language module")


def _train_full(model: CrossEncoder, batches: RankingBatches, lr: float, loss_fn: Any) -> Trained:
    for param in model.parameters():
        param.requires_grad_(False)
    params = full_parameters(model)
    for param in params.values():
        param.requires_grad_(True)
    start = time.perf_counter()
    losses = train_loop(model, batches, lr=lr, loss_fn=loss_fn)
    return Trained(losses, time.perf_counter() - start, sum(p.numel() for p in params.values()))

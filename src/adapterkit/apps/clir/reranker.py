"""The two models built over one decoder stack: a shortlist causal LM (language modules) and a
pointwise cross-encoder (ranking modules).

Both expose the decoder stack as ``.body``, so every adapter path (``body.layers.3.mlp.down_proj``)
is the same in both and a language module trained on :class:`LanguageModel` loads into
:class:`CrossEncoder` unchanged. Neither runs the 262k-vocabulary LM head:

* :class:`CrossEncoder` scores ``[bos] query separator document [eos]`` (right padding) with a
  scalar ``head`` on the hidden state of the last non-pad token. The head travels with each ranking
  module (``modules_to_save=["head"]``); it is initialised from a fixed seed so every fresh
  cross-encoder has the same base head (adapter fingerprints match).
* :class:`LanguageModel` computes next-token cross-entropy over a *shortlist* of the vocabulary
  (the ids that occur in the language's text, most frequent first): the logits are the hidden states
  times those rows of the frozen output embedding, and a target outside the shortlist is ignored.
  This approximates the full softmax (it leaves out the other ~246k ids from the normaliser) and costs
  a sixteenth of it; with a shortlist holding every target it equals the full-softmax CE restricted
  to the shortlist's columns.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError

HEAD_SEED = 0
IGNORE = -100


def body_of(lm: nn.Module) -> nn.Module:
    """The decoder stack of a ``*ForCausalLM`` (``lm.model``), without its LM head."""
    body = getattr(lm, "model", None)
    if not isinstance(body, nn.Module) or not hasattr(body, "layers"):
        raise ConfigError(f"{type(lm).__name__} has no decoder stack at .model; give a *ForCausalLM model")
    return body


def hidden_size(body: nn.Module) -> int:
    """Width of the decoder's hidden states."""
    return int(body.config.hidden_size)


def new_head(width: int) -> nn.Linear:
    """A ``width → 1`` scoring head, the same for every call (seeded; the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        return nn.Linear(width, 1)


def last_token_states(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The hidden state of each row's last non-pad token (right padding)."""
    last = attention_mask.long().sum(1) - 1
    if bool((last < 0).any()):
        raise ConfigError("a sequence in the batch has no tokens (its attention mask is all zero)")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class CrossEncoder(nn.Module):
    """``score = head(h_last)`` over the decoder stack ``body``; ``forward`` returns
    ``{"logits": scores (B,), "loss"}`` (pointwise BCE against ``labels`` when given)."""

    def __init__(self, body: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.head = head if head is not None else new_head(hidden_size(body))

    @property
    def config(self) -> Any:
        return self.body.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None,
                **_: Any) -> dict[str, Tensor]:
        """Scores of right-padded pairs (:class:`PairEncoder`); extra batch keys are ignored."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        scores = self.head(last_token_states(hidden, attention_mask)).squeeze(-1)
        out = {"logits": scores}
        if labels is not None:
            out["loss"] = F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype))
        return out


@dataclasses.dataclass(frozen=True)
class Shortlist:
    """Vocabulary ids the LM loss normalises over (sorted)."""

    ids: tuple[int, ...]

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Iterable[str], size: int) -> "Shortlist":
        """The ``size`` most frequent token ids of ``texts`` (ties: lower id first), plus EOS."""
        if not isinstance(size, int) or size < 2:
            raise ConfigError(f"shortlist size must be an integer >= 2, got {size!r}")
        counts: Counter[int] = Counter()
        for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            counts.update(ids)
        if not counts:
            raise ConfigError("no text to build the vocabulary shortlist from")
        chosen = {i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size - 1]}
        if tokenizer.eos_token_id is not None:
            chosen.add(int(tokenizer.eos_token_id))
        return cls(tuple(sorted(chosen)))

    def __len__(self) -> int:
        return len(self.ids)


class LanguageModel(nn.Module):
    """Causal LM over ``body`` with a shortlist softmax (see the module docstring).

    ``output_weight`` is the LM head's weight (Gemma: the tied input embedding); its shortlist rows
    are copied once into a non-persistent buffer, so they are frozen and never saved with a module.
    """

    def __init__(self, body: nn.Module, output_weight: Tensor, shortlist: Shortlist,
                 softcap: float | None = None) -> None:
        super().__init__()
        vocab = output_weight.shape[0]
        ids = torch.tensor(shortlist.ids, dtype=torch.long)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ConfigError(f"shortlist ids must lie in [0, {vocab}); got {len(shortlist)} ids")
        self.body = body
        self.softcap = softcap
        position = torch.full((vocab,), IGNORE, dtype=torch.long)
        position[ids] = torch.arange(ids.numel())
        self.register_buffer("rows", output_weight.detach()[ids].clone(), persistent=False)
        self.register_buffer("position", position, persistent=False)

    @property
    def config(self) -> Any:
        return self.body.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                **_: Any) -> dict[str, Tensor]:
        """``labels`` are token ids aligned with ``input_ids`` (HF convention: shifted here);
        ``-100``, padding and ids outside the shortlist are ignored."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = hidden @ self.rows.to(hidden.dtype).T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = shortlist_loss(logits, self.targets(labels, attention_mask))
        return out

    def targets(self, labels: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Next-token targets as shortlist positions (``-100`` where ignored), shape of ``labels``."""
        nxt = labels[:, 1:]
        if attention_mask is not None:
            nxt = nxt.masked_fill(attention_mask[:, 1:] == 0, IGNORE)
        valid = nxt >= 0
        mapped = self.position[nxt.clamp_min(0)].masked_fill(~valid, IGNORE)
        return F.pad(mapped, (0, 1), value=IGNORE)


def shortlist_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean CE over the positions with a target; 0 (with a gradient) when there is none."""
    flat = targets.reshape(-1)
    if not bool((flat != IGNORE).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE)


def language_model(lm: nn.Module, shortlist: Shortlist) -> LanguageModel:
    """The shortlist LM over ``lm``'s decoder stack and output embedding."""
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    return LanguageModel(body_of(lm), head.weight, shortlist, softcap)


def cross_encoder(lm: nn.Module) -> CrossEncoder:
    """The cross-encoder over ``lm``'s decoder stack (the LM head is not used)."""
    return CrossEncoder(body_of(lm))


@dataclasses.dataclass(frozen=True)
class PairFormat:
    """How a query and a document become one sequence: ``[bos] q separator d [eos]``."""

    separator: str = "\nDocument: "
    max_query_tokens: int = 32
    max_doc_tokens: int = 64


@dataclasses.dataclass
class EncodedPairs:
    """Right-padded token ids of query-document pairs and which tokens are the document's.

    ``doc_mask`` is True on the document's own tokens only: the final end-of-sequence token, whose
    state the head scores, stays on the query side with the other special tokens. That is the
    paper's routing of the pooled token (monoBERT pools ``[CLS]``, segment 0, so under
    ``Split(qlang, dlang)`` the scored state is computed by the query-language side); padding is
    never scored.
    """

    input_ids: Tensor
    attention_mask: Tensor
    doc_mask: Tensor

    def inputs(self) -> dict[str, Tensor]:
        """The model's keyword arguments (the document mask is for routing, not the model)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


class PairEncoder:
    """Tokenises query-document pairs for :class:`CrossEncoder` (texts cut to their token limits)."""

    def __init__(self, tokenizer: Any, fmt: PairFormat = PairFormat()) -> None:
        self.tokenizer = tokenizer
        self.format = fmt
        self.separator = self._ids([fmt.separator])[0]
        self.bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
        self.eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode(self, queries: Sequence[str], docs: Sequence[str]) -> EncodedPairs:
        """One right-padded row per (query, document) pair."""
        if len(queries) != len(docs) or not queries:
            raise ConfigError(f"need one query per document and at least one pair, got {len(queries)} and {len(docs)}")
        rows, marks = [], []
        for q, d in zip(self._ids(queries), self._ids(docs)):
            head = self.bos + q[:self.format.max_query_tokens] + self.separator
            doc = d[:self.format.max_doc_tokens]
            rows.append(head + doc + self.eos)
            marks.append([False] * len(head) + [True] * len(doc) + [False] * len(self.eos))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        doc_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, mark) in enumerate(zip(rows, marks)):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            doc_mask[i, :len(row)] = torch.tensor(mark)
        return EncodedPairs(ids, mask, doc_mask)

"""The reranking systems of the evaluation, declared once.

A :class:`System` says which ranking module it uses (``ranker``) and how language modules join it
(``language``); :meth:`System.plan` turns that into the adapters to activate for one language pair:

==============  =====================================  ===========================================
language        LT-SFT (weight deltas add)             bottleneck adapters (modules in sequence)
==============  =====================================  ===========================================
``none``        ``rank``                               ``rank``
``dlang``       ``Add(rank, lang_d)``                  ``Stack(lang_d, rank)``
``qlang``       ``Add(rank, lang_q)``                  ``Stack(lang_q, rank)``
``both``        ``Add(rank, lang_q, lang_d)``          —
``split``       —                                      ``Stack(Split(lang_q, lang_d), rank)``
==============  =====================================  ===========================================

``Split`` routes the document tokens (the routing mask) through ``lang_d`` and the rest of the
sequence through ``lang_q``, including the scored end-of-sequence token (as the paper's pooled
``[CLS]``, segment 0; see :class:`~adapterkit.apps.clir.reranker.EncodedPairs`). When query and document share a language the compositions collapse
(``both``/``split``/``qlang`` equal ``dlang``) and :attr:`Plan.key` is the same, so a monolingual
pair is scored once per distinct composition.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...errors import ConfigError

RANKERS = ("none", "full", "sft", "adapter", "lora")
LANGUAGE = ("none", "dlang", "qlang", "both", "split")
RANK = "rank"


def lang_name(code: str) -> str:
    """Adapter name of a language module inside the cross-encoder."""
    return f"lang_{code}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs for one pair: the adapter names to load, the block to activate, whether the
    document mask routes tokens, and a key equal for plans that compute the same function."""

    ranker: str
    languages: tuple[str, ...]
    block: Any
    routed: bool
    key: str


@dataclasses.dataclass(frozen=True)
class System:
    """One row of the results table."""

    name: str
    ranker: str
    language: str = "none"
    label: str = ""

    def __post_init__(self) -> None:
        if self.ranker not in RANKERS or self.language not in LANGUAGE:
            raise ConfigError(f"system {self.name!r}: ranker must be one of {RANKERS} and language one of {LANGUAGE}")
        allowed = {"sft": ("none", "dlang", "qlang", "both"), "adapter": ("none", "dlang", "qlang", "split")}
        if self.language != "none" and self.language not in allowed.get(self.ranker, ()):
            raise ConfigError(f"system {self.name!r}: a {self.ranker} ranker cannot take language modules as "
                              f"{self.language!r}")

    @property
    def reranks(self) -> bool:
        return self.ranker != "none"

    def plan(self, qlang: str, dlang: str) -> Plan:
        """The adapters and the composition for a query language ``qlang`` and document language ``dlang``."""
        from ...core import composition as blocks

        langs = self._languages(qlang, dlang)
        names = [lang_name(c) for c in langs]
        routed = self.language == "split" and qlang != dlang
        if self.ranker in ("none", "full"):
            return Plan(self.ranker, (), None, False, self.ranker)
        if not names:
            block: Any = RANK
        elif self.ranker == "sft":
            block = blocks.Add(RANK, *names)
        elif routed:
            block = blocks.Stack(blocks.Split(lang_name(qlang), lang_name(dlang), by="mask"), RANK)
        else:
            block = blocks.Stack(names[0], RANK)
        sep = "+".join(langs)
        key = f"{self.ranker}:{'split:' if routed else ''}{sep or 'rank'}"
        return Plan(self.ranker, langs, block, routed, key)

    def _languages(self, qlang: str, dlang: str) -> tuple[str, ...]:
        if self.language == "none":
            return ()
        if self.language == "dlang":
            return (dlang,)
        if self.language == "qlang":
            return (qlang,)
        return (qlang, dlang) if qlang != dlang else (dlang,)


SYSTEMS: tuple[System, ...] = (
    System("first-stage", "none", label="first stage only (USE cross-lingual, BM25 monolingual)"),
    System("full", "full", label="full fine-tuning, zero-shot"),
    System("sft", "sft", label="LT-SFT ranking only"),
    System("sft+dlang", "sft", "dlang", label="LT-SFT ranking + dlang"),
    System("sft+qlang", "sft", "qlang", label="LT-SFT ranking + qlang"),
    System("sft+both", "sft", "both", label="LT-SFT ranking + qlang + dlang (Add)"),
    System("adapter", "adapter", label="adapter ranking only"),
    System("adapter+dlang", "adapter", "dlang", label="adapter ranking + dlang"),
    System("adapter+qlang", "adapter", "qlang", label="adapter ranking + qlang"),
    System("adapter+split", "adapter", "split", label="adapter ranking + Split(qlang, dlang)"),
    System("lora", "lora", label="LoRA ranking only"),
)


def system(name: str) -> System:
    """The system called ``name`` (see :data:`SYSTEMS`)."""
    for entry in SYSTEMS:
        if entry.name == name:
            return entry
    raise ConfigError(f"unknown system {name!r}; known: {', '.join(s.name for s in SYSTEMS)}")

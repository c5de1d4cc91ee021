"""Rerank a first stage's top-k with a composed cross-encoder and score the runs.

A run is ranx's form, ``{query id: {doc id: score}}``. The first stage retrieves ``depth``
documents per query (USE for cross-lingual pairs, BM25 for monolingual ones); a system rescores
its top ``top_k`` and keeps the rest below them in first-stage order, so every system's run holds
the same documents and MAP is comparable across systems.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core import api
from ...errors import ConfigError
from ...io import artefact
from ...zoo.clir import Collection
from .evaluate import ranked_ids
from .first_stage import bm25_run, use_run
from .modules import Backbone
from .ranking import load_full
from .reranker import CrossEncoder, PairEncoder, PairFormat, cross_encoder
from .systems import RANK, Plan, System, lang_name

Run = dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Sizes of an evaluation.

    Attributes:
        queries: queries per pair (a seeded sample of those with a relevant document).
        top_k: first-stage candidates reranked per query.
        depth: first-stage documents per query in every run (those below ``top_k`` keep their order).
        batch_size: query-document pairs per forward.
        max_query_tokens, max_doc_tokens: truncation.
        seed: the query sample.
    """

    queries: int = 40
    top_k: int = 10
    depth: int = 100
    batch_size: int = 16
    max_query_tokens: int = 32
    max_doc_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("queries", "top_k", "depth", "batch_size", "max_query_tokens", "max_doc_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.depth < self.top_k:
            raise ConfigError(f"depth ({self.depth}) must be >= top_k ({self.top_k})")

    @property
    def pair_format(self) -> PairFormat:
        return PairFormat(max_query_tokens=self.max_query_tokens, max_doc_tokens=self.max_doc_tokens)


def select_queries(collection: Collection, count: int, seed: int = 0) -> list[str]:
    """A seeded sample of ``count`` query ids with at least one relevant document (sorted)."""
    judged = sorted(q for q in collection.queries if any(v > 0 for v in collection.qrels.get(q, {}).values()))
    if not judged:
        raise ConfigError(f"collection {collection.pair} has no query with a relevant document")
    if len(judged) > count:
        judged = sorted(random.Random(seed).sample(judged, count))
    return judged


def first_stage_run(collection: Collection, depth: int, qids: Sequence[str]) -> Run:
    """USE (cross-lingual) or BM25 (monolingual) top-``depth`` for the chosen queries."""
    full = use_run(collection, depth) if collection.query_lang != collection.doc_lang else bm25_run(collection, depth)
    return {q: dict(full.get(q, {})) for q in qids}


@dataclasses.dataclass
class ModuleDirs:
    """Where the trained modules of one family live: the ranking module and the language modules
    by language code."""

    ranking: Path | None = None
    languages: dict[str, Path] = dataclasses.field(default_factory=dict)


def build_reranker(backbone: Backbone, plan: Plan, dirs: ModuleDirs) -> CrossEncoder:
    """A fresh cross-encoder with the ranking module and the plan's language modules loaded."""
    if plan.ranker == "none":
        raise ConfigError("the first stage has no reranker")
    if dirs.ranking is None:
        raise ConfigError(f"a {plan.ranker} system needs its ranking module directory")
    missing = [c for c in plan.languages if c not in dirs.languages]
    if missing:
        raise ConfigError(f"this system needs the language modules of {missing}; give their directories")
    model = cross_encoder(backbone.fresh())
    if plan.ranker == "full":
        load_full(model, dirs.ranking)
        return model.eval()
    artefact.load(model, dirs.ranking, RANK)
    for code in plan.languages:
        artefact.load(model, dirs.languages[code], lang_name(code))
    api.activate(model, plan.block if plan.languages else RANK)
    return model.eval()


class RerankerPool:
    """One cross-encoder per ranker kind, reused across systems and pairs: its ranking module is
    loaded once, language modules as plans first need them, and each plan only re-activates.

    LT-SFT compositions are weight deltas only, so they are fused (exactly, and unfused before the
    next plan): a forward then costs what the plain model's does (an unfused Add of three SFTs
    was 1.19x slower on Gemma-3-270M, 16x81 tokens; a fuse or unfuse takes ~0.2 s)."""

    def __init__(self, backbone: Backbone, dirs: Mapping[str, ModuleDirs], fuse_deltas: bool = True) -> None:
        self.backbone = backbone
        self.dirs = dict(dirs)
        self.fuse_deltas = fuse_deltas
        self.models: dict[str, CrossEncoder] = {}

    def model_for(self, plan: Plan) -> CrossEncoder:
        """The ranker's model with exactly the plan's composition in effect."""
        if plan.ranker not in self.dirs:
            raise ConfigError(f"no trained {plan.ranker} modules were given")
        dirs = self.dirs[plan.ranker]
        model = self.models.get(plan.ranker)
        if model is None:
            model = self.models[plan.ranker] = build_reranker(self.backbone, dataclasses.replace(plan, languages=()),
                                                              dirs)
        if plan.ranker == "full":
            return model
        missing = [c for c in plan.languages if c not in dirs.languages]
        if missing:
            raise ConfigError(f"this system needs the language modules of {missing}; give their directories")
        if api.fused_adapters(model):
            api.unfuse(model)
        have = set(api.adapters(model))
        for code in plan.languages:
            if lang_name(code) not in have:
                artefact.load(model, dirs.languages[code], lang_name(code))
        api.activate(model, plan.block)
        if self.fuse_deltas and plan.ranker == "sft":
            api.fuse(model, plan.block)
        return model

    def release(self, ranker: str) -> None:
        """Drop the model of ``ranker`` (its memory) once no plan needs it any more."""
        self.models.pop(ranker, None)


@contextlib.contextmanager
def routed(model: nn.Module, plan: Plan, doc_mask: torch.Tensor) -> Iterator[None]:
    """Route the document tokens (``doc_mask`` True) to the second child of the plan's Split."""
    if not plan.routed:
        yield
        return
    from ...core.activation import routing  # the token-routing context of Split(by="mask")

    with routing(model, doc_mask):
        yield


@torch.no_grad()
def rerank(model: nn.Module, encoder: PairEncoder, collection: Collection, run: Run, plan: Plan, top_k: int,
           batch_size: int, progress: bool = True, desc: str = "rerank") -> Run:
    """``run`` with each query's top ``top_k`` rescored by ``model`` (placed above the rest)."""
    jobs = [(q, d) for q in run for d in ranked_ids(run[q])[:top_k]]
    scores: dict[tuple[str, str], float] = {}
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, leave=False, mininterval=2.0)
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            pairs = encoder.encode([collection.queries[q] for q, _ in chunk], [collection.docs[d] for _, d in chunk])
            with routed(model, plan, pairs.doc_mask):
                logits = model(**pairs.inputs())["logits"]
            scores.update(zip(chunk, logits.float().tolist()))
            bar.update(len(chunk))
    finally:
        bar.close()
    return merge_scores(run, scores, top_k)


def merge_scores(run: Run, scores: Mapping[tuple[str, str], float], top_k: int) -> Run:
    """Reranked top-k first (by the new scores), then the rest in first-stage order."""
    out: Run = {}
    for q, docs in run.items():
        order = ranked_ids(docs)
        top = {d: scores[(q, d)] for d in order[:top_k]}
        floor = min(top.values(), default=0.0)
        rest = {d: floor - 1.0 - i for i, d in enumerate(order[top_k:])}
        out[q] = {**top, **rest}
    return out


def score_system(backbone: Backbone, system: System, collection: Collection, candidates: Run, dirs: ModuleDirs,
                 options: EvalOptions, progress: bool = True) -> Run:
    """The run of ``system`` on ``collection``: ``candidates`` itself for the first stage, else reranked."""
    if not system.reranks:
        return candidates
    plan = system.plan(collection.query_lang, collection.doc_lang)
    model = build_reranker(backbone, plan, dirs)
    encoder = PairEncoder(backbone.tokenizer, options.pair_format)
    return rerank(model, encoder, collection, candidates, plan, options.top_k, options.batch_size, progress,
                  desc=f"{system.name} {collection.pair}")


def active_names(model: nn.Module) -> list[str]:
    """Names of the adapters that run (for checks and reports)."""
    return [name for name, _ in api.active_adapters(model)]

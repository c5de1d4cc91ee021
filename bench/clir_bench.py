"""Zero-shot cross-lingual reranking with language + ranking modules on Gemma-3-270M (issue 11, §3).

The paper's claim (Litschko et al., COLING 2022): composing a ranking module trained on English with
language modules (LT-SFT or bottleneck adapters) transfers zero-shot at least as well as fully
fine-tuning the reranker on English. Measured here on the man-page CLIR collections
(``adapterkit fetch-data clir``): EN→DE/FR/ES/RU with USE as first stage, DE→DE with BM25.

Grid (``adapterkit.apps.clir.systems.SYSTEMS``): first stage only; full fine-tuning (every decoder
weight and norm and the head; the token embeddings stay frozen) zero-shot; LT-SFT ranking only /
+dlang / +qlang / +both (Add); adapter ranking only / +dlang / +qlang / +Split (query tokens through
the query language's adapter, document tokens through the document language's); LoRA ranking only.
Language modules: causal LM on each language's monolingual text with a vocabulary-shortlist
softmax (an approximation; see ``apps/clir/reranker.py``); LT-SFT K = the language adapter's size.

Resumable: every trained module is kept under ``bench/work/clir/`` (``--quick``: ``clir-quick/``)
and reused when its recorded options match; every scored run is cached as JSON there, keyed by the
composition (identical compositions on one pair are scored once) and invalidated when a module it
uses is retrained or the evaluation sizes change. Interrupt and re-run at will.

    .venv/bin/python bench/clir_bench.py --plan-only   # the estimated time of every stage
    .venv/bin/python bench/clir_bench.py               # the grid (plan: ~67 min on 2 idle cores, fp32)
    .venv/bin/python bench/clir_bench.py --quick       # tiny random Gemma3 + real tokenizer/data, ~3 min
    .venv/bin/python bench/clir_bench.py --report-only # re-render .md/.png from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from adapterkit.apps.clir import language, ranking, systems  # noqa: E402
from adapterkit.apps.clir.modules import RECORD_FILE, Backbone, ModuleRecord, directory_bytes  # noqa: E402
from adapterkit.apps.clir.pipeline import EvalOptions, ModuleDirs, PairEncoder, RerankerPool, rerank  # noqa: E402

import clir_report as R  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS_LANG = ("sft", "adapter")
KINDS_RANK = ("full", "sft", "adapter", "lora")
TINY = "tiny-random-gemma3"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every size of the run (flags of the same names)."""

    model: str = "gemma3"
    pairs: tuple[str, ...] = ("en-de", "en-fr", "en-es", "en-ru", "de-de")
    queries: int = 32
    top_k: int = 10
    depth: int = 100
    eval_batch: int = 16
    max_query_tokens: int = 32
    max_doc_tokens: int = 64
    lang_steps: int = 20
    lang_batch: int = 8
    lang_tokens: int = 64
    lang_rf: int = 2
    shortlist: int = 16384
    max_texts: int = 20000
    rank_steps: int = 50
    rank_queries: int = 2
    negatives: int = 3
    rank_rf: int = 8
    lora_rank: int = 8
    train_queries: int = 2000
    seed: int = 0

    @property
    def languages(self) -> tuple[str, ...]:
        """en (the ranking module's) and every query/document language of the pairs."""
        codes = ["en"] + [c for p in self.pairs for c in p.split("-")]
        return tuple(dict.fromkeys(codes))

    def language_options(self, kind: str) -> language.LanguageOptions:
        return language.LanguageOptions(kind=kind, steps=self.lang_steps, batch_size=self.lang_batch,
                                        max_tokens=self.lang_tokens, reduction_factor=self.lang_rf,
                                        shortlist_size=self.shortlist, max_texts=self.max_texts, seed=self.seed)

    def ranking_options(self, kind: str) -> ranking.RankingOptions:
        return ranking.RankingOptions(kind=kind, steps=self.rank_steps, queries_per_batch=self.rank_queries,
                                      negatives=self.negatives, reduction_factor=self.rank_rf,
                                      lora_rank=self.lora_rank, max_query_tokens=self.max_query_tokens,
                                      max_doc_tokens=self.max_doc_tokens, seed=self.seed)

    def eval_options(self) -> EvalOptions:
        return EvalOptions(queries=self.queries, top_k=self.top_k, depth=self.depth, batch_size=self.eval_batch,
                           max_query_tokens=self.max_query_tokens, max_doc_tokens=self.max_doc_tokens, seed=self.seed)


QUICK = dict(model="tiny", pairs=("en-de", "de-de"), queries=6, top_k=3, depth=20, eval_batch=8, max_doc_tokens=24,
             lang_steps=2, lang_batch=2, lang_tokens=32, shortlist=2048, max_texts=400, rank_steps=2, negatives=2,
             train_queries=40)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tiny_backbone() -> Backbone:
    """A random 2-layer Gemma3 with Gemma's real tokenizer and 262k vocabulary (``--quick``)."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from adapterkit.zoo.llm import lm_path

    tokenizer = AutoTokenizer.from_pretrained(str(lm_path("gemma3")))
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    lm = Gemma3ForCausalLM(config).eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return Backbone(TINY, lm, tokenizer)


def options_match(directory: Path, options: Any, model: str) -> bool:
    """A module was trained on ``model`` and its record holds these options (else it is trained again)."""
    if not (directory / RECORD_FILE).is_file():
        return False
    recorded = ModuleRecord.read(directory).options
    return recorded.get("model") == model and all(
        recorded.get(k) == v for k, v in json.loads(json.dumps(dataclasses.asdict(options))).items()
        if k != "lr" or v is not None)


def module_digest(directory: Path) -> str:
    """Changes whenever the module is retrained (its record carries time and losses)."""
    return hashlib.sha256((directory / RECORD_FILE).read_bytes()).hexdigest()[:16]


class Bench:
    def __init__(self, settings: Settings, work: Path) -> None:
        self.s = settings
        self.work = work
        self._backbone: Backbone | None = None

    @property
    def model_name(self) -> str:
        return TINY if self.s.model == "tiny" else self.s.model

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = tiny_backbone() if self.s.model == "tiny" else Backbone.load(self.s.model)
        return self._backbone

    def lang_dir(self, kind: str, code: str) -> Path:
        return self.work / "lang" / f"{kind}-{code}"

    def rank_dir(self, kind: str) -> Path:
        return self.work / "rank" / kind

    # -- training -------------------------------------------------------------------------------
    def language_modules(self) -> None:
        from adapterkit.apps.clir.tasks import language_texts

        for kind in KINDS_LANG:
            for code in self.s.languages:
                out, options = self.lang_dir(kind, code), self.s.language_options(kind)
                if options_match(out, options, self.model_name):
                    continue
                log(f"language module {kind} {code}")
                record = language.train_language_module(self.backbone, code, language_texts(code), options, out)
                log(f"  {record.trainable:,} params, {record.seconds:.0f} s, loss {record.first_loss:.3f} -> "
                    f"{record.last_loss:.3f}")

    def ranking_modules(self) -> None:
        from adapterkit.apps.clir.tasks import ranking_examples

        examples = None
        for kind in KINDS_RANK:
            out, options = self.rank_dir(kind), self.s.ranking_options(kind)
            lang = self.lang_dir(kind, "en") if kind in KINDS_LANG else None
            fresh = lang is None or not (out / RECORD_FILE).is_file() or \
                ModuleRecord.read(out).options.get("on_top_of_digest") == module_digest(lang)
            if options_match(out, options, self.model_name) and fresh:
                continue
            if examples is None:
                examples = ranking_examples(self.s.negatives, self.s.train_queries, self.s.seed)
            log(f"ranking module {kind} on {len(examples)} English queries")
            record = ranking.train_ranking_module(self.backbone, examples, options, out, lang)
            if lang is not None:  # remember which English module it was trained on top of
                record = dataclasses.replace(record, options={**record.options, "on_top_of_digest": module_digest(lang)})
                record.write(out)
            log(f"  {record.trainable:,} params, {record.seconds:.0f} s, loss {record.first_loss:.3f} -> "
                f"{record.last_loss:.3f}")

    # -- scoring ----------------------------------------------------------------------------------
    def dirs(self) -> dict[str, ModuleDirs]:
        out = {"full": ModuleDirs(self.rank_dir("full")), "lora": ModuleDirs(self.rank_dir("lora"))}
        for kind in KINDS_LANG:
            out[kind] = ModuleDirs(self.rank_dir(kind), {c: self.lang_dir(kind, c) for c in self.s.languages})
        return out

    def candidates(self, pair: str) -> tuple[Any, list[str], dict]:
        from adapterkit.apps.clir.tasks import pair_data
        from adapterkit.zoo.clir import load_collection

        path = self.work / "runs" / pair / "first-stage.json"
        options = self.s.eval_options()
        settings = {"queries": options.queries, "depth": options.depth, "seed": options.seed,
                    "collection": _collection_digest(pair)}  # a rebuilt collection invalidates the cache
        cached = _read(path)
        if cached and cached["settings"] == settings:
            return load_collection(pair), cached["qids"], cached["run"]
        start = time.perf_counter()
        data = pair_data(pair, options)
        _write(path, {"settings": settings, "qids": data.qids, "run": data.candidates,
                      "seconds": time.perf_counter() - start})
        return data.collection, data.qids, data.candidates

    def score(self) -> dict[str, dict[str, Any]]:
        """Every system's run on every pair (cached), in ranker order so one model is held at a time."""
        options = self.s.eval_options()
        dirs = self.dirs()
        pool = RerankerPool(self.backbone, dirs)
        encoder = PairEncoder(self.backbone.tokenizer, options.pair_format)
        data = {pair: self.candidates(pair) for pair in self.s.pairs}
        runs: dict[str, dict[str, Any]] = {p: {"first-stage": {"run": data[p][2], "seconds": 0.0}} for p in self.s.pairs}
        for ranker in KINDS_RANK:
            for pair in self.s.pairs:
                collection, qids, candidates = data[pair]
                for system in [s for s in systems.SYSTEMS if s.ranker == ranker]:
                    plan = system.plan(collection.query_lang, collection.doc_lang)
                    used = [dirs[ranker].ranking, *(dirs[ranker].languages[c] for c in plan.languages)]
                    settings = {**dataclasses.asdict(options), "modules": [module_digest(d) for d in used]}
                    path = self.work / "runs" / pair / f"{plan.key.replace(':', '_').replace('+', '-')}.json"
                    cached = _read(path)
                    if not (cached and cached["settings"] == settings):
                        start = time.perf_counter()
                        model = pool.model_for(plan)
                        run = rerank(model, encoder, collection, candidates, plan, options.top_k, options.batch_size,
                                     desc=f"{system.name} {pair}")
                        cached = {"key": plan.key, "settings": settings, "run": run,
                                  "seconds": time.perf_counter() - start}
                        _write(path, cached)
                        log(f"scored {system.name} on {pair} ({plan.key}) in {cached['seconds']:.0f} s")
                    runs[pair][system.name] = {"run": cached["run"], "seconds": cached["seconds"], "key": plan.key}
            pool.release(ranker)
        return runs

    # -- results ---------------------------------------------------------------------------------
    def modules(self) -> dict[str, dict[str, Any]]:
        out = {}
        for kind in KINDS_LANG:
            for code in self.s.languages:
                out[f"lang/{kind}-{code}"] = _module_row(self.lang_dir(kind, code))
        for kind in KINDS_RANK:
            out[f"rank/{kind}"] = _module_row(self.rank_dir(kind))
        return out

    def results(self, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from adapterkit.apps.clir.evaluate import compare
        from adapterkit.apps.clir.tasks import METRICS
        from adapterkit.zoo.clir import load_collection

        table: dict[str, Any] = {}
        for pair, by_system in runs.items():
            collection = load_collection(pair)
            qids = sorted(next(iter(by_system.values()))["run"])
            result = compare({q: collection.qrels[q] for q in qids}, {n: r["run"] for n, r in by_system.items()},
                             METRICS)
            table[pair] = {"queries": result.queries, "systems": {
                row.name: {"means": row.means, "stderrs": row.stderrs,
                           "p_vs_full": row.p_values.get("full"), "beats_full": {m: "full" in row.beats[m] for m in METRICS},
                           "loses_to_full": {m: row.name in result.system("full").beats[m] for m in METRICS}
                           if "full" in by_system else None,
                           "seconds": by_system[row.name]["seconds"], "key": by_system[row.name].get("key")}
                for row in result.systems}}
        return table


def _module_row(directory: Path) -> dict[str, Any]:
    record = ModuleRecord.read(directory)
    return {**dataclasses.asdict(record), "bytes": directory_bytes(directory)}


def _collection_digest(pair: str) -> str:
    import hashlib

    from adapterkit.zoo.data import cache_dir

    return hashlib.sha256((cache_dir() / "clir" / "pairs" / f"{pair}.json").read_bytes()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:  # a run interrupted while writing: score it again
        return None


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def parse(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (results in bench/results/tmp)")
    parser.add_argument("--plan-only", action="store_true", help="print the estimated time of each stage and stop")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from the JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--calibrate", action="store_true",
                        help="scale the time plan by this machine's speed (one 8x64 forward of the model)")
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "pairs":
            parser.add_argument(flag, type=lambda t: tuple(x for x in t.split(",") if x), default=None,
                                help=f"comma-separated pairs (default: {','.join(field.default)})")
        else:
            parser.add_argument(flag, type=type(field.default), default=None, help=f"default: {field.default}")
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None}
    return args, Settings(**{**(QUICK if args.quick else {}), **given})


def main(argv: list[str]) -> int:
    args, settings = parse(argv)
    stem = "clir_bench"
    if args.report_only:
        R.render(stem, args.quick)
        return 0
    torch.set_num_threads(args.threads)
    bench = Bench(settings, ROOT / "bench" / "work" / ("clir-quick" if args.quick else "clir"))
    scale = R.calibrate(bench.backbone) if args.calibrate and settings.model != "tiny" else 1.0
    plan = R.estimate(settings, scale)
    print(R.plan_table(plan, settings))
    if args.plan_only:
        return 0
    started = time.perf_counter()
    log("stage 1/3: language modules")
    bench.language_modules()
    log("stage 2/3: ranking modules")
    bench.ranking_modules()
    log("stage 3/3: rerank and score")
    runs = bench.score()
    report = {"meta": R.metadata(["bench/clir_bench.py", *argv], bench.model_name), "settings":
              dataclasses.asdict(settings), "plan": plan, "modules": bench.modules(), "pairs": bench.results(runs),
              "wall_seconds_this_run": time.perf_counter() - started}
    R.write(report, stem, args.quick)
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

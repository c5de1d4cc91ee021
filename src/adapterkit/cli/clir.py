"""``adapterkit clir``: train language and ranking modules on Gemma-3-270M and evaluate the modular
zero-shot cross-lingual reranking pipeline; ``adapterkit fetch-data clir`` builds the data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..apps.clir import language, ranking, systems
from ..apps.clir.modules import Backbone, ModuleRecord, directory_bytes
from ..apps.clir.pipeline import EvalOptions, ModuleDirs, score_system
from ..errors import ConfigError

LANGS = ("en", "de", "fr", "es", "ru")


def register(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``clir`` and its subcommands to the top-level parser (``command`` makes a subparser)."""
    clir = command("clir", _no_subcommand, help="cross-lingual reranking with language + ranking modules (Gemma-3-270M)")
    nested = clir.add_subparsers(dest="clir_command", required=True)
    formatter = clir.formatter_class

    def sub_command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = nested.add_parser(name, help=help, formatter_class=formatter, allow_abbrev=False)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="re-raise errors with their traceback")
        p.add_argument("--model", default="gemma3", help="gemma3, smollm2 or a local causal-LM directory")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.set_defaults(run=run)
        return p

    defaults = language.LanguageOptions()
    p = sub_command("train-language", train_language, "train a language module (causal LM on monolingual text)")
    p.add_argument("--lang", required=True, choices=LANGS, help="language of the module")
    p.add_argument("--kind", required=True, choices=language.KINDS, help="LT-SFT or bottleneck adapter")
    p.add_argument("--out", required=True, help="module directory to write")
    p.add_argument("--steps", type=int, default=defaults.steps, help="LT-SFT steps per phase (an adapter trains twice as many)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="packed sequences per step")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="tokens per packed sequence")
    p.add_argument("--reduction-factor", type=int, default=defaults.reduction_factor,
                   help="adapter bottleneck = hidden // rf; the SFT's K equals that adapter's size")
    p.add_argument("--shortlist-size", type=int, default=defaults.shortlist_size,
                   help="vocabulary ids in the LM softmax (most frequent in the text; an approximation)")
    p.add_argument("--max-texts", type=int, default=defaults.max_texts, help="texts used (seeded sample)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-4 SFT, 1e-3 adapter)")
    p.add_argument("--seed", type=int, default=0, help="data order")

    rdefaults = ranking.RankingOptions()
    p = sub_command("train-ranking", train_ranking, "train a ranking module on English (with the English language module)")
    p.add_argument("--kind", required=True, choices=ranking.KINDS,
                   help="sft / adapter (on top of --lang-module), lora, or full fine-tuning (embeddings frozen)")
    p.add_argument("--lang-module", default=None, help="the English language module (sft and adapter kinds)")
    p.add_argument("--out", required=True, help="module directory to write")
    p.add_argument("--steps", type=int, default=rdefaults.steps, help="optimizer steps (LT-SFT: per phase)")
    p.add_argument("--queries-per-batch", type=int, default=rdefaults.queries_per_batch, help="queries per step")
    p.add_argument("--negatives", type=int, default=rdefaults.negatives, help="BM25 negatives per query")
    p.add_argument("--reduction-factor", type=int, default=rdefaults.reduction_factor,
                   help="ranking adapter rf; the ranking SFT's K equals that adapter's size")
    p.add_argument("--lora-rank", type=int, default=rdefaults.lora_rank, help="rank of the LoRA ranking module")
    p.add_argument("--loss", choices=ranking.LOSSES, default=rdefaults.loss, help="listwise CE or pointwise BCE")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in ranking.DEFAULT_LR.items()) + ")")
    p.add_argument("--max-query-tokens", type=int, default=rdefaults.max_query_tokens, help="query truncation")
    p.add_argument("--max-doc-tokens", type=int, default=rdefaults.max_doc_tokens, help="document truncation")
    p.add_argument("--train-queries", type=int, default=None, help="use at most N training queries")
    p.add_argument("--seed", type=int, default=0, help="data order and negatives")

    edefaults = EvalOptions()
    p = sub_command("evaluate", evaluate, "rerank a first stage with a composed system and print MAP/MRR@10/nDCG@10")
    p.add_argument("--pair", required=True, help="en-de, en-fr, en-es, en-ru, de-de, fr-fr, es-es, ru-ru")
    p.add_argument("--system", required=True, choices=[s.name for s in systems.SYSTEMS], help="what reranks")
    p.add_argument("--ranking", default=None, help="ranking module directory (all systems but first-stage)")
    p.add_argument("--qlang", default=None, help="language module of the query language")
    p.add_argument("--dlang", default=None, help="language module of the document language")
    p.add_argument("--queries", type=int, default=edefaults.queries, help="queries (seeded sample)")
    p.add_argument("--top-k", type=int, default=edefaults.top_k, help="first-stage candidates reranked per query")
    p.add_argument("--depth", type=int, default=edefaults.depth, help="first-stage documents per query in the run")
    p.add_argument("--batch-size", type=int, default=edefaults.batch_size, help="pairs per forward")
    p.add_argument("--max-query-tokens", type=int, default=edefaults.max_query_tokens, help="query truncation")
    p.add_argument("--max-doc-tokens", type=int, default=edefaults.max_doc_tokens, help="document truncation")
    p.add_argument("--seed", type=int, default=0, help="query sample")


def _no_subcommand(args: argparse.Namespace) -> int:  # argparse requires the subcommand first
    raise ConfigError("choose a clir subcommand: train-language, train-ranking or evaluate")


def _out(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    return out


def _report(record: ModuleRecord, out: Path) -> None:
    print(f"{record.role} module {record.kind} ({record.lang}): {record.trainable:,} trainable parameters, "
          f"{record.steps} steps in {record.seconds:.0f} s, loss {record.first_loss:.3f} -> {record.last_loss:.3f}; "
          f"{directory_bytes(out) / 2**20:.1f} MiB in {out}")


def train_language(args: argparse.Namespace) -> int:
    """``clir train-language``: one language module on that language's monolingual text."""
    from ..apps.clir.tasks import language_texts

    options = language.LanguageOptions(kind=args.kind, steps=args.steps, batch_size=args.batch_size,
                                       max_tokens=args.max_tokens, reduction_factor=args.reduction_factor,
                                       shortlist_size=args.shortlist_size, max_texts=args.max_texts, lr=args.lr,
                                       seed=args.seed)
    out = _out(args.out)
    texts = language_texts(args.lang)
    backbone = Backbone.load(args.model)
    print(f"training the {args.lang} {args.kind} language module on {min(len(texts), options.max_texts):,} texts "
          f"({backbone.name}; LM loss over a {options.shortlist_size:,}-id vocabulary shortlist)")
    _report(language.train_language_module(backbone, args.lang, texts, options, out), out)
    return 0


def train_ranking(args: argparse.Namespace) -> int:
    """``clir train-ranking``: the ranking module on the English training pages."""
    from ..apps.clir.tasks import ranking_examples

    options = ranking.RankingOptions(kind=args.kind, steps=args.steps, queries_per_batch=args.queries_per_batch,
                                     negatives=args.negatives, reduction_factor=args.reduction_factor,
                                     lora_rank=args.lora_rank, loss=args.loss, lr=args.lr,
                                     max_query_tokens=args.max_query_tokens, max_doc_tokens=args.max_doc_tokens,
                                     seed=args.seed)
    out = _out(args.out)
    ranking.check_lang_module(args.kind, args.lang_module)
    if args.lang_module is not None:
        record = ModuleRecord.read(args.lang_module)
        if record.role != "language" or record.lang != "en" or record.kind != args.kind:
            raise ConfigError(f"--lang-module {args.lang_module} holds the {record.lang} {record.role} module of kind "
                              f"{record.kind}; a {args.kind} ranking module needs the English {args.kind} language module")
    examples = ranking_examples(options.negatives, args.train_queries, args.seed)
    backbone = Backbone.load(args.model)
    print(f"training the {args.kind} ranking module on {len(examples):,} English queries "
          f"(1 relevant + {options.negatives} BM25 negatives each, {options.loss} loss)")
    _report(ranking.train_ranking_module(backbone, examples, options, out, args.lang_module), out)
    return 0


def module_dirs(system: systems.System, qlang: str, dlang: str, ranking_dir: str | None, qdir: str | None,
                ddir: str | None) -> ModuleDirs:
    """The directories a system needs for one pair, checked against their training records."""
    plan = system.plan(qlang, dlang)
    if not system.reranks:
        return ModuleDirs()
    if ranking_dir is None:
        raise ConfigError(f"system {system.name} needs --ranking DIR")
    record = ModuleRecord.read(ranking_dir)
    if record.role != "ranking" or record.kind != system.ranker:
        raise ConfigError(f"--ranking {ranking_dir} holds a {record.role} module of kind {record.kind}; "
                          f"system {system.name} needs the ranking module of kind {system.ranker}")
    dirs = ModuleDirs(Path(ranking_dir))
    for code in plan.languages:
        role = "dlang" if code == dlang else "qlang"
        directory = ddir if code == dlang and ddir is not None else qdir if code == qlang else None
        if directory is None:
            raise ConfigError(f"system {system.name} on {qlang}-{dlang} needs --{role} DIR (the {code} language module)")
        lang = ModuleRecord.read(directory)
        if lang.role != "language" or lang.lang != code or lang.kind != system.ranker:
            raise ConfigError(f"--{role} {directory} holds the {lang.lang} {lang.role} module of kind {lang.kind}; "
                              f"system {system.name} needs the {code} language module of kind {system.ranker}")
        dirs.languages[code] = Path(directory)
    return dirs


def evaluate(args: argparse.Namespace) -> int:
    """``clir evaluate``: one system on one pair, beside the first stage, with a paired t-test."""
    from ..apps.clir.evaluate import compare
    from ..apps.clir.tasks import METRICS, pair_data
    from ..zoo.clir import CLIR_PAIRS

    if args.pair not in CLIR_PAIRS:
        raise ConfigError(f"unknown pair {args.pair!r}; choose from {', '.join(CLIR_PAIRS)}")
    system = systems.system(args.system)
    qlang, _, dlang = args.pair.partition("-")
    options = EvalOptions(queries=args.queries, top_k=args.top_k, depth=args.depth, batch_size=args.batch_size,
                          max_query_tokens=args.max_query_tokens, max_doc_tokens=args.max_doc_tokens, seed=args.seed)
    dirs = module_dirs(system, qlang, dlang, args.ranking, args.qlang, args.dlang)
    data = pair_data(args.pair, options)
    backbone = Backbone.load(args.model) if system.reranks else None
    runs = {"first-stage": data.candidates}
    if system.reranks:
        runs[system.name] = score_system(backbone, system, data.collection, data.candidates, dirs, options)
    print(f"{args.pair}: {len(data.qids)} queries, top-{options.top_k} of a depth-{options.depth} first stage reranked")
    result = compare({q: data.collection.qrels[q] for q in data.qids}, runs, METRICS)
    print(f"{'system':<16}" + "".join(f"{m:>18}" for m in METRICS))
    for row in result.systems:
        print(f"{row.name:<16}" + "".join(f"{row.means[m]:>11.3f} ±{row.stderrs[m]:.3f}" for m in METRICS))
    if system.reranks:
        p = result.system(system.name).p_values["first-stage"]
        print("paired t-test against the first stage: " + ", ".join(f"{m} p={p[m]:.3g}" for m in METRICS))
    return 0


def fetch_data(args: argparse.Namespace) -> int:
    """``fetch-data [vader]``: the VADER sentences; ``fetch-data clir``: the Debian packages,
    unpacked and built into the CLIR collections; ``fetch-data rank``: the photos and cut-outs,
    built into the two image-ordering tasks."""
    if getattr(args, "dataset", "vader") == "rank":
        return fetch_rank()
    if getattr(args, "dataset", "vader") != "clir":
        from .commands import fetch_data as fetch_vader

        return fetch_vader(args)
    from ..zoo.clir import fetch_clir

    print(f"CLIR data ready: {fetch_clir()}")
    return 0


def fetch_rank() -> int:
    """``fetch-data rank``: fetch and curate the photos, then build (or find built) both ranking tasks."""
    from ..zoo.photos import fetch_photos, load_photos
    from ..zoo.rank_tasks import SPLITS, TASKS, rank_task

    root = fetch_photos()
    photos = load_photos(root)
    categories = photos.categories()
    print(f"photos ready: {root} ({len(photos.photos)} reference photos, {len(photos.cutouts)} cut-outs in "
          f"{len(categories)} categories: " + ", ".join(f"{c} {len(v)}" for c, v in categories.items()) + ")")
    for name in TASKS:
        task = rank_task(name, photos=photos)
        sizes = ", ".join(f"{split} {len(task.split(split))}" for split in SPLITS)
        built = json.loads((task.root / "build.json").read_text()).get("seconds", "?")
        print(f"rank task {name} ready: {task.root} ({len(task)} images: {sizes}; built in {built} s)")
        if task.heldout:
            sizes = ", ".join(f"{split} {len(task.split(split, 'heldout'))}" for split in SPLITS)
            print(f"  held-out categories {', '.join(task.heldout)}: {sizes}")
    return 0

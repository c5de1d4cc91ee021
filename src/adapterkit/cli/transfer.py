"""``adapterkit transfer prepare|run``: Trans-LoRA from the command line.

``prepare`` (source model + its adapter + the real data, the only step that sees the data) writes a
bundle beside the adapter; ``run`` (bundle + target model, no data) samples, filters, labels and
distils a fresh adapter of any registered method into ``--out``. A rerun of the same ``run``
command resumes: finished stages are read back from ``OUT/transfer/``. Everything that can be
checked without a model (the bundle, the options, the data, the output directory) is checked first.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from ..apps.transfer import PrepareSettings, SeedPrompt, Transfer, TransferSettings, Verdict, load_bundle, load_source, prepare
from ..apps.transfer.bundle import BUNDLE_FILE
from ..apps.transfer.pipeline import STAGE_DIR, STAGES
from ..core.registry import get_method, registered_methods
from ..errors import ConfigError, DataNotFoundError, MissingFileError
from ..io.safefiles import read_json, write_json
from ..methods.lora import LoRAConfig
from ..zoo.llm import MODELS, load_lm
from ..zoo.lm_tasks import LM_TASKS, LMExample, LMTask, lm_task, read_task_dir
from .causal import _read_pairs, set_lm_train_defaults
from .options import DEST, add_config_options, build_config, nested_commands, parse_targets

COMMAND_FILE = "command.json"  # the options of the run that owns an output directory


def register(sub: Any, command: Callable[..., argparse.ArgumentParser], method: str, selected: dict[str, str]) -> None:
    """Add ``transfer prepare`` and ``transfer run`` (with ``method``'s config options) to the parser."""
    nested = nested_commands(command, "transfer", "Trans-LoRA: move an adapter to another base model without its data",
                             "prepare or run")

    def sub_command(name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = nested(name, run, help)
        p.add_argument("--seed", type=int, default=0, help="seeds, sampling, data order (and the config's seed field)")
        return p

    models = f"{', '.join(sorted(MODELS))} or a local Hugging Face directory"
    p = sub_command("prepare", run_prepare, "write a transfer bundle (seeds, discriminator, source adapter) from the real data")
    p.add_argument("--model", required=True, help=f"the source base model: {models}")
    p.add_argument("--adapter", required=True, help="the source adapter directory (trained on --model)")
    p.add_argument("--data", required=True, help="a zoo task (" + ", ".join(LM_TASKS) + "), a task directory, or a "
                   ".jsonl file of {\"input\", \"target\"} lines (with --descriptor)")
    p.add_argument("--instruction", default=None, help="the task instruction of a .jsonl file (put before each input)")
    p.add_argument("--descriptor", default=None, help="short task name of a .jsonl file for the discriminator's "
                   "question ('... from DESCRIPTOR dataset?')")
    p.add_argument("--out", default=None, help="bundle directory (None: ADAPTER-transfer beside the adapter)")
    p.add_argument("--seeds", type=int, default=PrepareSettings.n_seeds, help="real examples kept in the bundle")
    p.add_argument("--negatives", type=int, default=None, help="source-model inputs the discriminator learns to reject "
                   "(None: as many as there are real inputs)")
    p.add_argument("--disc-epochs", type=int, default=PrepareSettings.epochs, help="discriminator training epochs")
    p.add_argument("--disc-r", type=int, default=8, help="rank of the discriminator LoRA")
    p.add_argument("--disc-targets", type=parse_targets, default="q_proj,v_proj", help="modules of the discriminator LoRA")
    p.add_argument("--disc-lr", type=float, default=None, help="discriminator learning rate (None: LoRA's default)")
    p.add_argument("--batch-size", type=int, default=PrepareSettings.batch_size, help="discriminator examples per step")
    p.add_argument("--max-calls", type=int, default=PrepareSettings.max_calls, help="generator calls for the negatives")

    p = sub_command("run", run_transfer, "distil an adapter of any method into the target model from a bundle (no data)")
    p.add_argument("--bundle", required=True, help="bundle directory written by 'adapterkit transfer prepare'")
    p.add_argument("--target", required=True, help=f"the target base model: {models}")
    p.add_argument("--out", required=True, help="adapter directory to write (stage files in OUT/transfer/)")
    p.add_argument("--source-model", default=None, help="the source base model (None: the one the bundle names)")
    p.add_argument("--teacher-adapter", default=None, help="teacher adapter on the source model for a continued "
                   "transfer (None: the bundle's source adapter)")
    p.add_argument("--method", choices=[m.name for m in registered_methods()], default=method,
                   help="the student's method; its config fields are the options below (shown for the method given)")
    p.add_argument("--name", default=TransferSettings.name, help="adapter name")
    p.add_argument("--size", type=int, default=TransferSettings.target_size, help="synthetic inputs to keep (|D_syn|)")
    p.add_argument("--mode", choices=("sequence", "logits"), default=TransferSettings.mode,
                   help="distil the teacher's answers (any tokenizers) or its logits (one vocabulary)")
    p.add_argument("--epochs", type=int, default=TransferSettings.epochs, help="student training epochs")
    p.add_argument("--lr", type=float, default=None, help="student learning rate (None: the method's default)")
    p.add_argument("--batch-size", type=int, default=TransferSettings.batch_size, help="student examples per step")
    p.add_argument("--max-calls", type=int, default=TransferSettings.max_calls, help="generator calls before sampling gives up")
    p.add_argument("--unfiltered", action="store_true", help="keep every distinct candidate (no discriminator)")
    taken = {"--debug", "-h", "--help", *(s for a in p._actions for s in a.option_strings)}
    p.add_argument("--targets", dest=DEST + "target_modules", type=parse_targets, default=argparse.SUPPRESS,
                   help="alias of --target-modules")
    add_config_options(p, get_method(p.get_default("method")).config_class, selected, taken)
    set_lm_train_defaults(p)


def _positive(**values: int | None) -> None:
    for label, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{label.replace('_', '-')} must be at least 1, got {value}")


def _model_spec(spec: str, option: str) -> str:
    """A zoo LM name as it is, a directory as its absolute path (a bundle may be used from elsewhere)."""
    if spec in MODELS:
        return spec
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise DataNotFoundError(f"{option} {spec}: not a model directory (no config.json); use one of {sorted(MODELS)} "
                                "or a local directory")
    return str(path.resolve())


def _task(args: argparse.Namespace) -> LMTask:
    """The real data of ``prepare`` as a task, read and checked completely."""
    path = Path(args.data)
    if path.is_dir() or args.data in LM_TASKS:
        if args.instruction is not None or args.descriptor is not None:
            raise ConfigError(f"{args.data} is a task with its own instruction and descriptor; those options are for .jsonl files")
        return read_task_dir(path) if path.is_dir() else lm_task(args.data)
    if path.suffix.lower() != ".jsonl":
        raise DataNotFoundError(f"{args.data!r} is neither a .jsonl file, a task directory nor a zoo task ({', '.join(LM_TASKS)})")
    if not path.is_file():
        raise MissingFileError(f"no such file: {path}")
    pairs = _read_pairs(path, None)  # checks every line
    first = json.loads(next(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    if "input" not in first:
        raise ConfigError(f"{path}: a transfer needs {{\"input\", \"target\"}} lines (the instruction apart, "
                          "--instruction), not whole prompts")
    if args.descriptor is None:
        raise ConfigError("--descriptor is needed with a .jsonl file (a short task name, e.g. 'movie review sentiment')")
    train = tuple(LMExample(p.prompt, p.completion) for p in pairs)
    return LMTask(path.stem, args.instruction or "", args.descriptor, train, train[:args.seeds], (), (), str(path))


def run_prepare(args: argparse.Namespace) -> int:
    """Check the adapter, the data and the options, then write the bundle (see the module docstring)."""
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise MissingFileError(f"--adapter {adapter}: not an adapter directory (no adapter_config.json)")
    _positive(seeds=args.seeds, negatives=args.negatives, disc_epochs=args.disc_epochs, disc_r=args.disc_r,
              batch_size=args.batch_size, max_calls=args.max_calls)
    source = _model_spec(args.model, "--model")
    task = _task(args)
    if args.seeds >= len(task.train):
        raise ConfigError(f"--seeds {args.seeds} leaves no other real input for the discriminator ({len(task.train)} in all)")
    SeedPrompt(tuple(e.input for e in task.train[:args.seeds]))  # seeds must be single lines
    Verdict(task.descriptor, task.instruction)
    discriminator = LoRAConfig(r=args.disc_r, target_modules=args.disc_targets, modules_to_save=None)
    out = Path(args.out) if args.out else adapter.resolve().with_name(adapter.resolve().name + "-transfer")
    if out.resolve() == adapter.resolve() or adapter.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} is inside the source adapter directory; choose another")
    if out.exists() and any(out.iterdir()) and not (out / BUNDLE_FILE).is_file():
        raise ConfigError(f"--out {out} holds other files (no {BUNDLE_FILE}); use an empty or new directory")
    settings = PrepareSettings(n_seeds=args.seeds, negatives=args.negatives, epochs=args.disc_epochs, lr=args.disc_lr,
                               batch_size=args.batch_size, max_calls=args.max_calls, seed=args.seed)
    model, tokenizer = load_lm(args.model)
    print(f"preparing a transfer of {adapter} ({task.name}: {len(task.train)} real inputs, {args.seeds} kept as seeds)")
    bundle = prepare(model, tokenizer, adapter, task, out, discriminator, source_model=source, settings=settings)
    if bundle.discriminator_accuracy is None:
        print("discriminator held-out accuracy: not measured (too few inputs to hold any out)")
    else:
        real, negatives = len(task.train), settings.negatives or len(task.train)
        held = f"{int(real * settings.holdout)} real + {int(negatives * settings.holdout)} synthetic"
        print(f"discriminator held-out accuracy {bundle.discriminator_accuracy:.3f} on {held} inputs")
    print(f"bundle written to {out} ({BUNDLE_FILE}, discriminator/, source_adapter/)")
    return 0


def _record(args: argparse.Namespace, bundle_json: bytes, config: Any, settings: TransferSettings) -> dict[str, Any]:
    """What a run's output depends on, as the command gave it (compared before any model loads)."""
    return {"bundle_sha256": hashlib.sha256(bundle_json).hexdigest(), "source_model": args.source_model,
            "teacher_adapter": args.teacher_adapter and str(Path(args.teacher_adapter).resolve()),
            "target": _model_spec(args.target, "--target"), "method": args.method, "config": repr(config),
            "settings": dataclasses.asdict(settings)}


def _check_out(out: Path, record: dict[str, Any]) -> bool:
    """Whether ``out`` is new (or holds no finished stage); refuse one that holds another run's stages."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file")
    if not out.exists() or not any(out.iterdir()):
        return True
    stages = out / STAGE_DIR
    if not stages.is_dir():
        raise ConfigError(f"--out {out} holds other files (no {STAGE_DIR}/ of a transfer); use an empty or new directory")
    if not any((stages / f"{name}.json").is_file() for name in STAGES):
        return True  # no stage finished: a failed run (budget, bad option) may be redone with other options
    if (stages / COMMAND_FILE).is_file():
        before = read_json(stages / COMMAND_FILE)
        changed = [key for key in record if before.get(key) != record[key]]
        if changed:
            what = "; ".join(f"{k}: {before.get(k)!r} there, {record[k]!r} now" for k in changed if k != "settings")
            raise ConfigError(f"--out {out} holds another transfer run (it differs in {', '.join(changed)}"
                              + (f"; {what}" if what else "") + "); use another --out, or rerun its command to resume")
    return False


def run_transfer(args: argparse.Namespace) -> int:
    """Check the bundle, the options and the output directory, load the models, run the stages."""
    bundle = load_bundle(args.bundle)
    config = build_config(get_method(args.method).config_class, args)
    _positive(size=args.size, epochs=args.epochs, batch_size=args.batch_size, max_calls=args.max_calls)
    if args.lr is not None and not args.lr > 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    settings = TransferSettings(target_size=args.size, filtered=not args.unfiltered, max_calls=args.max_calls,
                                mode=args.mode, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                seed=args.seed, name=args.name)
    if not (args.source_model or bundle.source_model):
        raise ConfigError(f"the bundle in {args.bundle} names no source model; give --source-model")
    args.source_model = _model_spec(args.source_model or bundle.source_model, "--source-model")
    if args.teacher_adapter is not None and not (Path(args.teacher_adapter) / "adapter_config.json").is_file():
        raise MissingFileError(f"--teacher-adapter {args.teacher_adapter}: not an adapter directory (no adapter_config.json)")
    out = Path(args.out)
    record = _record(args, (bundle.directory / BUNDLE_FILE).read_bytes(), config, settings)
    fresh = _check_out(out, record)

    source, source_tokenizer = load_lm(args.source_model)
    teacher, discriminator = load_source(bundle, source, source_tokenizer, args.teacher_adapter)
    target, target_tokenizer = load_lm(args.target)
    for name in STAGES:
        path = out / STAGE_DIR / f"{name}.json"
        if path.is_file():
            print(f"resumed: stage {name} already done ({read_json(path).get('seconds', 0.0):.1f} s when it ran)")
    if fresh:
        write_json(out / STAGE_DIR / COMMAND_FILE, record)

    def report(stage: str, seconds: float) -> None:
        line = f"{stage}: {seconds:.1f} s"
        if stage == "sample":
            sampled = read_json(out / STAGE_DIR / "sample.json")
            line += (f"; acceptance rate {sampled['acceptance_rate']:.3f} ({len(sampled['accepted'])} kept of "
                     f"{len(sampled['candidates'])} judged, {sampled['calls']} generator calls)")
        print(line, flush=True)

    outcome = Transfer(bundle, out, settings).run(teacher, discriminator if settings.filtered else None, target,
                                                  target_tokenizer, config, on_stage=report)
    print(f"{args.method} adapter {args.name!r} for {args.target} saved to {outcome.adapter_dir} "
          f"({len(outcome.sample.accepted)} synthetic inputs, final training loss {outcome.losses[-1]:.4f})")
    return 0

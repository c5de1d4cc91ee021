#!/usr/bin/env python
"""SHiRA adapter files: size and load time vs LoRA at equal trainable parameters, and vs peft.

    .venv/bin/python bench/shira_files.py            # full run
    .venv/bin/python bench/shira_files.py --quick    # smoke run (2 × 1024×1024 stack)

Settings: MiniLM-L6 with r=8 on query/value, and the 4 × ``nn.Linear(4096, 4096)`` stack with
r=32 on every layer (SHiRA: ``r · (in + out)`` entries per layer, a rank-r LoRA's count).

Files (``adapter.safetensors`` of ``ak.save``; peft's ``adapter_model.safetensors``):

* adapterkit SHiRA per mask: rand and struct store no indices (seed + sha256, the mask is
  regenerated on load); wm, grad and snip store Rice-coded index gaps. Values are fp32.
* adapterkit SHiRA saved with ``format="peft"`` and peft's own SHiRA file (fp32 values plus
  (2, nnz) int32 rows/cols);
* adapterkit LoRA and peft LoRA (the reference sizes).

Load: warm ``ak.load(model, dir, "a")`` (base-weight fingerprint checked, the default) and
``model.load_adapter(dir, "a")``, the adapter detached/deleted between repeats (untimed), every
variant alternated round by round. Each loaded adapter's dense ΔW is checked against the saved one.

Issue goal: adapterkit SHiRA file ≤ 1.25× the adapterkit LoRA file of the same parameter count.
Writes ``bench/results/shira_files.{json,md}`` (``--quick``: ``shira_files.quick.*``).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from shira_common import (AkVariant, PeftVariant, common_args, count_trainable, dense_deltas, finish, goal, header,
                          linear_stack, ms, ratio, start, table, times, verdict)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _timing import rounds  # noqa: E402
from lora_cases import reload_steps  # noqa: E402
from lora_common import Params, build_base, forward, make_input, metric  # noqa: E402
from lora_libs import Library  # noqa: E402

AK_LORA, PEFT_LORA, PEFT_SHIRA, AK_AS_PEFT = "adapterkit LoRA", "peft LoRA", "peft SHiRA", "adapterkit SHiRA rand, format='peft'"
AK_FROM_PEFT = "ak.load of peft's SHiRA file"
MASKS = ("rand", "struct", "wm", "grad", "snip")
SIZE_GOAL = 1.25


@dataclasses.dataclass
class FilesParams:
    quick: bool = False
    seed: int = 0
    mini_r: int = 8
    mini_alpha: float = 16.0
    stack_width: int = 4096
    stack_layers: int = 4
    stack_r: int = 32
    stack_alpha: float = 64.0
    calibration_batches: int = 2  # grad / snip masks
    value_std: float = 0.01
    load_reps: tuple[int, int] = (10, 1)

    @classmethod
    def quick_params(cls) -> "FilesParams":
        return cls(quick=True, stack_width=1024, stack_layers=2, load_reps=(3, 1))


def ak_label(mask: str) -> str:
    return f"adapterkit SHiRA {mask}"


def setting_parts(setting: str, p: FilesParams) -> tuple[nn.Module, list[dict[str, torch.Tensor]], Any, int, float]:
    """Base model, calibration batches, targets, r and LoRA alpha of a setting."""
    if setting == "minilm":
        base = build_base("minilm", Params(seed=p.seed))
        batches = [make_input("minilm", Params(seed=p.seed + i, mini_batch=8), base) for i in range(p.calibration_batches)]
        return base, batches, ["query", "value"], p.mini_r, p.mini_alpha
    base, _ = linear_stack(p.stack_width, p.stack_layers, p.seed)
    g = torch.Generator().manual_seed(p.seed + 7)
    batches = [{"x": torch.randn(8, p.stack_width, generator=g)} for _ in range(p.calibration_batches)]
    return base, batches, [str(i) for i in range(p.stack_layers)], p.stack_r, p.stack_alpha


def libraries(setting: str, p: FilesParams) -> tuple[nn.Module, dict[str, Library]]:
    """The base model and every variant of a setting (grad/snip masks get calibration batches)."""
    import adapterkit as ak
    import peft

    base, batches, targets, r, alpha = setting_parts(setting, p)
    calibration = {"calibration": batches, "loss_fn": lambda model, batch: forward(model, setting, batch).float().pow(2).mean()}
    libs: dict[str, Library] = {
        AK_LORA: AkVariant(AK_LORA, lambda: ak.LoRAConfig(r=r, alpha=alpha, target_modules=targets, init="random")),
        PEFT_LORA: PeftVariant(PEFT_LORA, lambda: peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                  init_lora_weights=False)),
        PEFT_SHIRA: PeftVariant(PEFT_SHIRA, lambda: peft.ShiraConfig(r=r, target_modules=targets, init_weights=False)),
    }
    for mask in MASKS:
        libs[ak_label(mask)] = AkVariant(ak_label(mask), lambda m=mask: ak.ShiraConfig(r=r, mask=m, target_modules=targets),
                                         p.value_std, **(calibration if mask in ("grad", "snip") else {}))
    return base, libs


def file_layout(path: Path) -> dict[str, Any]:
    """File size and how it splits into values (``values``/``lora_*``/``shira_weight``), other tensors
    (indices, seeds, digests) and the safetensors header."""
    from safetensors import safe_open

    out = {"file": path.name, "bytes": path.stat().st_size, "value_bytes": 0, "index_bytes": 0}
    with safe_open(str(path), "pt") as handle:
        for key in handle.keys():
            t = handle.get_tensor(key)
            kind = "value_bytes" if key.endswith(("values", "shira_weight", ".weight", "lora_A", "lora_B")) else "index_bytes"
            out[kind] += t.numel() * t.element_size()
    out["header_bytes"] = out["bytes"] - out["value_bytes"] - out["index_bytes"]
    return out


def save(model: nn.Module, how: str, directory: Path) -> tuple[Path, Path]:
    """Save adapter "a" with ``how`` ("adapterkit", "adapterkit as peft" or "peft"); returns the
    directory to load from and the weights file."""
    import adapterkit as ak

    if how == "peft":
        model.save_pretrained(str(directory))  # an adapter not named "default" goes to a sub-directory
        return directory / "a", directory / "a" / "adapter_model.safetensors"
    as_peft = how == "adapterkit as peft"
    ak.save(model, directory, "a", format="peft" if as_peft else "adapterkit")
    return directory, directory / ("adapter_model.safetensors" if as_peft else "adapter.safetensors")


def save_all(base: nn.Module, libs: dict[str, Library], tmp: Path) -> tuple[dict[str, Any], dict[str, Path], dict[str, Any]]:
    """Attach every variant as "a" to a fresh copy of the base, save it (adapterkit SHiRA rand also
    in PEFT's format) and keep its dense ΔW for the load check."""
    sizes, dirs, deltas = {}, {}, {}
    for label, lib in libs.items():
        model = lib.attach(copy.deepcopy(base), lib.config(), "a")
        ways = [(label, "adapterkit" if label.startswith("adapterkit") else "peft")]
        ways += [(AK_AS_PEFT, "adapterkit as peft")] if label == ak_label("rand") else []
        for key, how in ways:
            dirs[key], weights = save(model, how, tmp / key.replace(" ", "_").replace("'", ""))
            sizes[key] = {**file_layout(weights), "trainable": count_trainable(model)}
            deltas[key] = dense_deltas(model, "a")
    return sizes, dirs, deltas


def bench_loads(base: nn.Module, libs: dict[str, Library], dirs: dict[str, Path], deltas: dict[str, Any],
                reps: tuple[int, int]) -> tuple[dict[str, Any], dict[str, float]]:
    """Warm loads of every saved file into a model of its library that already holds an adapter
    "b" (adapterkit: SHiRA rand; peft: the same method as the file)."""
    ak_lib = libs[ak_label("rand")]
    ak_model = ak_lib.attach(copy.deepcopy(base), ak_lib.config(), "b")
    peft_models = {label: libs[label].attach(copy.deepcopy(base), libs[label].config(), "b") for label in (PEFT_LORA, PEFT_SHIRA)}
    loads = {label: (ak_lib, ak_model, dirs[label]) for label in dirs if label.startswith("adapterkit")}
    loads[AK_FROM_PEFT] = (ak_lib, ak_model, dirs[PEFT_SHIRA])
    loads.update({label: (libs[label], peft_models[label], dirs[label]) for label in peft_models})
    errors = {}
    for label, (lib, model, directory) in loads.items():  # first load: checked, and leaves "a" for the first unload
        lib.load(model, directory, "a")
        want = deltas[PEFT_SHIRA if label == AK_FROM_PEFT else label]
        errors[label] = max(float((a - b).abs().max()) for a, b in zip(dense_deltas(model, "a"), want))
        assert errors[label] == 0.0, f"{label}: the loaded adapter differs from the saved one ({errors[label]})"
        lib.unload(model, "a") if lib is ak_lib else None
    ak_lib.load(ak_model, dirs[ak_label("rand")], "a")
    samples = rounds({label: reload_steps(lib, model, directory) for label, (lib, model, directory) in loads.items()}, *reps)
    return metric(samples, "load", list(loads), repeats=reps[0], warmup=reps[1]), errors


def run(p: FilesParams, sections: Any, report: dict[str, Any]) -> None:
    for setting in ("minilm", "stack"):
        base, libs = libraries(setting, p)
        with tempfile.TemporaryDirectory(prefix=f"shira_files_{setting}_") as tmp:
            sizes, dirs, deltas = save_all(base, libs, Path(tmp))
            loads, errors = sections.run(f"{setting}: loads", lambda: bench_loads(base, libs, dirs, deltas, p.load_reps))
        report["results"][setting] = {"files": sizes, "load": loads}
        report["sanity"][setting] = {"loaded_delta_max_abs_err": errors}
        lora = sizes[AK_LORA]["bytes"]
        for mask in MASKS:
            report.setdefault("goals", {})[f"{setting}: {ak_label(mask)} file ≤ {SIZE_GOAL}× adapterkit LoRA"] = goal(
                ratio(sizes[ak_label(mask)]["bytes"], lora), SIZE_GOAL, False)


def markdown(report: dict[str, Any]) -> list[str]:
    p = report["meta"]["params"]
    lines = header(report, "SHiRA adapter files: size and load time vs LoRA and peft")
    lines += ["## Goals (file size ratio = SHiRA / adapterkit LoRA)", ""]
    lines += table(["goal", "ratio", "verdict"], [[k, times(g["value"]), verdict(g["met"])] for k, g in report["goals"].items()], "lrl")
    titles = {"minilm": f"MiniLM-L6, r={p['mini_r']} on query/value",
              "stack": f"{p['stack_layers']}× Linear {p['stack_width']}×{p['stack_width']}, r={p['stack_r']} on every layer"}
    for setting, res in report["results"].items():
        files, load = res["files"], res["load"]
        lora = files[AK_LORA]["bytes"]
        rows = []
        for label, f in files.items():
            rows.append([label, f["file"], f"{f['trainable']:,}", f"{f['bytes'] / 1024:.1f}", times(ratio(f["bytes"], lora)),
                         f"{8 * f['index_bytes'] / f['trainable']:.2f}" if f["index_bytes"] else "—",
                         ms(load[label]["median"]) if label in load else "—"])
        rows += [[label, "(peft SHiRA's)", "", "", "", "", ms(m["median"])] for label, m in load.items()
                 if isinstance(m, dict) and label not in files and "median" in m]
        lines += [f"## {titles[setting]}, fp32 values", ""]
        lines += table(["variant", "file", "entries", "size [KiB]", "× adapterkit LoRA", "index bits / entry", "warm load [ms]"], rows,
                       "llrrrrr")
    lines += ["Loaded adapters were checked against the saved ones (dense ΔW, max abs error): "
              + "; ".join(f"{s}: {max(e['loaded_delta_max_abs_err'].values()):.2g}" for s, e in report["sanity"].items()), ""]
    return lines


def main() -> None:
    args = common_args(__doc__).parse_args()
    p = FilesParams.quick_params() if args.quick else FilesParams()
    report, sections = start(args, p, "file sizes from the file system; loads: time.perf_counter around each call, GC off, "
                                      "variants alternated round by round, warm-up rounds dropped, medians")
    run(p, sections, report)
    print(finish(report, sections, args.out_dir, "shira_files", markdown))


if __name__ == "__main__":
    main()

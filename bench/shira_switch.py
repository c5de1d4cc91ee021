#!/usr/bin/env python
"""SHiRA rapid switching: adapterkit side by side with peft (LoRA and SHiRA) and the machine's floor.

    .venv/bin/python bench/shira_switch.py           # full run (4 × Linear 4096×4096, r=32)
    .venv/bin/python bench/shira_switch.py --quick   # smoke run (2 × 1024×1024)

Model: the LoRA benchmark's stack of 4 × ``nn.Linear(4096, 4096, bias=False)``, fp32 (and bf16),
two adapters "a" and "b" on every layer at the LoRA-matched budget r=32 (262,144 entries per layer
for SHiRA; rank 32 for LoRA), all with random non-zero values so that fusing does real work.

Timed, in the same run and alternating round by round (median ms per switch; a → b → a ...):

* adapterkit SHiRA: ``ak.switch(model, name)`` while fused (after the first visit of each
  adapter the originals at its entries come from adapterkit's cache: two scatters per layer);
* adapterkit SHiRA, first visit: the same switch with that cache emptied before each one
  (untimed ``ak.unfuse`` + ``ak.fuse``), so every switch gathers the new adapter's originals;
* adapterkit SHiRA, ``exact=False``: fused without saving originals; a switch subtracts the old
  values and adds the new ones (``index_add_``), the arithmetic of peft's unmerge + merge;
* peft LoRA and peft SHiRA: ``unmerge_adapter(); set_adapter(name); merge_adapter()``;
* adapterkit LoRA: ``ak.switch`` (reference);
* floor: per layer ``index_copy_`` of the saved originals back, ``index_select`` of the originals
  at the new indices and ``index_copy_`` of precomputed new values — the least an exact sparse
  switch must do; "floor + add" also computes the new values (saved + v) at switch time; "floor,
  originals cached" keeps every adapter's originals and new values, so a switch is two ``index_copy_``;
* loading a new adapter "c" straight into the fused weights: ``ak.load(model, dir, "c", fuse=True)``
  vs peft ``load_adapter`` + ``set_adapter`` + ``merge_adapter`` (after ``unmerge_adapter`` when
  "a" is fused).

First visit and ``exact=False`` are the like-for-like comparisons with peft SHiRA (no state carried
from earlier switches); the cached path is the trade-off, and the host memory every variant holds
while fused (adapterkit's own count; the floors' kept values) is recorded beside the times. The
report leads with those rows (``shira_switch_report.py``).

Checks (asserted): after the switches every model's fused weights give the outputs of a dense
reference (adapterkit SHiRA's exact paths and the floor: bit-identical weights), and ``ak.unfuse``
restores the base weights bit for bit on the exact paths. The drift of ``exact=False`` and of
peft's merge/unmerge cycles is recorded.

Writes ``bench/results/shira_switch.{json,md}`` (``--quick``: ``shira_switch.quick.*``).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import tempfile
from pathlib import Path
from typing import Any, Callable

from shira_common import (AkVariant, PeftVariant, common_args, dense_deltas, finish, goal, linear_stack, linear_weights,
                          parts_total, ratio, start)
from shira_switch_report import (AK_LORA, AK_SHIRA, AK_SHIRA_COLD, AK_SHIRA_INEXACT, FLOOR, FLOOR_GOAL, FLOORS, GOALS, OURS,
                                 PEFT_LORA, PEFT_SHIRA, markdown)

import torch  # noqa: E402  (after shira_common, which sets up sys.path)
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _timing import Step, rounds  # noqa: E402
from lora_common import metric, rel_err  # noqa: E402
from lora_fusion import alternator  # noqa: E402
from lora_libs import Library  # noqa: E402

@dataclasses.dataclass
class SwitchParams:
    quick: bool = False
    seed: int = 0
    width: int = 4096
    layers: int = 4
    batch: int = 8
    r: int = 32
    lora_alpha: float = 64.0
    value_std: float = 0.01  # adapterkit SHiRA values (peft SHiRA: randn, peft/adapterkit LoRA: their random inits)
    bf16: bool = True
    load: bool = True
    switch: tuple[int, int] = (40, 3)  # (timed repeats, warm-up rounds)
    switch_bf16: tuple[int, int] = (20, 2)
    load_reps: tuple[int, int] = (10, 1)

    @classmethod
    def quick_params(cls) -> "SwitchParams":
        return cls(quick=True, width=1024, layers=2, switch=(8, 1), switch_bf16=(4, 1), load_reps=(3, 1))


def libraries(p: SwitchParams) -> dict[str, Library]:
    import adapterkit as ak
    import peft

    targets = [str(i) for i in range(p.layers)]
    return {
        AK_SHIRA: AkVariant(AK_SHIRA, lambda: ak.ShiraConfig(r=p.r, mask="rand", target_modules=targets), p.value_std),
        AK_SHIRA_COLD: FirstVisit(AK_SHIRA_COLD, lambda: ak.ShiraConfig(r=p.r, mask="rand", target_modules=targets),
                                  p.value_std),
        AK_SHIRA_INEXACT: AkVariant(AK_SHIRA_INEXACT, lambda: ak.ShiraConfig(r=p.r, mask="rand", target_modules=targets),
                                    p.value_std, exact=False),
        AK_LORA: AkVariant(AK_LORA, lambda: ak.LoRAConfig(r=p.r, alpha=p.lora_alpha, target_modules=targets, init="random")),
        PEFT_LORA: PeftVariant(PEFT_LORA, lambda: peft.LoraConfig(r=p.r, lora_alpha=p.lora_alpha, lora_dropout=0.0,
                                                                  target_modules=targets, init_lora_weights=False)),
        PEFT_SHIRA: PeftVariant(PEFT_SHIRA, lambda: peft.ShiraConfig(r=p.r, target_modules=targets, init_weights=False)),
    }


class FirstVisit(AkVariant):
    """adapterkit SHiRA switching to adapters whose originals are not cached (the first switch to each)."""

    def switch_steps(self, model: nn.Module, next_name: Callable[[], str]) -> list[Step]:
        def forget() -> None:  # untimed: unfuse drops the cache; fuse re-fuses the current adapter
            current = self.ak.fused_adapters(model)[0][0]
            self.ak.unfuse(model)
            self.ak.fuse(model, [current])

        return [Step(None, forget), Step("switch", lambda: self.ak.switch(model, next_name()))]


class Floor:
    """The least an exact sparse switch does, on a copy of the base weights, with adapterkit
    SHiRA's own indices and values. Per layer: restore the saved originals (``index_copy_``), save
    the originals at the new indices (``index_select``), write the new values (``index_copy_``),
    precomputed (mode "floor", the issue's floor) or computed as saved + v ("add"). Mode "cached"
    keeps every adapter's originals and new values from the start (2·nnz floats per adapter and
    layer): a switch is the two ``index_copy_`` alone, no read of the weight."""

    def __init__(self, label: str, weights: list[torch.Tensor], model: nn.Module, mode: str) -> None:
        from adapterkit.core.state import get_state

        self.name, self.mode = label, mode
        self.flat = [w.clone().view(-1) for w in weights]
        state = get_state(model)
        self.idx = {n: [layer.indices for _, layer in state.layers(n)] for n in ("a", "b")}
        self.val = {n: [layer.values.detach().clone() for _, layer in state.layers(n)] for n in ("a", "b")}
        self.orig = {n: [f.index_select(0, i) for f, i in zip(self.flat, self.idx[n])] for n in ("a", "b")}
        self.new = {n: [self._new(o, v) for o, v in zip(self.orig[n], self.val[n])] for n in ("a", "b")}
        self.saved = list(self.orig["a"])
        for f, i, v in zip(self.flat, self.idx["a"], self.new["a"]):
            f.index_copy_(0, i, v)
        self.current = "a"

    @staticmethod
    def _new(original: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return (original.float() + values).to(original.dtype)

    def switch(self, to: str) -> None:
        cached = self.mode == "cached"
        for k, flat in enumerate(self.flat):
            flat.index_copy_(0, self.idx[self.current][k], self.orig[self.current][k] if cached else self.saved[k])
            if not cached:
                self.saved[k] = flat.index_select(0, self.idx[to][k])
            new = self._new(self.saved[k], self.val[to][k]) if self.mode == "add" else self.new[to][k]
            flat.index_copy_(0, self.idx[to][k], new)
        self.current = to

    def switch_steps(self, next_name: Callable[[], str]) -> list[Step]:
        return [Step("switch", lambda: self.switch(next_name()))]

    def held_bytes(self) -> int:
        """Values kept besides the weights: the saved originals, or (cached) every adapter's originals and new values."""
        kept = [*self.orig.values(), *self.new.values()] if self.mode == "cached" else [self.saved]
        return sum(v.numel() * v.element_size() for values in kept for v in values)


def build(base: nn.Module, libs: dict[str, Library], dtype: torch.dtype, notes: list[str]) -> dict[str, nn.Module]:
    """A model per library with adapters "a" and "b" (adapter "a" active, nothing fused)."""
    models = {}
    for label, lib in libs.items():
        try:
            model = lib.attach(copy.deepcopy(base).to(dtype), lib.config(), "a")
            lib.add(model, lib.config(), "b")
            lib.fuse(model, "a")  # probe: some libraries cannot fuse every dtype
            lib.reset(model)
        except Exception as exc:  # noqa: BLE001 - recorded, the variant is left out
            notes.append(f"{label} in {dtype}: left out ({type(exc).__name__}: {str(exc)[:160]})")
            continue
        models[label] = model.eval()
    return models


def check_fused(models: dict[str, nn.Module], floors: list[Floor], originals: list[torch.Tensor], x: torch.Tensor,
                name: str, tol: float) -> dict[str, Any]:
    """Every model has ``name`` fused: its outputs vs a dense reference ``(W + ΔW)`` built from its
    own adapter tensors (asserted for adapterkit; recorded for peft, whose unmerge drifts);
    adapterkit SHiRA's fused weights equal the reference bit for bit, and so do the floors'."""
    out: dict[str, Any] = {}
    shape = originals[0].shape
    with torch.no_grad():
        for label, model in models.items():
            refs = [(w.float() + d).to(w.dtype) for w, d in zip(originals, dense_deltas(model, name))]
            y_ref = x.to(refs[0].dtype)
            for w in refs:
                y_ref = F.linear(y_ref, w)
            weights = linear_weights(model, shape)
            entry = {"output_rel_err": rel_err(model(x.to(refs[0].dtype)), y_ref),
                     "weights_bit_identical_to_reference": all(torch.equal(a, b) for a, b in zip(weights, refs)),
                     "max_abs_weight_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(weights, refs))}
            if label.startswith("adapterkit"):  # peft's merge/unmerge drift is recorded, not asserted
                assert entry["output_rel_err"] < tol, f"{label}: fused {name!r} output differs from the dense reference: {entry}"
            if label in (AK_SHIRA, AK_SHIRA_COLD):
                assert entry["weights_bit_identical_to_reference"], f"{label}: fused weights differ from W + ΔW"
            if label == AK_SHIRA:
                for floor in floors:
                    assert floor.current == name and all(torch.equal(f.view(shape), w) for f, w in zip(floor.flat, weights))
            out[label] = entry
    return out


def check_unfused(models: dict[str, nn.Module], libs: dict[str, Library], originals: list[torch.Tensor]) -> dict[str, Any]:
    """Unfuse everything: adapterkit restores the base bit for bit (asserted); peft's drift is recorded."""
    out = {}
    with torch.no_grad():
        for label, model in models.items():
            libs[label].unfuse(model)
            weights = linear_weights(model, originals[0].shape)
            diff = [(a.float() - b.float()).abs() for a, b in zip(weights, originals)]
            out[label] = {"bit_identical": all(torch.equal(a, b) for a, b in zip(weights, originals)),
                          "max_abs_drift": max(float(d.max()) for d in diff),
                          "changed_fraction": sum(int((d != 0).sum()) for d in diff) / sum(d.numel() for d in diff)}
            if label.startswith("adapterkit") and label != AK_SHIRA_INEXACT:  # exact=False drifts, as peft does
                assert out[label]["bit_identical"], f"{label}: unfuse did not restore the base weights bit for bit"
    return out


def bench_switch(models: dict[str, nn.Module], libs: dict[str, Library], floors: list[Floor],
                 reps: tuple[int, int]) -> tuple[dict[str, Any], str]:
    """Switch fused a → b → a ... in every model and floor; returns the metrics and the adapter fused at the end."""
    n, w = reps
    with torch.no_grad():
        for label, model in models.items():
            libs[label].fuse(model, "a")
        seqs = {label: libs[label].switch_steps(model, alternator()) for label, model in models.items()}
        seqs.update({f.name: f.switch_steps(alternator()) for f in floors})
        samples = rounds(seqs, n, w)
    breakdown = {label: parts_total(samples[label], "switch") for label in seqs}
    result = metric(samples, "switch", list(seqs), repeats=n, warmup=w)
    result["breakdown"] = {k: v for k, v in breakdown.items() if v}
    result["calls"] = {label: getattr(libs.get(label), "calls", {}).get("switch", "see Floor") for label in seqs}
    result["held_bytes"] = {**{label: libs[label].held_bytes(model) for label, model in models.items()},
                            **{f.name: f.held_bytes() for f in floors}}  # while fused, after the switches
    return result, "b" if (n + w) % 2 else "a"


def switch_section(base: nn.Module, x: torch.Tensor, p: SwitchParams, dtype: torch.dtype, reps: tuple[int, int],
                   tol: float, notes: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, nn.Module]]:
    libs = libraries(p)
    models = build(base, libs, dtype, notes)
    originals = [w.clone() for w in linear_weights(copy.deepcopy(base).to(dtype), (p.width, p.width))]
    floors = [Floor(label, originals, models[AK_SHIRA], mode) for label, mode in FLOORS.items()]
    res, fused = bench_switch(models, libs, floors, reps)
    sanity = {"after_switches": check_fused(models, floors, originals, x, fused, tol)}
    with torch.no_grad():
        for label, model in models.items():
            libs[label].switch(model, "a" if fused == "b" else "b")
    sanity["after_one_more_switch"] = check_fused(models, floors[:0], originals, x, "a" if fused == "b" else "b", tol)
    sanity["unfused"] = check_unfused(models, libs, originals)
    return res, sanity, models


def bench_load(models: dict[str, nn.Module], p: SwitchParams, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a new adapter "c" into fused weights, with "a" fused before (switching to a new adapter
    from disk) and with nothing fused; adapterkit from its own directory (rand mask: indices
    regenerated from the seed), from the PEFT-format directory and without the fingerprint check."""
    import adapterkit as ak

    libs = libraries(p)
    akm, pm = models[AK_SHIRA], models[PEFT_SHIRA]
    libs[AK_SHIRA].add(akm, libs[AK_SHIRA].config(), "c")
    dirs = {"ak": ak.save(akm, tmp / "ak_c", "c"), "ak_peft": ak.save(akm, tmp / "ak_c_peft", "c", format="peft")}
    want = {AK_SHIRA: dense_deltas(akm, "c")}
    ak.detach(akm, "c")
    pm.add_adapter("c", libs[PEFT_SHIRA].config())
    pm.save_pretrained(str(tmp / "peft"), selected_adapters=["c"])
    dirs["peft"] = tmp / "peft" / "c"
    want[PEFT_SHIRA] = dense_deltas(pm, "c")
    pm.delete_adapter("c")
    pm.set_adapter("a")
    originals = {label: [w.clone() for w in linear_weights(models[label], (p.width, p.width))] for label in want}

    def ak_steps(fused: bool, directory: Path, **options: Any) -> list[Step]:
        def reset() -> None:
            if "c" in ak.adapters(akm):
                ak.detach(akm, "c")
            ak.fuse(akm, ["a"]) if fused else ak.activate(akm, "a")

        return [Step(None, reset), Step("load", lambda: ak.load(akm, directory, "c", fuse=True, **options))]

    def peft_steps(fused: bool) -> list[Step]:
        def reset() -> None:
            pm.unmerge_adapter()  # only warns (silenced) when nothing is merged
            if "c" in pm.peft_config:
                pm.delete_adapter("c")
            pm.set_adapter("a")
            if fused:
                pm.merge_adapter()

        steps = [Step(None, reset)] + ([Step("load.0_unmerge", pm.unmerge_adapter)] if fused else [])
        return steps + [Step("load.1_load_adapter", lambda: pm.load_adapter(str(dirs["peft"]), "c")),
                        Step("load.2_set_adapter", lambda: pm.set_adapter("c")), Step("load.3_merge", pm.merge_adapter)]

    res: dict[str, Any] = {}
    sanity: dict[str, Any] = {}
    n, w = p.load_reps
    for scenario, fused in (("while_a_fused", True), ("nothing_fused", False)):
        seqs = {"adapterkit": ak_steps(fused, dirs["ak"]), "adapterkit, PEFT-format file": ak_steps(fused, dirs["ak_peft"]),
                "adapterkit, ignore_fingerprint": ak_steps(fused, dirs["ak"], ignore_fingerprint=True),
                "peft": peft_steps(fused)}
        with torch.no_grad():
            samples = rounds(seqs, n, w)
        breakdown = parts_total(samples["peft"], "load")
        res[scenario] = metric(samples, "load", list(seqs), repeats=n, warmup=w, peft_breakdown=breakdown)
        for label, model in ((AK_SHIRA, akm), (PEFT_SHIRA, pm)):  # "c" is fused now: W + ΔW_c
            weights = linear_weights(model, (p.width, p.width))
            err = max(float((a - (o + d)).abs().max()) for a, o, d in zip(weights, originals[label], want[label]))
            sanity[f"{scenario}: {label} fused weights - (W + ΔW_c), max abs"] = err
            assert err == 0.0 or (label == PEFT_SHIRA and err < 1e-5), f"{scenario}: {label} loaded 'c' wrongly ({err})"
    return res, sanity


def run(p: SwitchParams, sections: Any, report: dict[str, Any]) -> None:
    base, x = linear_stack(p.width, p.layers, p.seed, p.batch)
    with tempfile.TemporaryDirectory(prefix="shira_switch_") as tmp:
        res, sanity, models = sections.run("fp32: switch", lambda: switch_section(
            base, x, p, torch.float32, p.switch, 1e-4, report["notes"]))
        report["results"]["fp32"], report["sanity"]["fp32"] = {"switch": res}, sanity
        if p.load:
            res, sanity = sections.run("fp32: load into fused weights", lambda: bench_load(models, p, Path(tmp)))
            report["results"]["fp32"]["load"], report["sanity"]["fp32_load"] = res, sanity
        del models
        gc.collect()
        if p.bf16:
            res, sanity, _ = sections.run("bf16: switch", lambda: switch_section(
                base, x, p, torch.bfloat16, p.switch_bf16, 3e-2, report["notes"]))
            report["results"]["bf16"], report["sanity"]["bf16"] = {"switch": res}, sanity
    goals = {}
    sw = report["results"]["fp32"]["switch"]
    med = {label: sw[label]["median"] for label in sw if isinstance(sw.get(label), dict) and "median" in sw[label]}
    for ours in (o for o in OURS if o in med):
        for label, bound in GOALS.items():
            goals[f"{ours} switch ≥ {bound:g}× faster than {label}"] = goal(ratio(med.get(label), med[ours]), bound, True)
        goals[f"{ours} switch within {FLOOR_GOAL}× of the floor"] = goal(ratio(med[ours], med[FLOOR]), FLOOR_GOAL, False)
    report["goals"] = goals
    report["floor_speedups"] = {f"{floor} vs {label}": ratio(med.get(label), med[floor]) for floor in FLOORS
                                for label in GOALS}


def main() -> None:
    parser = common_args(__doc__)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 stack")
    parser.add_argument("--no-load", action="store_true", help="skip the load-into-fused-weights section")
    args = parser.parse_args()
    p = SwitchParams.quick_params() if args.quick else SwitchParams()
    p.bf16, p.load = p.bf16 and not args.no_bf16, p.load and not args.no_load
    report, sections = start(args, p, "time.perf_counter around each call, GC off; variants alternated round by round; "
                                      "warm-up rounds dropped; medians; torch.no_grad")
    run(p, sections, report)
    print(finish(report, sections, args.out_dir, "shira_switch", markdown))


if __name__ == "__main__":
    main()

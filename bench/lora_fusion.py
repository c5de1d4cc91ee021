"""Fuse, unfuse, switch and inference measurements of the LoRA benchmark, with the sanity checks
that the libraries compute the same thing and that ``ak.unfuse`` restores the base bit for bit.

Three models hold the same adapters: adapterkit with ``exact=False`` (like for like with peft: both
subtract on unfuse and keep no copy), adapterkit's default exact path (keeps a host copy of each
fused weight: its bytes are recorded) and peft."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from _timing import Step, rounds, summary
from lora_common import (AK, AK_INEXACT, FUSION_LIBS, LIBS, PEFT, Params, adapterkit_only_metric, base_weights, forward,
                         metric, rel_err)
from lora_libs import FUSION_LIBRARIES, LIBRARIES, Library, assert_same_factors, calls_of


@dataclasses.dataclass
class Pair:
    """adapterkit models (exact and ``exact=False``) and a peft model holding the very same adapters "a" and "b"."""

    models: dict[str, nn.Module]  # library name -> model
    original: dict[str, torch.Tensor]  # base weights before any fusing
    peft_dirs: dict[str, Path]  # adapter name -> the directory peft saved it to

    def each(self, op: Callable[[Library, nn.Module], Any], libs: tuple[str, ...] = FUSION_LIBS) -> dict[str, Any]:
        """``op(library, model)`` for each library in ``libs``; the results by library name."""
        return {name: op(FUSION_LIBRARIES[name], self.models[name]) for name in libs}

    def reset(self) -> None:
        """Both models back to: nothing fused, adapter "a" active."""
        with torch.no_grad():
            self.each(lambda lib, model: lib.reset(model))

    def assert_bit_identical(self) -> None:
        """adapterkit's base weights equal the originals bit for bit."""
        now = base_weights(self.models[AK])
        assert now.keys() == self.original.keys()
        for k, v in self.original.items():
            assert torch.equal(now[k], v), f"ak.unfuse did not restore {k} bit-for-bit"

    def drift(self, lib: str) -> dict[str, Any]:
        """How far ``lib``'s base weights moved from the originals after all fuse/unfuse cycles."""
        now = base_weights(self.models[lib])
        max_abs, changed, total = 0.0, 0, 0
        for k, v in self.original.items():
            diff = (now[k].float() - v.float()).abs()
            max_abs = max(max_abs, float(diff.max()))
            changed += int((diff != 0).sum())
            total += diff.numel()
        return {"max_abs": max_abs, "changed_fraction": changed / total}


def make_pair(setting: str, base: nn.Module, p: Params, dtype: torch.dtype, tmp: Path) -> Pair:
    """peft creates "a" and "b" with random non-zero B and saves them; both adapterkit models load
    those PEFT directories, so every model fuses identical A/B values (asserted)."""
    ak, peft = LIBRARIES[AK], LIBRARIES[PEFT]
    plain = copy.deepcopy(base).to(dtype)
    original = {k: v.clone() for k, v in base_weights(plain).items()}
    pm = peft.attach(copy.deepcopy(plain), peft.config(setting, p, True), "a")
    peft.add(pm, peft.config(setting, p, True), "b")
    pm.save_pretrained(str(tmp), selected_adapters=["a", "b"])
    dirs = {n: tmp / n for n in ("a", "b")}
    inexact = copy.deepcopy(plain)
    for n in ("a", "b"):
        ak.load(plain, dirs[n], n)
        ak.load(inexact, dirs[n], n)
    pair = Pair({AK_INEXACT: inexact, AK: plain, PEFT: pm}, original, dirs)
    pair.each(lambda lib, model: (lib.activate(model, "a"), model.eval()))
    for n in ("a", "b"):
        assert_same_factors(peft.factors(pm, n), ak.factors(plain, n), f"adapter {n!r}")
        assert_same_factors(peft.factors(pm, n), ak.factors(inexact, n), f"adapter {n!r} (exact=False model)")
    return pair


def check_pair(setting: str, pair: Pair, plain: nn.Module, inp: dict[str, torch.Tensor], dtype: torch.dtype, tol: float) -> dict[str, Any]:
    """Every model's outputs agree with peft's unfused, fused with "a" and after switching to "b";
    the exact path's ak.unfuse is bit-exact."""

    def outputs() -> dict[str, torch.Tensor]:
        return pair.each(lambda lib, model: forward(model, setting, inp, dtype))

    out: dict[str, Any] = {"tolerance_rel_max_abs": tol}
    with torch.no_grad():
        y_base = forward(plain, setting, inp, dtype)
        y = outputs()
        out["adapter_effect_rel"] = rel_err(y[AK], y_base)
        assert out["adapter_effect_rel"] > 1e-3, "adapter 'a' does not change the output: fusing would do no work"
        pair.each(lambda lib, model: lib.fuse(model, "a"))
        fused = outputs()
        out["fused_vs_unfused_rel_err_adapterkit"] = rel_err(fused[AK], y[AK])
        pair.each(lambda lib, model: lib.switch(model, "b"))
        switched = outputs()
        out["b_differs_from_a_rel"] = rel_err(switched[AK], fused[AK])
    pair.reset()
    keys = ["fused_vs_unfused_rel_err_adapterkit"]
    for ours, suffix in ((AK, ""), (AK_INEXACT, "_exact_false")):
        for key, got in (("unfused_rel_err", y), ("fused_a_rel_err", fused), ("switched_b_rel_err", switched)):
            out[key + suffix] = rel_err(got[ours], got[PEFT])
            keys.append(key + suffix)
    for key in keys:
        assert out[key] < tol, f"{setting}/{dtype}: {key}={out[key]:.3g} exceeds {tol}"
    assert out["b_differs_from_a_rel"] > 1e-3
    pair.assert_bit_identical()
    out["adapterkit_unfuse_bit_identical"] = True
    return out


def alternator() -> Callable[[], str]:
    """Returns "b", "a", "b", ... on successive calls (the adapter to switch to next)."""
    state = {"cur": "a"}

    def nxt() -> str:
        state["cur"] = "b" if state["cur"] == "a" else "a"
        return state["cur"]

    return nxt


def bench_switch(pair: Pair, reps: tuple[int, int]) -> dict[str, Any]:
    """switch: fused a -> fused b -> fused a ..., each call does real work. A library that needs
    several calls to switch is timed per call; their sum is its "switch" time."""
    n, w = reps
    with torch.no_grad():
        pair.each(lambda lib, model: lib.fuse(model, "a"))
    samples = rounds(pair.each(lambda lib, model: lib.switch_steps(model, alternator())), n, w)
    breakdowns: dict[str, Any] = {}
    for lib in FUSION_LIBS:
        parts = [k for k in samples[lib] if k.startswith("switch.")]
        if parts:
            samples[lib]["switch"] = [sum(t) for t in zip(*(samples[lib][k] for k in parts))]
            breakdowns[f"{lib}_breakdown"] = {k: summary(samples[lib][k]) for k in parts}
    result = metric(samples, "switch", FUSION_LIBS, repeats=n, warmup=w, calls=calls_of("switch", FUSION_LIBRARIES))
    result.update(breakdowns)
    pair.reset()
    return result


def bench_unfuse_then_fuse(pair: Pair, reps: tuple[int, int]) -> dict[str, Any]:
    """adapterkit's switch against its own naive path (unfuse + fuse), for reference."""
    ak, akm = LIBRARIES[AK], pair.models[AK]
    n, w = reps
    to = alternator()
    with torch.no_grad():
        ak.fuse(akm, "a")
    naive = rounds({AK: [Step("unfuse+fuse", lambda: (ak.unfuse(akm), ak.fuse(akm, to())))]}, n, w)
    with torch.no_grad():
        ak.reset(akm)
    return adapterkit_only_metric(naive[AK]["unfuse+fuse"], repeats=n, warmup=w)


def bench_fusion(setting: str, base: nn.Module, inp: dict[str, torch.Tensor], p: Params, dtype: torch.dtype,
                 fuse_reps: tuple[int, int], switch_reps: tuple[int, int], tol: float, infer: bool,
                 tmp: Path) -> tuple[dict[str, Any], dict[str, Any], Pair]:
    """fuse, unfuse, switch (and, with ``infer``, inference) of both libraries on one model pair;
    returns ``(results, sanity, pair)``. adapterkit's base weights are checked after each part."""
    pair = make_pair(setting, base, p, dtype, tmp)
    plain = copy.deepcopy(base).to(dtype).eval()
    sanity = check_pair(setting, pair, plain, inp, dtype, tol)
    res: dict[str, Any] = {}

    n, w = fuse_reps  # fuse and unfuse, from an unfused state
    samples = rounds(pair.each(lambda lib, model: [
        Step("fuse", lambda: lib.fuse(model, "a")), Step("unfuse", lambda: lib.unfuse(model))]), n, w)
    for operation in ("fuse", "unfuse"):
        res[operation] = metric(samples, operation, FUSION_LIBS, repeats=n, warmup=w,
                                calls=calls_of(operation, FUSION_LIBRARIES))
    pair.assert_bit_identical()

    res["switch"] = bench_switch(pair, switch_reps)
    pair.assert_bit_identical()
    res["held_bytes_fused"] = held_bytes_while_fused(pair)
    res["adapterkit_unfuse_then_fuse"] = bench_unfuse_then_fuse(pair, switch_reps)
    pair.assert_bit_identical()

    if infer:
        res.update(bench_inference(setting, pair, plain, inp, p, dtype))
        pair.assert_bit_identical()
    sanity["peft_base_weight_drift_after_all_cycles"] = pair.drift(PEFT)
    sanity["adapterkit_exact_false_base_weight_drift_after_all_cycles"] = pair.drift(AK_INEXACT)
    sanity["adapterkit_bit_identical_after_all_cycles"] = True
    return res, sanity, pair


def held_bytes_while_fused(pair: Pair) -> dict[str, Any]:
    """Host bytes each library holds to undo fusing while "a" is fused (adapterkit's own count; peft
    keeps none), after the fuse/unfuse/switch rounds: the exact path's memory cost."""
    with torch.no_grad():
        pair.each(lambda lib, model: lib.fuse(model, "a"))
        held = pair.each(lambda lib, model: lib.held_bytes(model))
    pair.reset()
    return {"unit": "bytes", "note": "adapterkit: WeightFusion.host_bytes summed over the adapted modules; "
                                     "peft: 0 (merge adds in place, unmerge subtracts)",
            **{lib: {"median": value} for lib, value in held.items()}}


def bench_inference(setting: str, pair: Pair, plain: nn.Module, inp: dict[str, torch.Tensor], p: Params, dtype: torch.dtype) -> dict[str, Any]:
    """torch.no_grad forward with adapter "a" unfused, then fused; the plain base model for reference."""
    n, w = p.infer
    # the exact=False model runs the same forwards as the exact one: timed for adapterkit and peft only
    seqs = pair.each(lambda lib, model: [Step("fwd", lambda: forward(model, setting, inp, dtype))], LIBS)
    seqs["base"] = [Step("fwd", lambda: forward(plain, setting, inp, dtype))]
    with torch.no_grad():
        unfused = rounds(seqs, n, w)
        pair.each(lambda lib, model: lib.fuse(model, "a"), LIBS)
        fused = rounds(seqs, n, w)
    pair.reset()
    res = {
        "infer_unfused": metric(unfused, "fwd", repeats=n, warmup=w, note="torch.no_grad forward, adapter 'a' active, not fused"),
        "infer_fused": metric(fused, "fwd", repeats=n, warmup=w, note="torch.no_grad forward, adapter 'a' fused"),
    }
    res["infer_base_reference"] = {"unit": "s", "note": "plain base model without adapters",
                                   "base": summary(unfused["base"]["fwd"] + fused["base"]["fwd"])}
    ratio: dict[str, Any] = {"unit": "x", "note": "median unfused / median fused"}
    for lib in LIBS:
        ratio[lib] = {"median": res["infer_unfused"][lib]["median"] / res["infer_fused"][lib]["median"]}
    res["infer_unfused_over_fused"] = ratio
    return res

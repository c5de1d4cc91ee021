"""Attach, train-step and adapter-load measurements of the LoRA benchmark, written once for both
libraries (see ``lora_libs``) and timed round by round in this process."""

from __future__ import annotations

import copy
import gc
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from _timing import Step, rounds
from lora_common import AK, PEFT, Params, adapterkit_only_metric, make_train_step, metric, random_b_for_train, trainable
from lora_fusion import Pair
from lora_libs import LIBRARIES, Factors, Library, assert_same_factors, calls_of


def bench_attach(setting: str, base: nn.Module, p: Params, random_b: bool) -> dict[str, Any]:
    """Attach adapter "a" to a fresh deepcopy of the base model (the copy is not timed)."""
    models: dict[str, nn.Module] = {}

    def attach_steps(lib: Library) -> list[Step]:
        config = lib.config(setting, p, random_b)

        def fresh() -> None:
            models.clear()
            gc.collect()
            models[lib.name] = copy.deepcopy(base)

        def attach() -> None:
            models[lib.name] = lib.attach(models[lib.name], config, "a")

        return [Step(None, fresh), Step("attach", attach)]

    n, w = p.attach
    samples = rounds({name: attach_steps(lib) for name, lib in LIBRARIES.items()}, n, w)
    models.clear()
    return metric(samples, "attach", repeats=n, warmup=w, note="fresh deepcopy of the base model per repeat (copy not timed)")


def bench_train(setting: str, base: nn.Module, inp: dict[str, torch.Tensor], p: Params, sanity: dict[str, Any]) -> dict[str, Any]:
    """One training step of each library's LoRA model; asserts equal trainable parameter counts."""
    random_b = random_b_for_train(setting)
    models = {name: lib.attach(copy.deepcopy(base), lib.config(setting, p, random_b), "a") for name, lib in LIBRARIES.items()}
    counts = {name: sum(q.numel() for q in trainable(m)) for name, m in models.items()}
    assert counts[AK] == counts[PEFT], f"trainable parameter counts differ: {counts}"
    sanity["trainable_params"] = counts[AK]
    steps = {}
    for name, m in models.items():
        m.train()
        steps[name] = [Step("train_step", make_train_step(m, setting, inp))]
    n, w = p.train
    samples = rounds(steps, n, w)
    return metric(samples, "train_step", repeats=n, warmup=w, note="zero_grad + forward + loss + backward + AdamW.step")


def reload_steps(lib: Library, model: nn.Module, directory: Path, before: Callable[[], Any] | None = None,
                 **options: Any) -> list[Step]:
    """Untimed ``before`` (default: unload adapter "a"), then the timed load of "a" from ``directory``."""
    return [Step(None, before or (lambda: lib.unload(model, "a"))),
            Step("load", lambda: lib.load(model, directory, "a", **options))]


def bench_load(setting: str, base: nn.Module, pair: Pair, p: Params, tmp: Path) -> dict[str, Any]:
    """Time loading adapter "a": adapterkit from its own format (base-weight fingerprint checked),
    peft from its format; cold = first load into a freshly copied model, warm = repeated loads
    into the same model. Every loaded adapter is checked against the saved values."""
    import adapterkit

    ak = LIBRARIES[AK]
    dirs = {AK: tmp / "ak_a", PEFT: pair.peft_dirs["a"]}
    adapterkit.save(pair.models[AK], dirs[AK], "a", format="adapterkit")
    ref: Factors = {path: (a.detach().clone(), b.detach().clone(), s) for path, (a, b, s) in ak.factors(pair.models[AK], "a").items()}

    def check(lib: Library, model: nn.Module) -> None:
        assert_same_factors(lib.factors(model, "a"), ref, f"{lib.name} load")

    def fresh_model(lib: Library) -> nn.Module:
        """A fresh copy of the base model that already has adapter "b"."""
        return lib.attach(copy.deepcopy(base), lib.config(setting, p, True), "b")

    models: dict[str, nn.Module] = {}

    def cold_steps(lib: Library) -> list[Step]:
        def fresh() -> None:
            models.pop(lib.name, None)
            gc.collect()
            models[lib.name] = fresh_model(lib)

        return [Step(None, fresh), Step("load", lambda: lib.load(models[lib.name], dirs[lib.name], "a")),
                Step(None, lambda: check(lib, models[lib.name]))]

    cold = rounds({name: cold_steps(lib) for name, lib in LIBRARIES.items()}, p.load_cold, 0)

    # warm: the same models again, plus two adapterkit variants without a base-weight hash
    variants = {"adapterkit_from_peft_dir": (dirs[PEFT], {}), "adapterkit_ignore_fingerprint": (dirs[AK], {"ignore_fingerprint": True})}
    variant_models = {}
    for key, (directory, options) in variants.items():
        variant_models[key] = fresh_model(ak)
        ak.load(variant_models[key], directory, "a", **options)
    n, w = p.load_warm
    warm_seqs = {name: reload_steps(lib, models[name], dirs[name]) for name, lib in LIBRARIES.items()}
    for key, (directory, options) in variants.items():
        warm_seqs[key] = reload_steps(ak, variant_models[key], directory, **options)
    warm = rounds(warm_seqs, n, w)
    for name, model in {**models, **variant_models}.items():
        check(LIBRARIES.get(name, ak), model)
    del variant_models

    def fuse_cycle(lib: Library, model: nn.Module) -> Callable[[], None]:
        def cycle() -> None:
            lib.unload(model, "a")
            lib.fuse(model, "b")
            lib.unfuse(model)

        return cycle

    # warm again, but after a fuse/unfuse cycle of the other adapter "b" (untimed) before each load
    cycled = rounds({name: reload_steps(lib, models[name], dirs[name], before=fuse_cycle(lib, models[name]))
                     for name, lib in LIBRARIES.items()}, n, w)
    for name, lib in LIBRARIES.items():
        check(lib, models[name])

    # warm again, while adapter "b" is fused (e.g. a server that keeps one adapter fused)
    with torch.no_grad():
        for name, lib in LIBRARIES.items():
            lib.fuse(models[name], "b")
    fused_b = rounds({name: reload_steps(lib, models[name], dirs[name]) for name, lib in LIBRARIES.items()}, n, w)
    for name, lib in LIBRARIES.items():
        check(lib, models[name])
    models.clear()

    calls = calls_of("load")
    return {
        "load_cold": metric(cold, "load", repeats=p.load_cold, warmup=0, calls=calls,
                            note="first load into a freshly copied base model that already has adapter 'b'; "
                                 "adapterkit hashes the targeted base weights on every verified load (fingerprint check)"),
        "load_warm": metric(warm, "load", repeats=n, warmup=w, calls=calls,
                            note="detach/delete_adapter between repeats (untimed), same model every repeat"),
        "load_after_fuse_cycle": metric(cycled, "load", repeats=n, warmup=w, calls=calls,
                                        note="like load_warm, but adapter 'b' was fused and unfused (untimed) before each load"),
        "load_while_fused": metric(fused_b, "load", repeats=n, warmup=w, calls=calls,
                                   note="like load_warm, but while adapter 'b' is fused into the base weights"),
        "load_warm_adapterkit_ignore_fingerprint": adapterkit_only_metric(
            warm["adapterkit_ignore_fingerprint"]["load"], repeats=n, warmup=w,
            note="ak.load(model, <adapterkit dir>, 'a', ignore_fingerprint=True): no base-weight hash"),
        "load_warm_adapterkit_from_peft_dir": adapterkit_only_metric(
            warm["adapterkit_from_peft_dir"]["load"], repeats=n, warmup=w,
            note="ak.load of the directory peft saved (no adapterkit fingerprint in it, so no hash check)"),
    }

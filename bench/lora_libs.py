"""One small adapter object per library, so each measurement is written once for both.

Each object knows how its library attaches, fuses, switches, loads ... a LoRA adapter. The
libraries are imported lazily: a peak-RSS worker process imports only the one it measures.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from _timing import Step
from lora_common import AK, AK_INEXACT, PEFT, Params

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (lora_A, lora_B, scaling)


class Library:
    """The benchmarked operations of one library (adapter names are strings like "a" and "b")."""

    name: str
    module: str  # the package it imports (a peak-RSS worker imports only that one)
    calls: dict[str, str]  # operation -> the library call it times, recorded in the JSON

    def config(self, setting: str, p: Params, random_b: bool) -> Any:
        raise NotImplementedError

    def attach(self, model: nn.Module, config: Any, name: str) -> nn.Module:
        """Attach the first adapter; returns the model to use from then on."""
        raise NotImplementedError

    def add(self, model: nn.Module, config: Any, name: str) -> None:
        """Attach a further adapter to a model that already has one."""
        raise NotImplementedError

    def activate(self, model: nn.Module, name: str) -> None:
        raise NotImplementedError

    def fuse(self, model: nn.Module, name: str) -> None:
        raise NotImplementedError

    def unfuse(self, model: nn.Module) -> None:
        raise NotImplementedError

    def switch_steps(self, model: nn.Module, next_name: Callable[[], str]) -> list[Step]:
        """The timed steps that move the fused adapter to ``next_name()``; named "switch" or,
        when the library needs several calls, "switch.<part>" (summed into "switch")."""
        raise NotImplementedError

    def load(self, model: nn.Module, directory: Path, name: str) -> None:
        raise NotImplementedError

    def unload(self, model: nn.Module, name: str) -> None:
        """Remove an adapter again (so the next load starts from the same state)."""
        raise NotImplementedError

    def factors(self, model: nn.Module, name: str) -> Factors:
        raise NotImplementedError

    def held_bytes(self, model: nn.Module) -> int:
        """Host memory the library holds to undo fusing (beyond the model and adapters)."""
        raise NotImplementedError

    def switch(self, model: nn.Module, name: str) -> None:
        """Untimed switch to ``name`` (fused)."""
        for step in self.switch_steps(model, lambda: name):
            step.fn()

    def reset(self, model: nn.Module) -> None:
        """Back to the start state of the fusion measurements: nothing fused, adapter "a" active."""
        self.unfuse(model)
        self.activate(model, "a")


class Adapterkit(Library):
    name = AK
    module = "adapterkit"
    exact = True
    calls = {
        "fuse": "ak.fuse(model, ['a'])",
        "unfuse": "ak.unfuse(model)",
        "switch": "ak.switch(model, name)",
        "load": "ak.load(model, <adapterkit dir>, 'a')",
    }

    @functools.cached_property
    def ak(self) -> Any:
        import adapterkit

        return adapterkit

    def config(self, setting: str, p: Params, random_b: bool) -> Any:
        r, alpha = p.lora_shape(setting)
        return self.ak.LoRAConfig(r=r, alpha=alpha, target_modules=p.targets(setting), init="random" if random_b else "default")

    def attach(self, model: nn.Module, config: Any, name: str) -> nn.Module:
        return self.ak.attach(model, config, name)

    def add(self, model: nn.Module, config: Any, name: str) -> None:
        self.ak.attach(model, config, name)

    def activate(self, model: nn.Module, name: str) -> None:
        self.ak.activate(model, name)

    def fuse(self, model: nn.Module, name: str) -> None:
        self.ak.fuse(model, [name], exact=self.exact)

    def unfuse(self, model: nn.Module) -> None:
        self.ak.unfuse(model)

    def switch_steps(self, model: nn.Module, next_name: Callable[[], str]) -> list[Step]:
        return [Step("switch", lambda: self.ak.switch(model, next_name()))]

    def load(self, model: nn.Module, directory: Path, name: str, **options: Any) -> None:
        self.ak.load(model, directory, name, **options)

    def unload(self, model: nn.Module, name: str) -> None:
        self.ak.detach(model, name)

    def factors(self, model: nn.Module, name: str) -> Factors:
        from adapterkit.core.state import get_state

        return {path: (layer.lora_A, layer.lora_B, layer.scaling) for path, layer in get_state(model).layers(name)}

    def held_bytes(self, model: nn.Module) -> int:
        """Bytes of the host copies / saved entries kept for exact unfusing (adapterkit's own count)."""
        from adapterkit.core.state import get_state

        return sum(getattr(host, "host_bytes", 0) for host in get_state(model).wrappers.values())


class AdapterkitInexact(Adapterkit):
    """adapterkit with ``exact=False``: no host copy; unfuse and switch subtract the fused delta, as peft does."""

    name = AK_INEXACT
    exact = False
    calls = {
        "fuse": "ak.fuse(model, ['a'], exact=False)",
        "unfuse": "ak.unfuse(model) (subtracts ΔW_a)",
        "switch": "ak.switch(model, name) after fuse(exact=False) (subtracts ΔW_a, adds ΔW_b)",
        "load": Adapterkit.calls["load"],
    }


class Peft(Library):
    name = PEFT
    module = "peft"
    calls = {
        "fuse": "merge_adapter(['a'])",
        "unfuse": "unmerge_adapter()",
        "switch": "unmerge_adapter(); set_adapter(name); merge_adapter()",
        "load": "model.load_adapter(<peft dir>, 'a')",
    }

    def config(self, setting: str, p: Params, random_b: bool) -> Any:
        from peft import LoraConfig

        r, alpha = p.lora_shape(setting)
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=p.targets(setting),
                          init_lora_weights=False if random_b else True)

    def attach(self, model: nn.Module, config: Any, name: str) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, config, adapter_name=name)

    def add(self, model: nn.Module, config: Any, name: str) -> None:
        model.add_adapter(name, config)

    def activate(self, model: nn.Module, name: str) -> None:
        model.set_adapter(name)

    def fuse(self, model: nn.Module, name: str) -> None:
        model.merge_adapter([name])

    def unfuse(self, model: nn.Module) -> None:
        model.unmerge_adapter()

    def switch_steps(self, model: nn.Module, next_name: Callable[[], str]) -> list[Step]:
        target: dict[str, str] = {}

        def unmerge() -> None:
            target["name"] = next_name()
            model.unmerge_adapter()

        return [
            Step("switch.unmerge", unmerge),
            Step("switch.set_adapter", lambda: model.set_adapter(target["name"])),
            Step("switch.merge", model.merge_adapter),
        ]

    def load(self, model: nn.Module, directory: Path, name: str) -> None:
        model.load_adapter(str(directory), name)

    def unload(self, model: nn.Module, name: str) -> None:
        model.delete_adapter(name)

    def factors(self, model: nn.Module, name: str) -> Factors:
        out: Factors = {}
        for path, module in model.base_model.model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if isinstance(lora_a, nn.ModuleDict) and name in lora_a:
                out[path] = (lora_a[name].weight, module.lora_B[name].weight, module.scaling[name])
        return out

    def held_bytes(self, model: nn.Module) -> int:
        return 0  # merge adds ΔW in place, unmerge subtracts it: nothing is kept to undo a merge


LIBRARIES: dict[str, Library] = {AK: Adapterkit(), PEFT: Peft()}
# fuse/unfuse/switch also time adapterkit's exact=False path (attach, train, load are the same code)
FUSION_LIBRARIES: dict[str, Library] = {AK_INEXACT: AdapterkitInexact(), **LIBRARIES}


def assert_same_factors(got: Factors, want: Factors, what: str) -> None:
    """Both hold the very same LoRA modules, A/B values and scalings."""
    assert got.keys() == want.keys(), f"{what}: adapted modules differ: {sorted(got)} vs {sorted(want)}"
    for path, (a, b, scaling) in want.items():
        assert torch.equal(got[path][0], a), f"{what}: lora_A differs at {path}"
        assert torch.equal(got[path][1], b), f"{what}: lora_B differs at {path}"
        assert got[path][2] == scaling, f"{what}: scaling differs at {path}"


def calls_of(operation: str, libraries: dict[str, Library] = LIBRARIES) -> dict[str, str]:
    """The call each library times for ``operation`` (recorded in the JSON)."""
    return {name: lib.calls[operation] for name, lib in libraries.items()}

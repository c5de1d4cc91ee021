"""A Hypothesis state machine over the public API on a small MLP: LoRA (also low-bit), SHiRA, DyLoRA
and bottleneck adapters attached, detached, activated (as lists and as nested Add/Stack blocks), fused, unfused, switched, re-ranked, quantised,
saved and loaded under new names, plus deliberately invalid calls, in any order.

The machine keeps its own model of the state (adapters, active and fused sets, DyLoRA ranks, bit
widths, parameter values). After every step:

* ``ak.adapters`` / ``ak.active_adapters`` / ``ak.fused_adapters`` agree with that model;
* the base weights are the originals bit for bit while nothing is fused, unless a
  ``fuse(exact=False)`` was ever made (then they may drift by rounding error, never further);
  while fused they equal the originals plus the fused deltas;
* the output equals a dense float64 reference computed here from the adapters' parameters alone
  (``W + s·B@A``, values scattered at indices, the bottleneck's own formula, dequantised by hand);
* a refused call raised the predicted ``ak.AdapterError`` subclass and left the model bit-identical.

Budget: the ``adapterkit`` Hypothesis profile (tests/conftest.py); ``make test-nightly`` runs more.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import assert_unchanged, randomise, snapshot
from hypothesis import event, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from stateful_reference import QUANTISED, Spec, Weighted, reference_output
from torch import nn

import adapterkit as ak
from adapterkit.errors import (AdapterNotFoundError, ConfigError, DuplicateAdapterError, FusedStateError, FusionError,
                               NotFusableError, TargetError)

LAYERS = ("0", "2", "4")  # the Linear layers of the MLP
POOL = ("a", "b", "c", "d")
NAMES = st.sampled_from(POOL)
MODULES = st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True).map(tuple)
WEIGHT = st.sampled_from([1.0, 1.0, 1.0, 0.5, -1.0, 2.0, math.nan])
SEEDS = st.integers(0, 2**16)


class AdapterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
        self.originals = {p: self.model.get_submodule(p) for p in LAYERS}
        self.original_tensors = {p: (m.weight.detach().clone(), m.bias.detach().clone()) for p, m in self.originals.items()}
        self.base = {p: w for p, (w, _) in self.original_tensors.items()}  # base weights as last seen unfused
        self.x = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))
        self.specs: dict[str, Spec] = {}
        self.active: Weighted = ()
        self.fused: Weighted = ()
        self.fused_exact = True
        self.drifted = False  # a fuse(exact=False) happened: unfusing subtracts, base weights may drift
        self.tmp = Path(tempfile.mkdtemp(prefix="ak-stateful-"))
        self.saves = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------
    def attempt(self, errors: list[type], call: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Run ``call``; with predicted ``errors`` it must raise one of them and change nothing."""
        label = getattr(call, "__name__", "").strip("<>").replace("lambda", "config")
        event(f"{label}: {'refused' if errors else 'ok'}")  # counted by --hypothesis-show-statistics
        if not errors:
            call(*args, **kwargs)
            return True
        before = snapshot(self.model)
        with pytest.raises(ak.AdapterError) as raised:
            call(*args, **kwargs)
        assert isinstance(raised.value, tuple(errors)), (raised.value, errors)
        assert_unchanged(self.model, before)
        return False

    def weighted_errors(self, names: list[str], weights: list[float] | None) -> list[type]:
        """What ``_weighted``-style validation of ``names``/``weights`` must refuse."""
        errors = []
        if len(set(names)) != len(names):
            errors.append(ConfigError)
        if any(n not in self.specs for n in names):
            errors.append(AdapterNotFoundError)
        if weights is not None and (len(weights) != len(names) or any(math.isnan(w) for w in weights)):
            errors.append(ConfigError)
        return errors

    def deltas_of(self, pairs: Weighted) -> Weighted:
        return tuple((n, w) for n, w in pairs if self.specs[n].kind != "bottleneck")

    def inserted_of(self, pairs: Weighted) -> Weighted:
        return tuple((n, w) for n, w in pairs if self.specs[n].kind == "bottleneck")

    def read(self, name: str, targets: tuple[str, ...]) -> tuple[dict, dict]:
        """The adapter's parameters and index buffers, by the stable keys ``<module>.adapters.<name>.<param>``."""
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        latent = {p: {k[len(f"{p}.adapters.{name}."):]: v.detach().clone() for k, v in params.items()
                      if k.startswith(f"{p}.adapters.{name}.")} for p in targets}
        indices = {p: buffers[f"{p}.adapters.{name}.indices"].clone() for p in targets
                   if f"{p}.adapters.{name}.indices" in buffers}
        return latent, indices

    def pick(self, data: st.DataObject, free: bool = False) -> str:
        """A name from the pool, biased towards attached ones (``free``: towards unused ones)."""
        known = [n for n in POOL if (n in self.specs) != free]
        return data.draw(st.one_of(st.sampled_from(known), NAMES) if known else NAMES)

    def draw_names(self, data: st.DataObject) -> list[str]:
        attached = st.lists(st.sampled_from(list(self.specs)), max_size=3, unique=True) if self.specs else st.nothing()
        return data.draw(attached | st.lists(NAMES, max_size=3))  # the pool: unknown names and repeats too

    def draw_weights(self, data: st.DataObject, n: int) -> list[float] | None:
        valid = st.lists(st.sampled_from([1.0, 0.5, -1.0, 2.0]), min_size=n, max_size=n)
        return data.draw(st.one_of(st.none(), valid, st.lists(WEIGHT, max_size=3)))  # the last: wrong lengths, NaN

    def fused_into(self, target: Weighted, exact: bool) -> None:
        self.fused = target
        if self.specs:  # without adapters the model keeps no state: nothing to remember
            self.fused_exact = exact
        self.drifted |= bool(target) and not exact

    # -- attaching ---------------------------------------------------------------------------
    def config_for(self, data: st.DataObject, kind: str) -> ak.AdapterConfig:
        modules = data.draw(MODULES)
        if kind == "lora":
            return ak.LoRAConfig(r=data.draw(st.integers(1, 3)), alpha=data.draw(st.sampled_from([2.0, 8.0])),
                                 use_rslora=data.draw(st.booleans()), bits=data.draw(st.sampled_from([32, 32, 1, 2, 4, 8])),
                                 target_modules=modules)
        if kind == "shira":
            return ak.ShiraConfig(density=0.25, seed=data.draw(st.integers(0, 5)), target_modules=modules)
        if kind == "dylora":
            return ak.DyLoRAConfig(r_max=4, alpha=data.draw(st.sampled_from([4.0, 8.0])), target_modules=modules)
        return ak.BottleneckConfig(bottleneck=2, style=data.draw(st.sampled_from(["pfeiffer", "houlsby", "parallel"])),
                                   activation=data.draw(st.sampled_from(["relu", "gelu", "silu", "tanh"])),
                                   scaling=data.draw(st.sampled_from([1.0, 0.5])), target_modules=modules)

    @initialize(data=st.data(), palette=st.lists(st.sampled_from(sorted(QUANTISED)), min_size=1, max_size=4, unique=True),
                count=st.integers(1, 3))
    def start_with_adapters(self, data, palette, count):
        """Most interesting states have several adapters, often of one kind (two SHiRA masks fused
        into one weight, two DyLoRA ranks): each run attaches from a palette of kinds."""
        self.palette = palette
        for seed in range(count):
            self.attach(data, seed)

    @rule(data=st.data(), seed=SEEDS)
    def attach(self, data, seed):
        kind = data.draw(st.sampled_from(self.palette))
        name, config = self.pick(data, free=True), self.config_for(data, kind)
        if not self.attempt([DuplicateAdapterError] if name in self.specs else [], ak.attach, self.model, config, name):
            return
        randomise(self.model, name, seed=seed, scale=0.2)
        latent, indices = self.read(name, config.target_modules)
        for path, idx in indices.items():  # a SHiRA mask: sorted distinct in-range positions, exactly K of them
            numel = self.originals[path].weight.numel()
            assert idx.numel() == round(config.density * numel) and bool((idx[1:] > idx[:-1]).all())
            assert 0 <= int(idx[0]) and int(idx[-1]) < numel
        self.specs[name] = Spec(kind, config, latent, indices, rank=getattr(config, "r_max", 0))
        self.active = self.active or ((name, 1.0),)

    @rule(case=st.sampled_from([
        ("z", lambda: ak.LoRAConfig(r=2, target_modules=["9"]), TargetError),  # no such module
        ("z", lambda: ak.DyLoRAConfig(r_max=2, target_modules=["1"]), TargetError),  # a ReLU
        ("z", lambda: ak.BottleneckConfig(bottleneck=32, target_modules=["4"]), ConfigError),  # wider than 4 features
        ("z", lambda: ak.ShiraConfig(r=100, target_modules=["4"]), ConfigError),  # more entries than the weight has
        ("z", lambda: {"r": 2, "target_modules": ["0"]}, ConfigError),  # not a config
        ("z.y", lambda: ak.LoRAConfig(r=2, target_modules=["0"]), ConfigError),  # not a valid adapter name
        (None, lambda: ak.LoRAConfig(r=0, target_modules=["0"]), ConfigError),  # configs refuse bad values themselves
        (None, lambda: ak.LoRAConfig(bits=3, target_modules=["0"]), ConfigError),
        (None, lambda: ak.DyLoRAConfig(r_min=3, r_max=2, target_modules=["0"]), ConfigError),
    ]))
    def attach_invalid(self, case):
        name, build, error = case
        if name is None:
            self.attempt([error], build)
        else:
            self.attempt([error], ak.attach, self.model, build(), name)

    @rule(data=st.data())
    def detach(self, data):
        name = self.pick(data)
        if not self.attempt([] if name in self.specs else [AdapterNotFoundError], ak.detach, self.model, name):
            return
        del self.specs[name]
        self.active = tuple(p for p in self.active if p[0] != name)
        self.fused = tuple(p for p in self.fused if p[0] != name)
        if not self.specs:  # the model is plain again: its adapter state is gone
            self.fused_exact = True

    # -- activating and fusing ---------------------------------------------------------------
    @rule(data=st.data())
    def activate(self, data):
        names = self.draw_names(data)
        weights = self.draw_weights(data, len(names)) if names else None
        errors = self.weighted_errors(names, weights)
        pairs = tuple(zip(names, weights or [1.0] * len(names)))
        if not errors and self.fused and self.deltas_of(pairs) != self.fused:
            errors.append(FusedStateError)
        if self.attempt(errors, ak.activate, self.model, names or None, weights):
            self.active = pairs

    @rule(data=st.data())
    def activate_block(self, data):
        """A composition block: a nested ``Add`` of deltas (weights multiply), inside a ``Stack``
        with inserted modules after it; an ``Add`` holding an inserted module is refused."""
        attached = list(self.specs)
        if not attached:
            return
        chosen = data.draw(st.lists(st.sampled_from(attached), min_size=1, max_size=4, unique=True))
        deltas = [n for n in chosen if self.specs[n].kind != "bottleneck"]
        inserted = [n for n in chosen if self.specs[n].kind == "bottleneck"]
        scale = st.sampled_from([1.0, 0.5, -1.0, 2.0])
        outer, inner = data.draw(scale), data.draw(scale)
        if data.draw(st.booleans()) and inserted:  # an inserted module inside an Add
            block, errors, pairs = ak.Add(*chosen), [ConfigError], ()
        elif deltas:
            add = ak.Add(deltas[0], ak.Add(*deltas[1:], weights=[inner] * (len(deltas) - 1)), weights=[outer, 1.0]) \
                if len(deltas) > 1 else ak.Add(deltas[0], weights=[outer])
            block = ak.Stack(add, *inserted) if inserted else add
            pairs = ((deltas[0], outer),) + tuple((n, inner) for n in deltas[1:]) + tuple((n, 1.0) for n in inserted)
            errors = [FusedStateError] if self.fused and self.deltas_of(pairs) != self.fused else []
        else:
            return  # only inserted modules: the list/Stack rules already cover them
        event(f"activate_block: {type(block).__name__}{' (refused)' if errors else ''}")
        if self.attempt(errors, ak.activate, self.model, block):
            assert sorted(ak.active_adapters(self.model)) == sorted(pairs)
            self.active = tuple(ak.active_adapters(self.model))

    @rule(data=st.data(), named=st.booleans(), exact=st.booleans())
    def fuse(self, data, named, exact):
        if not named:
            target = self.deltas_of(self.active)
            if self.attempt([] if target else [FusionError], ak.fuse, self.model, exact=exact):
                self.fused_into(target, exact)
            return
        names = self.draw_names(data)
        weights = self.draw_weights(data, len(names))
        errors = self.weighted_errors(names, weights)
        if any(self.specs[n].kind == "bottleneck" for n in names if n in self.specs):
            errors.append(NotFusableError)
        target = tuple(zip(names, weights or [1.0] * len(names)))
        if self.attempt(errors, ak.fuse, self.model, names, weights, exact=exact):
            self.active = target + self.inserted_of(self.active)
            self.fused_into(target, exact)

    @rule(free=st.booleans())
    def unfuse(self, free):
        ak.unfuse(self.model, free_memory=free)
        self.fused = ()

    @rule(data=st.data(), weight=WEIGHT)
    def switch(self, data, weight):
        name = self.pick(data)
        errors = self.weighted_errors([name], [weight])
        if name in self.specs and self.specs[name].kind == "bottleneck":
            errors.append(NotFusableError)
        if self.attempt(errors, ak.switch, self.model, name, weight):
            exact = self.fused_exact if self.fused else True
            self.active = ((name, weight),) + self.inserted_of(self.active)
            self.fused_into(((name, weight),), exact)

    # -- ranks, bits, files --------------------------------------------------------------------
    @rule(data=st.data(), rank=st.sampled_from([1, 2, 3, 4] * 2 + [0, 5, 2.0, True]))
    def set_rank(self, data, rank):
        dylora = [n for n, s in self.specs.items() if s.kind == "dylora"]
        name = data.draw(st.none() | (st.sampled_from(dylora) if dylora else st.nothing()) | NAMES)
        chosen = [n for n, s in self.specs.items() if s.kind == "dylora"] if name is None else [name]
        errors = [] if chosen else [ConfigError]
        if name is not None and name not in self.specs:
            errors.append(AdapterNotFoundError)
        elif name is not None and self.specs[name].kind != "dylora":
            errors.append(ConfigError)
        if not (type(rank) is int and 1 <= rank <= 4):
            errors.append(ConfigError)
        if self.attempt(errors, ak.set_rank, self.model, rank, name):
            for n in chosen:
                self.specs[n].rank = rank
            self.drifted |= not self.fused_exact and any(n in chosen for n, _ in self.fused)

    @rule(data=st.data(), variant=st.sampled_from([(b, "gaussian_median") for b in (1, 2, 4, 8, 32, 3, 0)]
                                                  + [(1, "sign_mean"), (2, "sign_mean")]))
    def quantize(self, data, variant):
        bits, method = variant
        name = self.pick(data)
        errors = [] if name in self.specs else [AdapterNotFoundError]
        if bits not in (1, 2, 4, 8, 32) or (method == "sign_mean" and bits != 1):
            errors.append(ConfigError)
        if any(n == name for n, _ in self.fused):
            errors.append(FusedStateError)
        if self.attempt(errors, ak.quantize, self.model, name, bits, method):
            spec = self.specs[name]
            spec.config, spec.codes_kept = spec.config.replace(bits=bits, quantization=method), False

    @rule(data=st.data(), fuse=st.booleans())
    def save_and_load(self, data, fuse):
        source = self.pick(data)
        errors = [] if source in self.specs else [AdapterNotFoundError]
        if source in self.specs and not self.fused_exact and any(
                set(self.specs[n].config.target_modules) & set(self.specs[source].config.target_modules) for n, _ in self.fused):
            errors.append(FusedStateError)  # the fingerprint needs the original weights, unknown after an inexact fuse
        self.saves += 1
        directory = self.tmp / f"save{self.saves}"
        if not self.attempt(errors, ak.save, self.model, directory, source):
            return
        spec = self.specs[source]
        name = self.pick(data, free=True)
        fuse_exact = self.fused_exact if self.fused else True  # as ak.switch: exact unless an inexact fuse is in place
        errors = [DuplicateAdapterError] if name in self.specs else []
        if fuse and spec.kind == "bottleneck":
            errors.append(NotFusableError)
        # a drifted base may round to other bf16 values than the fingerprinted ones
        if not self.attempt(errors, ak.load, self.model, directory, name, fuse=fuse, ignore_fingerprint=self.drifted):
            return
        latent, indices = self.read(name, spec.config.target_modules)
        for path, params in latent.items():  # the file holds what the source's forward used
            for param, value in params.items():
                torch.testing.assert_close(value.double(), spec.effective(path, param), rtol=1e-6, atol=1e-7)
            if spec.kind == "shira":
                assert torch.equal(indices[path], spec.indices[path])
        self.specs[name] = Spec(spec.kind, spec.config, latent, indices, rank=getattr(spec.config, "r_max", 0),
                                codes_kept=spec.config.bits != 32)
        self.active = self.active or ((name, 1.0),)
        if fuse:
            self.active = ((name, 1.0),) + self.inserted_of(self.active)
            self.fused_into(((name, 1.0),), fuse_exact)

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def bookkeeping_agrees(self):
        assert ak.adapters(self.model) == list(self.specs)
        assert ak.active_adapters(self.model) == list(self.active)
        assert ak.fused_adapters(self.model) == list(self.fused)
        for name, spec in self.specs.items():  # no call changes an adapter's stored values
            latent, indices = self.read(name, spec.config.target_modules)
            assert all(torch.equal(latent[p][k], v) for p, params in spec.latent.items() for k, v in params.items())
            assert latent.keys() == spec.latent.keys() and all(latent[p].keys() == spec.latent[p].keys() for p in latent)
            assert all(torch.equal(indices[p], i) for p, i in spec.indices.items())
            assert ak.config_of(self.model, name).bits == spec.config.bits
            if spec.kind == "dylora":
                assert ak.dylora.current_rank(self.model, name) == spec.rank
        if not self.specs:  # detaching the last adapter gives back the original module objects
            assert all(self.model.get_submodule(p) is m for p, m in self.originals.items())
        else:  # the base is frozen, the adapters train
            assert all(p.requires_grad == (".adapters." in n) for n, p in self.model.named_parameters())

    @invariant()
    def base_weights_are_the_originals(self):
        for path, (weight, bias) in self.original_tensors.items():
            module = self.model.get_submodule(path)
            base = module.base_layer if isinstance(module, ak.AdaptedModule) else module
            assert torch.equal(base.bias, bias), path  # nothing is ever fused into a bias
            if self.fused:
                expected = self.base[path].double() + sum(
                    (w * self.specs[n].delta(path, weight.shape) for n, w in self.fused if path in self.specs[n].config.target_modules),
                    torch.zeros(weight.shape, dtype=torch.float64))
                torch.testing.assert_close(base.weight.double(), expected, rtol=0, atol=1e-5)
            elif self.drifted:
                torch.testing.assert_close(base.weight, weight, rtol=0, atol=1e-5)
                self.base[path] = base.weight.detach().clone()
            else:
                assert torch.equal(base.weight, weight), path

    @invariant()
    def output_matches_the_dense_reference(self):
        layers = {p: (self.base[p], bias) for p, (_, bias) in self.original_tensors.items()}
        with torch.no_grad():
            torch.testing.assert_close(self.model(self.x).double(), reference_output(self.x, layers, self.specs, self.active),
                                       rtol=1e-5, atol=1e-5)

TestAdapterMachine = AdapterMachine.TestCase

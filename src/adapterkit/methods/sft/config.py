"""LT-SFT configuration, the global budget K, and the adapter-size formula that matches K to a
Pfeiffer bottleneck adapter."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

from ...core.config import AdapterConfig
from ...errors import ConfigError

SELECTIONS = ("most_changed", "random", "given")
#: ``fn(changes, k) -> masks``: ``changes`` maps each targeted parameter (``"<module>.<tensor>"``) to
#: ``|θ − θ₀|`` after the dense phase; the result maps parameter names to bool masks of their shape
SelectionFn = Callable[[Mapping[str, Any], int], Mapping[str, Any]]


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SFTConfig(AdapterConfig):
    """Lottery-Ticket Sparse Fine-Tuning (Ansell et al., ACL 2022, arXiv 2110.07560).

    Phase 1 (at :func:`adapterkit.attach`, given ``calibration=batches``) fine-tunes every targeted
    tensor densely, then keeps the ``K`` entries that changed most under **one global threshold**
    over all targeted tensors (weights, biases, embeddings, norms) and rewinds the model. Phase 2
    trains only those ``K`` values (any loop, or :func:`adapterkit.sft.train_sft` for the whole
    procedure). Targeted modules are the matched ones and every module below them that has
    parameters of its own, so ``target_modules=r"bert"`` covers the whole encoder.

    Attributes:
        k: the global budget: entries trained over all targeted tensors; give k or density.
        density: the budget as a fraction of all targeted entries, in (0, 1].
        tensors: ``"all"`` parameters of each targeted module, or the parameter names to target
            (e.g. ``weight,bias``).
        freeze_norms: leave normalisation layers (LayerNorm, RMSNorm, BatchNorm, ...) out of the diff.
        full_steps: optimizer steps of the dense phase 1 (per iteration).
        sparse_steps: optimizer steps of the sparse phase 2 run by train_sft (per iteration).
        full_lr: AdamW learning rate of phase 1.
        l1: λ of the L1 pull towards the pre-trained values, λ·Σ|θ − θ₀|/N with N the base model's
            parameter count, added once per optimizer step (phase 1, and phase 2 in train_sft).
        accumulation: micro-batches per optimizer step (gradient accumulation) in both phases.
        selection: ``most_changed`` (LT-SFT), ``random`` (K uniformly random entries, no phase 1),
            ``given`` (the support passed as ``attach(..., support=...)``), or a callable
            ``fn(changes, k) -> masks``.
        iterations: rounds of (dense phase, select K/iterations new entries, sparse phase) in train_sft.
        seed: seed of the random selection.
        outcome: what the selection produced (K, entries, density, per-iteration counts); filled in by
            adapterkit.sft.train_sft and written to saved files; not an input.
    """

    k: int | None = None
    density: float | None = None
    tensors: str | Sequence[str] = "all"
    freeze_norms: bool = False
    full_steps: int = 100
    sparse_steps: int = 100
    full_lr: float = 5e-5
    l1: float = 0.0
    accumulation: int = 1
    selection: str | SelectionFn = "most_changed"
    iterations: int = 1
    seed: int = 0
    outcome: Mapping[str, Any] | None = None

    def validate(self) -> None:
        name = type(self).__name__
        if (self.k is None) == (self.density is None):
            raise ConfigError(f"{name}: give exactly one of k (entries) or density (fraction), got k={self.k!r}, "
                              f"density={self.density!r}")
        if self.k is not None and not (_integer(self.k) and self.k > 0):
            raise ConfigError(f"{name}: k must be a positive integer, got {self.k!r}")
        if self.density is not None and not (_number(self.density) and 0.0 < self.density <= 1.0):
            raise ConfigError(f"{name}: density must be in (0, 1], got {self.density!r}")
        if self.tensors == ("all",) or (isinstance(self.tensors, str) and self.tensors != "all"):
            object.__setattr__(self, "tensors", "all" if self.tensors == ("all",) else (self.tensors,))
        if isinstance(self.tensors, tuple):
            if not self.tensors or not all(isinstance(t, str) and t and "." not in t for t in self.tensors):
                raise ConfigError(f"{name}: tensors must be 'all' or non-empty parameter names such as "
                                  f"('weight', 'bias'), got {self.tensors!r}")
        elif self.tensors != "all":
            raise ConfigError(f"{name}: tensors must be 'all' or a list of parameter names, got {self.tensors!r}")
        for field in ("full_steps", "sparse_steps"):
            if not (_integer(getattr(self, field)) and getattr(self, field) >= 0):
                raise ConfigError(f"{name}: {field} must be a non-negative integer, got {getattr(self, field)!r}")
        for field, minimum in (("accumulation", 1), ("iterations", 1)):
            if not (_integer(getattr(self, field)) and getattr(self, field) >= minimum):
                raise ConfigError(f"{name}: {field} must be an integer >= {minimum}, got {getattr(self, field)!r}")
        if not (_number(self.full_lr) and self.full_lr > 0):
            raise ConfigError(f"{name}: full_lr must be a finite number > 0, got {self.full_lr!r}")
        if not (_number(self.l1) and self.l1 >= 0):
            raise ConfigError(f"{name}: l1 must be a finite number >= 0, got {self.l1!r}")
        if not isinstance(self.freeze_norms, bool):
            raise ConfigError(f"{name}: freeze_norms must be True or False, got {self.freeze_norms!r}")
        if not _integer(self.seed):
            raise ConfigError(f"{name}: seed must be an integer, got {self.seed!r}")
        if not callable(self.selection) and self.selection not in SELECTIONS \
                and not str(self.selection).startswith("custom:"):
            raise ConfigError(f"{name}: selection must be one of {SELECTIONS} or a callable, got {self.selection!r}")
        if self.needs_dense_phase and self.full_steps < 1:
            raise ConfigError(f"{name}: selection {self.selection_name!r} needs full_steps >= 1 (the dense phase)")
        if self.k is not None and self.iterations > self.k:
            raise ConfigError(f"{name}: {self.iterations} iterations cannot each add entries from k={self.k}")
        if self.outcome is not None and not isinstance(self.outcome, Mapping):
            raise ConfigError(f"{name}: outcome is written by adapterkit (a mapping), got {type(self.outcome).__name__}")

    @property
    def selection_name(self) -> str:
        """The selection rule's name (``custom:<function>`` for callables)."""
        if callable(self.selection):
            return f"custom:{getattr(self.selection, '__qualname__', type(self.selection).__name__)}"
        return self.selection

    @property
    def needs_dense_phase(self) -> bool:
        """Whether selection looks at the changes of a dense phase 1."""
        return self.selection == "most_changed" or callable(self.selection)

    @property
    def needs_gradients(self) -> bool:
        """Whether attaching needs ``calibration=batches`` (the command line then passes them)."""
        return self.needs_dense_phase

    def budget(self, total: int) -> int:
        """K for ``total`` targeted entries (raises when it cannot be met)."""
        if self.k is not None:
            if self.k > total:
                raise ConfigError(f"{type(self).__name__}: k={self.k} exceeds the {total} entries of the targeted tensors")
            k = self.k
        else:
            k = max(1, min(total, round(self.density * total)))
        if self.iterations > k:
            raise ConfigError(f"{type(self).__name__}: {self.iterations} iterations cannot each add entries from K={k}")
        return k

    def shares(self, total: int) -> list[int]:
        """New entries selected by each iteration: K split evenly, the first ones taking the remainder."""
        k = self.budget(total)
        return [k // self.iterations + (1 if i < k % self.iterations else 0) for i in range(self.iterations)]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["selection"] = self.selection_name  # a callable is not serialisable; saved indices keep the result
        return data


def match_adapter(d: int, rf: int, layers: int, invertible: bool = False) -> int:
    """K that matches a Pfeiffer bottleneck adapter with biases: ``layers · (2·d·⌊d/rf⌋ + ⌊d/rf⌋ + d)``
    for hidden size ``d`` and reduction factor ``rf``, plus a NICE invertible adapter (reduction
    factor 2) ``2·(2·⌊d/2⌋·⌊d/4⌋ + ⌊d/4⌋ + ⌊d/2⌋)`` when ``invertible``.

    The LT-SFT budgets of the composable-sft and ModularCLIR releases are these sizes: for mBERT
    (d = 768, 12 layers) ``match_adapter(768, 2, 12, invertible=True) == 7_387_776``.
    """
    for field, value in (("d", d), ("rf", rf), ("layers", layers)):
        if not (_integer(value) and value > 0):
            raise ConfigError(f"match_adapter: {field} must be a positive integer, got {value!r}")
    if rf > d:
        raise ConfigError(f"match_adapter: reduction factor {rf} exceeds the hidden size {d}")
    bottleneck = d // rf
    k = layers * (2 * d * bottleneck + bottleneck + d)
    if invertible:
        half, quarter = d // 2, d // 4
        k += 2 * (2 * half * quarter + quarter + half)
    return k

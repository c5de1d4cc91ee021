"""SHiRA configuration and budget rules."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from ...core.config import AdapterConfig
from ...errors import ConfigError

MASKS = ("rand", "struct", "wm", "grad", "snip")
MaskFn = Callable[..., Any]  # (weight, budget, *, generator, gradient) -> bool mask of the weight's shape


@dataclasses.dataclass(frozen=True)
class ShiraConfig(AdapterConfig):
    """Sparse High Rank Adapter: train ``K`` entries of each targeted weight through a fixed mask.

    Attributes:
        density: fraction of each weight's entries to train (``K = round(density · m · n)``).
        r: LoRA-matched budget instead (``K = r · (m + n)``, as PEFT's ``ShiraConfig.r``); give one of the two.
        mask: ``"rand"``, ``"struct"`` (every f-th row or column plus the diagonal), ``"wm"`` (largest
            ``|W|``), ``"grad"`` (largest ``|∇W L|``), ``"snip"`` (largest ``|W ⊙ ∇W L|``), or a callable
            ``fn(weight, budget, *, generator, gradient) -> bool mask``. grad and snip need
            ``ak.attach(..., calibration=batches)``.
        seed: base seed; every layer of every adapter derives its own seed from it, the adapter name and
            the module name, so no two layers or adapters share a random mask by accident.
        struct_axis: ``"rows"`` or ``"cols"`` for the struct mask.
        avoid: names of attached SHiRA adapters whose supports this adapter must not overlap (the
            paper's non-overlapping "next top-K" masks).
        grad_accumulate: ``"sum"`` (gradient of the summed loss) or ``"abs"`` (sum of per-batch |∇|).
    """

    density: float | None = None
    r: int | None = None
    mask: str | MaskFn = "rand"
    seed: int = 0
    struct_axis: str = "rows"
    avoid: Sequence[str] = ()
    grad_accumulate: str = "sum"

    def validate(self) -> None:
        if self.density is not None and self.r is not None:
            raise ConfigError("ShiraConfig: give either density or r, not both")
        if self.density is None and self.r is None:
            object.__setattr__(self, "density", 0.01)
        if self.density is not None and not (isinstance(self.density, (int, float)) and not isinstance(self.density, bool)
                                             and 0.0 < self.density <= 1.0):
            raise ConfigError(f"ShiraConfig: density must be in (0, 1], got {self.density!r}")
        if self.r is not None and not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"ShiraConfig: r must be a positive integer, got {self.r!r}")
        if not callable(self.mask) and self.mask not in MASKS and not str(self.mask).startswith("custom:"):
            raise ConfigError(f"ShiraConfig: mask must be one of {MASKS} or a callable, got {self.mask!r}")
        if self.struct_axis not in ("rows", "cols"):
            raise ConfigError(f"ShiraConfig: struct_axis must be 'rows' or 'cols', got {self.struct_axis!r}")
        if self.grad_accumulate not in ("sum", "abs"):
            raise ConfigError(f"ShiraConfig: grad_accumulate must be 'sum' or 'abs', got {self.grad_accumulate!r}")
        if isinstance(self.avoid, str):
            object.__setattr__(self, "avoid", (self.avoid,))
        if self.avoid and self.mask == "struct":
            raise ConfigError("ShiraConfig: avoid (non-overlapping masks) is not supported for the struct mask")

    @property
    def mask_name(self) -> str:
        """The mask rule's name (``custom:<function>`` for callables)."""
        if callable(self.mask):
            return f"custom:{getattr(self.mask, '__qualname__', type(self.mask).__name__)}"
        return self.mask

    @property
    def needs_gradients(self) -> bool:
        return self.mask in ("grad", "snip") or callable(self.mask)

    def budget(self, rows: int, cols: int, module_name: str = "") -> int:
        """Entries to train in a ``rows × cols`` weight."""
        total = rows * cols
        if self.r is not None:
            k = self.r * (rows + cols)
            if k > total:
                raise ConfigError(f"ShiraConfig: r={self.r} asks for {k} entries of {module_name or 'a'} {rows}×{cols} "
                                  f"weight, which has only {total}")
            return k
        return max(1, min(total, round(self.density * total)))

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["mask"] = self.mask_name  # a callable is not serialisable; saved indices make it reproducible
        return data

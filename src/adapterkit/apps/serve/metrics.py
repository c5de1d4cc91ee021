"""Server metrics: request counts, errors by status, latency percentiles over a bounded window,
batch sizes, and the process's resident memory. Thread-safe; one :class:`Metrics` per engine."""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from typing import Any

LATENCY_WINDOW = 4096  # latencies kept for the percentiles: memory stays bounded under any load
PERCENTILES = (50, 90, 99)


def rss_bytes() -> int:
    """Resident set size of this process now (0 where it cannot be read)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open(f"/proc/{os.getpid()}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ascending values by linear interpolation; nan when empty."""
    if not sorted_values:
        return float("nan")
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclasses.dataclass
class Metrics:
    """Counters of one server. ``record_request`` is called once per HTTP request (any status),
    ``record_batch`` once per forward the worker runs."""

    window: int = LATENCY_WINDOW
    requests: int = 0
    by_status: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # rows per forward
    batches: int = 0
    rows: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._latencies: collections.deque[float] = collections.deque(maxlen=self.window)
        self._lock = threading.Lock()

    def record_request(self, status: int, seconds: float) -> None:
        """Count one HTTP answer with its status and latency."""
        with self._lock:
            self.requests += 1
            self.by_status[int(status)] += 1
            self._latencies.append(seconds)

    def record_batch(self, rows: int) -> None:
        """Count one forward of ``rows`` rows."""
        with self._lock:
            self.batches += 1
            self.rows += rows
            self.batch_sizes[int(rows)] += 1

    def latency_ms(self) -> dict[str, float]:
        """Latency percentiles over the window, in milliseconds (nan when nothing was recorded)."""
        with self._lock:
            values = sorted(self._latencies)
        return {f"p{q}": percentile(values, q) * 1000 for q in PERCENTILES}

    def snapshot(self) -> dict[str, Any]:
        """Everything as JSON-ready values (the ``GET /metrics`` body, without the adapters)."""
        latency = self.latency_ms()
        with self._lock:
            errors = {str(s): n for s, n in sorted(self.by_status.items()) if s >= 400}
            return {
                "uptime_s": time.monotonic() - self.started,
                "requests": self.requests,
                "responses_by_status": {str(s): n for s, n in sorted(self.by_status.items())},
                "errors": sum(errors.values()),
                "errors_by_status": errors,
                "latency_ms": {k: (None if v != v else v) for k, v in latency.items()},  # nan → null
                "latency_window": len(self._latencies),
                "batches": self.batches,
                "rows": self.rows,
                "mean_batch_size": self.rows / self.batches if self.batches else None,
                "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "rss_bytes": rss_bytes(),
            }

"""Small timing / memory helpers for the benchmarks in this folder (no adapterkit imports)."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (perf_counter; the garbage collector is off meanwhile)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


@dataclass
class Step:
    """One call in a library's sequence: timed under ``name``, or untimed set-up when ``name`` is None."""

    name: str | None
    fn: Callable[[], Any]


def rounds(sequences: Mapping[str, Sequence[Step]], repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Run every library's step sequence ``warmup + repeats`` times, alternating the libraries
    round by round (and which one goes first) so slow drifts of a noisy machine hit both alike.

    Returns ``{library: {step name: [seconds, ...]}}`` with the warm-up rounds dropped.
    """
    libs = list(sequences)
    out: dict[str, dict[str, list[float]]] = {lib: {} for lib in libs}
    for round_ in range(warmup + repeats):
        order = libs if round_ % 2 == 0 else libs[::-1]
        for lib in order:
            for step in sequences[lib]:
                if step.name is None:
                    step.fn()
                    continue
                seconds = timed(step.fn)
                if round_ >= warmup:
                    out[lib].setdefault(step.name, []).append(seconds)
        gc.collect()
    return out


def summary(samples: list[float]) -> dict[str, Any]:
    """Median and spread of a sample list (kept with the raw samples)."""
    if not samples:
        return {"n": 0, "median": None, "min": None, "max": None, "samples": []}
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": list(samples),
    }


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def maxrss_bytes() -> int:
    """Peak RSS of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PeakRSS:
    """Context manager: the peak RSS while it is open.

    A sampling thread (every ``interval`` s; torch kernels release the GIL) gives the peak of
    the window; ``ru_maxrss`` gives the exact peak whenever the window set a new process-wide
    record. The larger of the two is reported.
    """

    interval: float = 0.002
    peak: int = 0
    sampled_peak: int = 0
    maxrss_before: int = 0
    maxrss_after: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.sampled_peak = max(self.sampled_peak, proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.maxrss_before = maxrss_bytes()
        self.sampled_peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.sampled_peak = max(self.sampled_peak, rss_bytes())
        self.maxrss_after = maxrss_bytes()
        exact = self.maxrss_after if self.maxrss_after > self.maxrss_before else 0
        self.peak = max(self.sampled_peak, exact)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_total_gib": round(psutil.virtual_memory().total / 2**30, 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    return info


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def _busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, steal seconds) from /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat", encoding="utf-8") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """How many cores *other* processes kept busy while a section ran (contention check).

    Machine-wide busy time from /proc/stat minus this process's and its waited-for children's
    CPU time, divided by the wall time. On a 2-core machine anything above ~0.2 distorts
    2-thread torch timings badly (a descheduled OpenMP thread stalls every parallel op).
    """

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.busy0, self.steal0 = _busy_seconds()
        self.own0 = _own_seconds()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall0
        busy, steal = _busy_seconds()
        own = _own_seconds() - self.own0
        others = max(0.0, (busy - self.busy0) - own)
        return {
            "wall_s": round(wall, 2),
            "own_cores": round(own / wall, 3) if wall > 0 else 0.0,
            "other_processes_cores": round(others / wall, 3) if wall > 0 else 0.0,
            "steal_cores": round((steal - self.steal0) / wall, 3) if wall > 0 else 0.0,
        }


def other_load(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes over the next ``seconds`` (this one idles meanwhile)."""
    watch = CpuWatch()
    time.sleep(seconds)
    return watch.stop()["other_processes_cores"]


def wait_until_quiet(threshold: float = 0.15, max_wait: float = 600.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) until other processes use fewer than ``threshold`` cores."""
    start = time.perf_counter()
    load = other_load()
    while load >= threshold and time.perf_counter() - start < max_wait:
        log(f"other processes keep {load:.2f} cores busy; waiting for a quiet machine ...")
        time.sleep(10)
        load = other_load()
    return {"waited_s": round(time.perf_counter() - start, 1), "other_processes_cores_at_start": load}

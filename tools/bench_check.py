#!/usr/bin/env python
"""Are the benchmark results still about the code in src/? (``make bench-check``)

For every results JSON under ``bench/results/`` (smoke runs, ``*.quick.json`` and ``results/tmp/``,
are skipped) this compares the tree hash of ``src/`` each measurement recorded
(``meta["provenance"]["src_tree"]``, see ``bench/_provenance.py``; also every later run that added
to the file, ``meta["extensions"]``) with ``git rev-parse HEAD:src`` now:

- ``fresh``: every measurement saw exactly today's committed ``src/``, without uncommitted changes;
- ``stale``: some measurement saw another ``src/`` tree, had uncommitted changes in ``src/``, or
  imported adapterkit from somewhere else;
- ``unknown``: a measurement recorded neither a tree hash nor a commit git still knows.

Results written before the tree hash was recorded carry only a commit: its tree is derived with
``git rev-parse <commit>:src``. Exits 1 unless every file is fresh; uncommitted changes in ``src/``
now are reported too (then even fresh results do not describe the working tree).

    .venv/bin/python tools/bench_check.py [FILE.json ...]
    .venv/bin/python tools/bench_check.py --self-check   # classify made-up records, no results needed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _provenance import git, records  # noqa: E402

FRESH, STALE, UNKNOWN = "fresh", "stale", "unknown"


def classify(meta: dict[str, Any], current_tree: str | None) -> tuple[str, str, str]:
    """``(status, measured commit(s), reason)`` of one result's metadata against ``current_tree``."""
    if current_tree is None:
        return UNKNOWN, "?", "git rev-parse HEAD:src failed here"
    statuses, commits, reasons = [], [], []
    for record in records(meta):
        if record is None:
            statuses.append(UNKNOWN)
            commits.append("?")
            reasons.append("no commit recorded")
            continue
        commit = record.get("commit") or "?"
        commits.append(commit[:10] + ("*" if record.get("legacy") else ""))
        tree = record.get("src_tree") or (git("rev-parse", f"{commit}:src") if commit != "?" else None)
        if tree is None:
            statuses.append(UNKNOWN)
            reasons.append(f"src tree of {commit[:10]} unknown to git")
        elif record.get("from_src") is False:
            statuses.append(STALE)
            reasons.append(f"adapterkit was imported from {record.get('adapterkit_path')}, not this src/")
        elif record.get("src_dirty"):
            statuses.append(STALE)
            reasons.append(f"{len(record.get('src_changes', []))} uncommitted change(s) in src/ when measured")
        elif tree != current_tree:
            statuses.append(STALE)
            reasons.append(f"src/ differs (tree {tree[:10]})")
        elif record.get("src_dirty") is None:
            statuses.append(UNKNOWN)
            reasons.append("same src tree, but whether src/ had uncommitted changes was not recorded")
        else:
            statuses.append(FRESH)
    status = UNKNOWN if UNKNOWN in statuses else STALE if STALE in statuses else FRESH
    return status, ", ".join(commits), "; ".join(dict.fromkeys(reasons))


def result_files(paths: list[str]) -> list[Path]:
    if paths:
        return [Path(p) for p in paths]
    return sorted(p for p in (ROOT / "bench" / "results").glob("*.json") if not p.name.endswith(".quick.json"))


def table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("file", "measured commit", "status", "reason")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + " | " + row[3] for row in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 6)
    return "\n".join(lines)


def check(paths: list[str]) -> int:
    current = git("rev-parse", "HEAD:src")
    rows = []
    for path in result_files(paths):
        try:
            meta = json.loads(path.read_text(encoding="utf-8")).get("meta", {})
        except (OSError, ValueError) as error:
            rows.append((path.name, "?", UNKNOWN, f"unreadable: {error}"))
            continue
        status, commits, reason = classify(meta, current)
        rows.append((path.name, commits, status, reason))
    print(f"src/ at HEAD: tree {(current or '?')[:10]} (commit {(git('rev-parse', 'HEAD') or '?')[:10]})")
    print(table(rows) if rows else "no results JSON found")
    print("(* = older result: only its commit was recorded; its src tree is derived from that commit)")
    dirty = [line for line in (git("status", "--porcelain", "--", "src") or "").splitlines() if line.strip()]
    if dirty:
        print(f"note: src/ has {len(dirty)} uncommitted change(s) now: no result describes the working tree")
    bad = [r for r in rows if r[2] != FRESH]
    print(f"{len(rows) - len(bad)} fresh, {sum(r[2] == STALE for r in rows)} stale, "
          f"{sum(r[2] == UNKNOWN for r in rows)} unknown")
    return 1 if bad or not rows else 0


def self_check() -> int:
    """Classify made-up records against this checkout's HEAD (no results files needed)."""
    head, tree = git("rev-parse", "HEAD"), git("rev-parse", "HEAD:src")
    if head is None or tree is None:
        print("self-check needs a git checkout with src/ at HEAD")
        return 1
    now = {"commit": head, "src_tree": tree, "src_dirty": False, "src_changes": []}
    other_tree = git("rev-parse", "HEAD^{tree}")  # the repository root: certainly not src/'s tree
    cases = {
        "fresh record": ({"provenance": now}, FRESH),
        "another src tree": ({"provenance": {**now, "src_tree": other_tree}}, STALE),
        "measured with uncommitted src changes": ({"provenance": {**now, "src_dirty": True, "src_changes": ["M x"]}}, STALE),
        "adapterkit imported from elsewhere": ({"provenance": {**now, "from_src": False}}, STALE),
        "legacy record of HEAD, clean": ({"adapterkit_commit": head, "src_uncommitted_changes": []}, FRESH),
        "legacy record, dirty": ({"adapterkit_git": {"commit": head, "src_uncommitted_changes": ["M x"]}}, STALE),
        "legacy record, unknown commit": ({"adapterkit_commit": "0" * 40, "src_uncommitted_changes": []}, UNKNOWN),
        "nothing recorded": ({}, UNKNOWN),
        "fresh, stale extension": ({"provenance": now, "extensions": [{"provenance": {**now, "src_tree": other_tree}}]}, STALE),
    }
    failures = 0
    for name, (meta, want) in cases.items():
        got = classify(meta, tree)[0]
        failures += got != want
        print(f"{'ok  ' if got == want else 'FAIL'} {name}: {got} (want {want})")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="results JSON files (default: bench/results/*.json)")
    parser.add_argument("--self-check", action="store_true", help="classify made-up records and exit")
    args = parser.parse_args(argv)
    return self_check() if args.self_check else check(args.files)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

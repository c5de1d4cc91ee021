"""What a benchmark result was measured on: the one place every bench script gets its git record from.

``provenance()`` is stored as ``meta["provenance"]`` in every results JSON:

- ``commit``: ``git rev-parse HEAD``;
- ``src_tree``: ``git rev-parse HEAD:src``, the tree hash of ``src/`` at that commit. Results stay
  valid across commits that leave ``src/`` alone, so ``tools/bench_check.py`` compares this hash,
  not the commit, with the current one;
- ``src_dirty`` / ``src_changes``: whether ``git status --porcelain -- src`` listed anything at
  measurement time (then the tree hash does not describe what was measured), and those lines;
- ``adapterkit_path`` / ``from_src``: where ``import adapterkit`` resolves to, and whether that is
  this checkout's ``src/adapterkit`` (else the git record says nothing about the code measured);
- ``subject``, ``src_last_commit``, ``src_last_subject``: for the reports' header lines.

Older results recorded only a commit (``meta["adapterkit_git"]["commit"]`` or
``meta["adapterkit_commit"]``); ``records()`` reads those too, without a tree hash.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str, root: Path = ROOT) -> str | None:
    """``git <args>``'s stdout, stripped; None when git fails (no checkout, unknown revision)."""
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance(root: Path = ROOT) -> dict[str, Any]:
    """The commit, the tree hash of ``src/`` at it, and the uncommitted changes under ``src/`` now."""
    status = git("status", "--porcelain", "--", "src", root=root)
    changes = [line for line in (status or "").splitlines() if line.strip()]
    spec = importlib.util.find_spec("adapterkit")
    package = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    return {
        "commit": git("rev-parse", "HEAD", root=root),
        "src_tree": git("rev-parse", "HEAD:src", root=root),
        "src_dirty": None if status is None else bool(changes),
        "src_changes": changes,
        "adapterkit_path": str(package),
        "from_src": package == (root / "src" / "adapterkit").resolve(),
        "subject": git("log", "-1", "--format=%s", root=root),
        "src_last_commit": git("log", "-1", "--format=%H", "--", "src", root=root),
        "src_last_subject": git("log", "-1", "--format=%s", "--", "src", root=root),
    }


def legacy(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a result written before ``provenance``: its commit and dirty flag, no tree hash."""
    old = meta.get("adapterkit_git")
    commit = old.get("commit") if isinstance(old, dict) else meta.get("adapterkit_commit")
    if not commit:
        return None
    changes = (old or meta).get("src_uncommitted_changes")
    return {"commit": commit, "src_tree": None, "src_dirty": None if changes is None else bool(changes),
            "src_changes": list(changes or []), "legacy": True}


def records(meta: dict[str, Any]) -> list[dict[str, Any] | None]:
    """Every measurement's record in a result's ``meta``: the run itself, then each later run that
    added to the same file (``meta["extensions"]``); None where a run recorded nothing."""
    metas = [meta, *meta.get("extensions", [])]
    return [m.get("provenance") or legacy(m) for m in metas]


def describe(meta: dict[str, Any], extensions: bool = True) -> str:
    """One line for a report header: commit, src tree and whether src/ had uncommitted changes
    (of the later runs that added to the file too, unless ``extensions`` is False)."""
    parts = []
    for record in records(meta)[: None if extensions else 1]:
        if record is None:
            parts.append("commit not recorded")
            continue
        text = f"commit {(record.get('commit') or '?')[:10]}"
        if record.get("src_tree"):
            text += f", src tree {record['src_tree'][:10]}"
        if record.get("src_dirty"):
            text += f", **{len(record['src_changes'])} uncommitted change(s) in src/**"
        if record.get("from_src") is False:
            text += f", **adapterkit imported from {record.get('adapterkit_path')}, not src/**"
        parts.append(text)
    return "; extended at ".join(parts)

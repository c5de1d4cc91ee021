"""Debian packages as a data source: download without installing, unpack, read licences.

Shared by the data builders that take their material from Debian bookworm packages (the CLIR man
pages, the photographs and cut-outs of the ranking tasks). ``apt-get download`` fetches ``.deb``
files into a directory, ``dpkg-deb -x`` unpacks each into ``tree/<package>``; nothing is installed.
Failures raise :class:`DataNotFoundError` naming the command the user should run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

from ..errors import DataNotFoundError


def built(root: Path, format_version: int) -> bool:
    """Whether ``root`` holds a finished build of this format (its ``manifest.json`` is written last)."""
    try:
        return json.loads((root / "manifest.json").read_text())["format"] == format_version
    except (OSError, ValueError, KeyError, TypeError):
        return False


def require(tools: Iterable[str], what: str, fetch_command: str) -> None:
    """Raise :class:`DataNotFoundError` unless every tool is on ``PATH``."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise DataNotFoundError(f"{tool} not found: {what}; on a Debian or Ubuntu machine run: {fetch_command}")


def download(debs: Path, packages: Iterable[str], fetch_command: str, progress: bool = False) -> None:
    """``apt-get download`` every package that has no ``.deb`` in ``debs`` yet (one call for all)."""
    missing = [p for p in packages if not any(debs.glob(f"{p}_*.deb"))]
    if not missing:
        return
    debs.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"apt-get download: {len(missing)} Debian packages into {debs}", file=sys.stderr)
    try:
        done = subprocess.run(["apt-get", "download", *missing], cwd=debs, capture_output=True, text=True,
                              check=False)
    except OSError as exc:  # apt-get vanished or is not executable
        raise DataNotFoundError(f"apt-get download failed ({exc}); run: apt-get update && {fetch_command}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["apt-get failed"])[-1]
        raise DataNotFoundError(f"apt-get download failed ({last}); run: apt-get update && {fetch_command}")


def extract(debs: Path, tree: Path, packages: Iterable[str]) -> dict[str, str]:
    """Unpack each package into ``tree/<package>`` (once per ``.deb``); returns each package's version."""
    versions: dict[str, str] = {}
    for package in packages:
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
        fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True)
        versions[package] = fields.stdout.strip()
        target = tree / package
        marker = target / ".adapterkit-extracted"
        if marker.is_file() and marker.read_text() == deb.name:
            continue
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        marker.write_text(deb.name)
    return versions


@dataclasses.dataclass(frozen=True)
class FilesParagraph:
    """One ``Files:`` paragraph of a machine-readable (DEP-5) copyright file."""

    patterns: tuple[str, ...]
    copyright: str
    licence: str


_FIELD = re.compile(r"^([A-Za-z-]+):[ \t]*(.*)$")


def files_paragraphs(copyright_text: str) -> list[FilesParagraph]:
    """The ``Files:`` paragraphs of a DEP-5 copyright file, in file order (empty for free-form files)."""
    paragraphs: list[FilesParagraph] = []
    for block in re.split(r"\n[ \t]*\n", copyright_text):
        fields: dict[str, list[str]] = {}
        key = None
        for line in block.splitlines():
            match = _FIELD.match(line)
            if match and not line[:1].isspace():
                key = match.group(1).lower()
                fields[key] = [match.group(2).strip()]
            elif key is not None and line[:1].isspace():
                fields[key].append(line.strip())
        if "files" in fields:
            patterns = tuple(p for line in fields["files"] for p in line.split())
            holders = "; ".join(h for h in fields.get("copyright", []) if h and h != ".")
            licence = (fields.get("license") or [""])[0]
            paragraphs.append(FilesParagraph(patterns, holders, licence))
    return paragraphs


def licence_of(paragraphs: list[FilesParagraph], source_path: str) -> FilesParagraph | None:
    """The paragraph that governs ``source_path`` (a path in the upstream source tree): DEP-5 says the
    last matching ``Files:`` paragraph wins; ``*`` matches across ``/``."""
    chosen = None
    for paragraph in paragraphs:
        if any(fnmatch.fnmatchcase(source_path, pattern) for pattern in paragraph.patterns):
            chosen = paragraph
    return chosen

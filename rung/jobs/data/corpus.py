"""Corpus sources: text files, globs, JSONL files with a "text" field, or the built-in corpus.

The built-in corpus is the Python standard library source of the running interpreter: present on every machine
that runs rung, license-clean, and large enough (~30 MB) for tiny models to learn from.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from rung.errors import DataError

BUILTIN = "builtin:python-stdlib"


def resolve_sources(sources: list[str]) -> list[Path]:
    """Expand globs into a sorted, de-duplicated file list; a source that matches nothing is an error."""
    if not sources:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    files: list[Path] = []
    for source in sources:
        matches = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
        paths = [Path(m) for m in matches if Path(m).is_file()]
        if not paths:
            raise DataError(f"corpus source not found: {source}")
        files.extend(paths)
    return list(dict.fromkeys(files))


def iter_documents(files: list[Path], max_bytes: int | None) -> Iterator[str]:
    """Yield documents (a text file is one; a JSONL line is one) until `max_bytes` of text has been read."""
    total = 0
    for path in files:
        for text in _documents_in(path):
            if not text:
                continue
            if max_bytes is not None and total + len(text.encode()) > max_bytes:
                if total == 0:  # always yield something, truncated, rather than an empty corpus
                    yield text.encode()[:max_bytes].decode(errors="ignore")
                return
            total += len(text.encode())
            yield text


def _documents_in(path: Path) -> Iterator[str]:
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        yield _jsonl_text(path, number, line)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror}") from None


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{path}:{number}: a JSONL record needs a string field \"text\"")
    return record["text"]

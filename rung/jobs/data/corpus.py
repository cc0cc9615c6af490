"""Corpus sources and their documents: plain text, JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, Arrow IPC, and
local Hugging Face `datasets` folders, given as paths, globs or directories; or the built-in corpus.

A source is read as a list of `Part`s — a text file, a JSONL file, one Parquet row group, one Arrow file — in a
fixed order (sources as given, globs sorted, row groups in file order). A part is the unit one tokenization task
reads, so the same documents come out in the same order whether one process reads every part or Ray Data tasks
read them in parallel. A document is a text file, a JSONL record, or a Parquet/Arrow row; empty ones are skipped.

Nothing is fetched from a hub: a source that names no local file but looks like a hub id is refused with the way
to download it. The built-in corpus is the Python standard library source of the running interpreter: present on
every machine that runs rung, license-clean, and large enough (~30 MB) for tiny models to learn from.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rung.errors import DataError

BUILTIN = "builtin:python-stdlib"
PartKind = Literal["text", "jsonl", "parquet", "arrow"]
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, slots=True)
class Part:
    """What one task reads: a whole file, or one row group of a Parquet file."""

    path: str
    kind: PartKind
    row_group: int | None = None


def kind_of(path: Path) -> PartKind:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".arrow", ".feather", ".ipc")):
        return "arrow"
    return "text"


def resolve_sources(sources: list[str]) -> list[Path]:
    """Expand globs and dataset folders into a de-duplicated file list; a source that matches nothing is an error.

    Empty `sources` is the built-in corpus."""
    if not sources:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    files: list[Path] = []
    for source in sources:
        matches = sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
        paths: list[Path] = []
        for match in map(Path, matches):
            if match.is_dir():
                paths.extend(dataset_folder_files(match))
            elif match.is_file():
                paths.append(match)
        if not paths:
            raise DataError(_not_found(source))
        files.extend(paths)
    return list(dict.fromkeys(files))


def _not_found(source: str) -> str:
    if not Path(source).exists() and _HUB_ID.match(source):
        name = source.removeprefix("hf://")
        return (f"corpus source {source!r} is not a local path; it looks like a Hugging Face hub dataset id. rung "
                f"fetches nothing from a hub: download it first (e.g. `hf download {name} --repo-type dataset "
                f"--local-dir DIR`) and give the local folder or its files")
    return f"corpus source not found: {source}"


def dataset_folder_files(folder: Path) -> list[Path]:
    """The data files of a `datasets` save_to_disk folder (state.json lists its Arrow files), or a folder of Parquet,
    Arrow or JSONL shards (recursively, sorted). A DatasetDict folder must be given as one split's folder."""
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{state}: not a Hugging Face datasets state.json (no _data_files list)") from None
        return [folder / name for name in names]
    splits = folder / "dataset_dict.json"
    if splits.is_file():
        try:
            names = json.loads(splits.read_text())["splits"]
        except (ValueError, KeyError, TypeError):
            names = []
        raise DataError(f"{folder} is a datasets DatasetDict: give one split's folder "
                        f"({', '.join(str(folder / n) for n in names) or 'its split folders'})")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and kind_of(p) != "text")
    if not files:
        raise DataError(f"{folder} holds no Parquet, Arrow or JSONL files (and is no datasets save_to_disk folder)")
    return files


def plan_parts(files: list[Path], text_field: str) -> list[Part]:
    """The parts to read, in order. Parquet and Arrow schemas are checked here, before any task starts: a missing or
    non-string text field, or a file that is not Parquet/Arrow, fails with the file named."""
    parts: list[Part] = []
    for path in files:
        kind = kind_of(path)
        if kind == "parquet":
            metadata = _parquet_file(path, text_field).metadata
            parts.extend(Part(str(path), kind, group) for group in range(metadata.num_row_groups))
        else:
            if kind == "arrow":
                with _arrow_reader(path) as reader:
                    _check_field(path, reader.schema, text_field)
            parts.append(Part(str(path), kind))
    return parts


def read_part(part: Part, text_field: str) -> Iterator[str]:
    """The non-empty documents of one part, in order."""
    path = Path(part.path)
    try:
        if part.kind == "text":
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text
        elif part.kind == "jsonl":
            yield from _jsonl_documents(path, text_field)
        elif part.kind == "parquet":
            yield from _parquet_documents(path, part.row_group, text_field)
        else:
            with _arrow_reader(path) as reader:
                for batch in reader:
                    yield from (text for text in batch.column(text_field).to_pylist() if text)
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror or err}") from None


def _parquet_documents(path: Path, row_group: int, text_field: str) -> Iterator[str]:
    import pyarrow

    try:
        table = _parquet_file(path, text_field).read_row_group(row_group, columns=[text_field])
    except pyarrow.ArrowException as err:  # a sound footer over damaged pages fails only here
        raise DataError(f"{path}: row group {row_group} is damaged ({err})") from None
    yield from (text for text in table.column(0).to_pylist() if text)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    name = path.name.lower()
    damaged: tuple[type[Exception], ...] = (EOFError, UnicodeDecodeError)
    if name.endswith(".gz"):
        handle = gzip.open(path, "rt", encoding="utf-8")
        damaged += (gzip.BadGzipFile,)
    elif name.endswith(".zst"):
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)
        handle = io.TextIOWrapper(stream, encoding="utf-8")
        damaged += (zstandard.ZstdError,)
    else:
        handle = path.open(encoding="utf-8")
    number = 0
    try:
        with handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    text = _jsonl_text(path, number, line, text_field)
                    if text:
                        yield text
    except damaged as err:
        raise DataError(f"{path}: unreadable after {number} lines ({type(err).__name__}: {err})") from None


def _jsonl_text(path: Path, number: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(f"{path}:{number}: a JSONL record needs a string field {text_field!r} (data.text_field)")
    return record[text_field]


def _parquet_file(path: Path, text_field: str):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    _check_field(path, handle.schema_arrow, text_field)
    return handle


class _arrow_reader:
    """An Arrow IPC file (random-access format) or stream (what `datasets` save_to_disk writes), as a context
    manager over its record batches."""

    def __init__(self, path: Path):
        import pyarrow

        self.path, self.source = path, None
        try:
            self.source = pyarrow.memory_map(str(path))
            try:
                reader = pyarrow.ipc.open_file(self.source)
                self._batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pyarrow.ArrowInvalid:
                self.source.seek(0)
                reader = pyarrow.ipc.open_stream(self.source)
                self._batches = iter(reader)
        except (pyarrow.ArrowException, OSError) as err:
            if self.source is not None:
                self.source.close()
            raise DataError(f"{path}: not a readable Arrow IPC file or stream ({err})") from None
        self.schema = reader.schema

    def __enter__(self) -> _arrow_reader:
        return self

    def __exit__(self, *_exc) -> None:
        self.source.close()

    def __iter__(self):
        import pyarrow

        try:
            yield from self._batches
        except pyarrow.ArrowException as err:
            raise DataError(f"{self.path}: damaged Arrow data ({err})") from None


def _check_field(path: Path, schema, text_field: str) -> None:
    import pyarrow

    if text_field not in schema.names:
        raise DataError(f"{path} has no column {text_field!r} (data.text_field); its columns are: "
                        f"{', '.join(schema.names) or 'none'}")
    kind = schema.field(text_field).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)
            or pyarrow.types.is_string_view(kind)):
        raise DataError(f"{path}: column {text_field!r} (data.text_field) holds {kind}, not strings")

"""Checkpoint directories: staged under a temporary name, committed atomically, verified before use.

Layout under the store's root:

    step_00000010/            a committed checkpoint
        manifest.json         {file: sha256} for every other file; written last, so its presence means complete
        ...                   whatever the writer put there (rung: model/optimizer safetensors, state, RNG)
    .staging-step_00000010/   being written; never read, removed on the next save

`commit` renames the staging directory into place, so a crash leaves either the old set of checkpoints or the new
one. `latest` walks checkpoints newest first and skips, with a warning, any whose files are missing or whose
checksums do not match. `RemoteMirror` keeps a copy of committed checkpoints at an object-store URI. This module
knows nothing of torch: it moves and hashes files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from rung.errors import RungError

MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:08d}"

    def staging_path(self, step: int) -> Path:
        return self.root / f".staging-{self.name(step)}"

    def staging(self, step: int) -> Path:
        """A fresh, empty directory to write checkpoint `step` into (removing any leftover of an earlier try)."""
        path = self.staging_path(step)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, step: int) -> Path:
        """Hash every file, write the manifest last, rename into place, then prune to the newest `keep`."""
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(staging)): _sha256(p) for p in files}
        _write_durably(staging / MANIFEST, json.dumps({"step": step, "files": manifest}, indent=2))
        final = self.root / self.name(step)
        if final.exists():  # a re-run of the same step after a restart: replace it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        self._prune()
        return final

    def committed(self) -> list[tuple[int, Path]]:
        """Committed checkpoints (those with a manifest), oldest first; contents not verified."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _NAME.match(p.name)) and (p / MANIFEST).is_file()]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        """The newest checkpoint whose files all match their checksums; damaged ones are skipped with a warning."""
        for step, path in reversed(self.committed()):
            problem = verify(path)
            if problem is None:
                return step, path
            warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
        return None

    def _prune(self) -> None:
        for _, path in self.committed()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(path, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None if every file listed in the manifest is present with the right checksum, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if _sha256(file) != digest:
            return f"checksum mismatch in {name}"
    return None


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return _stream_sha256(handle)


def _stream_sha256(handle) -> str:
    """sha256 of a binary stream read in 1 MiB blocks (a local file or a pyarrow input stream)."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _write_durably(path: Path, text: str) -> None:
    with path.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class RemoteMirror:
    """Committed checkpoints copied to an object store or any filesystem pyarrow can reach by URI (s3://, gs://,
    hdfs://, file://), for clusters without a shared filesystem and for runs that outlive their machines.

    Object stores have no atomic rename, so completeness is marked the same way as locally, by order: every file is
    uploaded first and the manifest last; a checkpoint without a manifest is an interrupted upload and is ignored."""

    def __init__(self, uri: str, keep: int = 3):
        import pyarrow.fs as pafs

        self.uri, self.keep = uri, keep
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
            self.fs.create_dir(self.root, recursive=True)
        except (OSError, ValueError) as err:
            raise RungError(f"cannot use checkpoint storage {uri}: {err}") from None

    def check_writable(self) -> None:
        probe = f"{self.root}/.write-test-{os.getpid()}"
        try:
            with self.fs.open_output_stream(probe) as handle:
                handle.write(b"")
            self.fs.delete_file(probe)
        except OSError as err:
            raise RungError(f"checkpoint storage {self.uri} is not writable: {err}") from None

    def upload(self, local: Path) -> None:
        target = f"{self.root}/{local.name}"
        self.fs.create_dir(target, recursive=True)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST) + [local / MANIFEST]
        for path in files:
            with path.open("rb") as source, self.fs.open_output_stream(f"{target}/{path.relative_to(local)}") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
        for _, name in self.committed()[: -self.keep] if self.keep > 0 else []:
            self.fs.delete_dir(f"{self.root}/{name}")

    def committed(self) -> list[tuple[int, str]]:
        import pyarrow.fs as pafs

        found = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            match = _NAME.match(info.base_name)
            if match and info.type == pafs.FileType.Directory and \
                    self.fs.get_file_info(f"{info.path}/{MANIFEST}").type == pafs.FileType.File:
                found.append((int(match.group(1)), info.base_name))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest uploaded checkpoint whose files match their checksums; damaged ones are skipped."""
        for step, name in reversed(self.committed()):
            problem = self._verify(name)
            if problem is None:
                return step
            warnings.warn(f"skipping checkpoint {self.uri}/{name}: {problem}", stacklevel=2)
        return None

    def download(self, step: int, into: Path) -> Path:
        """Copy checkpoint `step` into the local store directory `into` (a no-op if it is already there)."""
        name = CheckpointStore.name(step)
        final = into / name
        if (final / MANIFEST).is_file():
            return final
        staging = into / f".download-{name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        manifest = json.loads(self._read(f"{name}/{MANIFEST}"))
        for file in [*manifest["files"], MANIFEST]:
            with self.fs.open_input_stream(f"{self.root}/{name}/{file}") as source, (staging / file).open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
        try:
            os.replace(staging, final)
        except OSError:  # another process on this machine finished the same download first
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def _read(self, relative: str) -> bytes:
        with self.fs.open_input_stream(f"{self.root}/{relative}") as handle:
            return handle.read()

    def _verify(self, name: str) -> str | None:
        try:
            manifest = json.loads(self._read(f"{name}/{MANIFEST}"))["files"]
        except (OSError, ValueError, KeyError) as err:
            return f"unreadable manifest ({err})"
        for file, digest in manifest.items():
            try:
                with self.fs.open_input_stream(f"{self.root}/{name}/{file}") as handle:
                    actual = _stream_sha256(handle)
            except OSError:
                return f"missing file {file}"
            if actual != digest:
                return f"checksum mismatch in {file}"
        return None

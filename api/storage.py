"""The artifact store: where finished checkpoints and uploaded texts live.

A job's files appear only when complete: ``publish`` moves a finished local folder into place in one
rename (local backend), so a reader sees either nothing or the whole folder. Keys are relative
paths (``jobs/<id>/model/model.safetensors``, ``texts/<sha256>.txt``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol


class StoreError(RuntimeError):
    """A key that is missing or not allowed."""


@dataclass(frozen=True)
class StoredFile:
    name: str  # path relative to the published folder, '/'-separated
    key: str  # store key
    bytes: int
    sha256: str


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ArtifactStore(Protocol):
    def publish(self, prefix: str, folder: Path) -> list[StoredFile]:
        """Move a finished local folder under ``prefix`` atomically; returns its files."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def open(self, key: str) -> BinaryIO: ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for ``key`` when the backend has one (used for zero-copy downloads)."""
        ...

    def delete_prefix(self, prefix: str) -> None: ...

    def work_dir(self) -> Path:
        """Scratch space for a job's unfinished outputs, on the same filesystem when possible."""
        ...


class LocalStore:
    """Files under one root directory; publishing is a rename on the same filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if p == self.root or self.root not in p.parents:
            raise StoreError(f"key {key!r} is outside the store")
        return p

    def work_dir(self) -> Path:
        d = self.root / ".work"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def publish(self, prefix: str, folder: Path) -> list[StoredFile]:
        dest = self._path(prefix)
        if dest.exists():
            raise StoreError(f"{prefix} is already published")
        dest.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(folder)
        try:
            os.rename(folder, dest)  # atomic on one filesystem
        except OSError:
            tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=dest.parent))
            shutil.rmtree(tmp)
            shutil.copytree(folder, tmp)
            os.rename(tmp, dest)
            shutil.rmtree(folder, ignore_errors=True)
        return list(self.list(prefix))

    def list(self, prefix: str) -> Iterator[StoredFile]:
        base = self._path(prefix)
        for p in sorted(base.rglob("*")):
            if p.is_file():
                name = p.relative_to(base).as_posix()
                yield StoredFile(name=name, key=f"{prefix}/{name}", bytes=p.stat().st_size, sha256=sha256_of(p))

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=dest.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        p = self._path(key)
        if not p.is_file():
            raise StoreError(f"{key} is not in the store")
        return p.stat().st_size

    def open(self, key: str) -> BinaryIO:
        p = self._path(key)
        if not p.is_file():
            raise StoreError(f"{key} is not in the store")
        return open(p, "rb")

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


def make_store(root: Path) -> ArtifactStore:
    return LocalStore(root)

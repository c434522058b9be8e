"""The artifact store: where finished checkpoints and uploaded texts live.

A job's files appear only when complete: ``publish`` moves a finished local folder into place in one
rename (local backend), or uploads every file and then a completion marker last (S3 backend,
service/storage/s3.py), so a reader sees either nothing or the whole folder. Keys are relative paths
(``jobs/<id>/model/model.safetensors``, ``texts/<sha256>.txt``). ``make_store(settings)`` picks the
backend: the local directory by default (one host), S3-compatible for several hosts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from quant_core.checksums import sha256_file

STORE_ERROR_CODES = ("not_found", "bad_key", "exists", "bad_range", "unavailable", "misconfigured")


class StoreError(RuntimeError):
    """A store operation that failed. ``code`` (one of STORE_ERROR_CODES) says how, for callers to act on (the
    API maps it to its HTTP status): a missing key, a key that is not allowed, an already published prefix, a
    range outside the file, a backend that did not answer or answered short, a store that is not set up."""

    def __init__(self, message: str, *, code: str = "not_found", key: str | None = None) -> None:
        assert code in STORE_ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.key = key


@dataclass(frozen=True)
class StoredFile:
    name: str  # path relative to the published folder, '/'-separated
    key: str  # store key
    bytes: int
    sha256: str


CHUNK = 1 << 20  # bytes per chunk when streaming


def check_range(key: str, size: int, start: int, end: int | None) -> int:
    """The range's end (exclusive) when ``start``..``end`` lies inside a file of ``size`` bytes."""
    end = size if end is None else end
    if not 0 <= start <= end <= size:
        raise StoreError(f"range {start}-{end} is outside {key} ({size} bytes)", code="bad_range", key=key)
    return end


class ArtifactStore(Protocol):
    def publish(self, prefix: str, folder: Path) -> list[StoredFile]:
        """Move a finished local folder under ``prefix`` atomically; returns its files."""
        ...

    def list(self, prefix: str) -> Iterator[StoredFile]:
        """The files of a published prefix (nothing when it is not published, or not completely)."""
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def open(self, key: str) -> BinaryIO: ...

    def iter_bytes(self, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Bytes ``start`` up to ``end`` (exclusive; None = the end) of ``key``, in chunks.

        StoreError when the key is missing or the range is not inside the file (0 <= start <= end <= size).
        """
        ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for ``key`` when the backend has one (used for zero-copy downloads)."""
        ...

    def delete_prefix(self, prefix: str) -> None: ...

    def work_dir(self) -> Path:
        """Scratch space for a job's unfinished outputs, on the same filesystem when possible."""
        ...


class LocalStore:
    """Files under one root directory; publishing is a rename on the same filesystem."""

    def __init__(self, root: Path, work_root: Path | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._work = Path(work_root).resolve() if work_root is not None else self.root / ".work"

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if p == self.root or self.root not in p.parents:
            raise StoreError(f"key {key!r} is outside the store", code="bad_key", key=key)
        return p

    def work_dir(self) -> Path:
        self._work.mkdir(parents=True, exist_ok=True)
        return self._work

    def publish(self, prefix: str, folder: Path) -> list[StoredFile]:
        dest = self._path(prefix)
        if dest.exists():
            raise StoreError(f"{prefix} is already published", code="exists", key=prefix)
        folder = Path(folder)
        if not folder.is_dir():
            raise StoreError(f"{folder} is not a folder; nothing to publish", code="not_found", key=prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
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
                yield StoredFile(name=name, key=f"{prefix}/{name}", bytes=p.stat().st_size, sha256=sha256_file(p))

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
            raise StoreError(f"{key} is not in the store", key=key)
        return p.stat().st_size

    def open(self, key: str) -> BinaryIO:
        p = self._path(key)
        if not p.is_file():
            raise StoreError(f"{key} is not in the store", key=key)
        return open(p, "rb")

    def iter_bytes(self, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = CHUNK) -> Iterator[bytes]:
        f = self.open(key)  # raises here, not at the first next()
        try:
            stop = check_range(key, os.fstat(f.fileno()).st_size, start, end)
        except BaseException:
            f.close()
            raise
        return _read_range(f, start, stop, chunk_size)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


def _read_range(f: BinaryIO, start: int, stop: int, chunk_size: int) -> Iterator[bytes]:
    with f:
        f.seek(start)
        left = stop - start
        while left > 0:
            block = f.read(min(chunk_size, left))
            if not block:
                raise StoreError(f"{getattr(f, 'name', 'file')} ended {left} bytes early", code="unavailable")
            left -= len(block)
            yield block


def make_store(settings: Any) -> ArtifactStore:
    """The store the settings name (service.settings.ApiSettings or WorkerSettings).

    ``store='local'`` (the default): LocalStore under ``artifact_root``; ``store='s3'``: S3Store on
    ``s3_bucket``. A bare path still means a LocalStore there.
    """
    if isinstance(settings, (str, os.PathLike)):
        return LocalStore(Path(settings))
    kind = getattr(settings, "store", "local")
    if kind == "local":
        return LocalStore(settings.artifact_root, work_root=settings.work_root)
    if kind == "s3":
        from .s3 import S3Store

        if not settings.s3_bucket:
            raise StoreError("SPINQUANT_STORE=s3 needs a bucket: set SPINQUANT_S3_BUCKET", code="misconfigured")
        key_id, secret = settings.s3_access_key_id, settings.s3_secret_access_key
        return S3Store(bucket=settings.s3_bucket, prefix=settings.s3_prefix, endpoint_url=settings.s3_endpoint_url,
                       region=settings.s3_region, access_key_id=key_id.get_secret_value() if key_id else None,
                       secret_access_key=secret.get_secret_value() if secret else None, work_root=settings.work_root)
    raise StoreError(f"unknown store {kind!r}; accepted: 'local' or 's3'", code="misconfigured")

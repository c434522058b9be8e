"""The S3-compatible artifact store: one bucket (AWS S3, MinIO, Ceph, moto...) shared by every host.

Keys map to objects ``<s3_prefix><key>``. ``publish`` uploads every file of a finished folder, then
writes the completion marker ``<prefix>/.complete`` LAST (a JSON list of the files with sizes and
sha256). Readers treat a published prefix without its marker as absent, so a job's files appear only
when complete, as with the local backend's rename: every object that ``publish`` uploads carries its
prefix in its metadata, and ``exists``/``size``/``open``/``iter_bytes``/``list`` accept it only when
that prefix's marker lists it with the same size. ``put_bytes`` objects (uploaded texts) are one PUT
each, whole or absent. ``delete_prefix`` removes the marker first, then the objects.
"""

from __future__ import annotations

import functools
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import quote, unquote

from quant_core.checksums import sha256_file

from . import CHUNK, StoredFile, StoreError, check_range

MARKER = ".complete"  # the completion marker's name inside a published prefix
META = "spinquant-prefix"  # object metadata: the prefix a published file belongs to


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _missing(exc: Exception) -> bool:
    return _code(exc) in ("404", "NoSuchKey", "NotFound")


F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _translated() -> Iterator[None]:
    """botocore's errors as StoreError codes: S3 that cannot be reached, times out, fails (5xx) or throttles is
    ``unavailable`` (the API answers 503, the worker's export fails the job with that code); any other refusal
    (access denied, no such bucket) is ``misconfigured``. The StoreErrors the methods raise pass unchanged."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        busy = status >= 500 or status == 429 or _code(exc) in ("SlowDown", "Throttling", "RequestTimeout")
        raise StoreError(f"S3 refused the request ({_code(exc) or status}): {exc}",
                         code="unavailable" if busy else "misconfigured") from exc
    except BotoCoreError as exc:
        raise StoreError(f"S3 did not answer: {exc}", code="unavailable") from exc


def _answers(fn: F) -> F:
    """A store method (or generator) whose botocore errors come out as StoreError (``_translated``)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args: Any, **kwargs: Any) -> Any:
            with _translated():
                yield from fn(*args, **kwargs)
        return cast(F, gen)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _translated():
            return fn(*args, **kwargs)
    return cast(F, call)


def _name_order(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))  # the local backend's order (path parts)


class S3Store:
    """Objects in one bucket under an optional prefix; publishing ends with a completion marker."""

    def __init__(self, *, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 work_root: Path | None = None, client: Any = None) -> None:
        if not bucket:
            raise StoreError("the S3 store needs a bucket (SPINQUANT_S3_BUCKET)", code="misconfigured")
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        if client is None:
            import boto3

            extra: dict[str, Any] = {}
            if endpoint_url:  # S3-compatible servers: path-style URLs, checksums only where S3 requires them
                extra = dict(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                             response_checksum_validation="when_required")
            cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120,
                         **extra)
            # None for the keys: boto3's default chain (environment, shared files, instance or pod role).
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url or None, region_name=region or None,
                aws_access_key_id=access_key_id or None, aws_secret_access_key=secret_access_key or None, config=cfg)
        self.client = client
        self._transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)
        self._work = Path(work_root) if work_root is not None else Path(tempfile.gettempdir()) / "spinquant-work"

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"

    @_answers
    def ensure_bucket(self) -> bool:
        """Create the bucket when it is missing (a fresh local S3 server); True when it was created."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if not (_missing(exc) or _code(exc) == "NoSuchBucket"):
                raise
        region = self.client.meta.region_name
        where = {"CreateBucketConfiguration": {"LocationConstraint": region}} if region not in (None, "us-east-1") else {}
        self.client.create_bucket(Bucket=self.bucket, **where)
        return True

    # keys
    def _obj(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"key {key!r} is outside the store (or not a plain relative path)", code="bad_key", key=key)
        return self.prefix + key

    def _marker(self, prefix: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._obj(f"{prefix}/{MARKER}"))["Body"]
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        with body:
            return json.loads(body.read())

    def _stat(self, key: str) -> tuple[int, str] | None:
        """(size, ETag) when ``key`` is visible: a put_bytes object, or a file its prefix's marker lists."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._obj(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        size, etag = int(head["ContentLength"]), head["ETag"]
        owner = (head.get("Metadata") or {}).get(META)
        if owner is None:
            return None if key.rsplit("/", 1)[-1] == MARKER else (size, etag)
        owner = unquote(owner)
        if not key.startswith(owner + "/"):
            return None
        marker = self._marker(owner)
        name = key[len(owner) + 1:]
        entry = next((f for f in (marker or {}).get("files", []) if f["name"] == name), None)
        return (size, etag) if entry is not None and int(entry["bytes"]) == size else None

    # the protocol
    def work_dir(self) -> Path:
        self._work.mkdir(parents=True, exist_ok=True)
        return self._work

    @_answers
    def publish(self, prefix: str, folder: Path) -> list[StoredFile]:
        from botocore.exceptions import ClientError

        marker_key = self._obj(f"{prefix}/{MARKER}")
        if self._marker(prefix) is not None:
            raise StoreError(f"{prefix} is already published", code="exists", key=prefix)
        folder = Path(folder)
        if not folder.is_dir():
            raise StoreError(f"{folder} is not a folder; nothing to publish", key=prefix)
        paths = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).parts)
        files: list[StoredFile] = []
        for p in paths:
            name = p.relative_to(folder).as_posix()
            if name == MARKER:
                raise StoreError(f"{folder} holds a file named {MARKER}, the store's completion marker",
                                 code="bad_key", key=MARKER)
            files.append(StoredFile(name=name, key=f"{prefix}/{name}", bytes=p.stat().st_size, sha256=sha256_file(p)))
            self.client.upload_file(str(p), self.bucket, self._obj(f"{prefix}/{name}"),
                                    ExtraArgs={"Metadata": {META: quote(prefix)}}, Config=self._transfer)
        body = json.dumps({"version": 1, "prefix": prefix,
                           "files": [{"name": f.name, "bytes": f.bytes, "sha256": f.sha256} for f in files]})
        try:  # last: the prefix appears now; If-None-Match makes a racing second publisher lose
            self.client.put_object(Bucket=self.bucket, Key=marker_key, Body=body.encode(),
                                   ContentType="application/json", IfNoneMatch="*")
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise StoreError(f"{prefix} is already published", code="exists", key=prefix) from None
            raise
        shutil.rmtree(folder, ignore_errors=True)
        return files

    @_answers
    def list(self, prefix: str) -> Iterator[StoredFile]:
        self._obj(prefix)  # refuses keys outside the store
        marker = self._marker(prefix)
        for f in sorted((marker or {}).get("files", []), key=lambda f: _name_order(f["name"])):
            yield StoredFile(name=f["name"], key=f"{prefix}/{f['name']}", bytes=int(f["bytes"]), sha256=f["sha256"])

    @_answers
    def put_bytes(self, key: str, data: bytes) -> None:
        if key.rsplit("/", 1)[-1] == MARKER:
            raise StoreError(f"{MARKER} is the store's completion marker; not a key for put_bytes", code="bad_key", key=key)
        self.client.put_object(Bucket=self.bucket, Key=self._obj(key), Body=data)

    @_answers
    def exists(self, key: str) -> bool:
        return self._stat(key) is not None

    @_answers
    def size(self, key: str) -> int:
        st = self._stat(key)
        if st is None:
            raise StoreError(f"{key} is not in the store", key=key)
        return st[0]

    def _get(self, key: str, etag: str, byte_range: str | None = None) -> Any:
        from botocore.exceptions import ClientError

        extra = {"Range": byte_range} if byte_range else {}
        try:  # If-Match: the object read is the one just checked
            return self.client.get_object(Bucket=self.bucket, Key=self._obj(key), IfMatch=etag, **extra)["Body"]
        except ClientError as exc:
            if _missing(exc) or _code(exc) in ("PreconditionFailed", "412"):
                raise StoreError(f"{key} is not in the store (it changed or went away)", key=key) from None
            raise

    @_answers
    def open(self, key: str) -> BinaryIO:
        st = self._stat(key)
        if st is None:
            raise StoreError(f"{key} is not in the store", key=key)
        return self._get(key, st[1])  # botocore's StreamingBody: read(), iter_chunks(), a context manager

    @_answers
    def iter_bytes(self, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = CHUNK) -> Iterator[bytes]:
        st = self._stat(key)
        if st is None:
            raise StoreError(f"{key} is not in the store", key=key)
        stop = check_range(key, st[0], start, end)
        if stop == start:
            return iter(())
        return _chunks(self._get(key, st[1], f"bytes={start}-{stop - 1}"), stop - start, chunk_size)

    def local_path(self, key: str) -> Path | None:
        return None

    @_answers
    def delete_prefix(self, prefix: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._obj(f"{prefix}/{MARKER}"))  # invisible first
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=self._obj(prefix) + "/")
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i:i + 1000], "Quiet": True})


@_answers
def _chunks(body: Any, length: int, chunk_size: int) -> Iterator[bytes]:
    with body:
        got = 0
        for block in body.iter_chunks(chunk_size):
            got += len(block)
            yield block
        if got != length:
            raise StoreError(f"short read from S3: {got} of {length} bytes", code="unavailable")

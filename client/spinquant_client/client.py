"""Client for the SpinQuant service: the ``Client`` class (httpx only) and the ``spinquant`` CLI.

    spinquant submit local:llama-tiny --w-bits 4 --a-bits 4 --kv-bits 4 --steps 20 \\
        --calib-text train.txt --eval-text test.txt --idempotency-key "$GITHUB_SHA-w4a4" --download out/
    spinquant status ID | list [--status S] [--limit N] | cancel ID | download ID DIR     (each with --json)
    python -m spinquant_client ...                                                   (the same CLI)

URL and token: ``--url``/``--token`` or ``SPINQUANT_URL`` (default http://127.0.0.1:8000) / ``SPINQUANT_TOKEN``.

Exit codes:
    0  succeeded (and, with --download, every file's sha256 matches the API and SHA256SUMS)
    2  bad request: the server answered 4xx (its detail is printed), or the CLI was misused (no token, ...)
    3  the job failed (its error code and message are printed)
    4  the job was cancelled
    5  timed out waiting (--timeout); the job keeps running on the server
    6  checksum mismatch in a download
    7  server unreachable (connection errors or 5xx after the retries)

Library use::

    from spinquant_client import Client
    c = Client("http://127.0.0.1:8000", token)
    job = c.wait(c.submit("local:llama-tiny", settings={"w_bits": 4}, calib={"dataset": "wikitext2"})["id"])
    c.download(job["id"], "out/")        # raises ChecksumMismatch (exit 6) on any bad file

Requests are retried with exponential backoff (0.5 s, doubling) on connection errors and 5xx, never on
4xx. ``POST /v1/jobs`` always carries an ``Idempotency-Key`` (a fresh uuid when none is given), so a
retried submission can never create a second job.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")
EXIT_OK, EXIT_BAD_REQUEST, EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMEOUT, EXIT_CHECKSUM, EXIT_UNREACHABLE = 0, 2, 3, 4, 5, 6, 7
EXIT_FOR_STATUS = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
SUMS = "SHA256SUMS"


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file in 1 MiB chunks. The client is its own distribution and imports nothing of the
    server's (quant_core.checksums writes the same format; tests/client checks the two agree)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class ClientError(Exception):
    """Base of the client's errors; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_BAD_REQUEST


class RequestRefused(ClientError):
    """The server answered 4xx (never retried). ``lines`` are its detail, one ``loc: msg`` per 422 item."""

    exit_code = EXIT_BAD_REQUEST

    def __init__(self, status: int, detail: Any, where: str = "") -> None:
        self.status, self.detail, self.where = status, detail, where
        if isinstance(detail, list):
            self.lines = [f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', d)}" if isinstance(d, dict)
                          else str(d) for d in detail]
        else:
            self.lines = [str(detail)]
        super().__init__(f"{where} -> HTTP {status}: " + "; ".join(self.lines))


class Unreachable(ClientError):
    exit_code = EXIT_UNREACHABLE


class WaitTimeout(ClientError):
    exit_code = EXIT_TIMEOUT

    def __init__(self, msg: str, job: dict[str, Any] | None = None) -> None:
        super().__init__(msg)
        self.job = job


class ChecksumMismatch(ClientError):
    exit_code = EXIT_CHECKSUM

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: id (the resume point), event kind, decoded JSON data."""

    id: str
    event: str
    data: dict[str, Any]


def safe_dest(root: Path, name: str) -> Path:
    """``root/name`` for an artifact name, refusing absolute paths and ``..`` (a name must stay inside root)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or "\\" in name:
        raise ChecksumMismatch([f"artifact name {name!r} is not a safe relative path"])
    return root.joinpath(*p.parts)


def verify_checksums(root: Path | str, artifacts: list[dict[str, Any]], *, known: dict[str, str] | None = None,
                     skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Problems (empty = all good) of the files under ``root``: each file's sha256 and size against the API's
    value, and SHA256SUMS (as downloaded) against the API's values: every other artifact listed, same digest.
    ``known``: name -> sha256 already computed while downloading (saves hashing big files twice);
    ``skip``: names already reported (not checked again)."""
    root = Path(root)
    problems: list[str] = []
    api = {a["name"]: a for a in artifacts}
    for name, art in api.items():
        if name in skip:
            continue
        path = safe_dest(root, name)
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size, digest = path.stat().st_size, (known or {}).get(name) or sha256_of(path)
        if digest != art["sha256"] or size != art["bytes"]:
            problems.append(f"{name}: sha256 {digest} ({size} bytes), the API says {art['sha256']} ({art['bytes']} bytes)")
    if SUMS not in api:
        problems.append(f"{SUMS}: not among the job's artifacts")
    if SUMS not in api or SUMS in skip:
        return problems
    sums_path = safe_dest(root, SUMS)
    listed: dict[str, str] = {}
    if sums_path.is_file():
        for n, line in enumerate(sums_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            digest, _, name = line.strip().partition(" ")
            name = name.strip().lstrip("*")
            if not name or len(digest) != 64:
                problems.append(f"{SUMS} line {n} is not '<sha256>  <name>': {line!r}")
                continue
            listed[name] = digest.lower()
    for name, digest in listed.items():
        if name not in api:
            problems.append(f"{SUMS} lists {name}, which is not among the job's artifacts")
        elif api[name]["sha256"] != digest:
            problems.append(f"{name}: {SUMS} says {digest}, the API says {api[name]['sha256']}")
    for name in api:
        if name != SUMS and name not in listed:
            problems.append(f"{name}: not listed in {SUMS}")
    return problems


def _detail(resp: httpx.Response) -> Any:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    return body.get("detail", body) if isinstance(body, dict) else body


class Client:
    """A token's view of the service. Every method raises ``ClientError`` subclasses (see their exit_code)."""

    def __init__(self, url: str | None = None, token: str | None = None, *, retries: int = 4, backoff: float = 0.5,
                 timeout: float = 60.0, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = (url or os.environ.get("SPINQUANT_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("SPINQUANT_TOKEN")
        if not self.token:
            raise ClientError("no token: pass --token or set SPINQUANT_TOKEN "
                              "(an admin creates one with: python -m api tokens create --name ci)")
        self.retries, self.backoff, self.sleep = max(0, retries), backoff, sleep
        self.http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {self.token}", "User-Agent": "spinquant-client/0.1"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport with retries -------------------------------------------------------------------------
    def _retrying(self, what: str, attempt: Callable[[], Any]) -> Any:
        """Run ``attempt`` up to 1 + retries times; it raises _Retry on a retryable failure."""
        delay, last = self.backoff, ""
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _Retry as exc:
                last = str(exc)
            if n < self.retries:
                self.sleep(delay)
                delay *= 2
        raise Unreachable(f"{what} failed after {self.retries + 1} tries ({self.url}): {last}")

    def _check(self, resp: httpx.Response, where: str) -> httpx.Response:
        if resp.status_code >= 500:
            raise _Retry(f"HTTP {resp.status_code}: {_detail(resp)}")
        if resp.status_code >= 400:
            raise RequestRefused(resp.status_code, _detail(resp), where)
        return resp

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One API call: retried on connection errors and 5xx, ``RequestRefused`` on 4xx."""
        where = f"{method} {path}"

        def attempt() -> httpx.Response:
            try:
                resp = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from None
            return self._check(resp, where)

        return self._retrying(where, attempt)

    # -- the API ----------------------------------------------------------------------------------------
    def upload_text(self, path: Path | str, name: str | None = None) -> dict[str, Any]:
        """POST /v1/texts with the file as the raw body -> {id, name, bytes, sha256}."""
        path = Path(path)
        return self.request("POST", "/v1/texts", params={"name": (name or path.name)[:200]}, content=path.read_bytes(),
                            headers={"Content-Type": "text/plain; charset=utf-8"}).json()

    def submit(self, model: str, *, method: str = "spinquant", settings: dict[str, Any] | None = None,
               calib: dict[str, str] | None = None, eval: dict[str, str] | None = None,
               formats: list[str] | None = None, force: bool = False, revision: str | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/jobs -> {id, status, links, cache_hit, reused_from, idempotent_replay}.

        calib/eval: {"dataset": NAME} or {"text_id": ID} (see upload_text). Without an idempotency key a
        fresh one is made, so the retries of this one call cannot create two jobs."""
        body: dict[str, Any] = {"model": model, "method": method, "settings": settings or {}, "force": force}
        for key, value in (("calib", calib), ("eval", eval), ("formats", formats), ("revision", revision)):
            if value is not None:
                body[key] = value
        key = idempotency_key or f"spinquant-cli-{uuid.uuid4().hex}"
        return self.request("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def list(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit} | ({"status": status} if status else {})
        return self.request("GET", "/v1/jobs", params=params).json()["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def artifacts(self, job_id: str) -> builtins.list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts").json()

    def events(self, job_id: str, *, last_event_id: str | None = None, deadline: float | None = None) -> Iterator[Event]:
        """The job's events (replayed, then live) until its ``end`` event. A dropped connection is resumed with
        Last-Event-ID; ``retries`` consecutive failed reconnects raise Unreachable. ``deadline`` is a
        time.monotonic() value: passing it raises WaitTimeout."""
        last, failures, delay, hint = last_event_id, 0, self.backoff, 0.0
        path = f"/v1/jobs/{job_id}/events"
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(f"timed out waiting for job {job_id}")
            read = 60.0 if remaining is None else max(0.05, min(60.0, remaining))
            headers = {"Accept": "text/event-stream"} | ({"Last-Event-ID": last} if last else {})
            got = False
            try:
                with self.http.stream("GET", path, headers=headers,
                                      timeout=httpx.Timeout(30.0, read=read)) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                    self._check(resp, f"GET {path}")
                    for kind, value in _sse(resp.iter_lines()):
                        if kind == "retry":
                            hint = value / 1000.0
                            continue
                        got, failures, delay = True, 0, self.backoff
                        last = value.id or last
                        yield value
                        if value.event == "end":
                            return
                why = "the stream ended before the job's end event"
            except (httpx.TransportError, _Retry) as exc:
                why = f"{type(exc).__name__}: {exc}"
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"timed out waiting for job {job_id}")
            if not got:
                failures += 1
                if failures > self.retries:
                    raise Unreachable(f"GET {path}: {failures} reconnects in a row failed ({self.url}): {why}")
            pause = max(hint if got else delay, 0.05)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            self.sleep(pause)
            if not got:
                delay *= 2

    def wait(self, job_id: str, *, timeout: float | None = None,
             on_event: Callable[[Event], None] | None = None) -> dict[str, Any]:
        """Follow the job's events until it ends; returns the final job (GET /v1/jobs/{id}).
        Raises WaitTimeout after ``timeout`` seconds (the job keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for ev in self.events(job_id, deadline=deadline):
                if on_event is not None:
                    on_event(ev)
        except WaitTimeout as exc:
            try:
                job = self.status(job_id)
            except ClientError:
                job = None
            raise WaitTimeout(f"{exc} after {timeout:g}s" + (f" (status {job['status']}, stage {job['stage']})"
                                                              if job else ""), job) from None
        job = self.status(job_id)
        for _ in range(20):  # the end event follows the database write; this only guards a lagging replica
            if job["status"] in TERMINAL:
                break
            self.sleep(0.25)
            job = self.status(job_id)
        return job

    def _download_one(self, job_id: str, art: dict[str, Any], dest: Path) -> str:
        """Stream one artifact to a temp file beside ``dest``; returns its sha256. Renamed to ``dest`` only when
        it matches the API's sha256; otherwise discarded (and an older ``dest`` removed)."""
        path = f"/v1/jobs/{job_id}/artifacts/{art['name']}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")

        def attempt() -> str:
            h = hashlib.sha256()
            try:
                with self.http.stream("GET", path) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                    self._check(resp, f"GET {path}")
                    with open(tmp, "wb") as f:
                        for chunk in resp.iter_bytes(1 << 20):
                            f.write(chunk)
                            h.update(chunk)
            except httpx.TransportError as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from None
            return h.hexdigest()

        try:
            digest = self._retrying(f"GET {path}", attempt)
            if digest == art["sha256"]:
                os.replace(tmp, dest)
            else:
                dest.unlink(missing_ok=True)
        finally:
            tmp.unlink(missing_ok=True)
        return digest

    def download(self, job_id: str, dest: Path | str, *, job: dict[str, Any] | None = None,
                 on_file: Callable[[str, int], None] | None = None) -> builtins.list[Path]:
        """Download every artifact of a finished job under ``dest`` (names keep their folders) and verify
        each sha256 against the API and against SHA256SUMS. Raises ChecksumMismatch listing every problem."""
        root = Path(dest)
        arts = (job or {}).get("artifacts") or self.artifacts(job_id)
        if not arts:
            st = job or self.status(job_id)
            raise ClientError(f"job {job_id} has no artifacts (status {st['status']})")
        digests: dict[str, str] = {}
        problems: list[str] = []
        for art in arts:
            name = art["name"]
            digests[name] = self._download_one(job_id, art, safe_dest(root, name))
            if digests[name] != art["sha256"]:
                problems.append(f"{name}: sha256 {digests[name]} as downloaded, the API says {art['sha256']} "
                                "(file discarded)")
            if on_file is not None:
                on_file(name, art["bytes"])
        bad = {a["name"] for a in arts if digests[a["name"]] != a["sha256"]}
        problems += verify_checksums(root, arts, known=digests, skip=bad)
        if problems:
            raise ChecksumMismatch(problems)
        paths = [safe_dest(root, a["name"]) for a in arts]
        return paths


class _Retry(Exception):
    """A retryable failure (connection error or 5xx)."""


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """("event", Event) per SSE frame, ("retry", ms) for retry hints; comments (keep-alives) skipped."""
    cur: dict[str, str] = {}
    for line in lines:
        if not line:
            if "event" in cur or "data" in cur:
                try:
                    data = json.loads(cur.get("data") or "{}")
                except ValueError:
                    data = {"raw": cur.get("data")}
                yield "event", Event(cur.get("id", ""), cur.get("event", "message"),
                                     data if isinstance(data, dict) else {"value": data})
            if "retry" in cur and cur["retry"].isdigit():
                yield "retry", int(cur["retry"])
            cur = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        cur[key] = cur[key] + "\n" + value if key == "data" and key in cur else value

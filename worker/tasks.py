"""The one task: ``worker.quantize(job_id)``, a thin idempotent adapter around quant_core.

It re-reads the job row (the truth), exits at once for a finished or cancelled job or when another
delivery holds the job's lock, counts attempts (a SIGKILLed child is redelivered; above the cap the
job fails as 'worker lost'), imports quant_core only inside the task (never CUDA before the fork),
runs the pipeline with a Redis/SQL progress publisher and a Redis cancel flag, exports into scratch
space (the store's work_dir) and publishes the folder into the artifact store (one rename locally; on
S3 every file, then a completion marker), then records the outcome.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from redis import Redis
from redis import exceptions as redis_exceptions
from sqlalchemy import delete, update

from service import live
from service.db import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Artifact,
    Job,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from service.queue import QUANTIZE_TASK
from service.settings import WorkerSettings, worker_settings
from service.sources import model_location, text_key, upload_sha
from service.storage import ArtifactStore, StoreError, make_store

from .celery_app import app
from .progress import Publisher, stage_weights

log = logging.getLogger("worker.tasks")


class _Heartbeat(threading.Thread):
    """Keeps the job lock alive while the job runs; a dead worker's lock expires within lock_ttl_s."""

    def __init__(self, redis: Redis, key: str, owner: str, ttl: int) -> None:
        super().__init__(daemon=True)
        self.redis, self.key, self.owner, self.ttl, self.stop = redis, key, owner, ttl, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.ttl / 3):
            try:
                # a Redis restart can drop a lock set in its last second (AOF fsyncs every second): put it back, or
                # the sweeper (service/sweeper.py) would take the job for an orphan
                if not self.redis.set(self.key, self.owner, nx=True, ex=self.ttl):
                    self.redis.expire(self.key, self.ttl)
            except Exception:  # a Redis blip: the next beat tries again
                log.warning("lock heartbeat failed for %s", self.key)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of space. safetensors (Rust) raises its own SafetensorError carrying only the
    OS message, so the message is read where no errno is; the chain (raise ... from) is followed."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        text = str(e)
        if any(os.strerror(n) in text or f"os error {n})" in text for n in DISK_FULL_ERRNOS):
            return True
        e = e.__cause__ or e.__context__
    return False


def classify(exc: BaseException) -> tuple[str, str]:
    """(error code, message) for a failed job: bad input is the user's to fix (its UserError code), the rest is
    ours ('internal', logged with its traceback)."""
    from quant_core.errors import UserError
    from quant_core.progress import Cancelled

    if isinstance(exc, Cancelled):
        return "cancelled", str(exc)
    if isinstance(exc, UserError):
        return exc.code, str(exc)
    if isinstance(exc, SoftTimeLimitExceeded):
        return "timeout", "the job ran past its time limit"
    if isinstance(exc, StoreError) and exc.code == "unavailable":  # not ours to fix: the store did not answer
        return "store_unavailable", f"the artifact store did not answer: {exc}"
    if _disk_full(exc):
        return "disk_full", f"the worker's disk is full (scratch space or local artifact store): {exc}"
    torch = sys.modules.get("torch")  # a CUDA OOM can only come from a job that imported torch
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)):
        return "out_of_memory", f"out of memory: {exc}".strip()
    return "internal", f"{type(exc).__name__}: {exc}"


def _resolve_sources(cfg: Any, store: ArtifactStore, work: Path) -> Any:
    """``upload:<sha256>`` data sources -> ``file:<path>`` of the stored text, for this run only."""
    def one(source: str, name: str) -> str:
        sha = upload_sha(source)
        if sha is None:
            return source
        key = text_key(sha)
        path = store.local_path(key)
        if path is None:  # a remote store: copy the text into the job's scratch space
            path = work / f"{name}.txt"
            with store.open(key) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return f"file:{path}"

    return replace(cfg, calib=replace(cfg.calib, source=one(cfg.calib.source, "calib")),
                   eval=replace(cfg.eval, source=one(cfg.eval.source, "eval")))


# How long the worker keeps trying its final writes while the database (or Redis) does not answer, before it gives
# up on this delivery (the row stays running; the sweeper, service/sweeper.py, sends the job again).
FINAL_WRITE_DEADLINE_S = 600.0


def _retrying(what: str, fn: Callable[[], None], deadline_s: float = FINAL_WRITE_DEADLINE_S) -> None:
    """``fn()`` until it passes; a dependency that does not answer is retried with backoff up to ``deadline_s``."""
    from .progress import _is_transient

    end = time.monotonic() + deadline_s
    delay = 0.5
    while True:
        try:
            fn()
            return
        except Exception as exc:
            if not _is_transient(exc) or time.monotonic() + delay > end:
                raise
            log.warning("%s: %s; retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _finish(sessions: Any, redis: Redis, job_id: str, settings: WorkerSettings, status: str, *,
            pub: Publisher | None = None, write: Callable[[Any], None] | None = None, **values: Any) -> None:
    """Record the terminal status (with ``write``'s rows, in the same transaction), then its events."""
    def commit() -> None:
        with sessions() as db:
            if write is not None:
                write(db)
            db.execute(update(Job).where(Job.id == job_id).values(status=status, finished_at=utcnow(), **values))
            db.commit()

    _retrying(f"job {job_id}: recording {status}", commit)
    event = {"status": status}
    if "error_code" in values:
        event.update(code=values["error_code"], message=values.get("error_message") or "")

    def publish() -> None:
        if pub is not None and not pub.deliver():  # the events kept while Redis was away come first
            raise redis_exceptions.ConnectionError("Redis does not answer")
        live.publish_end(redis, job_id, event, settings.events_ttl_s)

    try:
        _retrying(f"job {job_id}: publishing its end", publish, deadline_s=60.0)
    except Exception:  # the row is the truth and says it; SSE readers fall back to it (api/events.py)
        log.warning("job %s: could not publish its end event", job_id, exc_info=True)


def _hand_back(sessions: Any, redis: Redis, job_id: str) -> None:
    """A job interrupted by its worker's shutdown: ``queued`` again, the interrupted attempt taken back."""
    with sessions() as db:
        db.execute(update(Job).where(Job.id == job_id, Job.status == RUNNING).values(
            status=QUEUED, attempts=Job.attempts - 1))
        db.commit()
    # Redis may be away (its loss can be what stopped the worker): the row says queued
    with suppress(redis_exceptions.ConnectionError, redis_exceptions.TimeoutError):
        live.publish_event(redis, job_id, "status", {"status": QUEUED, "reason": "worker_shutdown"})
    log.warning("job %s: its worker is shutting down; back in the queue", job_id)


def lock_wait_s(settings: WorkerSettings, job_id: str) -> int:
    """Seconds until the job's lock expires unless its holder's heartbeat refreshes it, plus one. A redelivery
    waits that long rather than a whole lock lifetime: while it waits its message is unacked and the row has no
    lock once a dead holder's expires, which is what the sweeper reads as an orphan (service/sweeper.py)."""
    try:
        left = int(Redis.from_url(settings.redis_url).ttl(live.lock_key(job_id)))
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError):
        return settings.lock_ttl_s
    return min(settings.lock_ttl_s, left + 1) if left > 0 else 1


def run_job(job_id: str, *, settings: WorkerSettings, hostname: str = "local") -> str:
    """Run one job to a terminal state; returns what happened (for logs and tests)."""
    sessions = make_sessionmaker(make_engine(settings.database_url))
    redis = Redis.from_url(settings.redis_url)
    store = make_store(settings)
    with sessions() as db:
        job = db.get(Job, job_id)
        if job is None:
            log.error("job %s is not in the database; dropping the message", job_id)
            return "missing"
        if job.status in TERMINAL:
            return f"skipped: already {job.status}"
    owner = f"{hostname}:{os.getpid()}"
    if not redis.set(live.lock_key(job_id), owner, nx=True, ex=settings.lock_ttl_s):
        return "locked"
    beat = _Heartbeat(redis, live.lock_key(job_id), owner, settings.lock_ttl_s)
    beat.start()
    work = store.work_dir() / job_id
    try:
        return _run_locked(job_id, settings=settings, sessions=sessions, redis=redis, store=store, work=work,
                           hostname=hostname)
    finally:
        beat.stop.set()
        shutil.rmtree(work, ignore_errors=True)
        try:
            if redis.get(live.lock_key(job_id)) == owner.encode():
                redis.delete(live.lock_key(job_id))
        except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError):
            log.warning("job %s: Redis is away; its lock expires by itself", job_id)


def _run_locked(job_id: str, *, settings: WorkerSettings, sessions: Any, redis: Redis, store: ArtifactStore,
                work: Path, hostname: str) -> str:
    with sessions() as db:
        res = db.execute(update(Job).where(Job.id == job_id, Job.status.in_((QUEUED, RUNNING))).values(
            status=RUNNING, attempts=Job.attempts + 1, started_at=utcnow(), worker=hostname))
        db.commit()
        job = db.get(Job, job_id)
        assert job is not None
    if res.rowcount != 1:
        return f"skipped: already {job.status}"
    if job.attempts > settings.max_attempts:
        _finish(sessions, redis, job_id, settings, FAILED, error_code="worker_lost",
                error_message=f"worker lost {job.attempts - 1} times (likely host out of memory); not retried")
        return "failed: worker_lost"
    live.publish_event(redis, job_id, "status", {"status": RUNNING, "worker": hostname, "attempt": job.attempts})
    live.mark_started(redis, job_id)

    def should_cancel() -> bool:
        try:
            return bool(redis.exists(live.cancel_key(job_id)))
        except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError):
            return False  # Redis is away: a cancel asked meanwhile is seen once it answers

    prefix = f"jobs/{job_id}"
    pub: Publisher | None = None
    try:  # from here every failure, the store's included, ends the job in a terminal state
        store.delete_prefix(prefix)  # a half-recorded earlier attempt: the DB never said succeeded, so redo
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        # quant_core (and torch) only now, inside the forked child; huge-page CPU tensors first, since torch reads
        # that setting once as it loads (quant_core.allocator)
        from quant_core.allocator import prefer_huge_pages

        prefer_huge_pages()
        from quant_core.config import config_from_dict
        from quant_core.pipeline import run
        from quant_core.progress import Cancelled

        cfg = config_from_dict(job.config)
        pub = Publisher(redis=redis, sessions=sessions, job_id=job_id, weights=stage_weights(cfg.learning, cfg.rotating),
                        db_interval_s=settings.db_write_interval_s)
        publisher = pub

        def progress(stage: str, fraction: float, info: dict[str, Any]) -> None:
            # the export stage is writing the folder (first half) and publishing it to the store (second half)
            publisher(stage, fraction / 2 if stage == "export" else fraction, info)

        # The same entry point as the CLI; the report records the job's own names: the carried config (texts as
        # upload:<sha256>, not this worker's file paths) and local:<name>, not the models directory's path.
        result = run(model_location(job.model, settings.models_dir), _resolve_sources(cfg, store, work),
                     out=work / "out", formats=job.formats, record_cfg=cfg, model_id=job.model, revision=job.revision,
                     progress=progress, should_cancel=should_cancel,
                     cache_dir=str(settings.hub_cache_dir) if settings.hub_cache_dir else None)
        if should_cancel():
            raise Cancelled("cancelled during export")
        files = store.publish(prefix, work / "out")
        pub("export", 1.0, {"files": len(files)})
        pub.finish_stage()

        def record(db: Any) -> None:
            db.execute(delete(Artifact).where(Artifact.job_id == job_id))  # never an earlier attempt's rows twice
            for f in files:
                db.add(Artifact(job_id=job_id, name=f.name, bytes=f.bytes, sha256=f.sha256, store_key=f.key))

        # the files' rows and the status in one transaction: a job is succeeded with all its files, or neither
        _finish(sessions, redis, job_id, settings, SUCCEEDED, pub=pub, write=record, progress=1.0, eta_s=0.0,
                report=result.report, store_prefix=prefix, stage_times=pub.stage_times, step=pub.step, loss=pub.loss)
        return "succeeded"
    except BaseException as exc:
        code, message = classify(exc)
        try:
            store.delete_prefix(prefix)
        except StoreError:
            # The store does not answer: whatever this attempt uploaded has no completion marker, so no reader
            # sees it, and the next attempt (or a new job) deletes it first. The terminal status comes first.
            log.warning("job %s: could not clear %s in the store", job_id, prefix, exc_info=True)
        if pub is not None:
            # The row keeps where the job stopped (stage times, the last learning step and loss), which the
            # throttled flush may not have written yet
            pub.finish_stage()
            try:
                pub.flush()
            except Exception:  # the terminal status below matters more than the progress fields
                log.exception("job %s: last progress write failed", job_id)
        if not isinstance(exc, Exception):
            # SystemExit/KeyboardInterrupt: the worker is shutting down (a deploy's SIGTERM: after its soft-shutdown
            # wait Celery stops this child). Not the job's fault: it goes back to the queue as it was, this attempt
            # not counted, and the broker hands the unacknowledged message to the next worker.
            _hand_back(sessions, redis, job_id)
            raise
        if code == "cancelled":
            _finish(sessions, redis, job_id, settings, CANCELLED, pub=pub, error_code=code, error_message=message)
            return "cancelled"
        if code == "internal":
            log.exception("job %s failed", job_id)
        _finish(sessions, redis, job_id, settings, FAILED, pub=pub, error_code=code, error_message=message)
        return f"failed: {code}"


@app.task(name=QUANTIZE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def quantize(self: Any, job_id: str) -> str:
    """Run one quantization job by id (idempotent: a second delivery of a finished job does nothing)."""
    settings = worker_settings()
    outcome = run_job(job_id, settings=settings, hostname=self.request.hostname or "worker")
    if outcome == "locked":
        # Another delivery holds the lock: it is running, or its worker died and the lock will expire.
        # Look again once it would have expired; a finished job then reads as skipped.
        raise self.retry(countdown=lock_wait_s(settings, job_id), max_retries=None)
    log.info("job %s: %s", job_id, outcome)
    return outcome

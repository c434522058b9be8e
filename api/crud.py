"""Persistence and the rules around it: validate and create jobs, find them for their owner, cancel.

Routes stay declarations; everything they decide lives here as keyword-only functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from quant_core.config import ALIASES, ConfigError, SpinQuantConfig, config_to_dict, make_config
from quant_core.formats import ExportError, check_formats
from service import live, sources
from service.db import CANCELLED, QUEUED, RUNNING, SUCCEEDED, TERMINAL, Artifact, Job, Token, UploadedText, utcnow
from service.queue import enqueue, time_limits
from service.settings import ApiSettings
from service.sources import UPLOAD_PREFIX, ModelRef, SourceError, text_key
from service.storage import ArtifactStore

from .schemas import DataRef, JobCreate

# Data sources come only from the calib/eval fields: a free-form source could read any file on a worker.
_SOURCE_KEYS = {"calib_source", "eval_source", "calib.source", "eval.source", "calib", "eval"}


log = logging.getLogger(__name__)
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII, as HTTP header tokens


class RequestError(Exception):
    """A request the service refuses; becomes an HTTP error naming the field and what is accepted."""

    def __init__(self, status: int, loc: list[str | int], msg: str, kind: str = "value_error") -> None:
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind = status, loc, msg, kind


def resolve_model_ref(*, model: str, revision: str | None, settings: ApiSettings) -> ModelRef:
    """The request's model (service.sources), its refusal as a 422 on the field it names."""
    try:
        return sources.resolve_model_ref(model=model, revision=revision, models_dir=settings.models_dir,
                                         hub_check=settings.hub_check)
    except SourceError as exc:
        raise RequestError(422, ["body", exc.field], exc.message) from None


def _data_source(ref: DataRef | None, *, db: Session, owner: Token, field: str) -> str | None:
    if ref is None:
        return None
    if ref.dataset is not None:
        return ref.dataset
    text = db.get(UploadedText, ref.text_id)
    if text is None or (text.owner_id != owner.id and not owner.admin):
        raise RequestError(422, ["body", field, "text_id"], f"unknown text id {ref.text_id!r}; upload the text "
                           "with POST /v1/texts first and use the id it returns")
    return UPLOAD_PREFIX + text.sha256


def build_config(*, job_in: JobCreate, db: Session, owner: Token) -> SpinQuantConfig:
    """The quant_core config for a request; ConfigError becomes a 422 naming the setting."""
    flat: dict[str, Any] = {}
    dotted: dict[str, Any] = {}
    for key, value in job_in.settings.items():
        if key in _SOURCE_KEYS:
            raise RequestError(422, ["body", "settings", key], f"{key} cannot be set here; use the request's "
                               "'calib'/'eval' fields ({dataset} or {text_id})")
        (dotted if "." in key else flat)[key] = value
    calib = _data_source(job_in.calib, db=db, owner=owner, field="calib")
    evals = _data_source(job_in.eval, db=db, owner=owner, field="eval")
    try:
        return make_config(job_in.method, **flat, calib_source=calib, eval_source=evals, settings=dotted)
    except ConfigError as exc:
        raise RequestError(422, _config_loc(exc.field, job_in.settings), str(exc), "config_error") from None


def _config_loc(field: str | None, settings: dict[str, Any]) -> list[str | int]:
    """Where in the request a ConfigError's field came from: the method, the settings key (flat or dotted)
    that sets it, else the settings object as a whole."""
    if field == "method":
        return ["body", "method"]
    for key in settings:
        targets = ALIASES.get(key, ())
        if field in (key, *(targets if isinstance(targets, tuple) else (targets,))):
            return ["body", "settings", key]
    return ["body", "settings"]


def fingerprint(*, ref: ModelRef, revision: str | None, cfg: SpinQuantConfig, formats: list[str]) -> str:
    """Same model weights, revision, settings, data and formats -> same fingerprint (the cache key)."""
    payload = {"model": ref.model, "pin": ref.pin, "revision": revision, "config": config_to_dict(cfg),
               "formats": sorted(formats)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class Created:
    job: Job
    cache_hit: bool = False
    replay: bool = False


def _find_by_key(db: Session, owner: Token, key: str) -> Job | None:
    return db.scalar(select(Job).where(Job.owner_id == owner.id, Job.idempotency_key == key))


def _replay(prior: Job, job_in: JobCreate) -> Created:
    """The earlier job of this Idempotency-Key, if the request is the same one; a 422 if it is not."""
    if prior.request != job_in.model_dump(mode="json"):
        raise RequestError(422, ["header", "Idempotency-Key"], "this Idempotency-Key was used for a "
                           f"different request (job {prior.id}); use a new key for new settings", "conflict")
    return Created(prior, replay=True)


def create_job(*, db: Session, owner: Token, job_in: JobCreate, idempotency_key: str | None, settings: ApiSettings,
               sender: Any, redis: Any) -> Created:
    """Validate, dedupe (Idempotency-Key, finished identical job), record, then enqueue by name."""
    if idempotency_key is not None:
        if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise RequestError(400, ["header", "Idempotency-Key"], "Idempotency-Key must be 1-200 visible ASCII "
                               "characters (no spaces or control characters)")
        prior = _find_by_key(db, owner, idempotency_key)
        if prior is not None:
            return _replay(prior, job_in)
    ref = resolve_model_ref(model=job_in.model, revision=job_in.revision, settings=settings)
    cfg = build_config(job_in=job_in, db=db, owner=owner)
    try:
        formats = list(check_formats(cfg, job_in.formats))
    except ExportError as exc:
        raise RequestError(422, ["body", "formats"], str(exc)) from None
    fp = fingerprint(ref=ref, revision=job_in.revision, cfg=cfg, formats=formats)
    soft, hard = time_limits(ref.weight_bytes)
    job = Job(owner_id=owner.id, model=ref.model, revision=job_in.revision, method=cfg.method.value,
              scheme=cfg.scheme, request=job_in.model_dump(mode="json"), config=config_to_dict(cfg), formats=formats,
              fingerprint=fp, idempotency_key=idempotency_key, soft_limit_s=soft, hard_limit_s=hard,
              stage_times={})
    # an unverified pin (the hub not asked) may name other weights than the finished job's: never a cache hit
    done = None if job_in.force or not ref.cacheable else db.scalar(
        select(Job).where(Job.fingerprint == fp, Job.status == SUCCEEDED, Job.reused_from.is_(None))
        .order_by(Job.finished_at.desc()).limit(1))
    if done is not None:  # cache hit: a finished row sharing the same stored files; nothing runs
        now = utcnow()
        job.status, job.stage, job.progress, job.eta_s = SUCCEEDED, done.stage, 1.0, 0.0
        job.report, job.reused_from, job.store_prefix = done.report, done.id, done.store_prefix
        job.started_at = job.finished_at = now
        job.stage_times = {}
        job.artifacts = [Artifact(name=a.name, bytes=a.bytes, sha256=a.sha256, store_key=a.store_key)
                         for a in done.artifacts]
    if done is None:
        _check_active_limit(db, owner, settings.max_active_jobs)
    db.add(job)
    try:
        db.commit()
    except IntegrityError:  # the same Idempotency-Key raced in from a retry
        db.rollback()
        prior = _find_by_key(db, owner, idempotency_key or "")
        if prior is None:
            raise
        return _replay(prior, job_in)
    if done is not None:
        live.publish_end(redis, job.id, {"status": SUCCEEDED, "cache_hit": True, "reused_from": done.id},
                         settings.events_ttl_s)
        return Created(job, cache_hit=True)
    try:
        live.publish_event(redis, job.id, "status", {"status": QUEUED})
        enqueue(sender, job.id, soft, hard)
    except Exception as exc:
        # Redis (the broker) did not take the job: a row left 'queued' with no message behind it would never run,
        # and an Idempotency-Key retry would replay it. The row goes; a message that did get through finds no
        # row and is dropped by the worker.
        log.warning("job %s: enqueue failed (%s); the row is removed", job.id, type(exc).__name__)
        db.delete(job)
        db.commit()
        raise RequestError(503, ["service", "queue"], f"the job queue (Redis) is unavailable ({type(exc).__name__}); "
                           "nothing was recorded: retry later", "unavailable") from None
    return Created(job)


def _check_active_limit(db: Session, owner: Token, limit: int) -> None:
    """429 when the token already has ``limit`` queued or running jobs (a shared GPU pool's fair share; cache hits
    and idempotent replays run nothing and never count). The caller commits the new row in this transaction."""
    if limit <= 0:
        return
    # A no-op write to the owner's token row first: it holds PostgreSQL's row lock (SQLite's write lock) until the
    # commit, so two submits of one owner count and insert one after the other and cannot both pass at the limit.
    db.execute(update(Token).where(Token.id == owner.id).values(name=Token.name)
               .execution_options(synchronize_session=False))
    active = db.scalar(select(func.count()).select_from(Job).where(Job.owner_id == owner.id,
                                                                   Job.status.in_((QUEUED, RUNNING)))) or 0
    if active >= limit:
        raise RequestError(429, ["header", "Authorization"], f"this token has {active} queued or running jobs, the "
                           f"most allowed (SPINQUANT_MAX_ACTIVE_JOBS={limit}); submit again when one has finished",
                           "too_many_jobs")


def visible_job(*, db: Session, owner: Token, job_id: str) -> Job | None:
    """The job if this token may see it (its owner, or an admin); None reads as 404 either way."""
    job = db.get(Job, job_id) if len(job_id) <= 64 else None
    if job is None or (job.owner_id != owner.id and not owner.admin):
        return None
    return job


def list_jobs(*, db: Session, owner: Token, status: str | None, limit: int) -> list[Job]:
    q = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if not owner.admin:
        q = q.where(Job.owner_id == owner.id)
    if status is not None:
        q = q.where(Job.status == status)
    return list(db.scalars(q))


def request_cancel(*, db: Session, job: Job, sender: Any, redis: Any, settings: ApiSettings) -> Job:
    """Queued: revoke and mark cancelled now. Running: raise the cooperative flag; the worker finishes it."""
    if job.status in TERMINAL:
        return job
    redis.set(live.cancel_key(job.id), "1", ex=settings.events_ttl_s)
    job.cancel_requested = True
    if job.status == QUEUED:
        # Conditional: a worker may be flipping it to running at this moment; then the flag stops it.
        now = utcnow()
        res = db.execute(update(Job).where(Job.id == job.id, Job.status == QUEUED).values(
            status=CANCELLED, finished_at=now, cancel_requested=True, error_code="cancelled",
            error_message="cancelled before it started"))
        db.commit()
        if cast(CursorResult[Any], res).rowcount == 1:
            sender.control.revoke(job.id)  # never terminate=True (QUEUE.md §4)
            live.publish_end(redis, job.id, {"status": CANCELLED}, settings.events_ttl_s)
            db.refresh(job)
            return job
        db.refresh(job)
        job.cancel_requested = True
    db.commit()
    live.publish_event(redis, job.id, "log", {"message": "cancel requested"})
    return job


def create_text(*, db: Session, owner: Token, name: str, data: bytes, store: ArtifactStore) -> UploadedText:
    """Store an uploaded UTF-8 text once per content hash and record it for this owner."""
    if not data.strip():
        raise RequestError(422, ["body"], "the text is empty; upload a UTF-8 plain-text file")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(422, ["body"], f"the text is not UTF-8 ({exc}); upload a UTF-8 plain-text file") from None
    digest = hashlib.sha256(data).hexdigest()
    key = text_key(digest)
    if not store.exists(key):
        store.put_bytes(key, data)
    # The same content from the same owner keeps its id, so a re-run request (same Idempotency-Key,
    # text uploaded again) is recognised as the same request.
    prior = db.scalar(select(UploadedText).where(UploadedText.owner_id == owner.id, UploadedText.sha256 == digest)
                      .order_by(UploadedText.created_at).limit(1))
    if prior is not None:
        return prior
    row = UploadedText(owner_id=owner.id, name=name[:200] or "text", sha256=digest, bytes=len(data))
    db.add(row)
    db.commit()
    return row


def stage_timings(job: Job) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for stage, t in (job.stage_times or {}).items():
        start, end = t.get("start"), t.get("end")
        out[stage] = {"start": start, "end": end, "seconds": (end - start) if start and end else
                      ((time.time() - start) if start and job.status not in TERMINAL else None)}
    return out

"""Persistence and the rules around it: validate and create jobs, find them for their owner, cancel.

Routes stay declarations; everything they decide lives here as keyword-only functions.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from quant_core.config import ALIASES, ConfigError, SpinQuantConfig, config_to_dict, make_config
from quant_core.formats import ExportError, check_formats

from . import live
from .db import CANCELLED, QUEUED, SUCCEEDED, TERMINAL, Artifact, Job, Token, UploadedText, utcnow
from .queue import enqueue, time_limits
from .schemas import DataRef, JobCreate
from .settings import Settings
from .storage import ArtifactStore

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
LOCAL_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)*$")
# Data sources come only from the calib/eval fields: a free-form source could read any file on a worker.
_SOURCE_KEYS = {"calib_source", "eval_source", "calib.source", "eval.source", "calib", "eval"}


class RequestError(Exception):
    """A request the service refuses; becomes an HTTP error naming the field and what is accepted."""

    def __init__(self, status: int, loc: list[str | int], msg: str, kind: str = "value_error") -> None:
        super().__init__(msg)
        self.status, self.loc, self.msg, self.kind = status, loc, msg, kind


@dataclass(frozen=True)
class ModelRef:
    model: str  # as the worker receives it: 'local:<name>' or a hub id
    pin: str  # what identifies the weights for caching (folder stamp, or the hub commit)
    weight_bytes: int | None


def resolve_local(name: str, models_dir: Path | None) -> Path:
    """The folder of ``local:<name>`` inside ``models_dir``; refuses names that escape it."""
    if models_dir is None:
        raise RequestError(422, ["body", "model"], "local models are disabled on this server (no models directory "
                           "configured); use a Hugging Face id such as 'org/name'")
    if not LOCAL_NAME.match(name) or ".." in name.split("/"):
        raise RequestError(422, ["body", "model"], f"local model name {name!r} is not allowed; accepted: "
                           "letters, digits, '.', '_', '-' and '/' between names, inside the models directory")
    root = Path(models_dir).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise RequestError(422, ["body", "model"], f"local model {name!r} escapes the models directory")
    if not (path / "config.json").is_file():
        available = sorted(p.parent.relative_to(root).as_posix() for p in root.glob("*/config.json"))
        raise RequestError(422, ["body", "model"], f"unknown local model {name!r}; available: "
                           f"{', '.join('local:' + a for a in available) or 'none'}")
    return path


def _hub_lookup(model: str, revision: str | None) -> tuple[str, int | None]:
    """(commit sha, weight bytes) from the hub; RequestError when the id or revision does not exist."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(model, revision=revision, timeout=10)
    except RevisionNotFoundError:
        raise RequestError(422, ["body", "revision"], f"revision {revision!r} does not exist for {model}") from None
    except GatedRepoError:
        raise RequestError(422, ["body", "model"], f"{model} is gated; the server's hub token has no access") from None
    except RepositoryNotFoundError:
        raise RequestError(422, ["body", "model"], f"unknown model {model!r}: no such Hugging Face repository "
                           "(or it is private)") from None
    except Exception:  # hub unreachable: accept; the worker fails the job with bad_model if it is wrong
        return f"unverified:{revision or 'main'}", None
    st = getattr(info, "safetensors", None)
    total = getattr(st, "total", None) if st is not None else None
    return str(info.sha or revision or "main"), (int(total) * 2 if total else None)


def resolve_model_ref(*, model: str, revision: str | None, settings: Settings) -> ModelRef:
    if model.startswith("local:"):
        path = resolve_local(model.removeprefix("local:"), settings.models_dir)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        stamp = hashlib.sha256("".join(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns};"
                                       for p in files).encode()).hexdigest()
        local_bytes = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
        return ModelRef(model=model, pin=stamp, weight_bytes=local_bytes)
    if not HUB_ID.match(model):
        raise RequestError(422, ["body", "model"], f"model {model!r} is not valid; accepted: a Hugging Face id "
                           "like 'meta-llama/Llama-3.2-1B' or 'local:<name>' from the server's models directory")
    if settings.hub_check:
        sha, weight_bytes = _hub_lookup(model, revision)
        return ModelRef(model=model, pin=sha, weight_bytes=weight_bytes)
    return ModelRef(model=model, pin=f"unverified:{revision or 'main'}", weight_bytes=None)


def _data_source(ref: DataRef | None, *, db: Session, owner: Token, field: str) -> str | None:
    if ref is None:
        return None
    if ref.dataset is not None:
        return ref.dataset
    text = db.get(UploadedText, ref.text_id)
    if text is None or (text.owner_id != owner.id and not owner.admin):
        raise RequestError(422, ["body", field, "text_id"], f"unknown text id {ref.text_id!r}; upload the text "
                           "with POST /v1/texts first and use the id it returns")
    return f"upload:{text.sha256}"


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
        msg = str(exc)

        def named(key: str) -> bool:  # the message names the setting by its flat or dotted name
            targets = ALIASES.get(key, ())
            return key in msg or any(t in msg for t in (targets if isinstance(targets, tuple) else (targets,)))

        bad = next((k for k in job_in.settings if named(k)), None)
        loc: list[str | int] = ["body", "method"] if "method" in str(exc) and bad is None else ["body", "settings"]
        if bad is not None:
            loc.append(bad)
        raise RequestError(422, loc, str(exc), "config_error") from None


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


def create_job(*, db: Session, owner: Token, job_in: JobCreate, idempotency_key: str | None, settings: Settings,
               sender: Any, redis: Any) -> Created:
    """Validate, dedupe (Idempotency-Key, finished identical job), record, then enqueue by name."""
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 200:
            raise RequestError(400, ["header", "Idempotency-Key"], "Idempotency-Key must be 1-200 characters")
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
    done = None if job_in.force else db.scalar(
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
    live.publish_event(redis, job.id, "status", {"status": QUEUED})
    enqueue(sender, job.id, soft, hard)
    return Created(job)


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


def request_cancel(*, db: Session, job: Job, sender: Any, redis: Any, settings: Settings) -> Job:
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


def text_key(sha256: str) -> str:
    return f"texts/{sha256}.txt"


def stage_timings(job: Job) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for stage, t in (job.stage_times or {}).items():
        start, end = t.get("start"), t.get("end")
        out[stage] = {"start": start, "end": end, "seconds": (end - start) if start and end else
                      ((time.time() - start) if start and job.status not in TERMINAL else None)}
    return out

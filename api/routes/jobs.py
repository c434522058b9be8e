"""Jobs: submit, list, view, watch (SSE), cancel, list and download artifacts."""

from __future__ import annotations

from typing import Annotated, Any, cast
from urllib.parse import quote

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from service import live
from service.db import TERMINAL, Job
from service.storage import ArtifactStore, StoreError

from .. import crud
from ..deps import DbDep, OwnerDep, ServicesDep, WriterDep, get_owner
from ..events import EVENT_ID, job_events
from ..schemas import (
    UNAUTHORIZED,
    ArtifactPublic,
    ErrorInfo,
    JobAccepted,
    JobCreate,
    JobList,
    JobPublic,
    JobSummary,
    Links,
    Problem,
    StageTiming,
    Status,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=UNAUTHORIZED)
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "no such job for this token"}}
READ_ONLY: dict[int | str, dict[str, Any]] = {403: {"model": Problem, "description": "the token is read-only"}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"model": Problem, "description": (
    "a dependency (Redis, the database, the artifact store) does not answer; retry after Retry-After seconds")}}


def links(job_id: str) -> Links:
    base = f"/v1/jobs/{job_id}"
    return Links(self=base, events=f"{base}/events", artifacts=f"{base}/artifacts", cancel=f"{base}/cancel")


def _error(job: Job) -> ErrorInfo | None:
    return ErrorInfo(code=job.error_code, message=job.error_message or "") if job.error_code else None


def to_public(job: Job, live_state: dict[str, Any] | None = None) -> JobPublic:
    s = live_state if (live_state and job.status not in TERMINAL) else {}
    return JobPublic(
        id=job.id, status=cast(Status, job.status), stage=s.get("stage", job.stage),
        progress=float(min(max(s.get("progress", job.progress) or 0.0, 0.0), 1.0)),
        eta_s=s.get("eta_s", job.eta_s), step=s.get("step", job.step), loss=s.get("loss", job.loss),
        model=job.model, revision=job.revision, method=job.method, scheme=job.scheme, settings=job.config,
        formats=job.formats, cancel_requested=job.cancel_requested, attempts=job.attempts,
        reused_from=job.reused_from, created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at,
        timings={k: StageTiming(**v) for k, v in crud.stage_timings(job).items()}, report=job.report, error=_error(job),
        artifacts=[ArtifactPublic(name=a.name, bytes=a.bytes, sha256=a.sha256,
                                  url=f"/v1/jobs/{job.id}/artifacts/{a.name}") for a in job.artifacts],
        links=links(job.id))


def _visible(db: DbDep, owner: OwnerDep, job_id: str) -> Job:
    job = crud.visible_job(db=db, owner=owner, job_id=job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


@router.post("", status_code=202, response_model=JobAccepted, responses={
    200: {"model": JobAccepted, "description": "idempotent replay: the job this Idempotency-Key already made"},
    400: {"model": Problem, "description": "Idempotency-Key is not 1-200 visible ASCII characters"}, **READ_ONLY,
    429: {"model": Problem, "description": "the token has SPINQUANT_MAX_ACTIVE_JOBS queued or running jobs; "
                                           "retry after Retry-After seconds"},
    422: {"model": Problem, "description": "a setting, model or data reference is not valid"}, **UNAVAILABLE})
def submit_job(job_in: JobCreate, db: DbDep, owner: WriterDep, services: ServicesDep, response: Response,
               idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> JobAccepted:
    """Submit a quantization job; identical finished jobs are reused unless force is set."""
    created = crud.create_job(db=db, owner=owner, job_in=job_in, idempotency_key=idempotency_key,
                              settings=services.settings, sender=services.sender, redis=services.redis)
    job = created.job
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if created.replay:
        response.status_code = 200
    return JobAccepted(id=job.id, status=cast(Status, job.status), links=links(job.id), cache_hit=created.cache_hit,
                       reused_from=job.reused_from, idempotent_replay=created.replay)


@router.get("", response_model=JobList)
def list_jobs(db: DbDep, owner: OwnerDep, services: ServicesDep, status_: Annotated[Status | None, Query(alias="status")] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> JobList:
    """List this token's jobs (all jobs for admins), newest first."""
    rows = crud.list_jobs(db=db, owner=owner, status=status_, limit=min(limit, services.settings.max_jobs_listed))
    out = []
    for j in rows:
        r = j.report or {}
        out.append(JobSummary(id=j.id, status=cast(Status, j.status), stage=j.stage, progress=j.progress, model=j.model,
                              method=j.method, scheme=j.scheme, created_at=j.created_at, finished_at=j.finished_at,
                              fp_ppl=r.get("fp_ppl"), quant_ppl=r.get("quant_ppl"),
                              checkpoint_bytes=r.get("checkpoint_bytes"), error=_error(j)))
    return JobList(jobs=out)


@router.get("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
def get_job(job_id: str, db: DbDep, owner: OwnerDep, services: ServicesDep) -> JobPublic:
    """One job: status, stage, progress, ETA, learning step and loss, timings, report, error, artifacts."""
    job = _visible(db, owner, job_id)
    state = live.decode_hash(services.redis.hgetall(live.state_key(job.id))) if job.status not in TERMINAL else None
    return to_public(job, state)


@router.get("/{job_id}/events", responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {}},
                                                              "description": "stage, progress, log, status, end"},
                                          400: {"model": Problem, "description": "Last-Event-ID is not an event id"}})
async def job_events_stream(job_id: str, request: Request, services: ServicesDep,
                            last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None) -> StreamingResponse:
    """Server-Sent Events: the job's events replayed from Last-Event-ID, then live until it ends."""
    def check() -> None:
        with services.sessions() as db:
            owner = get_owner(request, db)
            _visible(db, owner, job_id)

    await run_in_threadpool(check)
    if last_event_id is not None and not EVENT_ID.match(last_event_id):
        raise HTTPException(400, f"Last-Event-ID {last_event_id!r} is not an event id (expected like 1700000000000-0)")

    async def final_status() -> str | None:
        def read() -> str | None:
            with services.sessions() as db:
                job = db.get(Job, job_id)
                return job.status if job is not None and job.status in TERMINAL else None
        return await run_in_threadpool(read)

    gen = job_events(aredis=services.aredis, job_id=job_id, last_id=last_event_id,
                     block_ms=services.settings.sse_block_ms, final_status=final_status)
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, responses={**NOT_FOUND, **READ_ONLY})
def cancel_job(job_id: str, db: DbDep, owner: WriterDep, services: ServicesDep) -> JobPublic:
    """Cancel: a queued job ends now; a running one stops at its next learning step, layer or window."""
    job = _visible(db, owner, job_id)
    job = crud.request_cancel(db=db, job=job, sender=services.sender, redis=services.redis, settings=services.settings)
    return to_public(job)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactPublic], responses=NOT_FOUND)
def list_artifacts(job_id: str, db: DbDep, owner: OwnerDep) -> list[ArtifactPublic]:
    """The files of a finished job, with sizes and sha256."""
    job = _visible(db, owner, job_id)
    return to_public(job).artifacts


@router.get("/{job_id}/artifacts/{name:path}", response_class=FileResponse,
            responses={**NOT_FOUND, 206: {"description": "partial content (Range)"}, 304: {"description": "ETag matched"},
                       400: {"model": Problem, "description": "malformed Range header"},
                       410: {"model": Problem, "description": "the artifact is no longer in the store"},
                       416: {"model": Problem, "description": "the range starts past the end of the file"},
                       **UNAVAILABLE})
def download_artifact(job_id: str, name: str, request: Request, db: DbDep, owner: OwnerDep,
                      services: ServicesDep) -> Response:
    """Download one file; supports Range, and ETag (its sha256) with If-None-Match."""
    job = _visible(db, owner, job_id)
    art = next((a for a in job.artifacts if a.name == name), None)
    if art is None:
        raise HTTPException(404, f"job {job_id} has no artifact {name!r}" +
                            ("" if job.artifacts else f" (it has none: status {job.status})"))
    etag = f'"{art.sha256}"'
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    gone = HTTPException(410, f"artifact {name!r} of job {job_id} is no longer in the store")
    headers = {"ETag": etag, "X-Checksum-SHA256": art.sha256}
    path = services.store.local_path(art.store_key)
    if path is None:  # a remote store (S3): streamed from there, Range included
        return _stream(services.store, art.store_key, art.bytes, request, filename=name.rsplit("/", 1)[-1],
                       gone=gone, headers=headers)
    if not path.is_file():
        raise gone
    return FileResponse(path, media_type="application/octet-stream", filename=name.rsplit("/", 1)[-1],
                        headers=headers)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range -> (start, end exclusive); None = send the whole file (several ranges).

    As the local backend's FileResponse: 400 when malformed, 416 when it starts at or past the end.
    """
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        raise HTTPException(400, "malformed Range header; accepted: bytes=START-END, bytes=START- or bytes=-N")
    if "," in spec:
        return None  # several ranges: allowed to ignore (RFC 9110 §14.2), served whole
    first, dash, last = (x.strip() for x in spec.strip().partition("-"))
    if not dash or not (first or last) or not (first or "0").isdigit() or not (last or "0").isdigit():
        raise HTTPException(400, "malformed Range header; accepted: bytes=START-END, bytes=START- or bytes=-N")
    start = int(first) if first else max(size - int(last), 0)
    end = min(int(last) + 1, size) if first and last else size
    if start >= size:
        raise HTTPException(416, f"range not satisfiable: the file has {size} bytes",
                            headers={"Content-Range": f"bytes */{size}"})
    if start >= end:
        raise HTTPException(400, "malformed Range header: the range ends before it starts")
    return start, end


def _stream(store: ArtifactStore, key: str, size: int, request: Request, *, filename: str, gone: HTTPException,
            headers: dict[str, str]) -> StreamingResponse:
    """The file from the store, whole or one Range (206), with the local path's headers."""
    quoted = quote(filename)
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Disposition":
               f"attachment; filename*=utf-8''{quoted}" if quoted != filename else f'attachment; filename="{filename}"'}
    span, code = None, 200
    header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if header is not None and (if_range is None or if_range == headers["ETag"]):
        span = parse_range(header, size)
    start, end = span or (0, size)
    if span is not None:
        code = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    try:
        body = store.iter_bytes(key, start, end)
    except StoreError as exc:
        if exc.code != "not_found":
            raise  # a store that does not answer is 503 (api.main), not a file that went away
        raise gone from None
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(body, status_code=code, media_type="application/octet-stream", headers=headers)

"""Live progress in Redis, shared by the API (reader) and the worker (writer).

Per job: a hash ``job:{id}`` with the latest stage/progress/eta/step/loss for cheap reads, and a
capped stream ``job:{id}:events`` that a late subscriber replays (pub/sub would drop events when
nobody listens). ``job:{id}:cancel`` is the cooperative cancel flag; ``job:{id}:lock`` makes a
duplicate delivery exit at once. The SQL row stays the truth; these keys expire after the job ends.
"""

from __future__ import annotations

import json
import time
from typing import Any

from quant_core.config import MAX_STEPS
from quant_core.progress import STAGES

# Events a job can publish (worker.progress.Publisher): one per learning step and per pre-fit step, and per other
# stage its start, every 1% and its end (<= 102 each, quant_core.progress.STAGES); the API adds a few per attempt (queued,
# running, cancel, the final status and end). A job's replay must never lose its start (SSE clients and
# Last-Event-ID resumes read from it), so the cap only guards Redis against a runaway writer: no valid job
# reaches it. About 250 bytes an event: a 100-step job's stream is ~0.2 MB, the largest possible ~50 MB, and
# every stream expires after its job ends.
PROGRESS_EVENT_STEP = 0.01  # outside learning, a stage publishes a progress event per this much of its fraction
EVENTS_PER_STAGE = round(1 / PROGRESS_EVENT_STEP) + 2  # those, its start and its end: 102
STREAM_MAXLEN = 2 * MAX_STEPS + len(STAGES) * EVENTS_PER_STAGE + 1000


def state_key(job_id: str) -> str:
    return f"job:{job_id}"


def events_key(job_id: str) -> str:
    return f"job:{job_id}:events"


def cancel_key(job_id: str) -> str:
    return f"job:{job_id}:cancel"


def lock_key(job_id: str) -> str:
    return f"job:{job_id}:lock"


def started_key(job_id: str) -> str:
    return f"job:{job_id}:started"


def mark_started(redis: Any, job_id: str) -> None:
    """When this attempt started, on the Redis server's clock: the one clock every host reads alike (the sweeper
    compares it with its own TIME call, so a worker's skewed clock never decides a timeout)."""
    seconds, micros = redis.time()
    redis.set(started_key(job_id), f"{seconds + micros / 1e6:.6f}")


def running_seconds(redis: Any, job_id: str) -> float | None:
    """Seconds since ``mark_started`` on the Redis clock; None when the mark is gone."""
    raw = redis.get(started_key(job_id))
    if raw is None:
        return None
    seconds, micros = redis.time()
    return seconds + micros / 1e6 - float(raw)


def event_fields(kind: str, data: dict[str, Any]) -> dict[str, str]:
    """Stream entry fields: the SSE event name and its JSON payload."""
    return {"type": kind, "data": json.dumps(data, default=str), "ts": f"{time.time():.3f}"}


def publish_event(redis: Any, job_id: str, kind: str, data: dict[str, Any]) -> str:
    """XADD one event (sync client); returns the stream id."""
    eid = redis.xadd(events_key(job_id), event_fields(kind, data), maxlen=STREAM_MAXLEN, approximate=True)
    return eid.decode() if isinstance(eid, bytes) else str(eid)


def publish_end(redis: Any, job_id: str, status: dict[str, Any], ttl_s: int) -> None:
    """A job's last events (its final ``status``, then ``end``, which closes every SSE stream), and the
    expiry of its progress keys: the database keeps the outcome after they are gone."""
    publish_event(redis, job_id, "status", status)
    publish_event(redis, job_id, "end", {"status": status["status"]})
    expire_job_keys(redis, job_id, ttl_s)


def expire_job_keys(redis: Any, job_id: str, ttl_s: int) -> None:
    for key in (state_key(job_id), events_key(job_id), cancel_key(job_id), started_key(job_id)):
        redis.expire(key, ttl_s)


def decode_hash(raw: dict[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        k = k.decode() if isinstance(k, bytes) else k
        v = v.decode() if isinstance(v, bytes) else v
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out

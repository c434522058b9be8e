"""The sweeper: finds jobs that nothing will ever finish and hands them back to the queue, or ends them.

A job row is the truth, but a row alone does not run: its Celery message does. A row is orphaned when
no worker holds its lock (the lock lives while a worker's heartbeat refreshes it) and no message for it waits in
the queue: a ``queued`` row whose send never happened (the API died between its commit and the send), a row a
killed worker *process* left (its message stays in the broker's unacked set until the 49-hour visibility
timeout; a killed pool child's message goes back to the queue by itself), a job handed back by a worker that
lost Redis.

An orphan is acted on only after it has stayed one for ``grace_s`` on this process's monotonic clock (seen on
two sweeps that far apart): a delivery between the broker and the lock, or a lock a Redis restart dropped
(the heartbeat puts it back), is not an orphan. Then:
- a running job whose message is gone although it had time to reach its soft limit was stopped by Celery's
  hard time limit (Celery acks such a message and kills the child): it fails as ``timeout``;
- every other orphan is sent again under its own task id. The task is idempotent (terminal rows are skipped,
  the lock admits one delivery, the attempt cap fails a job that keeps killing its worker), so a message sent
  twice never runs a job twice.

The decision reads the broker's own keys (kombu's Redis transport: the queue is a list of JSON messages, the
unacked set a hash of ``[message, exchange, routing key]``) and compares no two hosts' clocks: time since a
job started is read on the Redis server's clock (service.live.mark_started).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update

from . import live
from .db import FAILED, QUEUED, RUNNING, Job, utcnow
from .queue import GPU_QUEUE, LIMIT_MARGIN_S, enqueue

log = logging.getLogger("service.sweeper")

UNACKED_KEY = "unacked"  # kombu's Redis transport: delivered, not yet acknowledged messages
LEADER_KEY = "spinquant:sweeper"  # one sweeping process at a time among the API replicas


def _task_id(raw: bytes | str) -> str | None:
    try:
        msg = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if isinstance(msg, list) and msg:  # the unacked hash: [message, exchange, routing_key]
        msg = msg[0]
    headers = msg.get("headers") if isinstance(msg, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None


def broker_task_ids(redis: Any, queue: str = GPU_QUEUE) -> tuple[set[str], set[str]]:
    """(task ids waiting in ``queue``, task ids delivered to a worker and not yet acknowledged)."""
    waiting = {t for raw in redis.lrange(queue, 0, -1) if (t := _task_id(raw))}
    unacked = {t for raw in redis.hvals(UNACKED_KEY) if (t := _task_id(raw))}
    return waiting, unacked


@dataclass(frozen=True)
class SweepResult:
    resent: tuple[str, ...] = ()
    timed_out: tuple[str, ...] = ()
    suspects: tuple[str, ...] = ()  # orphans seen for less than grace_s: looked at again next sweep


@dataclass
class Sweeper:
    sessions: Any
    redis: Any
    sender: Any
    grace_s: float
    events_ttl_s: int
    store: Any = None  # the artifact store: a timed-out job's half-published files are deleted
    clock: Callable[[], float] = time.monotonic
    # job id -> when this process first saw it orphaned (its monotonic clock): never another host's
    first_seen: dict[str, float] = field(default_factory=dict)
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)

    def lead(self, ttl_s: float) -> bool:
        """Take or keep the sweeping lease (one sweeper among the API replicas); False while another holds it."""
        ttl = max(1, int(ttl_s))
        if self.redis.set(LEADER_KEY, self.owner, nx=True, ex=ttl):
            return True
        if self.redis.get(LEADER_KEY) == self.owner.encode():
            self.redis.expire(LEADER_KEY, ttl)
            return True
        self.first_seen.clear()  # a new leader starts its own observations
        return False

    def sweep(self) -> SweepResult:
        now = self.clock()
        with self.sessions() as db:
            rows = db.execute(select(Job.id, Job.status, Job.started_at, Job.soft_limit_s, Job.hard_limit_s)
                              .where(Job.status.in_((QUEUED, RUNNING)))).all()
        waiting, unacked = broker_task_ids(self.redis)
        orphans: dict[str, Any] = {}
        for row in rows:
            if self.redis.exists(live.lock_key(row.id)):
                continue
            # only a message waiting in the queue is sure to reach a worker: an unacked one may be a dead worker's
            # (a live worker that holds one takes the job's lock within moments, well inside grace_s)
            if row.id not in waiting:
                orphans[row.id] = row
        self.first_seen = {j: self.first_seen.get(j, now) for j in orphans}  # who stopped being one is forgotten
        resent: list[str] = []
        timed_out: list[str] = []
        suspects: list[str] = []
        for job_id, row in orphans.items():
            if now - self.first_seen[job_id] < self.grace_s:
                suspects.append(job_id)
                continue
            del self.first_seen[job_id]
            if row.status == RUNNING and job_id not in unacked and self._past_soft_limit(row):
                if self._fail_timeout(job_id, row.hard_limit_s):
                    timed_out.append(job_id)
                continue
            enqueue(self.sender, job_id, row.soft_limit_s, row.hard_limit_s)
            live.publish_event(self.redis, job_id, "status", {"status": row.status, "resent": True})
            log.warning("job %s: %s with no live worker or message; sent again", job_id, row.status)
            resent.append(job_id)
        return SweepResult(tuple(resent), tuple(timed_out), tuple(suspects))

    def _past_soft_limit(self, row: Any) -> bool:
        """Whether the attempt has run at least to its soft limit (less the limits' margin). Measured on the Redis
        server's clock (service.live.mark_started); only when that mark is gone on this host's clock against the
        worker's started_at, where a skew under LIMIT_MARGIN_S cannot change the answer."""
        elapsed = live.running_seconds(self.redis, row.id)
        if elapsed is None:
            if row.started_at is None:
                return False
            started = row.started_at if row.started_at.tzinfo else row.started_at.replace(tzinfo=dt.UTC)
            elapsed = (utcnow() - started).total_seconds()
        return elapsed >= row.soft_limit_s - LIMIT_MARGIN_S

    def _fail_timeout(self, job_id: str, hard_limit_s: int) -> bool:
        with self.sessions() as db:
            res = db.execute(update(Job).where(Job.id == job_id, Job.status == RUNNING).values(
                status=FAILED, finished_at=utcnow(), error_code="timeout",
                error_message=f"the job ran past its hard time limit ({hard_limit_s} s) and its worker stopped it"))
            db.commit()
        if res.rowcount != 1:  # it finished meanwhile
            return False
        if self.store is not None:  # what the stopped attempt published has no completion marker: remove it
            try:
                self.store.delete_prefix(f"jobs/{job_id}")
            except Exception:
                log.warning("job %s: could not clear its store prefix", job_id, exc_info=True)
        live.publish_end(self.redis, job_id, {"status": FAILED, "code": "timeout",
                                              "message": "the job ran past its hard time limit"}, self.events_ttl_s)
        log.warning("job %s: past its hard time limit with no worker; failed as timeout", job_id)
        return True

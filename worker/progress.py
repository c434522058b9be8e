"""The progress publisher: quant_core's ``progress(stage, fraction, info)`` calls -> Redis hash, stream, SQL row.

Overall progress weighs each stage by its usual share of a job's time, so the bar rises steadily
and the ETA means something; it never goes backwards.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from service import live
from service.db import Job

log = logging.getLogger("worker.progress")

# Redis errors (a restart, a network blip) and database errors the publisher outlives: progress is best effort,
# the job's own work is not stopped by it. Events are kept meanwhile and published, in order, once Redis answers.
MAX_PENDING_EVENTS = 100_000

STAGE_ORDER = ("load", "evaluate_fp", "prepare", "learn", "quantize", "evaluate", "export")
# Typical shares of a job's time (the paper's 8B runs: learning dominates, GPTQ next).
_WEIGHTS = {"load": 0.05, "evaluate_fp": 0.08, "prepare": 0.02, "learn": 0.5, "quantize": 0.22,
            "evaluate": 0.08, "export": 0.05}


def stage_weights(learning: bool, rotating: bool) -> dict[str, float]:
    w = dict(_WEIGHTS)
    if not learning:
        w["learn"] = 0.0
    if not rotating:
        w["prepare"] = 0.0
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def overall_fraction(weights: dict[str, float], stage: str, fraction: float) -> float:
    """Fraction of the whole job done when ``stage`` is ``fraction`` done (stages run in STAGE_ORDER)."""
    if stage not in weights:
        return 0.0
    i = STAGE_ORDER.index(stage)
    before = sum(weights[s] for s in STAGE_ORDER[:i])
    return min(1.0, before + weights[stage] * min(max(fraction, 0.0), 1.0))


def _clean(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in info.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


class Publisher:
    """Callable passed to quant_core as ``progress``; writes Redis every call, SQL at most every few seconds."""

    def __init__(self, *, redis: Any, sessions: sessionmaker, job_id: str, weights: dict[str, float],
                 db_interval_s: float = 2.0, clock: Callable[[], float] = time.time) -> None:
        self.redis, self.sessions, self.job_id, self.weights = redis, sessions, job_id, weights
        self.db_interval_s, self.clock = db_interval_s, clock
        self.started = clock()
        self.stage: str | None = None
        self.overall = 0.0
        self.stage_times: dict[str, dict[str, float]] = {}
        self.last_db = 0.0
        self.last_event: tuple[str | None, float, float] = (None, -1.0, 0.0)  # (stage, fraction, time) of the last progress event
        self.step: int | None = None
        self.loss: float | None = None
        self.eta: float | None = None
        self.pending: deque[tuple[str, dict[str, Any]]] = deque(maxlen=MAX_PENDING_EVENTS)

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        self.pending.append((kind, data))
        self.deliver()

    def deliver(self) -> bool:
        """Publish the events kept while Redis did not answer (oldest first); False while it still does not."""
        try:
            while self.pending:
                kind, data = self.pending[0]
                live.publish_event(self.redis, self.job_id, kind, data)
                self.pending.popleft()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            return False
        return True

    def __call__(self, stage: str, fraction: float, info: dict[str, Any]) -> None:
        now = self.clock()
        changed = stage != self.stage
        if changed:
            if self.stage is not None:
                self.stage_times[self.stage]["end"] = now
            self.stage_times.setdefault(stage, {"start": now})
            self.stage = stage
            self._event("stage", {"stage": stage})
        self.overall = max(self.overall, overall_fraction(self.weights, stage, fraction))
        elapsed = now - self.started
        self.eta = elapsed * (1 - self.overall) / self.overall if self.overall >= 0.02 else None
        if "step" in info and stage == "learn":
            self.step, self.loss = int(info["step"]), info.get("loss")
        state = {"stage": stage, "stage_fraction": fraction, "progress": self.overall, "eta_s": self.eta,
                 "step": self.step, "loss": self.loss, "updated_at": now}
        try:
            self.redis.hset(live.state_key(self.job_id), mapping={k: json.dumps(v) for k, v in state.items()})
        except Exception as exc:
            if not _is_transient(exc):
                raise
        # Every learning step is an event (the loss curve); other stages one per 1% at most, so a job's stream
        # stays within service.live.STREAM_MAXLEN whatever its length and no replay loses its start. The hash
        # above has the latest state on every call.
        _, last_frac, _ = self.last_event
        if changed or stage == "learn" or fraction >= 1.0 or fraction - last_frac >= live.PROGRESS_EVENT_STEP:
            self._event("progress", {
                "stage": stage, "stage_fraction": round(fraction, 6), "progress": round(self.overall, 6),
                "eta_s": self.eta, **_clean(info)})
            self.last_event = (stage, fraction, now)
        if changed or now - self.last_db >= self.db_interval_s:
            try:
                self.flush()
            except Exception as exc:  # the database is away: the next write (or the final one) carries it all
                if not _is_transient(exc):
                    raise
                log.warning("job %s: progress write failed (%s); going on", self.job_id, type(exc).__name__)

    def flush(self) -> None:
        self.last_db = self.clock()
        with self.sessions() as db:
            db.execute(update(Job).where(Job.id == self.job_id).values(
                stage=self.stage, progress=self.overall, eta_s=self.eta, step=self.step, loss=self.loss,
                stage_times=self.stage_times))
            db.commit()

    def finish_stage(self) -> None:
        if self.stage is not None:
            self.stage_times[self.stage].setdefault("end", self.clock())


def _is_transient(exc: BaseException) -> bool:
    """A dependency that did not answer (Redis, the database), as opposed to a bug."""
    import redis.exceptions
    import sqlalchemy.exc

    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))

"""Faults in the service's own dependencies (issue 14): Redis killed under a running stack (real redis-server
with AOF, uvicorn, a Celery worker, SQLite).

While Redis is down a submit is 503 with Retry-After and leaves no row behind (no orphan 'queued' job that
nothing would ever run, nothing for an Idempotency-Key retry to replay); no request is a 500. Once Redis is back
the same request, same key, makes a new job that runs once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from scripts.stack import Stack
from tests.stack_helpers import Api

pytestmark = pytest.mark.faults


def _kill_redis(stack: Stack) -> None:
    proc = stack.procs.pop("redis")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_redis_down_at_submit_is_503_with_no_orphan_and_recovers(tmp_path: Path) -> None:
    with Stack(tmp_path / "stack") as stack:
        api = Api(stack, stack.token("faults"))
        body = api.job_body(steps=2, seed=3)
        before = api.http.get("/v1/jobs").json()
        _kill_redis(stack)

        t0 = time.monotonic()
        r = api.submit(body, **{"Idempotency-Key": "redis-down-1"})
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0 and r.json()["detail"][0]["loc"] == ["service", "queue"]
        assert time.monotonic() - t0 < 30  # a clear answer, not a hang
        assert api.http.get("/readyz").status_code == 503
        for path in ("/v1/jobs", "/healthz", "/metrics"):
            got = api.http.get(path)
            assert got.status_code != 500 and (got.status_code != 503 or "retry-after" in got.headers), (path, got)
        listed = api.http.get("/v1/jobs")
        if listed.status_code == 200:  # the database answers: no row was left by the refused submit
            assert listed.json() == before

        stack.start_redis()  # same port and AOF folder: what Redis held comes back
        assert api.http.get("/v1/jobs").json() == before
        r = api.submit(body, **{"Idempotency-Key": "redis-down-1"})
        assert r.status_code == 202 and not r.json()["idempotent_replay"], r.text  # a new job, not a replayed orphan
        job = api.wait(r.json()["id"], timeout=180)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert len(api.http.get("/v1/jobs").json()["jobs"]) == len(before["jobs"]) + 1

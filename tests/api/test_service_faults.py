"""Faults in the service's own dependencies (issue 14): Redis killed under a running stack (real redis-server
with AOF, uvicorn, a Celery worker, SQLite), the API process killed, PostgreSQL stopped for a while (a private
server of scripts/ci_postgres.sh, halted and resumed).

While Redis is down a submit is 503 with Retry-After and leaves no row behind (no orphan 'queued' job that
nothing would ever run, nothing for an Idempotency-Key retry to replay); no request is a 500. Once Redis is back
the same request, same key, makes a new job that runs once.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
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


FAULT_ENV = {"SPINQUANT_LOCK_TTL_S": "10", "SPINQUANT_SWEEP_INTERVAL_S": "1", "SPINQUANT_SWEEP_GRACE_S": "6"}


def _learn_steps(events: list[tuple[str, str, dict]]) -> list[int]:
    return [d["step"] for _, e, d in events if e == "progress" and d.get("stage") == "learn" and d.get("step")]


def test_redis_killed_and_restarted_mid_job(tmp_path: Path) -> None:
    """Redis (broker and progress) SIGKILLed while a job learns, back 5 s later from its AOF file. Meanwhile the API
    answers 503 (or 200 from the database), never 500; the job finishes once, and its event stream has every
    learning step in order: the worker kept the events Redis could not take and published them when it was back."""
    with Stack(tmp_path / "stack", extra_env=FAULT_ENV) as stack:
        api = Api(stack, stack.token("faults"))
        job_id = api.submit(api.job_body(steps=40, seed=4)).json()["id"]
        api.wait_learning(job_id)
        _kill_redis(stack)
        down_until = time.monotonic() + 5
        codes: set[int] = set()
        while time.monotonic() < down_until:
            for path in (f"/v1/jobs/{job_id}", "/v1/jobs", f"/v1/jobs/{job_id}/events", "/readyz"):
                got = api.http.get(path, timeout=10)
                codes.add(got.status_code)
                assert got.status_code in (200, 503), (path, got.status_code, got.text)
                assert got.status_code != 503 or "retry-after" in got.headers or path == "/readyz"
            time.sleep(0.3)
        stack.start_redis()
        job = api.wait(job_id, timeout=240)
        assert job["status"] == "succeeded", job
        events = api.events(job_id)
        ends = [d for _, e, d in events if e == "status" and d["status"] in ("succeeded", "failed", "cancelled")]
        assert ends == [{"status": "succeeded"}]
        runs = [d["attempt"] for _, e, d in events if e == "status" and d["status"] == "running"]
        steps = _learn_steps(events)
        print(f"redis down 5 s mid-learn: API answered {sorted(codes)}; attempts {runs}; {len(steps)} learning steps")
        assert steps == list(range(1, 41)) * len(runs)


def test_api_killed_mid_job_and_sse_clients_resume_by_last_event_id(tmp_path: Path) -> None:
    """The API process SIGKILLed while a client watches a learning job, restarted on the same port: the job is not
    touched (one attempt), and the client resuming with Last-Event-ID gets exactly the events it had not seen."""
    import json

    with Stack(tmp_path / "stack", extra_env=FAULT_ENV) as stack:
        api = Api(stack, stack.token("faults"))
        job_id = api.submit(api.job_body(steps=40, seed=6)).json()["id"]
        seen: list[tuple[str, str, dict]] = []
        cur: dict[str, str] = {}
        with api.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(":"):
                    continue
                if line:
                    key, _, value = line.partition(": ")
                    cur[key] = value
                    continue
                if "event" in cur:
                    seen.append((cur["id"], cur["event"], json.loads(cur["data"])))
                cur = {}
                if _learn_steps(seen) and _learn_steps(seen)[-1] >= 3:
                    break
        api_proc = stack.procs.pop("api")
        os.killpg(api_proc.pid, signal.SIGKILL)
        api_proc.wait()
        with pytest.raises(httpx.TransportError):
            httpx.get(stack.url + "/healthz", timeout=5)
        time.sleep(2)
        stack.start_api()
        rest = api.events(job_id, last_id=seen[-1][0])
        whole = api.events(job_id)
        assert seen + rest == whole  # nothing lost, nothing twice
        assert _learn_steps(whole) == list(range(1, 41))
        job = api.job(job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job


PG_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ci_postgres.sh"


class PrivatePostgres:
    """A PostgreSQL server of this test's own (scripts/ci_postgres.sh with its own state folder and port), which the
    test can halt and resume without touching the suite's shared server."""

    def __init__(self, state: Path) -> None:
        self.env = {**os.environ, "SPINQUANT_PG_STATE": str(state), "SPINQUANT_PG_PORT": "56432"}
        out = self._run("start")
        found = re.search(r"SPINQUANT_TEST_POSTGRES_URL='([^']+)'", out)
        assert found, out
        self.url = found.group(1)

    def _run(self, cmd: str) -> str:
        done = subprocess.run(["bash", str(PG_SCRIPT), cmd], env=self.env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def halt(self) -> None:
        self._run("halt")

    def resume(self) -> None:
        self._run("resume")

    def stop(self) -> None:
        self._run("stop")


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    # Not under tmp_path: pytest makes that 0700 for the user running the tests, and the server (as root, CI runs
    # it as the postgres user) must reach its data folder. A folder of its own under the system temp, traversable.
    state = Path(tempfile.mkdtemp(prefix="spinquant-pg-"))
    state.chmod(0o755)
    pg = PrivatePostgres(state)
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_database_stopped_mid_job_is_503_and_the_job_finishes_once(tmp_path: Path,
                                                                   private_pg: PrivatePostgres) -> None:
    """PostgreSQL (the job store) stopped while a job learns and kept down until the job has computed its result
    and its worker is retrying the final write; then started again. Meanwhile every API request is 503 with
    Retry-After (the events stream of a running job included: its token is looked up in the database), never 500;
    the job finishes once, with one attempt, every learning step in its stream and files that match their sha256."""
    with Stack(tmp_path / "stack", database_url=private_pg.url, extra_env=FAULT_ENV) as stack:
        api = Api(stack, stack.token("faults"))
        job_id = api.submit(api.job_body(steps=30, seed=14)).json()["id"]
        api.wait_learning(job_id)
        private_pg.halt()
        t0 = time.monotonic()
        worker_log = stack.root / "worker-gpu0.log"
        codes: set[int] = set()
        final_write = re.compile(rf"job {job_id}: recording succeeded: \w+; retrying in")
        while not final_write.search(worker_log.read_text()):
            assert time.monotonic() - t0 < 240, "the worker never reached its final write"
            for path in (f"/v1/jobs/{job_id}", "/v1/jobs", f"/v1/jobs/{job_id}/events"):
                got = api.http.get(path, timeout=30)
                codes.add(got.status_code)
                assert got.status_code == 503 and "retry-after" in got.headers, (path, got.status_code, got.text)
                assert got.json()["code"] == "unavailable", got.text
            got = api.submit({"model": "local:llama-tiny", "method": "rtn"})
            assert got.status_code == 503, got.text
            time.sleep(0.5)
        down_s = time.monotonic() - t0
        private_pg.resume()
        job = api.wait(job_id, timeout=240)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        events = api.events(job_id)
        ends = [d for _, e, d in events if e == "status" and d["status"] in ("succeeded", "failed", "cancelled")]
        assert ends == [{"status": "succeeded"}]
        assert _learn_steps(events) == list(range(1, 31))
        assert job["artifacts"]
        for art in job["artifacts"]:
            body = api.http.get(art["url"]).content
            assert hashlib.sha256(body).hexdigest() == art["sha256"] and len(body) == art["bytes"], art["name"]
        listed = api.http.get("/v1/jobs").json()["jobs"]
        assert [x["id"] for x in listed] == [job_id]  # the refused submits left no row
        print(f"database down {down_s:.1f} s (from learn to the worker's retried final write): API answered "
              f"{sorted(codes)}")

"""Faults in the workers and the queue under the real stack (issue 14): a real redis-server with AOF, uvicorn, Celery
worker processes, SQLite, and the API's sweeper (service/sweeper.py) on a short interval.

Each case injects one fault into a running job and then checks the invariants: the job reaches exactly one
terminal state, a succeeded job ran to completion once (one 'succeeded' status event, every file matching its
sha256, the checkpoint reloads with the report's perplexity), nothing of a failed job is visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from scripts.stack import Stack
from service import live
from service.db import Job, make_engine, make_sessionmaker
from service.queue import make_sender
from service.sweeper import broker_task_ids
from tests.stack_helpers import Api

pytestmark = pytest.mark.faults

LOCK_TTL_S = 10  # a dead worker's lock is gone this long after its last heartbeat
FAULT_ENV = {"SPINQUANT_LOCK_TTL_S": str(LOCK_TTL_S), "SPINQUANT_SWEEP_INTERVAL_S": "1",
             "SPINQUANT_SWEEP_GRACE_S": "6", "SPINQUANT_SHUTDOWN_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def fstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("faults"), extra_env=FAULT_ENV) as st:
        yield st


@pytest.fixture
def fapi(fstack: Stack) -> Iterator[Api]:
    yield Api(fstack, fstack.token("faults"))
    if not any(n.startswith("worker-") and p.poll() is None for n, p in fstack.procs.items()):
        fstack.start_worker(f"w{time.monotonic_ns()}")  # the next case starts with a worker


def _worker(stack: Stack) -> tuple[str, subprocess.Popen]:
    live_workers = [(n, p) for n, p in stack.procs.items() if n.startswith("worker-") and p.poll() is None]
    assert len(live_workers) == 1, live_workers
    return live_workers[0]


def _children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def _wait_event(redis: Redis, job_id: str, match: object, timeout: float = 120) -> dict:
    """Block on the job's event stream until ``match(kind, data)``; returns that event's data."""
    last = "0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, entries in redis.xread({live.events_key(job_id): last}, block=200) or []:
            for eid, fields in entries:
                last = eid
                kind, data = fields[b"type"].decode(), json.loads(fields[b"data"])
                if match(kind, data):  # type: ignore[operator]
                    return data
    raise AssertionError(f"job {job_id}: no matching event in {timeout}s")


def _assert_succeeded_once(api: Api, job_id: str, attempts: int, tmp_path: Path | None = None) -> dict:
    job = api.wait(job_id, timeout=240)
    assert job["status"] == "succeeded" and job["attempts"] == attempts, job
    events = api.events(job_id)
    ends = [d for _, e, d in events if e == "status" and d["status"] in ("succeeded", "failed", "cancelled")]
    assert ends == [{"status": "succeeded"}], ends  # one terminal state, reached once
    names = {a["name"]: a for a in job["artifacts"]}
    assert "model/model.safetensors" in names and len(names) == len(job["artifacts"])  # no file recorded twice
    for name, art in names.items():
        body = api.http.get(art["url"]).content
        assert hashlib.sha256(body).hexdigest() == art["sha256"] and len(body) == art["bytes"], name
        if tmp_path is not None:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(body)
    if tmp_path is not None:  # the checkpoint reloads and gives the report's perplexity
        from quant_core.calibration import encode, eval_windows, load_text, load_tokenizer
        from quant_core.evaluate import perplexity
        from quant_core.runtime import load
        from tests.conftest import TEST_TEXT

        model, cfg, _ = load(tmp_path, int4_kernels=False)
        windows = eval_windows(encode(load_tokenizer(tmp_path / "model"), load_text(f"file:{TEST_TEXT}", "test")),
                               cfg.eval.seq_len, cfg.eval.max_windows)
        assert perplexity(model, windows) == pytest.approx(job["report"]["quant_ppl"], rel=1e-6)
    return job


def _running_attempts(api: Api, job_id: str) -> list[int]:
    """The attempt number of each start. A sweeper re-send (status event with ``resent``) is a message, not an
    attempt: the task is idempotent, so a re-send is harmless, and only the starts are counted."""
    return [d["attempt"] for _, e, d in api.events(job_id)
            if e == "status" and d["status"] == "running" and not d.get("resent")]


@pytest.mark.parametrize("stage", ["load", "learn", "quantize", "export"])
def test_worker_child_sigkill_at_each_stage_is_redelivered_and_finishes_once(fstack: Stack, fapi: Api,
                                                                             stage: str) -> None:
    redis = Redis.from_url(fstack.redis_url)
    job_id = fapi.submit(fapi.job_body(steps=6, seed=100 + len(stage))).json()["id"]
    _wait_event(redis, job_id, lambda k, d: k == "stage" and d["stage"] == stage)
    _, proc = _worker(fstack)
    children = _children(proc.pid)
    assert children
    for pid in children:
        os.kill(pid, signal.SIGKILL)  # what the host's OOM killer does
    _assert_succeeded_once(fapi, job_id, attempts=2)
    assert _running_attempts(fapi, job_id) == [1, 2]


def test_worker_sigterm_mid_job_hands_it_back_and_the_next_worker_finishes_it(fstack: Stack, fapi: Api,
                                                                              tmp_path: Path) -> None:
    """A deploy: SIGTERM to the worker process alone (what docker stop sends PID 1). After its soft-shutdown wait
    (2 s here) the job is stopped, back in the queue with that attempt not counted, and the worker exits; the
    next worker runs it to the end."""
    redis = Redis.from_url(fstack.redis_url)
    job_id = fapi.submit(fapi.job_body(steps=60, seed=7)).json()["id"]
    _wait_event(redis, job_id, lambda k, d: k == "progress" and d.get("stage") == "learn" and d.get("step"))
    name, proc = _worker(fstack)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    fstack.procs.pop(name)
    job = fapi.job(job_id)
    assert job["status"] == "queued" and job["attempts"] == 0, job
    statuses = [json.loads(f[b"data"]) for _, f in redis.xrange(live.events_key(job_id)) if f[b"type"] == b"status"]
    assert statuses[-1] == {"status": "queued", "reason": "worker_shutdown"}, statuses
    fstack.start_worker("after-sigterm")
    _assert_succeeded_once(fapi, job_id, attempts=1, tmp_path=tmp_path)
    assert _running_attempts(fapi, job_id) == [1, 1]  # the interrupted attempt was given back


def test_worker_process_sigkill_leaves_no_stranded_job(fstack: Stack, fapi: Api) -> None:
    """The whole worker (main process and child) killed: its message stays in the broker's unacked set for the
    49-hour visibility timeout. The sweeper finds the running row with no lock and no queued message and sends the
    job again; a new worker finishes it."""
    redis = Redis.from_url(fstack.redis_url)
    job_id = fapi.submit(fapi.job_body(steps=60, seed=8)).json()["id"]
    _wait_event(redis, job_id, lambda k, d: k == "progress" and d.get("stage") == "learn" and d.get("step"))
    name, proc = _worker(fstack)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    fstack.procs.pop(name)
    assert job_id in {json.loads(v)[0]["headers"]["id"] for v in redis.hvals("unacked")}  # stranded in the broker
    t0 = time.monotonic()
    _wait_event(redis, job_id, lambda k, d: k == "status" and d.get("resent"), timeout=60)
    print(f"sweeper re-sent the job {time.monotonic() - t0:.1f}s after its worker died (lock TTL {LOCK_TTL_S}s)")
    fstack.start_worker("after-sigkill")
    _assert_succeeded_once(fapi, job_id, attempts=2)


def test_two_workers_receive_the_same_job_and_one_runs_it(fstack: Stack, fapi: Api) -> None:
    """A duplicate message (a re-send, a visibility-timeout restore) reaches a second worker while the first runs the
    job: the second finds the lock held, looks again after its lifetime, and then skips the finished job."""
    redis = Redis.from_url(fstack.redis_url)
    second = fstack.start_worker("second")
    try:
        job_id = fapi.submit(fapi.job_body(steps=30, seed=9)).json()["id"]
        _wait_event(redis, job_id, lambda k, d: k == "status" and d["status"] == "running")
        with make_sessionmaker(make_engine(fstack.database_url))() as db:
            row = db.get(Job, job_id)
            assert row is not None
            soft, hard = row.soft_limit_s, row.hard_limit_s
        from service.queue import enqueue

        enqueue(make_sender(fstack.redis_url), job_id, soft, hard)  # the same task id, a second message
        _assert_succeeded_once(fapi, job_id, attempts=1)
        logs = "".join((fstack.root / f"{n}.log").read_text() for n in fstack.procs if n.startswith("worker-"))
        deadline = time.monotonic() + 3 * LOCK_TTL_S
        while f"job {job_id}: skipped: already succeeded" not in logs:
            assert time.monotonic() < deadline, "the duplicate delivery never ended"
            time.sleep(0.5)
            logs = "".join((fstack.root / f"{n}.log").read_text() for n in fstack.procs if n.startswith("worker-"))
        assert logs.count(f"job {job_id}: succeeded") == 1
        assert _running_attempts(fapi, job_id) == [1]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        fstack.procs.pop("worker-second")


def test_hard_time_limit_fails_as_timeout_whatever_the_workers_clock(fstack: Stack, fapi: Api) -> None:
    """Celery's hard time limit kills the child and acknowledges the message: nothing in the job would record it.
    The sweeper sees the running row with no lock and no message, past its soft limit on the Redis server's clock,
    and fails it as 'timeout'; the worker's own clock (its started_at, set two hours off here) is not read."""
    import datetime as dt

    from sqlalchemy import update

    redis = Redis.from_url(fstack.redis_url)
    name, proc = _worker(fstack)
    proc.send_signal(signal.SIGTERM)  # no worker while the job's message is replaced by one with a 4 s hard limit
    proc.wait(timeout=60)
    fstack.procs.pop(name)
    job_id = fapi.submit(fapi.job_body(steps=400, seed=10)).json()["id"]
    assert redis.delete("gpu") == 1
    sessions = make_sessionmaker(make_engine(fstack.database_url))
    with sessions() as db:
        db.execute(update(Job).where(Job.id == job_id).values(soft_limit_s=2, hard_limit_s=4))
        db.commit()
    make_sender(fstack.redis_url).send_task("worker.quantize", kwargs={"job_id": job_id}, task_id=job_id,
                                            queue="gpu", time_limit=4)  # no soft limit: the hard one fires
    fstack.start_worker("hard-limit")
    _wait_event(redis, job_id, lambda k, d: k == "status" and d["status"] == "running")
    with sessions() as db:  # a worker clock two hours behind
        db.execute(update(Job).where(Job.id == job_id).values(
            started_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)))
        db.commit()
    job = fapi.wait(job_id, timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert job["artifacts"] == [] and fapi.http.get(f"/v1/jobs/{job_id}/artifacts").json() == []
    worker_log = (fstack.root / "worker-hard-limit.log").read_text()
    assert "TimeLimitExceeded" in worker_log or "Hard time limit" in worker_log
    # its message acknowledged, its lock gone (the whole-worker kill case above leaves its own dead message in the
    # unacked set until the visibility timeout: only this job's is looked for)
    deadline = time.monotonic() + 3 * LOCK_TTL_S
    while job_id in broker_task_ids(redis)[1] or redis.exists(live.lock_key(job_id)):
        assert time.monotonic() < deadline, "the timed-out job still holds its message or lock"
        time.sleep(0.5)


def test_queued_job_whose_message_was_lost_is_sent_again(fstack: Stack, fapi: Api) -> None:
    """A committed row whose message never reached the broker (the API died between its commit and its send, or
    Redis lost the message): the sweeper sends it again once it has stayed so for its grace, and it runs once."""
    redis = Redis.from_url(fstack.redis_url)
    name, proc = _worker(fstack)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    fstack.procs.pop(name)
    job_id = fapi.submit(fapi.job_body(steps=2, seed=12)).json()["id"]
    assert redis.delete("gpu") == 1  # the message is gone; the row says queued
    _wait_event(redis, job_id, lambda k, d: k == "status" and d.get("resent"), timeout=60)
    fstack.start_worker("after-lost-message")
    _assert_succeeded_once(fapi, job_id, attempts=1)


def test_disk_full_during_export_fails_clearly_and_leaves_nothing(fstack: Stack, tmp_path: Path) -> None:
    """The artifact store and scratch space on a 256 KiB tmpfs (the checkpoint needs more): the export hits ENOSPC.
    The job fails as 'disk_full', no file or artifact row is published, the scratch folder is gone. Runs the task in
    this process on the stack's Redis (mounting needs root, as this suite's machines have)."""
    from quant_core.config import config_to_dict, make_config
    from service.db import FAILED, Artifact, Token, migrate
    from service.settings import WorkerSettings
    from tests.conftest import MODELS, TEST_TEXT, TRAIN_TEXT
    from worker.tasks import run_job

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
        migrate(url)
        settings = WorkerSettings(database_url=url, redis_url=fstack.redis_url, artifact_root=disk / "store",
                                  models_dir=MODELS, lock_ttl_s=30)
        sessions = make_sessionmaker(make_engine(url))
        cfg = make_config("rtn", w_bits=4, seq_len=64, eval_windows=1, calib_source=f"file:{TRAIN_TEXT}",
                          eval_source=f"file:{TEST_TEXT}")
        with sessions() as db:
            tok = Token(name="t", token_hash=os.urandom(32).hex())
            db.add(tok)
            db.commit()
            job = Job(owner_id=tok.id, model="local:llama-tiny", method="rtn", scheme=cfg.scheme, request={},
                      config=config_to_dict(cfg), formats=["ct"], fingerprint=os.urandom(32).hex(), soft_limit_s=60,
                      hard_limit_s=90, stage_times={}, status="queued", attempts=0)
            db.add(job)
            db.commit()
            job_id = job.id
        assert run_job(job_id, settings=settings) == "failed: disk_full"
        with sessions() as db:
            row = db.get(Job, job_id)
            assert row is not None and row.status == FAILED and row.error_code == "disk_full", row.error_message
            assert "No space left" in (row.error_message or "")
            assert db.query(Artifact).filter_by(job_id=job_id).count() == 0
        assert not (disk / "store" / "jobs" / job_id).exists()
        assert not (disk / "store" / ".work" / job_id).exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)

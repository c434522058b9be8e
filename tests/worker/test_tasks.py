"""The quantize task: idempotent redelivery, the job lock, the attempt cap, failure classes, QUEUE.md settings.

``run_job`` runs in this process against a real redis-server and a real SQLite job store; the last
test kills a real Celery child mid-job and checks that the job is redelivered and finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from redis import Redis

from quant_core.config import config_to_dict, make_config
from service import live
from service.db import FAILED, QUEUED, RUNNING, SUCCEEDED, Artifact, Job, Token, make_engine, make_sessionmaker, migrate
from service.queue import time_limits
from service.settings import WorkerSettings
from tests.conftest import MODELS, TEST_TEXT, TRAIN_TEXT
from worker.tasks import run_job

SMALL = dict(w_bits=4, a_bits=4, kv_bits=4, seq_len=128, steps=2, prefit_steps=10, train_samples=8, calib_samples=4, batch_size=2,
             eval_windows=4, calib_source=f"file:{TRAIN_TEXT}", eval_source=f"file:{TEST_TEXT}")


@pytest.fixture
def env(stack, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    settings = WorkerSettings(database_url=url, redis_url=stack.redis_url, artifact_root=tmp_path / "store",
                              models_dir=MODELS, lock_ttl_s=30)
    sessions = make_sessionmaker(make_engine(url))
    with sessions() as db:
        tok = Token(name="t", token_hash=os.urandom(32).hex())
        db.add(tok)
        db.commit()
    redis = Redis.from_url(stack.redis_url)

    def add_job(status: str = QUEUED, attempts: int = 0, model: str = "local:llama-tiny", **cfg: object) -> str:
        c = make_config("spinquant", **{**SMALL, **cfg})
        with sessions() as db:
            job = Job(owner_id=tok.id, model=model, method="spinquant", scheme=c.scheme, request={},
                      config=config_to_dict(c), formats=["ct"], fingerprint=os.urandom(32).hex(), soft_limit_s=60,
                      hard_limit_s=90, stage_times={}, status=status, attempts=attempts)
            db.add(job)
            db.commit()
            return job.id

    return settings, sessions, redis, add_job


def _row(sessions, job_id: str) -> Job:
    with sessions() as db:
        return db.get(Job, job_id)


def test_the_running_worker_has_the_queue_rules(stack) -> None:
    """QUEUE.md, read back from the stack's real Celery worker process (``inspect conf``): the visibility timeout
    of 49 h in all three places (above the 48 h longest job), late acks, prefetch 1, a fresh child per job, a job
    that outlives a Redis blip."""
    from celery import Celery

    conf = Celery(broker=stack.redis_url).control.inspect(timeout=10).conf()
    assert conf, "no worker answered"
    for c in conf.values():
        assert c["broker_transport_options"]["visibility_timeout"] == 49 * 3600
        assert c["result_backend_transport_options"]["visibility_timeout"] == 49 * 3600
        assert c["visibility_timeout"] == 49 * 3600
        assert c["task_acks_late"] is True and c["task_reject_on_worker_lost"] is True
        assert c["worker_prefetch_multiplier"] == 1 and c["worker_max_tasks_per_child"] == 1
        assert c["worker_cancel_long_running_tasks_on_connection_loss"] is False  # a Redis blip keeps the job


def test_time_limits_grow_with_the_model_and_stay_under_the_visibility_timeout() -> None:
    for size in (None, 0, 10**8, 16 * 10**9, 10**12):
        soft, hard = time_limits(size)
        assert 0 < soft < hard <= 48 * 3600 < 49 * 3600
    assert time_limits(16 * 10**9)[0] > time_limits(10**9)[0]


def test_job_runs_once_and_a_duplicate_delivery_does_nothing(env) -> None:
    settings, sessions, redis, add_job = env
    job_id = add_job()
    assert run_job(job_id, settings=settings) == "succeeded"
    row = _row(sessions, job_id)
    assert row.status == SUCCEEDED and row.attempts == 1 and row.progress == 1.0
    assert row.report["quant_ppl"] > row.report["fp_ppl"] > 1
    with sessions() as db:
        files = {a.name: a for a in db.query(Artifact).filter_by(job_id=job_id)}
    assert "model/model.safetensors" in files
    stored = settings.artifact_root / files["model/model.safetensors"].store_key
    assert stored.is_file() and stored.stat().st_size == files["model/model.safetensors"].bytes
    assert not (settings.artifact_root / ".work" / job_id).exists()
    n_events = redis.xlen(live.events_key(job_id))
    assert redis.ttl(live.events_key(job_id)) > 0  # progress keys expire after the job ends
    mtime = stored.stat().st_mtime_ns
    assert run_job(job_id, settings=settings) == "skipped: already succeeded"
    assert redis.xlen(live.events_key(job_id)) == n_events and stored.stat().st_mtime_ns == mtime
    assert _row(sessions, job_id).attempts == 1


def test_lock_held_by_another_delivery(env) -> None:
    settings, sessions, redis, add_job = env
    job_id = add_job()
    redis.set(live.lock_key(job_id), "other-worker:1", ex=30)
    assert run_job(job_id, settings=settings) == "locked"
    row = _row(sessions, job_id)
    assert row.status == QUEUED and row.attempts == 0
    assert redis.get(live.lock_key(job_id)) == b"other-worker:1"  # not ours to release


def test_attempt_cap_fails_as_worker_lost(env) -> None:
    settings, sessions, redis, add_job = env
    job_id = add_job(status=RUNNING, attempts=2)
    assert run_job(job_id, settings=settings) == "failed: worker_lost"
    row = _row(sessions, job_id)
    assert row.status == FAILED and row.error_code == "worker_lost" and "out of memory" in row.error_message
    last = redis.xrevrange(live.events_key(job_id), count=1)[0][1]
    assert last[b"type"] == b"end" and json.loads(last[b"data"]) == {"status": "failed"}


@pytest.mark.parametrize("change, code, words", [
    ({"model": "local:missing-model"}, "bad_model", "unknown local model"),
    ({"eval_source": "file:/nonexistent/test.txt"}, "bad_data", "does not exist"),
    ({"w_group_size": 96}, "bad_config", "group"),
])
def test_failures_are_classified(env, change: dict, code: str, words: str) -> None:
    settings, sessions, _, add_job = env
    job_id = add_job(**change)
    assert run_job(job_id, settings=settings) == f"failed: {code}"
    row = _row(sessions, job_id)
    assert row.status == FAILED and row.error_code == code and words in row.error_message, row.error_message
    assert not (settings.artifact_root / "jobs" / job_id).exists()


VOLATILE = ("timings_s", "peak_rss_mb", "memory_mb", "peak_gpu_mb")  # measured per process, never equal twice


def test_worker_and_cli_write_the_same_report(env, tmp_path: Path) -> None:
    """Both run quant_core.pipeline.run: the same settings give the same report (but for the seconds and bytes of
    memory each process measures, and the model's name: the job's local:<name>, the CLI's folder)."""
    import sys

    settings, sessions, _, add_job = env
    job_id = add_job()
    assert run_job(job_id, settings=settings) == "succeeded"
    worker_report = _row(sessions, job_id).report
    flags = ["--w-bits", "4", "--a-bits", "4", "--kv-bits", "4", "--seq-len", "128", "--steps", "2",
             "--train-samples", "8", "--calib-samples", "4", "--batch-size", "2", "--eval-windows", "4",
             "--set", "train.prefit_steps=10", "--calib-text", str(TRAIN_TEXT), "--eval-text", str(TEST_TEXT)]
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "quant_core", "quantize", str(MODELS / "llama-tiny"), *flags, "--out", str(out),
                        "--report-json", str(tmp_path / "report.json"), "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    cli_report = json.loads((tmp_path / "report.json").read_text())
    assert cli_report == json.loads((out / "model" / "eval_report.json").read_text())  # printed = shipped

    def stable(rep: dict) -> dict:
        rotation = {k: v for k, v in rep["rotation"].items() if not k.endswith("_seconds")}  # the pre-fit's seconds
        return {**{k: v for k, v in rep.items() if k not in VOLATILE}, "model": {**rep["model"], "id": None},
                "rotation": rotation}

    assert worker_report["model"]["id"] == "local:llama-tiny"
    assert cli_report["model"]["id"] == str((MODELS / "llama-tiny").resolve())
    assert stable(worker_report) == stable(cli_report)
    assert set(worker_report["timings_s"]) == set(cli_report["timings_s"]) and worker_report["timings_s"]["export"] > 0

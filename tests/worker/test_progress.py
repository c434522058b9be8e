"""The progress publisher: overall fraction, ETA, stage timings, Redis hash + stream, throttled SQL writes."""

from __future__ import annotations

import json

import pytest
from redis import Redis

from service import live
from service.db import Job, Token, make_engine, make_sessionmaker, migrate
from worker.progress import STAGE_ORDER, Publisher, overall_fraction, stage_weights


def test_stage_weights_sum_to_one_and_skip_absent_stages() -> None:
    for learning, rotating in [(True, True), (False, True), (False, False)]:
        w = stage_weights(learning, rotating)
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
        assert (w["learn"] > 0) == learning and (w["prepare"] > 0) == rotating


def test_overall_fraction_rises_through_the_stages() -> None:
    w = stage_weights(True, True)
    seq = [overall_fraction(w, s, f) for s in STAGE_ORDER for f in (0.0, 0.5, 1.0)]
    assert seq == sorted(seq) and seq[0] == 0.0 and seq[-1] == pytest.approx(1.0)
    assert overall_fraction(w, "learn", 0.5) == pytest.approx(sum(w[s] for s in STAGE_ORDER[:3]) + w["learn"] / 2)


def _job_row(tmp_path) -> tuple:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    sessions = make_sessionmaker(make_engine(url))
    with sessions() as db:
        tok = Token(name="t", token_hash="h" * 64)
        db.add(tok)
        db.flush()
        job = Job(owner_id=tok.id, model="local:x", method="spinquant", scheme="W4A4KV4", request={}, config={},
                  formats=["ct"], fingerprint="f" * 64, soft_limit_s=1, hard_limit_s=2, stage_times={})
        db.add(job)
        db.commit()
        return sessions, job.id


def test_eta_is_the_true_remaining_time_of_a_job_that_runs_at_its_weights(stack, tmp_path) -> None:
    """A job whose stages take exactly their weight's share of 100 s: every ETA after the first 2% is the time
    the simulated job really has left, and it ends at 0."""
    sessions, job_id = _job_row(tmp_path)
    w = stage_weights(True, True)
    now = [0.0]
    pub = Publisher(redis=Redis.from_url(stack.redis_url), sessions=sessions, job_id=job_id, weights=w,
                    db_interval_s=1e9, clock=lambda: now[0])
    checked = 0
    for stage in STAGE_ORDER:
        for i in range(1, 11):
            now[0] += 100 * w[stage] / 10
            pub(stage, i / 10, {})
            if pub.eta is not None:
                assert pub.eta == pytest.approx(100 - now[0], abs=1e-6), (stage, i)
                checked += 1
    assert now[0] == pytest.approx(100) and pub.eta == pytest.approx(0, abs=1e-6) and checked >= 60


def test_publisher_writes_hash_stream_and_row(stack, tmp_path) -> None:
    sessions, job_id = _job_row(tmp_path)
    redis = Redis.from_url(stack.redis_url)
    now = [1000.0]
    pub = Publisher(redis=redis, sessions=sessions, job_id=job_id, weights=stage_weights(True, True),
                    db_interval_s=5.0, clock=lambda: now[0])
    pub("load", 0.0, {})
    now[0] += 10
    pub("load", 1.0, {})
    pub("evaluate_fp", 1.0, {"windows": 8, "of": 8})
    for step in range(1, 5):
        now[0] += 1
        pub("learn", step / 4, {"step": step, "loss": 3.0 - step / 10, "steps": 4, "grad_norm": float("nan")})
    state = live.decode_hash(redis.hgetall(live.state_key(job_id)))
    assert state["stage"] == "learn" and state["step"] == 4 and state["loss"] == pytest.approx(2.6)
    w = stage_weights(True, True)
    assert state["progress"] == pytest.approx(overall_fraction(w, "learn", 1.0))
    events = [(f[b"type"].decode(), json.loads(f[b"data"])) for _, f in redis.xrange(live.events_key(job_id))]
    assert [d["stage"] for k, d in events if k == "stage"] == ["load", "evaluate_fp", "learn"]
    learn = [d for k, d in events if k == "progress" and d["stage"] == "learn"]
    assert [d["step"] for d in learn] == [1, 2, 3, 4] and learn[0]["grad_norm"] is None  # NaN is not JSON
    assert pub.stage_times["load"] == {"start": 1000.0, "end": 1010.0}
    with sessions() as db:  # rows are written on stage changes (and every db_interval_s otherwise)
        row = db.get(Job, job_id)
        assert row.stage == "learn" and row.stage_times["evaluate_fp"] == {"start": 1010.0, "end": 1011.0}


def test_a_long_jobs_stream_keeps_every_event_from_its_start(stack, tmp_path) -> None:
    """A job of 1200 pre-fit and 800 learning steps (more events than the old 1000-entry cap) whose other stages
    report 5000 times each: a subscriber that comes at the end replays the stream from the very first event, every
    learning step is in it, and each other stage adds at most live.EVENTS_PER_STAGE events."""
    sessions, job_id = _job_row(tmp_path)
    redis = Redis.from_url(stack.redis_url)
    now = [0.0]
    pub = Publisher(redis=redis, sessions=sessions, job_id=job_id, weights=stage_weights(True, True),
                    db_interval_s=1e9, clock=lambda: now[0])
    for stage in STAGE_ORDER:
        if stage == "learn":
            for k in range(1, 1201):
                pub("learn", k / 2000, {"phase": "prefit", "prefit_step": k})
            for step in range(1, 801):
                pub("learn", (1200 + step) / 2000, {"step": step, "loss": 1.0})
            continue
        for k in range(1, 5001):
            now[0] += 2.0  # slow calls: a time-based rule would publish every one of them
            pub(stage, k / 5000, {})
    events = [(f[b"type"].decode(), json.loads(f[b"data"])) for _, f in redis.xrange(live.events_key(job_id))]
    assert events[0] == ("stage", {"stage": STAGE_ORDER[0]})
    learn = [d for k, d in events if k == "progress" and d["stage"] == "learn"]
    assert [d["prefit_step"] for d in learn if "prefit_step" in d] == list(range(1, 1201))
    assert [d["step"] for d in learn if "step" in d] == list(range(1, 801))
    for stage in STAGE_ORDER:
        if stage != "learn":
            n = sum(1 for k, d in events if d.get("stage") == stage)
            assert 100 <= n <= live.EVENTS_PER_STAGE, (stage, n)
    assert len(events) > 2000 and 2 * 100_000 + len(STAGE_ORDER) * live.EVENTS_PER_STAGE <= live.STREAM_MAXLEN

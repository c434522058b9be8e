"""The SQL job store on every supported backend: migrations match the models, and the rules the service
relies on (hashed tokens, idempotency keys, JSON and datetime round trips, artifact cascade) hold.

SQLite always runs (a temp file). PostgreSQL runs when SPINQUANT_TEST_POSTGRES_URL points at a database
the URL's user owns (CI: ``eval "$(scripts/ci_postgres.sh)"``); each test gets its own fresh schema,
dropped afterwards, so runs are repeatable and never touch other data (the ``db_url`` fixture, tests/conftest.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import delete, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import sessionmaker

from api import auth
from service.db import Artifact, Base, Job, Token, alembic_config, make_engine, make_sessionmaker, migrate

TABLES = {"tokens", "texts", "jobs", "artifacts"}


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker]:
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables_and_version(url: str) -> tuple[set[str], list[str]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            versions = list(conn.scalars(text("SELECT version_num FROM alembic_version")))
        return tables, versions
    finally:
        engine.dispose()


def _head(url: str) -> str:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def _job(owner: Token, **kw) -> Job:
    values = dict(owner_id=owner.id, model="local:llama-tiny", method="spinquant", scheme="w4a4kv4",
                  request={"model": "local:llama-tiny"}, config={"_type": "SpinQuantConfig"}, formats=["ct"],
                  fingerprint="f" * 64, soft_limit_s=600, hard_limit_s=900, stage_times={})
    values.update(kw)
    return Job(**values)


def test_migrate_yields_the_models_schema_and_is_idempotent(db_url: str, sessions: sessionmaker) -> None:
    # `sessions` has migrated the empty database once.
    assert _schema_diff(db_url) == []
    tables, versions = _tables_and_version(db_url)
    assert tables == TABLES | {"alembic_version"}
    assert versions == [_head(db_url)]
    with sessions() as db:
        auth.create_token(db=db, name="survivor")

    migrate(db_url)  # again: a no-op that keeps the data

    assert _schema_diff(db_url) == []
    assert _tables_and_version(db_url) == (tables, versions)
    with sessions() as db:
        assert db.scalars(select(Token.name)).all() == ["survivor"]


def test_downgrade_to_base_then_upgrade_to_head(db_url: str) -> None:
    cfg = alembic_config(db_url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    tables, versions = _tables_and_version(db_url)
    assert tables == {"alembic_version"} and versions == []

    command.upgrade(cfg, "head")

    assert _schema_diff(db_url) == []
    assert _tables_and_version(db_url) == (TABLES | {"alembic_version"}, [_head(db_url)])


def test_token_create_lookup_revoke_stores_only_the_sha256(sessions: sessionmaker) -> None:
    with sessions() as db:
        row, secret = auth.create_token(db=db, name="ci", admin=True)
        _, other_secret = auth.create_token(db=db, name="other")
        token_id = row.id
    assert secret.startswith(auth.TOKEN_PREFIX) and secret != other_secret

    with sessions() as db:
        stored = db.execute(text("SELECT * FROM tokens WHERE id = :id"), {"id": token_id}).mappings().one()
        assert stored["token_hash"] == hashlib.sha256(secret.encode()).hexdigest()
        assert not any(secret in str(v) or secret.removeprefix(auth.TOKEN_PREFIX) in str(v) for v in stored.values())

        found = auth.lookup(db=db, secret=secret)
        assert found is not None and (found.id, found.name, found.admin) == (token_id, "ci", True)
        assert auth.lookup(db=db, secret=secret + "x") is None

        assert auth.revoke(db=db, token_id=token_id) is True
        assert auth.revoke(db=db, token_id="no-such-token") is False

    with sessions() as db:
        assert auth.lookup(db=db, secret=secret) is None  # revoked, seen from a fresh session
        assert auth.lookup(db=db, secret=other_secret) is not None  # the other token is untouched
        assert db.get(Token, token_id).revoked is True


def test_idempotency_key_is_unique_per_owner(sessions: sessionmaker) -> None:
    with sessions() as db:
        alice, _ = auth.create_token(db=db, name="alice")
        bob, _ = auth.create_token(db=db, name="bob")
        db.add_all([_job(alice, idempotency_key="k1"), _job(bob, idempotency_key="k1"),  # other owner: fine
                    _job(alice, idempotency_key=None), _job(alice, idempotency_key=None)])  # no key: never clash
        db.commit()

        db.add(_job(alice, idempotency_key="k1"))
        with pytest.raises(IntegrityError):
            db.commit()
        db.rollback()
        assert db.scalar(select(func.count()).select_from(Job).where(Job.owner_id == alice.id)) == 3


def test_json_columns_round_trip_nested_dicts_and_floats_exactly(sessions: sessionmaker) -> None:
    config = {"_type": "SpinQuantConfig", "_version": 3,
              "_data": {"w_bits": 4, "lr": 1.5e-3, "third": 1 / 3, "tiny": 5e-324, "huge": 1.7976931348623157e308,
                        "neg": -0.1, "zero": 0.0, "flag": True, "none": None, "name": "wikitext2 — ü",
                        "nested": {"layers": [0, 1.25, [2.5e-10, {"deep": 0.30000000000000004}]]}}}
    report = {"fp_ppl": 12.345678901234567, "quant_ppl": 13.000000000000002, "loss_curve": [2.1, 1.9000000000000001],
              "timings_s": {"total": 3.14159, "export": 0.001}, "model": {"id": "local:llama-tiny"}}
    stage_times = {"calibrate": {"start": 1764000000.123456, "end": 1764000001.654321}, "evaluate": {"start": 1.0}}
    with sessions() as db:
        owner, _ = auth.create_token(db=db, name="json")
        job = _job(owner, config=config, report=report, stage_times=stage_times)
        bad = _job(owner, report={"quant_ppl": float("nan"), "loss_curve": [1.0, float("inf"), -float("inf")]})
        db.add_all([job, bad])
        db.commit()
        job_id, bad_id = job.id, bad.id

    with sessions() as db:
        back = db.get(Job, job_id)
        assert back.config == config and back.report == report and back.stage_times == stage_times
        assert repr(back.config) == repr(config)  # same floats to the last bit, same key order
        assert back.report["fp_ppl"].hex() == report["fp_ppl"].hex()
        # JSON has no NaN/inf (PostgreSQL's json type refuses them): they are stored as null.
        assert db.get(Job, bad_id).report == {"quant_ppl": None, "loss_curve": [1.0, None, None]}


def test_deleting_a_job_cascades_to_its_artifacts(sessions: sessionmaker) -> None:
    with sessions() as db:
        owner, _ = auth.create_token(db=db, name="cascade")
        jobs = [_job(owner), _job(owner), _job(owner)]
        for i, job in enumerate(jobs):
            job.artifacts = [Artifact(name=f"ct/model-{i}-{k}.safetensors", bytes=10 + k, sha256="a" * 64,
                                      store_key=f"jobs/{i}/{k}") for k in range(2)]
        db.add_all(jobs)
        db.commit()
        ids = [j.id for j in jobs]
        assert db.scalar(select(func.count()).select_from(Artifact)) == 6

        db.delete(jobs[0])  # ORM delete
        db.commit()
        db.execute(delete(Job).where(Job.id == ids[1]))  # SQL delete: the ON DELETE CASCADE foreign key
        db.commit()

    with sessions() as db:
        remaining = db.execute(select(Artifact.job_id, Artifact.name).order_by(Artifact.name)).all()
        assert [job_id for job_id, _ in remaining] == [ids[2], ids[2]]
        assert db.get(Job, ids[2]).artifacts[0].name == "ct/model-2-0.safetensors"


def test_timezone_aware_datetimes_round_trip(sessions: sessionmaker) -> None:
    india = dt.timezone(dt.timedelta(hours=5, minutes=30))
    started = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=india)  # 2026-01-01 21:34:05.678901 UTC
    finished = dt.datetime(2026, 1, 1, 23, 0, 0, 1, tzinfo=dt.UTC)
    with sessions() as db:
        owner, _ = auth.create_token(db=db, name="tz")
        job = _job(owner, started_at=started, finished_at=finished)
        db.add(job)
        db.commit()
        job_id = job.id

    with sessions() as db:
        back = db.get(Job, job_id)
        for value, want in ((back.started_at, started), (back.finished_at, finished)):
            assert value == want and value.utcoffset() == dt.timedelta(0)
        assert back.started_at.isoformat() == "2026-01-01T21:34:05.678901+00:00"
        assert back.created_at.tzinfo is not None  # the default (utcnow) too
        assert abs(dt.datetime.now(dt.UTC) - back.created_at) < dt.timedelta(minutes=5)
        assert (back.finished_at - back.started_at) == dt.timedelta(hours=1, minutes=25, seconds=54, microseconds=321100)
        # Ordering and filtering compare instants, not wall-clock text.
        assert db.scalar(select(Job.id).where(Job.started_at < dt.datetime(2026, 1, 1, 22, tzinfo=dt.UTC))) \
            == job_id
        assert db.scalar(select(Job.id).where(Job.started_at > dt.datetime(2026, 1, 2, 3, tzinfo=india))) == job_id

        back.finished_at = dt.datetime(2026, 1, 1, 23, 0)  # naive: ambiguous, refused
        with pytest.raises(StatementError, match="naive datetime"):
            db.commit()

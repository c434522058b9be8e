"""The cache key's model part (issue 14): a finished job is reused only when its pin names fixed weights. With the
hub not asked (SPINQUANT_HUB_CHECK=false, a hub outage), a branch is `unverified:main`, and `main` may have moved:
such a request runs again. A full commit id names the same files forever, so it stays a cache hit. Real SQLite,
the session stack's real Redis and broker (its worker drops the messages: their rows are in this test's database)."""

from __future__ import annotations

from pathlib import Path

from redis import Redis
from sqlalchemy import update

from api.crud import create_job
from api.schemas import JobCreate
from service.db import SUCCEEDED, Job, Token, make_engine, make_sessionmaker, migrate, utcnow
from service.queue import make_sender
from service.settings import ApiSettings
from service.sources import ModelRef


def test_unverified_branch_pins_are_never_cache_hits(stack, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    sessions = make_sessionmaker(make_engine(url))
    settings = ApiSettings(database_url=url, hub_check=False)
    redis, sender = Redis.from_url(stack.redis_url), make_sender(stack.redis_url)
    body = {"model": "org/model", "method": "rtn", "settings": {"w_bits": 4},
            "calib": {"dataset": "wikitext2"}, "eval": {"dataset": "wikitext2"}}

    def submit(db, owner, **extra) -> tuple[str, bool]:
        created = create_job(db=db, owner=owner, job_in=JobCreate(**{**body, **extra}), idempotency_key=None,
                             settings=settings, sender=sender, redis=redis)
        return created.job.id, created.cache_hit

    with sessions() as db:
        owner = Token(name="t", token_hash="c" * 64)
        db.add(owner)
        db.commit()
        for extra, reused in (({}, False), ({"revision": "v1.0"}, False), ({"revision": "a1b2" * 10}, True)):
            first, hit = submit(db, owner, **extra)
            assert not hit
            db.execute(update(Job).where(Job.id == first).values(status=SUCCEEDED, finished_at=utcnow()))
            db.commit()
            again, hit = submit(db, owner, **extra)
            assert again != first and hit is reused, extra
    assert not ModelRef("org/m", "unverified:main", None).cacheable
    assert ModelRef("org/m", "unverified:" + "0" * 40, None).cacheable and ModelRef("org/m", "0" * 40, None).cacheable

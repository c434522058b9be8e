"""GET /metrics in Prometheus text format: jobs by status, queue depth, job durations."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from service.db import STATUSES, Job
from service.queue import GPU_QUEUE

# kombu's Redis transport keeps one list per priority step: "gpu", "gpu\x06\x163", ... (steps 0, 3, 6, 9).
_PRIORITY_SEP = "\x06\x16"


def queue_depth(redis: Any, queue: str = GPU_QUEUE) -> int:
    keys = [queue] + [f"{queue}{_PRIORITY_SEP}{p}" for p in (1, 2, 3, 4, 5, 6, 7, 8, 9)]
    return int(sum(redis.llen(k) for k in keys))


class _JobCollector:
    def __init__(self, sessions: sessionmaker, redis: Any) -> None:
        self.sessions, self.redis = sessions, redis

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("spinquant_jobs", "Jobs in the database by status", labels=["status"])
        dur_sum = GaugeMetricFamily("spinquant_job_duration_seconds_sum",
                                    "Total run time (start to finish) of ended jobs", labels=["status"])
        dur_count = GaugeMetricFamily("spinquant_job_duration_seconds_count", "Ended jobs with a run time",
                                      labels=["status"])
        with self.sessions() as db:
            counts = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            ended = db.execute(select(Job.status, Job.started_at, Job.finished_at).where(
                Job.started_at.is_not(None), Job.finished_at.is_not(None), Job.reused_from.is_(None))).all()
        for s in STATUSES:
            jobs.add_metric([s], counts.get(s, 0))
        sums: dict[str, list[float]] = {}
        for status, start, end in ended:
            sums.setdefault(status, []).append((end - start).total_seconds())
        for s, values in sorted(sums.items()):
            dur_sum.add_metric([s], sum(values))
            dur_count.add_metric([s], len(values))
        yield jobs
        yield dur_sum
        yield dur_count
        depth = GaugeMetricFamily("spinquant_queue_depth", "Jobs waiting in the broker queue", labels=["queue"])
        depth.add_metric([GPU_QUEUE], queue_depth(self.redis))
        yield depth


def render(sessions: sessionmaker, redis: Any) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_JobCollector(sessions, redis))
    return generate_latest(registry)

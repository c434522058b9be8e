"""Operational endpoints: liveness, readiness (database and Redis reachable), Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from sqlalchemy import text

from .. import metrics
from ..deps import ServicesDep

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database or Redis unreachable"}})
def readyz(services: ServicesDep) -> dict[str, str]:
    """Ready to take jobs: the database answers and Redis answers."""
    try:
        with services.sessions() as db:
            db.execute(text("SELECT 1"))
    except Exception as exc:
        raise HTTPException(503, f"database unreachable: {type(exc).__name__}") from None
    try:
        services.redis.ping()
    except Exception as exc:
        raise HTTPException(503, f"redis unreachable: {type(exc).__name__}") from None
    return {"status": "ready"}


@router.get("/metrics", response_class=Response)
def prometheus_metrics(services: ServicesDep) -> Response:
    """Prometheus metrics: jobs by status, queue depth, job durations."""
    return Response(metrics.render(services.sessions, services.redis),
                    media_type="text/plain; version=0.0.4; charset=utf-8")

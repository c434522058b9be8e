"""The FastAPI app: wiring only (services, middleware, error handlers, routers).

Run: ``python -m api serve`` or ``uvicorn api.main:app``. Settings come from SPINQUANT_* variables.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import kombu.exceptions
import redis
import redis.asyncio as aioredis
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db import make_engine, make_sessionmaker, migrate
from service.queue import make_sender
from service.settings import ApiSettings, api_settings
from service.storage import StoreError, make_store
from service.sweeper import Sweeper

from . import dashboard
from .crud import RequestError
from .deps import Services
from .routes import jobs, system, texts

log = logging.getLogger("api.main")

RETRY_AFTER_S = "30"  # seconds a 429 or 503 (a dependency that does not answer) asks the client to wait
# HTTP status of each service.storage.StoreError code: a store that did not answer (or answered short) is 503, to
# retry; only a missing key is 404
STORE_ERROR_STATUS = {"not_found": 404, "bad_key": 400, "exists": 409, "bad_range": 416, "unavailable": 503,
                      "misconfigured": 500}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for bodies over the limit, before they are read into memory (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = (f'{{"detail":"request body too large; the limit is {self.max_bytes} bytes '
                f'(SPINQUANT_MAX_BODY_BYTES)"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def build_services(settings: ApiSettings) -> Services:
    engine = make_engine(settings.database_url)
    return Services(settings=settings, sessions=make_sessionmaker(engine), redis=redis.Redis.from_url(settings.redis_url),
                    # XREAD BLOCK waits sse_block_ms: the socket must outwait it (redis-py's default does not).
                    aredis=aioredis.Redis.from_url(settings.redis_url, socket_timeout=settings.sse_block_ms / 1000 + 10),
                    sender=make_sender(settings.redis_url),
                    store=make_store(settings))


async def sweep_forever(services: Services, settings: ApiSettings) -> None:
    """The sweeper's loop (service/sweeper.py), in a thread per sweep: one API process at a time holds the lease."""
    sweeper = Sweeper(sessions=services.sessions, redis=services.redis, sender=services.sender,
                      grace_s=settings.sweep_grace_s, events_ttl_s=settings.events_ttl_s, store=services.store)

    def once() -> None:
        if sweeper.lead(3 * settings.sweep_interval_s):
            result = sweeper.sweep()
            if result.resent or result.timed_out:
                log.warning("sweeper: re-sent %s, timed out %s", list(result.resent), list(result.timed_out))

    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            await asyncio.to_thread(once)
        except Exception:  # Redis or the database down: the next sweep tries again
            log.warning("sweeper: this sweep failed", exc_info=True)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or api_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            migrate(settings.database_url)
        app.state.services = build_services(settings)
        sweeping = asyncio.create_task(sweep_forever(app.state.services, settings)) if settings.sweep_interval_s else None
        yield
        if sweeping is not None:
            sweeping.cancel()
            with suppress(asyncio.CancelledError):
                await sweeping
        await app.state.services.aredis.aclose()
        app.state.services.redis.close()

    app = FastAPI(title="SpinQuant service", version="0.1.0", lifespan=lifespan,
                  description="Quantize causal LMs to 4 bits with learned rotations (SpinQuant); watch jobs live; "
                              "download real int4 checkpoints. Authenticate with 'Authorization: Bearer <token>'.")

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": exc.loc, "msg": exc.msg, "type": exc.kind}]}, status_code=exc.status,
                            headers={"Retry-After": RETRY_AFTER_S} if exc.status in (429, 503) else None)

    # A dependency that does not answer (Redis, the database) is 503 with Retry-After, never a bare 500: the
    # request may be retried as it is
    async def _dependency_down(_: Request, exc: Exception) -> JSONResponse:
        what = "the database" if isinstance(exc, sqlalchemy.exc.DBAPIError) else "Redis"
        return JSONResponse({"detail": f"{what} is unavailable ({type(exc).__name__}); retry later",
                             "code": "unavailable"}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})

    for kind in (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu.exceptions.OperationalError,
                 sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError):
        app.add_exception_handler(kind, _dependency_down)

    @app.exception_handler(StoreError)
    async def _store_error(_: Request, exc: StoreError) -> JSONResponse:
        status = STORE_ERROR_STATUS[exc.code]
        headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=status, headers=headers)

    app.include_router(jobs.router)
    app.include_router(texts.router)
    app.include_router(system.router)
    dashboard.mount(app)  # the web dashboard: / and /static
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn api.main:app` builds the app lazily, so importing this module reads no settings.
    if name == "app":
        return create_app()
    raise AttributeError(name)

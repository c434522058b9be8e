"""Server-Sent Events from a job's Redis stream: replay from Last-Event-ID, then live until the job ends.

The stream id is the SSE ``id:``, so a reconnecting client resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.exceptions import RedisError

from service import live

EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def format_sse(event_id: str, kind: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def job_events(*, aredis: Any, job_id: str, last_id: str | None, block_ms: int,
                     final_status: Callable[[], Any]) -> AsyncIterator[bytes]:
    """Yield SSE frames. ``final_status`` (awaitable) returns the DB status when terminal, else None.

    A Redis error ends the response cleanly; the client reconnects with Last-Event-ID (the retry hint)
    and loses nothing, because the stream is replayable.
    """
    try:
        async for frame in _frames(aredis, job_id, last_id, block_ms, final_status):
            yield frame
    except RedisError:
        return


async def _frames(aredis: Any, job_id: str, last_id: str | None, block_ms: int,
                  final_status: Callable[[], Any]) -> AsyncIterator[bytes]:
    key = live.events_key(job_id)
    last = last_id or "0-0"
    yield b"retry: 2000\n\n"
    if not await aredis.exists(key):
        status = await final_status()
        if status is not None:  # progress keys already expired: the database still knows the outcome
            yield format_sse(last, "status", json.dumps({"status": status}))
            yield format_sse(last, "end", json.dumps({"status": status}))
            return
    while True:
        resp = await aredis.xread({key: last}, count=200, block=block_ms)
        if not resp:
            if await final_status() is not None and not await aredis.exists(key):
                return
            yield b": keep-alive\n\n"
            continue
        for _, entries in resp:
            for eid, fields in entries:
                last = _s(eid)
                f = {_s(k): _s(v) for k, v in fields.items()}
                kind = f.get("type", "message")
                yield format_sse(last, kind, f.get("data", "{}"))
                if kind == "end":
                    return

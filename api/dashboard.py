"""The web dashboard: static files (plain HTML, CSS and JS modules in api/static/) served by the API.

``/`` is the single page; ``/static/...`` its files. Everything is local (no CDN, no build step) and the
pages talk to the same /v1 API as any client, with the bearer token the user signs in with.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent / "static"
# Revalidate every time (ETag makes that a 304): a server upgrade never leaves a browser on stale modules.
NO_CACHE = {"Cache-Control": "no-cache"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        resp = await super().get_response(path, scope)
        resp.headers.update(NO_CACHE)
        return resp


def mount(app: FastAPI) -> None:
    """Serve the dashboard at / and its files under /static (outside the OpenAPI schema)."""
    app.mount("/static", _Static(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={**NO_CACHE, "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                     "Referrer-Policy": "no-referrer"})

"""Alembic environment: runs migrations against the URL set by service.db.migrate (or alembic -x url=...)."""

from typing import Any, Literal

from alembic import context

from service.db import Base, UTCDateTime, make_engine

config = context.config
_url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
if not _url:
    raise SystemExit("alembic: no database URL (pass -x url=... or set sqlalchemy.url)")
url: str = _url


def render_item(kind: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Autogenerate writes UTCDateTime (Python-side UTC handling) as the plain column type it stores."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_item=render_item)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=url.startswith("sqlite"),
                          render_item=render_item)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()

"""``python -m api``: tokens, database migrations, and the server.

    python -m api tokens create --name ci [--admin]   # prints the token once
    python -m api tokens list | revoke ID
    python -m api db upgrade
    python -m api store check [--create-bucket]       # write, read and delete a probe; S3: make the bucket
    python -m api serve [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy import select


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m api", description="SpinQuant service administration")
    sub = p.add_subparsers(dest="cmd", required=True)
    tok = sub.add_parser("tokens", help="create, list or revoke bearer tokens")
    tsub = tok.add_subparsers(dest="tcmd", required=True)
    c = tsub.add_parser("create", help="create a token and print it (shown once)")
    c.add_argument("--name", required=True)
    c.add_argument("--admin", action="store_true", help="sees and cancels every owner's jobs")
    c.add_argument("--read-only", action="store_true",
                   help="reads only (a dashboard, a monitor): submit, cancel and upload answer 403")
    c.add_argument("--json", action="store_true", help="print {id, name, admin, read_only, token} as JSON")
    tsub.add_parser("list", help="list tokens (never their secrets)")
    r = tsub.add_parser("revoke", help="revoke a token by id")
    r.add_argument("id")
    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade"])
    st = sub.add_parser("store", help="check that the artifact store (SPINQUANT_STORE) can be written and read")
    st.add_argument("action", choices=["check"])
    st.add_argument("--create-bucket", action="store_true",
                    help="S3: create SPINQUANT_S3_BUCKET when it is missing (a local S3-compatible server)")
    s = sub.add_parser("serve", help="run the API with uvicorn")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)

    from pydantic import ValidationError

    from service.settings import UnknownSetting, api_settings


    try:
        settings = api_settings()
    except UnknownSetting as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error: bad SPINQUANT_* setting: {exc}", file=sys.stderr)
        return 2
    if a.cmd == "store":
        return _store_check(settings, create_bucket=a.create_bucket)
    from service.db import Token, make_engine, make_sessionmaker, migrate

    from . import auth

    if a.cmd == "serve":
        import uvicorn

        from .main import create_app

        uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level="info")
        return 0
    migrate(settings.database_url)
    if a.cmd == "db":
        print(f"database at head: {settings.database_url.split('@')[-1]}")
        return 0
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions() as session:
        if a.tcmd == "create":
            try:
                row, secret = auth.create_token(db=session, name=a.name, admin=a.admin, read_only=a.read_only)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if a.json:
                print(json.dumps({"id": row.id, "name": row.name, "admin": row.admin, "read_only": row.read_only,
                                  "token": secret}))
            else:
                print(secret)
            return 0
        if a.tcmd == "list":
            for t in session.scalars(select(Token).order_by(Token.created_at)):
                print(f"{t.id}  {t.name:<20} admin={t.admin} read_only={t.read_only} revoked={t.revoked} "
                      f"created={t.created_at:%Y-%m-%d %H:%M}")
            return 0
        if a.tcmd == "revoke":
            if not auth.revoke(db=session, token_id=a.id):
                print(f"error: no token with id {a.id}", file=sys.stderr)
                return 2
            print(f"revoked {a.id}")
            return 0
    return 2


def _store_check(settings: object, *, create_bucket: bool) -> int:
    import uuid

    from service.storage import make_store

    try:
        store = make_store(settings)
        created = store.ensure_bucket() if create_bucket and hasattr(store, "ensure_bucket") else False
        probe = f".probe/{uuid.uuid4().hex}"
        store.put_bytes(f"{probe}/ok", b"ok")
        ok = b"".join(store.iter_bytes(f"{probe}/ok")) == b"ok"
        store.delete_prefix(probe)
    except Exception as exc:  # StoreError, botocore's (no credentials, endpoint unreachable, no such bucket...)
        print(f"error: the artifact store does not work: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"error: {store!r} returned other bytes than were written", file=sys.stderr)
        return 1
    print(f"artifact store ok: {store!r}" + (" (bucket created)" if created else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

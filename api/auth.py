"""Bearer tokens: random, shown once, stored as sha256.

A plain sha256 (not a slow password hash) is enough because tokens carry 256 random bits: there is
nothing to brute-force, and a fast hash keeps every request's lookup cheap.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import Token

TOKEN_PREFIX = "sq_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(*, db: Session, name: str, admin: bool = False, read_only: bool = False) -> tuple[Token, str]:
    """A new token row and the secret (returned once, never stored). A read-only token reads what its owner
    (every owner's, with admin) may read, and may not submit, cancel or upload."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("token name must be 1-100 characters")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = Token(name=name, token_hash=hash_token(secret), admin=admin, read_only=read_only)
    db.add(row)
    db.commit()
    return row, secret


def lookup(*, db: Session, secret: str) -> Token | None:
    row = db.scalar(select(Token).where(Token.token_hash == hash_token(secret)))
    if row is None or row.revoked:
        return None
    return row


def revoke(*, db: Session, token_id: str) -> bool:
    row = db.get(Token, token_id)
    if row is None:
        return False
    row.revoked = True
    db.commit()
    return True

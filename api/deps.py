"""Request dependencies as Annotated aliases: settings, database session, Redis, the caller's token."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session, sessionmaker

from service.db import Token
from service.settings import ApiSettings
from service.storage import ArtifactStore

from . import auth


@dataclass
class Services:
    """Process-wide clients, built once at startup (api.main) and shared by every request."""

    settings: ApiSettings
    sessions: sessionmaker
    redis: Any  # redis.Redis (sync: used from threadpool routes)
    aredis: Any  # redis.asyncio.Redis (the SSE route)
    sender: Any  # celery.Celery, send-only
    store: ArtifactStore


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> ApiSettings:
    return services.settings


def get_db(services: ServicesDep) -> Iterator[Session]:
    with services.sessions() as db:
        yield db


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
DbDep = Annotated[Session, Depends(get_db)]


def get_owner(request: Request, db: DbDep) -> Token:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token; send 'Authorization: Bearer <token>' "
                            "(create one with: python -m api tokens create --name NAME)",
                            headers={"WWW-Authenticate": "Bearer"})
    row = auth.lookup(db=db, secret=secret.strip())
    if row is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return row


OwnerDep = Annotated[Token, Depends(get_owner)]


def get_writer(owner: OwnerDep) -> Token:
    """The owner, for a route that changes something (submit, cancel, upload): 403 for a read-only token."""
    if owner.read_only:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this token is read-only; submit, cancel and upload need a "
                            "token created without --read-only")
    return owner


WriterDep = Annotated[Token, Depends(get_writer)]

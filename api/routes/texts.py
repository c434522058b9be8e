"""Texts: upload plain text for calibration or evaluation, referenced by id in POST /v1/jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from .. import crud
from ..deps import DbDep, ServicesDep, WriterDep
from ..schemas import UNAUTHORIZED, Problem, TextPublic

router = APIRouter(prefix="/v1/texts", tags=["texts"], responses=UNAUTHORIZED)


@router.post("", status_code=201, response_model=TextPublic,
             openapi_extra={"requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}}},
             responses={403: {"model": Problem, "description": "the token is read-only"}, 413: {"model": Problem},
                        422: {"model": Problem}})
async def upload_text(request: Request, db: DbDep, owner: WriterDep, services: ServicesDep,
                      name: Annotated[str, Query(min_length=1, max_length=200)] = "text") -> TextPublic:
    """Upload a UTF-8 plain-text body (curl --data-binary @file.txt); returns the id to use as text_id."""
    data = await request.body()
    row = crud.create_text(db=db, owner=owner, name=name, data=data, store=services.store)
    return TextPublic(id=row.id, name=row.name, bytes=row.bytes, sha256=row.sha256)

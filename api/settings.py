"""The API process's settings: one pydantic-settings object, env prefix SPINQUANT_, unknown keys refused."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPINQUANT_", extra="forbid")

    database_url: str = "sqlite:///runs/service/spinquant.db"  # SQLAlchemy URL: sqlite:///file or postgresql+psycopg://...
    redis_url: str = "redis://127.0.0.1:6379/0"  # Celery broker and live progress (hash + stream per job)
    artifact_root: Path = Path("runs/service/artifacts")  # local artifact store: one folder per job, texts/
    models_dir: Path | None = None  # where `local:<name>` models live; None = local models refused
    hub_check: bool = True  # ask the Hugging Face hub whether a model id exists at submission
    max_body_bytes: int = Field(default=64 << 20, ge=1024)  # larger request bodies get 413 (texts included)
    max_jobs_listed: int = Field(default=200, ge=1)  # page size cap of GET /v1/jobs
    events_ttl_s: int = Field(default=7 * 86400, ge=60)  # Redis progress keys expire this long after a job ends
    sse_block_ms: int = Field(default=15000, ge=100)  # how long one XREAD waits before a keep-alive comment
    auto_migrate: bool = True  # run Alembic migrations to head when the API starts

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql")):
            raise ValueError("database_url must be sqlite:///<file> or postgresql+psycopg://user:pass@host/db")
        return v


@lru_cache
def get_settings() -> Settings:
    return Settings()

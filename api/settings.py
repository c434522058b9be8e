"""The API process's settings: one pydantic-settings object, env prefix SPINQUANT_, unknown keys refused."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from .settings_shared import SharedSettings, check_environment


class Settings(SharedSettings):
    model_config = SettingsConfigDict(env_prefix="SPINQUANT_", extra="forbid")

    hub_check: bool = True  # ask the Hugging Face hub whether a model id exists at submission
    max_body_bytes: int = Field(default=64 << 20, ge=1024)  # larger request bodies get 413 (texts included)
    max_jobs_listed: int = Field(default=200, ge=1)  # page size cap of GET /v1/jobs
    sse_block_ms: int = Field(default=15000, ge=100)  # how long one XREAD waits before a keep-alive comment
    auto_migrate: bool = True  # run Alembic migrations to head when the API starts


@lru_cache
def get_settings() -> Settings:
    """The process's settings from the environment; UnknownSetting for a SPINQUANT_* name nothing reads."""
    check_environment()
    return Settings()

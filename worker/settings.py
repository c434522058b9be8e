"""The worker process's settings: one pydantic-settings object, env prefix SPINQUANT_ (shared with the API)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from api.settings_shared import SharedSettings, check_environment


class WorkerSettings(SharedSettings):
    model_config = SettingsConfigDict(env_prefix="SPINQUANT_", extra="ignore")  # the API's keys share the prefix

    hub_cache_dir: Path | None = None  # Hugging Face download cache; None = the hub's default
    lock_ttl_s: int = Field(default=120, ge=10)  # job lock lifetime; a heartbeat refreshes it every third
    max_attempts: int = Field(default=2, ge=1)  # deliveries after which a job is failed as 'worker lost'
    db_write_interval_s: float = Field(default=2.0, ge=0.0)  # progress rows are written at most this often


@lru_cache
def get_settings() -> WorkerSettings:
    """The process's settings from the environment; UnknownSetting for a SPINQUANT_* name nothing reads."""
    check_environment()
    return WorkerSettings()

"""The service's settings: one pydantic-settings class per process, env prefix SPINQUANT_.

``ApiSettings`` and ``WorkerSettings`` both inherit ``SharedSettings`` (the same SPINQUANT_* names mean the
same on every host), so the store and database settings cannot drift apart. One env file usually serves both
processes, so each accepts the other's names; any other SPINQUANT_* variable is refused by name
(``check_environment``). Nothing here is read at import time: ``api_settings()``/``worker_settings()`` read
the environment when a process starts.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PREFIX = "SPINQUANT_"
# SPINQUANT_* variables that are no server setting: the client's, and the dev, test and deploy tools'.
OTHER_VARIABLES = frozenset({
    "SPINQUANT_URL", "SPINQUANT_TOKEN", "SPINQUANT_IDEMPOTENCY_KEY",  # the spinquant client
    "SPINQUANT_MODEL_CACHE", "SPINQUANT_TEST_POSTGRES_URL", "SPINQUANT_PG_STATE", "SPINQUANT_PG_PORT",  # tests, make
    "SPINQUANT_TOOLS_DIR", "SPINQUANT_CHROMIUM", "SPINQUANT_CHROMEDRIVER",
    "SPINQUANT_IMAGE_TAG", "SPINQUANT_IMAGE_REGISTRY", "SPINQUANT_COMPOSE", "SPINQUANT_API_PORT",  # compose
    "SPINQUANT_VLLM",
})


class UnknownSetting(ValueError):
    """A SPINQUANT_* variable no part of the service reads: a misspelt one would otherwise be ignored silently."""

    def __init__(self, field: str, closest: str | None) -> None:
        self.field, self.closest = field, closest
        hint = f"; did you mean {closest}?" if closest else ""
        super().__init__(f"unknown setting {field}{hint} (accepted: the SPINQUANT_* names in the README's "
                         "configuration table)")


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse an unknown SPINQUANT_* variable (names are case-insensitive, as pydantic-settings reads them)."""
    env = os.environ if environ is None else environ
    valid = {PREFIX + f.upper() for f in (*ApiSettings.model_fields, *WorkerSettings.model_fields)} | OTHER_VARIABLES
    for key in sorted(env):
        name = key.upper()
        if name.startswith(PREFIX) and name not in valid:
            # compared without the prefix, which every name shares
            close = difflib.get_close_matches(name[len(PREFIX):], sorted(v[len(PREFIX):] for v in valid), n=1, cutoff=0.6)
            raise UnknownSetting(name, PREFIX + close[0] if close else None)


class SharedSettings(BaseSettings):
    database_url: str = "sqlite:///runs/service/spinquant.db"  # SQLAlchemy URL: sqlite:///file or postgresql+psycopg://...
    redis_url: str = "redis://127.0.0.1:6379/0"  # Celery broker and live progress (hash + stream per job)
    artifact_root: Path = Path("runs/service/artifacts")  # local artifact store: one folder per job, texts/
    store: Literal["local", "s3"] = "local"  # 'local': artifact_root on one host; 's3': a bucket several hosts share
    s3_bucket: str | None = None  # the bucket (required when store is 's3')
    s3_endpoint_url: str | None = None  # S3-compatible server (MinIO, Ceph...), e.g. http://minio:9000; None = AWS S3
    s3_region: str | None = None  # e.g. us-east-1; None = boto3's default (AWS_REGION, ~/.aws/config)
    s3_access_key_id: SecretStr | None = None  # None = boto3's default chain (AWS_* variables, files, instance role)
    s3_secret_access_key: SecretStr | None = None  # with s3_access_key_id
    s3_prefix: str = ""  # object keys start with this (e.g. 'spinquant/'); one bucket can hold several services
    work_root: Path | None = None  # scratch for unfinished outputs; None = artifact_root/.work (local), a temp dir (s3)
    models_dir: Path | None = None  # where `local:<name>` models live; None = local models refused
    events_ttl_s: int = Field(default=7 * 86400, ge=60)  # Redis progress keys expire this long after a job ends

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql")):
            raise ValueError("database_url must be sqlite:///<file> or postgresql+psycopg://user:pass@host/db")
        return v

    @field_validator("s3_bucket", "s3_endpoint_url", "s3_region", "s3_access_key_id", "s3_secret_access_key",
                     "work_root", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v == "" else v  # compose's ${VAR:-} passes empty strings

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Self:
        if self.store == "s3" and not self.s3_bucket:
            raise ValueError("store is 's3' but no bucket is set: set SPINQUANT_S3_BUCKET (and "
                             "SPINQUANT_S3_ENDPOINT_URL for an S3-compatible server such as MinIO)")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError("set both SPINQUANT_S3_ACCESS_KEY_ID and SPINQUANT_S3_SECRET_ACCESS_KEY, or neither "
                             "(then boto3's default credential chain is used)")
        return self


class ApiSettings(SharedSettings):
    """The API process: unknown constructor keywords are refused too."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid")

    hub_check: bool = True  # ask the Hugging Face hub whether a model id exists at submission
    max_body_bytes: int = Field(default=64 << 20, ge=1024)  # larger request bodies get 413 (texts included)
    max_jobs_listed: int = Field(default=200, ge=1)  # page size cap of GET /v1/jobs
    max_active_jobs: int = Field(default=20, ge=0)  # queued + running jobs per token; past it a submit is 429; 0 = none
    sse_block_ms: int = Field(default=15000, ge=100)  # how long one XREAD waits before a keep-alive comment
    auto_migrate: bool = True  # run Alembic migrations to head when the API starts
    # the sweeper (service/sweeper.py): every sweep_interval_s one API process looks for jobs no worker or message
    # will finish, and acts on those that stayed so for sweep_grace_s (keep it above the workers' lock_ttl_s / 3)
    sweep_interval_s: float = Field(default=30.0, ge=0.0)  # 0 = no sweeper in this process
    sweep_grace_s: float = Field(default=300.0, ge=0.0)


class WorkerSettings(SharedSettings):
    """A worker process (the API's names share the prefix: check_environment, not extra=, refuses strangers)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore")

    hub_cache_dir: Path | None = None  # Hugging Face download cache; None = the hub's default
    lock_ttl_s: int = Field(default=120, ge=10)  # job lock lifetime; a heartbeat refreshes it every third
    max_attempts: int = Field(default=2, ge=1)  # deliveries after which a job is failed as 'worker lost'
    db_write_interval_s: float = Field(default=2.0, ge=0.0)  # progress rows are written at most this often
    # on SIGTERM a running job gets this long to finish before it is stopped and re-queued (keep it under the
    # orchestrator's grace period: compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds)
    shutdown_timeout_s: float = Field(default=60.0, ge=0.0)


@lru_cache
def api_settings() -> ApiSettings:
    """The API process's settings from the environment; UnknownSetting for a SPINQUANT_* name nothing reads."""
    check_environment()
    return ApiSettings()


@lru_cache
def worker_settings() -> WorkerSettings:
    """A worker's settings from the environment; UnknownSetting for a SPINQUANT_* name nothing reads."""
    check_environment()
    return WorkerSettings()

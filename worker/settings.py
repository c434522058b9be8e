"""The worker process's settings: one pydantic-settings object, env prefix SPINQUANT_ (shared with the API)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPINQUANT_", extra="ignore")  # the API's keys share the prefix

    database_url: str = "sqlite:///runs/service/spinquant.db"  # the job store (same as the API's)
    redis_url: str = "redis://127.0.0.1:6379/0"  # broker and live progress
    artifact_root: Path = Path("runs/service/artifacts")  # the artifact store root (same as the API's)
    store: Literal["local", "s3"] = "local"  # 'local': artifact_root on one host; 's3': a bucket several hosts share
    s3_bucket: str | None = None  # the bucket (required when store is 's3')
    s3_endpoint_url: str | None = None  # S3-compatible server (MinIO, Ceph...), e.g. http://minio:9000; None = AWS S3
    s3_region: str | None = None  # e.g. us-east-1; None = boto3's default (AWS_REGION, ~/.aws/config)
    s3_access_key_id: SecretStr | None = None  # None = boto3's default chain (AWS_* variables, files, instance role)
    s3_secret_access_key: SecretStr | None = None  # with s3_access_key_id
    s3_prefix: str = ""  # object keys start with this (e.g. 'spinquant/'); one bucket can hold several services
    work_root: Path | None = None  # scratch for unfinished outputs; None = artifact_root/.work (local), a temp dir (s3)
    models_dir: Path | None = None  # where `local:<name>` models live (same as the API's)
    hub_cache_dir: Path | None = None  # Hugging Face download cache; None = the hub's default
    events_ttl_s: int = Field(default=7 * 86400, ge=60)  # progress keys expire this long after a job ends
    lock_ttl_s: int = Field(default=120, ge=10)  # job lock lifetime; a heartbeat refreshes it every third
    max_attempts: int = Field(default=2, ge=1)  # deliveries after which a job is failed as 'worker lost'
    db_write_interval_s: float = Field(default=2.0, ge=0.0)  # progress rows are written at most this often

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


@lru_cache
def get_settings() -> WorkerSettings:
    return WorkerSettings()

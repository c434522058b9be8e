"""Settings the API and the workers share (the same SPINQUANT_* names must mean the same on every host).

Each process still has its own settings class (api.settings.Settings, worker.settings.WorkerSettings);
both inherit these fields and their checks, so the store and database settings cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings


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

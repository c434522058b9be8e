"""Request and response models: the OpenAPI schema users read. Families per entity, one line each on its edge."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class DataRef(BaseModel):
    """Calibration or evaluation text: a `datasets` name, or a text uploaded through POST /v1/texts."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"dataset": "wikitext2"},
                                                                             {"text_id": "5f0c…"}]})
    dataset: str | None = Field(default=None, max_length=200, pattern=r"^[A-Za-z0-9][\w.\-/]*(:[\w.\-]+)?$",
                                description="datasets name, e.g. wikitext2 or name:config")
    text_id: str | None = Field(default=None, max_length=32, description="id returned by POST /v1/texts")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataRef:
        if (self.dataset is None) == (self.text_id is None):
            raise ValueError("give exactly one of dataset or text_id")
        return self


class JobCreate(BaseModel):
    """Body of POST /v1/jobs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model": "meta-llama/Llama-3.2-1B",
        "method": "spinquant",
        "settings": {"w_bits": 4, "a_bits": 4, "kv_bits": 4, "steps": 100},
        "calib": {"dataset": "wikitext2"},
        "eval": {"dataset": "wikitext2"},
        "formats": ["ct"],
    }, {
        "model": "local:llama-tiny",
        "method": "spinquant-vllm",
        "settings": {"w_bits": 4, "a_bits": 4, "kv_bits": 4, "seq_len": 256, "steps": 20,
                     "weights.gptq.damp": 0.02},
        "calib": {"text_id": "5f0c2c0e5a7d4f8c9a1b2c3d4e5f6a7b"},
        "eval": {"text_id": "5f0c2c0e5a7d4f8c9a1b2c3d4e5f6a7b"},
    }]})
    model: str = Field(min_length=1, max_length=300,
                       description="Hugging Face id ('org/name') or 'local:<name>' inside the server's models directory")
    revision: str | None = Field(default=None, max_length=100, pattern=r"^[\w.\-/]+$",
                                 description="branch, tag or commit (hub ids); default: main")
    method: str = Field(default="spinquant", description="preset: spinquant, spinquant-vllm, quarot, gptq, rtn")
    settings: dict[str, Any] = Field(default_factory=dict, description=(
        "any config field: flat names (w_bits, a_bits, kv_bits, w_group_size, steps, lr, seed, seq_len, "
        "calib_samples, ...) or dotted paths (weights.gptq.damp); validated by quant_core's config"))
    calib: DataRef | None = Field(default=None, description="calibration text; default: the preset's (wikitext2)")
    eval: DataRef | None = Field(default=None, description="evaluation text; default: wikitext2 test split")
    formats: list[Literal["ct", "gptq"]] = Field(default_factory=lambda: ["ct"],  # type: ignore[arg-type]
                                                 min_length=1, max_length=2,
                                                 description="ct: compressed-tensors (vLLM); gptq: GPTQ v1 (W4A16 only)")
    force: bool = Field(default=False, description="rebuild even when an identical finished job exists")


class Links(BaseModel):
    self: str
    events: str
    artifacts: str
    cancel: str


class JobAccepted(BaseModel):
    """Response of POST /v1/jobs (202)."""

    id: str
    status: Status
    links: Links
    cache_hit: bool = Field(description="an identical finished job was reused; nothing will run")
    reused_from: str | None = None
    idempotent_replay: bool = Field(description="the Idempotency-Key matched an earlier request; its job is returned")


class ErrorInfo(BaseModel):
    code: str = Field(description="bad_model, bad_data, bad_config, out_of_memory, timeout, worker_lost, cancelled, internal")
    message: str


class ArtifactPublic(BaseModel):
    """One downloadable file of a finished job."""

    name: str
    bytes: int
    sha256: str
    url: str


class StageTiming(BaseModel):
    start: float | None = None  # epoch seconds
    end: float | None = None
    seconds: float | None = None


class JobPublic(BaseModel):
    """GET /v1/jobs/{id}: everything about one job."""

    id: str
    status: Status
    stage: str | None
    progress: float = Field(ge=0.0, le=1.0)
    eta_s: float | None
    step: int | None = Field(description="current rotation-learning step")
    loss: float | None = Field(description="latest rotation-learning loss")
    model: str
    revision: str | None
    method: str
    scheme: str
    settings: dict[str, Any] = Field(description="the full versioned quant_core config ({_type, _version, _data})")
    formats: list[str]
    cancel_requested: bool
    attempts: int
    reused_from: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    timings: dict[str, StageTiming]
    report: dict[str, Any] | None = Field(description="fp_ppl, quant_ppl, timings_s, loss_curve, ... (see README)")
    error: ErrorInfo | None
    artifacts: list[ArtifactPublic]
    links: Links


class JobSummary(BaseModel):
    """One row of GET /v1/jobs."""

    id: str
    status: Status
    stage: str | None
    progress: float
    model: str
    method: str
    scheme: str
    created_at: dt.datetime
    finished_at: dt.datetime | None
    fp_ppl: float | None
    quant_ppl: float | None
    checkpoint_bytes: int | None
    error: ErrorInfo | None


class JobList(BaseModel):
    jobs: list[JobSummary]


class TextPublic(BaseModel):
    """Response of POST /v1/texts."""

    id: str
    name: str
    bytes: int
    sha256: str


class Problem(BaseModel):
    """Every 4xx/5xx body: FastAPI's shape, a detail string or a list of {loc, msg, type}; a dependency or store
    failure adds its code (``unavailable``, ``not_found``, ...)."""

    detail: str | list[dict[str, Any]]
    code: str | None = None


# Every route behind a bearer token answers 401 without a valid one (api.deps.current_owner)
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: {"model": Problem,
                                                      "description": "missing, invalid or revoked bearer token"}}

"""Where a job's inputs come from: models (``local:<name>`` folders, Hugging Face ids) and texts (uploads).

The API checks a request's model here before it records the job; a worker resolves the same names here
when it runs it, so both sides agree on what ``local:<name>`` and ``upload:<sha256>`` mean.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from quant_core.config import HUB_ID
from quant_core.errors import UserError

LOCAL_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)*", re.ASCII)  # with fullmatch
LOCAL_PREFIX = "local:"
UNVERIFIED = "unverified:"  # a hub pin the hub was not asked for (hub check off, or the hub did not answer)
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # a full git commit id: names the same files forever
UPLOAD_PREFIX = "upload:"


class SourceError(UserError):
    """A model reference the service refuses; ``field`` is the request field it came from (model, revision)."""

    code = "bad_model"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)
        self.field: str = field


@dataclass(frozen=True)
class ModelRef:
    model: str  # as the worker receives it: 'local:<name>' or a hub id
    pin: str  # what identifies the weights for caching (folder stamp, or the hub commit)
    weight_bytes: int | None

    @property
    def cacheable(self) -> bool:
        """Whether the pin names fixed weights, so a finished job with it may be reused: not so for an
        ``unverified:`` branch or tag (``main`` moves on the hub while the pin stays the same), unless the
        revision asked for is itself a full commit id."""
        return not self.pin.startswith(UNVERIFIED) or bool(COMMIT_SHA.fullmatch(self.pin.removeprefix(UNVERIFIED)))


def text_key(sha256: str) -> str:
    """The store key of an uploaded text (content-addressed: one object per distinct text)."""
    return f"texts/{sha256}.txt"


def upload_sha(source: str) -> str | None:
    """The sha256 of an ``upload:<sha256>`` data source, or None for any other source."""
    return source.removeprefix(UPLOAD_PREFIX) if source.startswith(UPLOAD_PREFIX) else None


def resolve_local(name: str, models_dir: Path | None) -> Path:
    """The folder of ``local:<name>`` inside ``models_dir``; refuses names that escape it."""
    if models_dir is None:
        raise SourceError("model", "local models are disabled on this server (no models directory configured); "
                          "use a Hugging Face id such as 'org/name'")
    if not LOCAL_NAME.fullmatch(name) or ".." in name.split("/"):
        raise SourceError("model", f"local model name {name!r} is not allowed; accepted: letters, digits, '.', '_', "
                          "'-' and '/' between names, inside the models directory")
    root = Path(models_dir).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise SourceError("model", f"local model {name!r} escapes the models directory")
    if not (path / "config.json").is_file():
        available = sorted(p.parent.relative_to(root).as_posix() for p in root.glob("*/config.json"))
        raise SourceError("model", f"unknown local model {name!r}; available: "
                          f"{', '.join(LOCAL_PREFIX + a for a in available) or 'none'}")
    return path


def model_location(model: str, models_dir: Path | None) -> str:
    """What quant_core loads for a job's model: the folder of ``local:<name>``, else the hub id itself."""
    if model.startswith(LOCAL_PREFIX):
        return str(resolve_local(model.removeprefix(LOCAL_PREFIX), models_dir))
    return model


def _hub_lookup(model: str, revision: str | None) -> tuple[str, int | None]:
    """(commit sha, weight bytes) from the hub; SourceError when the id or revision does not exist."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(model, revision=revision, timeout=10)
    except RevisionNotFoundError:
        raise SourceError("revision", f"revision {revision!r} does not exist for {model}") from None
    except GatedRepoError:
        raise SourceError("model", f"{model} is gated; the server's hub token has no access") from None
    except RepositoryNotFoundError:
        raise SourceError("model", f"unknown model {model!r}: no such Hugging Face repository (or it is private)") from None
    except Exception:  # hub unreachable: accept; the worker fails the job with bad_model if it is wrong
        return f"{UNVERIFIED}{revision or 'main'}", None
    st = getattr(info, "safetensors", None)
    total = getattr(st, "total", None) if st is not None else None
    return str(info.sha or revision or "main"), (int(total) * 2 if total else None)


def resolve_model_ref(*, model: str, revision: str | None, models_dir: Path | None, hub_check: bool) -> ModelRef:
    """What a request's model names, and what pins its weights (the cache key's model part)."""
    if model.startswith(LOCAL_PREFIX):
        path = resolve_local(model.removeprefix(LOCAL_PREFIX), models_dir)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        stamp = hashlib.sha256("".join(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns};"
                                       for p in files).encode()).hexdigest()
        local_bytes = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
        return ModelRef(model=model, pin=stamp, weight_bytes=local_bytes)
    if not HUB_ID.fullmatch(model):  # fullmatch: `$` would let a trailing newline through
        raise SourceError("model", f"model {model!r} is not valid; accepted: a Hugging Face id like "
                          "'meta-llama/Llama-3.2-1B' or 'local:<name>' from the server's models directory")
    if hub_check:
        sha, weight_bytes = _hub_lookup(model, revision)
        return ModelRef(model=model, pin=sha, weight_bytes=weight_bytes)
    return ModelRef(model=model, pin=f"{UNVERIFIED}{revision or 'main'}", weight_bytes=None)

"""Pieces of the service on their own: model references (hub mocked), failure classes, settings.

The artifact store's tests are in test_storage.py (every backend).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from api.crud import RequestError, resolve_local, resolve_model_ref
from api.settings import Settings
from tests.conftest import MODELS


@pytest.mark.parametrize("name, words", [
    ("llama-tiny/../../..", "not allowed"), ("..", "not allowed"), ("/abs", "not allowed"),
    ("nope", "unknown local model"), ("llama-tiny/extra", "unknown local model"),
])
def test_local_model_names_stay_inside_the_models_dir(name: str, words: str) -> None:
    with pytest.raises(RequestError, match=words):
        resolve_local(name, MODELS)
    assert resolve_local("llama-tiny", MODELS) == (MODELS / "llama-tiny").resolve()
    with pytest.raises(RequestError, match="disabled"):
        resolve_local("llama-tiny", None)


def test_local_model_pin_changes_when_its_files_change(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(MODELS / "llama-tiny", tmp_path / "m")
    settings = Settings(models_dir=tmp_path, database_url="sqlite:///:memory:")
    a = resolve_model_ref(model="local:m", revision=None, settings=settings)
    assert a.weight_bytes == sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))
    (tmp_path / "m" / "config.json").write_text((tmp_path / "m" / "config.json").read_text() + " ")
    assert resolve_model_ref(model="local:m", revision=None, settings=settings).pin != a.pin


class _Info:
    sha = "0123abc"
    safetensors = type("S", (), {"total": 1_000_000})()


def test_hub_ids_checked_against_mocked_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face hub is unreachable here, so HfApi.model_info is mocked (the only mock in these tests)."""
    import httpx2  # huggingface_hub's HTTP client; its errors carry a response
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    def resp() -> httpx2.Response:
        return httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))

    settings = Settings(database_url="sqlite:///:memory:")
    calls = []

    def fake(self, repo_id, revision=None, timeout=None):
        calls.append((repo_id, revision))
        if repo_id == "org/missing":
            raise RepositoryNotFoundError("404", response=resp())
        if revision == "nope":
            raise RevisionNotFoundError("404", response=resp())
        if repo_id == "org/offline":
            raise ConnectionError("no route to host")
        return _Info()

    monkeypatch.setattr(HfApi, "model_info", fake)
    ok = resolve_model_ref(model="org/model", revision="main", settings=settings)
    assert (ok.model, ok.pin, ok.weight_bytes) == ("org/model", "0123abc", 2_000_000)
    with pytest.raises(RequestError, match="unknown model 'org/missing'") as e:
        resolve_model_ref(model="org/missing", revision=None, settings=settings)
    assert e.value.status == 422 and e.value.loc == ["body", "model"]
    with pytest.raises(RequestError, match="revision 'nope' does not exist") as e:
        resolve_model_ref(model="org/model", revision="nope", settings=settings)
    assert e.value.loc == ["body", "revision"]
    offline = resolve_model_ref(model="org/offline", revision=None, settings=settings)
    assert offline.pin == "unverified:main" and offline.weight_bytes is None  # the worker will say bad_model
    n = len(calls)
    resolve_model_ref(model="org/model", revision=None, settings=Settings(database_url="sqlite:///:memory:",
                                                                          hub_check=False))
    assert len(calls) == n


def test_failure_classes() -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from quant_core.calibration import DataError
    from quant_core.models import ModelError
    from quant_core.progress import Cancelled
    from worker.tasks import classify

    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name; no GPU here to raise the real one
        pass

    assert classify(Cancelled("x"))[0] == "cancelled"
    assert classify(ModelError("x"))[0] == "bad_model"
    assert classify(DataError("x"))[0] == "bad_data"
    assert classify(SoftTimeLimitExceeded())[0] == "timeout"
    assert classify(MemoryError())[0] == "out_of_memory"
    assert classify(OutOfMemoryError("CUDA out of memory"))[0] == "out_of_memory"
    assert classify(ZeroDivisionError("boom")) == ("internal", "ZeroDivisionError: boom")


def test_settings_refuse_unknown_keys_and_bad_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="database_url"):
        Settings(database_url="mysql://x")
    with pytest.raises(ValidationError):
        Settings(max_body_bytes=10)
    with pytest.raises(ValidationError):
        Settings(no_such_key=1)  # type: ignore[call-arg]

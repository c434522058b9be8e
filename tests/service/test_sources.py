"""Where a job's inputs come from (service.sources): local model folders, hub ids (the hub mocked), uploads."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.crud import RequestError
from api.crud import resolve_model_ref as api_resolve_model_ref
from service.settings import ApiSettings
from service.sources import SourceError, model_location, resolve_local, resolve_model_ref, upload_sha
from tests.conftest import MODELS


@pytest.mark.parametrize("name, words", [
    ("llama-tiny/../../..", "not allowed"), ("..", "not allowed"), ("/abs", "not allowed"),
    ("nope", "unknown local model"), ("llama-tiny/extra", "unknown local model"),
])
def test_local_model_names_stay_inside_the_models_dir(name: str, words: str) -> None:
    with pytest.raises(SourceError, match=words) as e:
        resolve_local(name, MODELS)
    assert e.value.field == "model"
    assert resolve_local("llama-tiny", MODELS) == (MODELS / "llama-tiny").resolve()
    assert model_location("local:llama-tiny", MODELS) == str((MODELS / "llama-tiny").resolve())
    assert model_location("org/name", None) == "org/name"
    with pytest.raises(SourceError, match="disabled"):
        resolve_local("llama-tiny", None)


def test_upload_sources_name_their_text_by_content() -> None:
    assert upload_sha("upload:" + "ab" * 32) == "ab" * 32
    assert upload_sha("wikitext2") is None and upload_sha("file:/x/upload:y") is None


def test_local_model_pin_changes_when_its_files_change(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(MODELS / "llama-tiny", tmp_path / "m")
    a = resolve_model_ref(model="local:m", revision=None, models_dir=tmp_path, hub_check=True)
    assert a.weight_bytes == sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))
    (tmp_path / "m" / "config.json").write_text((tmp_path / "m" / "config.json").read_text() + " ")
    assert resolve_model_ref(model="local:m", revision=None, models_dir=tmp_path, hub_check=True).pin != a.pin


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

    settings = ApiSettings(database_url="sqlite:///:memory:")
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
    ok = api_resolve_model_ref(model="org/model", revision="main", settings=settings)
    assert (ok.model, ok.pin, ok.weight_bytes) == ("org/model", "0123abc", 2_000_000)
    # the API turns a SourceError into a 422 on the field it names
    with pytest.raises(RequestError, match="unknown model 'org/missing'") as e:
        api_resolve_model_ref(model="org/missing", revision=None, settings=settings)
    assert e.value.status == 422 and e.value.loc == ["body", "model"]
    with pytest.raises(RequestError, match="revision 'nope' does not exist") as e:
        api_resolve_model_ref(model="org/model", revision="nope", settings=settings)
    assert e.value.loc == ["body", "revision"]
    offline = api_resolve_model_ref(model="org/offline", revision=None, settings=settings)
    assert offline.pin == "unverified:main" and offline.weight_bytes is None  # the worker will say bad_model
    n = len(calls)
    resolve_model_ref(model="org/model", revision=None, models_dir=None, hub_check=False)
    assert len(calls) == n

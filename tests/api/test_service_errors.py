"""Bad input over real HTTP: each gets a 4xx with a clear message, and nothing changes."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.conftest import TEST_TEXT
from tests.stack_helpers import Api


def _count(api: Api) -> int:
    return len(api.http.get("/v1/jobs", params={"limit": 1000}).json()["jobs"])


def _detail(r: Any) -> str:
    return str(r.json()["detail"])


@pytest.fixture
def body(api: Api) -> dict[str, Any]:
    return api.job_body()


@pytest.mark.parametrize("change, status, field, words", [
    ({"model": "local:no-such-model"}, 422, "model", "unknown local model"),
    ({"model": "local:../fixtures/models/llama-tiny"}, 422, "model", "not allowed"),
    ({"model": "local:/etc"}, 422, "model", "not allowed"),
    ({"model": "not a model id"}, 422, "model", "Hugging Face id"),
    ({"settings": {"w_bits": 5}}, 422, "w_bits", "accepted"),
    ({"settings": {"a_bits": 0}}, 422, "a_bits", "accepted"),
    ({"settings": {"kv_bits": 99}}, 422, "kv_bits", "accepted"),
    ({"settings": {"no_such_setting": 1}}, 422, "no_such_setting", "accepted"),
    ({"settings": {"calib_source": "file:/etc/passwd"}}, 422, "calib_source", "cannot be set"),
    ({"method": "magic"}, 422, "method", "spinquant"),
    ({"formats": ["gptq"]}, 422, "formats", "GPTQ v1 cannot hold"),
    ({"formats": ["onnx"]}, 422, "formats", "ct"),
    ({"calib": {"text_id": "deadbeef"}}, 422, "text_id", "unknown text id"),
    ({"calib": {"dataset": "wikitext2", "text_id": "x"}}, 422, "calib", "exactly one"),
    ({"extra_field": True}, 422, "extra_field", "Extra inputs"),
])
def test_bad_job_requests_are_refused_and_change_nothing(api: Api, body: dict, change: dict, status: int,
                                                         field: str, words: str) -> None:
    before = _count(api)
    r = api.submit({**body, **change})
    assert r.status_code == status, r.text
    assert field in r.text and words in r.text, r.text
    assert _count(api) == before



def test_malformed_json(api: Api) -> None:
    before = _count(api)
    r = api.http.post("/v1/jobs", content=b'{"model": "local:llama-tiny",', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "json" in r.text.lower()
    assert _count(api) == before


def test_one_gigabyte_body_is_413_before_it_is_read(api: Api) -> None:
    # Claim 1 GB and send only the start: the server answers 413 from the header alone.
    host, port = api.stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/texts HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api.token}\r\n"
                  f"Content-Type: text/plain\r\nContent-Length: {1 << 30}\r\n\r\n".encode() + b"x" * 65536)
        reply = b""
        while b"too large" not in reply and (chunk := s.recv(4096)):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "too large" in reply and "connection: close" in reply


def test_streamed_body_over_the_limit_is_413(api: Api) -> None:
    def chunks():
        for _ in range(80):  # 80 MiB streamed without Content-Length, over the 64 MiB default
            yield b"y" * (1 << 20)

    r = api.http.post("/v1/texts", content=chunks(), headers={"Content-Type": "text/plain"})
    assert r.status_code == 413 and "too large" in r.text


@pytest.mark.parametrize("header", [None, "Bearer sq_wrong", "Basic abc", "Bearer"])
def test_missing_or_wrong_token_is_401(api: Api, header: str | None) -> None:
    import httpx

    headers = {"Authorization": header} if header else {}
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/abc"), ("POST", "/v1/texts")]:
        r = httpx.request(method, api.stack.url + path, headers=headers, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert "token" in r.text and r.headers["www-authenticate"].startswith("Bearer")


def test_other_owners_job_is_404_and_admin_sees_it(api: Api, other_api: Api, admin_api: Api) -> None:
    job_id = api.submit(api.job_body(steps=1, seed=61)).json()["id"]
    for path in ["", "/events", "/artifacts", "/artifacts/SHA256SUMS"]:
        assert other_api.http.get(f"/v1/jobs/{job_id}{path}").status_code == 404, path
    assert other_api.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    assert job_id not in [j["id"] for j in other_api.http.get("/v1/jobs").json()["jobs"]]
    assert admin_api.job(job_id)["id"] == job_id
    assert job_id in [j["id"] for j in admin_api.http.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]]
    assert api.wait(job_id)["status"] == "succeeded"
    # A stranger's text id is unknown to them.
    text_id = api.upload(TEST_TEXT)
    r = other_api.submit({**other_api.job_body(), "calib": {"text_id": text_id}})
    assert r.status_code == 422 and "unknown text id" in r.text


def test_bad_texts(api: Api) -> None:
    assert api.http.post("/v1/texts", content=b"   \n").status_code == 422
    r = api.http.post("/v1/texts", content=b"\xff\xfe\x00bad")
    assert r.status_code == 422 and "UTF-8" in r.text


def test_unknown_job_and_bad_status_filter(api: Api) -> None:
    assert api.http.get("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    r = api.http.get("/v1/jobs", params={"status": "exploded"})
    assert r.status_code == 422 and "queued" in r.text


def test_openapi_documents_the_routes(api: Api) -> None:
    spec = api.http.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ["/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/cancel",
              "/v1/jobs/{job_id}/artifacts", "/v1/jobs/{job_id}/artifacts/{name}", "/v1/texts", "/healthz",
              "/readyz", "/metrics"]:
        assert p in paths, p
    assert spec["components"]["schemas"]["JobCreate"]["examples"][0]["method"] == "spinquant"
    assert all(op.get("description") or op.get("summary") for path in paths.values() for op in path.values())


@pytest.mark.parametrize("change, loc", [
    ({"settings": {"steps": -1}}, ["body", "settings", "steps"]),  # flat name of train.steps
    ({"settings": {"weights.gptq.damp": 0}}, ["body", "settings", "weights.gptq.damp"]),  # dotted
    ({"settings": {"seq_len": 4}}, ["body", "settings", "seq_len"]),  # one flat name, two fields (calib, eval)
    ({"settings": {"eval_windows": -1}}, ["body", "settings", "eval_windows"]),  # a DataConfig field under eval.
    ({"settings": {"w_bits": 16, "a_bits": 16, "kv_bits": 16}}, ["body", "settings"]),  # no one field at fault
    ({"method": "magic"}, ["body", "method"]),
])
def test_a_config_error_is_located_at_the_field_it_names(api: Api, body: dict, change: dict, loc: list) -> None:
    """ConfigError carries its field; the API maps it to the request key that set it (no message parsing)."""
    r = api.submit({**body, **change})
    assert r.status_code == 422, r.text
    assert [d["loc"] for d in r.json()["detail"]] == [loc], r.text

"""Hostile input over real HTTP (issue 14): path tricks in artifact names, URL tricks in model ids, absurd numbers,
NaN and deeply nested JSON in settings, hostile headers. Each is a 4xx, never a 5xx, and nothing is written (no
job row, no file in the artifact store)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from tests.stack_helpers import Api


def _written(api: Api) -> tuple[int, list[str]]:
    jobs = len(api.http.get("/v1/jobs", params={"limit": 1000}).json()["jobs"])
    root = Path(api.stack.root) / "artifacts"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
    return jobs, files


@pytest.fixture(scope="module")
def finished(stack) -> tuple[Api, dict[str, Any]]:
    api = Api(stack, stack.token("adversary"))
    job = api.wait(api.submit(api.job_body(method="rtn", steps=0)).json()["id"], timeout=180)
    assert job["status"] == "succeeded", job
    return api, job


@pytest.mark.parametrize("name", [
    "../../../etc/passwd", "%2e%2e/%2e%2e/%2e%2e/etc/passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/etc/passwd",
    "model/../../../../etc/passwd", "model/%2e%2e/%2e%2e/SHA256SUMS", "model%00.safetensors", "a" * 5000,
    "..\\..\\windows", "%252e%252e/x",
])
def test_artifact_names_that_escape_are_not_served(finished: tuple[Api, dict], name: str) -> None:
    """Sent byte for byte as written (a raw request line: an HTTP client would remove the dot segments first)."""
    api, job = finished
    status, body = _raw_get(api, f"/v1/jobs/{job['id']}/artifacts/{name}")
    assert 400 <= status < 500 and status != 401, (name, status, body[:200])
    assert b"root:" not in body


def _raw_get(api: Api, target: str) -> tuple[int, bytes]:
    host, port = api.stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api.token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("model", [
    "https://evil.example/org/model", "org/../../etc", "org/model?revision=x", "org/model#x", "org%2fmodel",
    "..//model", "local:%2e%2e/models", "local:..%2f..%2fetc", "local:\x00", "org/" + "m" * 300,
    "file:///etc/passwd", "org/model\n", " org/model", "local:llama-tiny\n", "org/mod\u00e9l",
])
def test_model_ids_with_url_tricks_are_422(api: Api, model: str) -> None:
    body = api.job_body()
    before = _written(api)
    r = api.submit({**body, "model": model})
    assert r.status_code == 422 and "model" in r.text, (model, r.status_code, r.text[:300])
    assert _written(api) == before


@pytest.mark.parametrize("settings", [
    {"steps": 10**30}, {"steps": -1}, {"lr": 1e308}, {"seq_len": 2**63}, {"calib_samples": 10**12},
    {"w_bits": 4.5}, {"w_bits": True}, {"seed": 2**80}, {"eval_windows": "all"}, {"w_group_size": -7},
    {"weights.gptq.damp": -1.0}, {"steps": [1, 2]}, {"steps": {"$gt": 1}},
])
def test_absurd_settings_are_422(api: Api, settings: dict) -> None:
    body = api.job_body()
    before = _written(api)
    r = api.submit({**body, "settings": settings})
    assert r.status_code == 422, (settings, r.status_code, r.text[:300])
    assert _written(api) == before


@pytest.mark.parametrize("raw", [
    b'{"model": "local:llama-tiny", "settings": {"lr": NaN}}',
    b'{"model": "local:llama-tiny", "settings": {"lr": Infinity}}',
    b'{"model": "local:llama-tiny", "settings": {"lr": -Infinity}}',
    b'{"model": "local:llama-tiny", "settings": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    b'{"model": "local:llama-tiny", "settings": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
    b'{"model": "local:llama-tiny", "settings": {"steps": 1' + b"0" * 5000 + b"}}",
    b"\xff\xfe{}",
    b"[]",
    b"null",
])
def test_hostile_json_is_4xx(api: Api, raw: bytes) -> None:
    before = _written(api)
    r = api.http.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (raw[:80], r.status_code, r.text[:300])
    assert _written(api) == before


@pytest.mark.parametrize("key", ["x" * 201, "k\x7f", "a b", "k\x80"])
def test_hostile_idempotency_keys_are_4xx(api: Api, key: str) -> None:
    body = api.job_body()
    before = _written(api)
    r = api.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key.encode("latin-1")})
    assert 400 <= r.status_code < 500, (key[:20], r.status_code, r.text[:300])
    assert _written(api) == before


@pytest.mark.parametrize("name", ["../../../../tmp/evil.txt", "/etc/passwd", "a\x00b.txt", "x" * 5000])
def test_text_names_never_choose_where_the_text_is_stored(api: Api, name: str) -> None:
    """An upload's name is a label: the text is stored under its sha256, whatever the name says."""
    r = api.http.post("/v1/texts", params={"name": name}, content=b"some calibration text. " * 20)
    assert r.status_code in (201, 422), (r.status_code, r.text[:300])
    root = Path(api.stack.root) / "artifacts"
    assert not Path("/tmp/evil.txt").exists()
    assert all(p.parent.name == "texts" and len(p.stem) == 64 for p in (root / "texts").glob("*"))

"""Helpers for the tests that drive the real service: an HTTP client per token, the fast job settings,
and a real S3-compatible server (moto's standalone server as a subprocess).

The fixtures that start them (``stack``, ``api``, ``s3_server`` ...) are in tests/conftest.py.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from scripts.stack import Stack
from tests.conftest import TEST_TEXT, TRAIN_TEXT

# Small, fast settings on the trained fixture (a job runs in a few seconds on 2 cores).
FAST = {"w_bits": 4, "a_bits": 4, "kv_bits": 4, "seq_len": 128, "steps": 4, "train_samples": 16,
        "calib_samples": 8, "batch_size": 2, "eval_windows": 8, "prefit_steps": 10}


class Api:
    """An httpx client for one token, with the helpers the tests share."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.stack, self.token = stack, token
        self.http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def upload(self, path: Path, limit: int | None = None) -> str:
        data = path.read_bytes()[:limit] if limit else path.read_bytes()
        r = self.http.post("/v1/texts", params={"name": path.name}, content=data)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job_body(self, *, model: str = "local:llama-tiny", method: str = "spinquant", **settings: Any) -> dict[str, Any]:
        calib = self.upload(TRAIN_TEXT, limit=300_000)
        evals = self.upload(TEST_TEXT)
        return {"model": model, "method": method, "settings": {**FAST, **settings},
                "calib": {"text_id": calib}, "eval": {"text_id": evals}}

    def submit(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return self.http.post("/v1/jobs", json=body, headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_learning(self, job_id: str, min_step: int = 1, timeout: float = 120) -> dict[str, Any]:
        """The job once it is learning and has done ``min_step`` steps: a fault injected then hits a running job."""
        deadline = time.monotonic() + timeout
        while (j := self.job(job_id))["stage"] != "learn" or (j["step"] or 0) < min_step:
            assert time.monotonic() < deadline, f"never reached learning step {min_step}: {j}"
            time.sleep(0.1)
        return j

    def wait(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.job(job_id)
            if j["status"] in ("succeeded", "failed", "cancelled"):
                return j
            time.sleep(0.25)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s: {self.job(job_id)}")

    def events(self, job_id: str, last_id: str | None = None, timeout: float = 240) -> list[tuple[str, str, dict]]:
        """Every (id, event, data) of the job's SSE stream until its 'end' event."""
        import json

        headers = {"Last-Event-ID": last_id} if last_id else {}
        out: list[tuple[str, str, dict]] = []
        cur: dict[str, str] = {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line:
                    if "event" in cur:
                        out.append((cur.get("id", ""), cur["event"], json.loads(cur.get("data", "{}"))))
                        if cur["event"] == "end":
                            break
                    cur = {}
                    continue
                if line.startswith(":"):
                    continue
                key, _, value = line.partition(": ")
                cur[key] = value
        return out


@dataclass(frozen=True)
class S3Server:
    """Where the S3-compatible test server listens, its bucket and the (any) credentials it takes."""

    endpoint_url: str
    bucket: str
    access_key_id: str = "test-key"
    secret_access_key: str = "test-secret"
    region: str = "us-east-1"

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                              aws_access_key_id=self.access_key_id,
                                              aws_secret_access_key=self.secret_access_key)

    def store(self, prefix: str | None = None, work_root: Path | None = None) -> Any:
        """An S3Store on the bucket under its own fresh prefix (tests never see each other's objects)."""
        from service.storage.s3 import S3Store

        return S3Store(bucket=self.bucket, prefix=f"t-{uuid.uuid4().hex[:12]}/" if prefix is None else prefix,
                       endpoint_url=self.endpoint_url, region=self.region, access_key_id=self.access_key_id,
                       secret_access_key=self.secret_access_key, work_root=work_root)

    def env(self, prefix: str) -> dict[str, str]:
        """SPINQUANT_* variables that point the API and the worker at this server."""
        return {"SPINQUANT_STORE": "s3", "SPINQUANT_S3_BUCKET": self.bucket,
                "SPINQUANT_S3_ENDPOINT_URL": self.endpoint_url, "SPINQUANT_S3_REGION": self.region,
                "SPINQUANT_S3_ACCESS_KEY_ID": self.access_key_id,
                "SPINQUANT_S3_SECRET_ACCESS_KEY": self.secret_access_key, "SPINQUANT_S3_PREFIX": prefix}


def start_moto(root: Path, bucket: str) -> tuple[Any, S3Server]:
    """moto's standalone S3 server as a real subprocess (its own session) on a free port, up, with ``bucket``."""
    import subprocess
    import sys

    from scripts.stack import free_port, wait_until

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "moto.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}", bucket=bucket)
    wait_until(lambda: httpx.get(server.endpoint_url + "/", timeout=2).status_code == 200, "moto S3 server", 60,
               proc, log)
    server.client().create_bucket(Bucket=server.bucket)
    return proc, server

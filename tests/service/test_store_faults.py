"""Faults in the artifact store (issue 14): an S3 server that stops answering, mid-job and under the API.

Each test runs its own moto S3 server as a real subprocess and kills it (SIGKILL): a store that does not answer
is a StoreError ``unavailable`` in every method, 503 with Retry-After at the API (never 500, never the 404 of a
missing file), and a job whose export meets it fails with the code ``store_unavailable`` and publishes nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from scripts.stack import Stack
from service.storage import STORE_ERROR_CODES, StoreError
from tests.stack_helpers import Api, S3Server, start_moto

pytestmark = pytest.mark.faults


def _moto(root: Path) -> tuple[subprocess.Popen, S3Server]:
    return start_moto(root, "faults")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_every_store_method_says_unavailable_when_s3_is_gone(tmp_path: Path) -> None:
    proc, server = _moto(tmp_path / "s3")
    store = server.store(work_root=tmp_path / "work")
    store.put_bytes("texts/a.txt", b"abc")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "f.bin").write_bytes(b"x" * 100)
    _kill(proc)
    calls: dict[str, Any] = {
        "put_bytes": lambda: store.put_bytes("texts/b.txt", b"b"), "exists": lambda: store.exists("texts/a.txt"),
        "size": lambda: store.size("texts/a.txt"), "open": lambda: store.open("texts/a.txt"),
        "iter_bytes": lambda: b"".join(store.iter_bytes("texts/a.txt")), "list": lambda: list(store.list("jobs/j")),
        "publish": lambda: store.publish("jobs/j", folder), "delete_prefix": lambda: store.delete_prefix("jobs/j"),
    }
    for name, call in calls.items():
        with pytest.raises(StoreError) as err:
            call()
        assert err.value.code == "unavailable", (name, err.value)
    assert (folder / "f.bin").exists()  # a failed publish leaves the job's folder as it was


def test_codes_of_the_store_errors_that_are_not_faults(tmp_path: Path) -> None:
    """Every code has one HTTP status in the API; the local store raises the codes its failures are."""
    from api.main import STORE_ERROR_STATUS
    from service.storage import LocalStore

    assert set(STORE_ERROR_STATUS) == set(STORE_ERROR_CODES) and STORE_ERROR_STATUS["unavailable"] == 503
    store = LocalStore(tmp_path / "a")
    for call, code in ((lambda: store.size("texts/none"), "not_found"), (lambda: store.exists("../x"), "bad_key"),
                       (lambda: store.iter_bytes("texts/t", 2, 99), "bad_range")):
        if code == "bad_range":
            store.put_bytes("texts/t", b"abc")
        with pytest.raises(StoreError) as err:
            call()
        assert err.value.code == code


def test_s3_down_mid_job_and_under_the_api(tmp_path: Path) -> None:
    """A job running when S3 goes away fails as store_unavailable with nothing published; the API answers 503
    (Retry-After) for files and uploads meanwhile, and everything that lives in the database still reads."""
    proc, server = _moto(tmp_path / "s3")
    prefix = f"faults-{uuid.uuid4().hex[:8]}/"
    work = tmp_path / "scratch"
    try:
        with Stack(tmp_path / "stack", extra_env={**server.env(prefix), "SPINQUANT_WORK_ROOT": str(work)}) as stack:
            api = Api(stack, stack.token("faults"))
            done = api.wait(api.submit(api.job_body(steps=2, seed=1)).json()["id"], timeout=120)
            assert done["status"] == "succeeded", done
            r = api.submit(api.job_body(steps=400, seed=2))  # long enough to be running when S3 goes
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            deadline = time.monotonic() + 120
            while api.job(job_id)["status"] != "running" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert api.job(job_id)["status"] == "running"
            _kill(proc)
            failed = api.wait(job_id, timeout=180)
            assert failed["status"] == "failed", failed
            assert failed["error"]["code"] == "store_unavailable", failed["error"]
            assert failed["artifacts"] == []
            assert not (work / job_id).exists()  # its scratch is gone too

            art = done["artifacts"][0]
            got = api.http.get(art["url"])
            assert got.status_code == 503 and got.json()["code"] == "unavailable", got.text
            assert int(got.headers["retry-after"]) > 0
            up = api.http.post("/v1/texts", params={"name": "t.txt"}, content=b"some text " * 100)
            assert up.status_code == 503, up.text
            assert api.job(done["id"])["status"] == "succeeded"  # the database still answers
            assert api.http.get("/v1/jobs").status_code == 200
    finally:
        if proc.poll() is None:
            _kill(proc)

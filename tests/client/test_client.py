"""The CI client (client/spinquant_client: client.py, cli.py): the CLI as a real subprocess against the real stack,
one test per exit code, plus the library's retry, resume and checksum logic on a mock transport."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from spinquant_client.cli import LineProgress, progress_line
from spinquant_client.client import (
    ChecksumMismatch,
    Client,
    ClientError,
    Event,
    RequestRefused,
    Unreachable,
    verify_checksums,
)

from scripts.stack import Stack, free_port
from tests.conftest import ROOT, TEST_TEXT, TRAIN_TEXT

# tests/stack_helpers.py FAST, as flags; the seed varies per test so no job is a cache hit of another.
FAST = ["--w-bits", "4", "--a-bits", "4", "--kv-bits", "4", "--seq-len", "128", "--set", "train_samples=16",
        "--set", "calib_samples=8", "--set", "batch_size=2", "--set", "eval_windows=8",
        "--set", "prefit_steps=10"]
TEXTS = ["--calib-text", str(TRAIN_TEXT), "--eval-text", str(TEST_TEXT)]
LINE = re.compile(r"^\[(\w+)\] \d+%( step \d+(/\d+)?)?( loss [\d.e+-]+)?( eta \S+)?$")


class Cli:
    """``python -m api.client`` as a subprocess with SPINQUANT_URL/SPINQUANT_TOKEN set."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.stack, self.token = stack, token
        self.client = Client(stack.url, token)

    def env(self, **extra: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINQUANT_")}
        env.update(SPINQUANT_URL=self.stack.url, SPINQUANT_TOKEN=self.token, PYTHONPATH=str(ROOT))
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "spinquant_client", *args]

    def __call__(self, *args: str, timeout: float = 180, **env: str | None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), cwd=ROOT, env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, *args: str, **env: str | None) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), cwd=ROOT, env=self.env(**env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def wait_running(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.client.status(job_id)
            if j["status"] != "queued":
                return j
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never started: {self.client.status(job_id)}")

    def wait_done(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.client.status(job_id)
            if j["status"] in ("succeeded", "failed", "cancelled"):
                return j
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not end: {self.client.status(job_id)}")


@pytest.fixture
def cli(stack: Stack) -> Cli:
    return Cli(stack, stack.token("client"))


def _progress_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("[") and not ln.startswith(("[status]", "[log]"))]


def test_submit_wait_download_verifies_every_checksum(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli("submit", "local:llama-tiny", *FAST, "--steps", "2", "--seed", "101", *TEXTS, "--download", str(out),
            "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded" and job["settings"]["_data"]["train"]["steps"] == 2
    # Plain progress lines (stderr is not a TTY): the documented shape, at most one per stage per 10%.
    lines = _progress_lines(r.stderr)
    assert lines and all(LINE.match(ln) for ln in lines), lines
    stages = [LINE.match(ln).group(1) for ln in lines]
    assert {"load", "learn", "quantize", "export"} <= set(stages)
    assert all(stages.count(s) <= 11 for s in set(stages)) and len(lines) <= 80
    assert any(ln.startswith("[learn]") and " step 2/2 loss " in ln for ln in lines), lines
    assert "[status] running" in r.stderr and "every sha256 matches" in r.stderr
    # Every artifact is on disk with the API's sha256, and the folder's SHA256SUMS agrees.
    for art in job["artifacts"]:
        assert hashlib.sha256((out / art["name"]).read_bytes()).hexdigest() == art["sha256"]
    assert not list(out.rglob("*.part"))
    assert verify_checksums(out, job["artifacts"]) == []

    # A tampered SHA256SUMS (one digest changed) is caught by the library check.
    sums = (out / "SHA256SUMS").read_text()
    digest = next(a["sha256"] for a in job["artifacts"] if a["name"] == "model/config.json")
    (out / "SHA256SUMS").write_text(sums.replace(digest, "0" * 64))
    problems = verify_checksums(out, job["artifacts"])
    assert any("SHA256SUMS: sha256" in p for p in problems)  # the file itself no longer matches the API
    assert any(p.startswith("model/config.json: SHA256SUMS says 000") for p in problems), problems

    # `download` of the same job again into a fresh folder: exit 0. Then a file corrupted in the server's
    # store: the client refuses it (exit 6) and leaves no file with the bad content in place.
    assert cli("download", job["id"], str(tmp_path / "again")).returncode == 0
    stored = cli.stack.root / "artifacts" / "jobs" / job["id"] / "model" / "config.json"
    good = stored.read_bytes()
    try:
        stored.write_bytes(good.replace(b"{", b"{ ", 1))
        bad = cli("download", job["id"], str(tmp_path / "bad"), "--retries", "0")
    finally:
        stored.write_bytes(good)
    assert bad.returncode == 6, bad.stderr
    assert "error: checksum mismatch" in bad.stderr and "model/config.json: sha256" in bad.stderr
    assert not (tmp_path / "bad" / "model" / "config.json").exists() and (tmp_path / "bad" / "SHA256SUMS").is_file()


def test_bad_setting_is_exit_2_with_the_servers_message(cli: Cli) -> None:
    before = len(cli.client.list(limit=1000))
    r = cli("submit", "local:llama-tiny", "--w-bits", "5", "--calib-dataset", "wikitext2")
    assert r.returncode == 2, r.stderr
    assert "error: POST /v1/jobs refused (HTTP 422): body.settings.w_bits: " in r.stderr and "accepted" in r.stderr
    r = cli("submit", "local:llama-tiny", "--set", "no_such_setting=1", "--set", "w_bits=5")
    assert r.returncode == 2 and "no_such_setting" in r.stderr, r.stderr
    r = cli("submit", "local:llama-tiny", "--set", "oops")
    assert r.returncode == 2 and "expected KEY=VALUE" in r.stderr
    r = cli("status", "no-such-job")
    assert r.returncode == 2 and "job no-such-job not found" in r.stderr
    assert len(cli.client.list(limit=1000)) == before


def test_missing_or_wrong_token_is_exit_2(cli: Cli) -> None:
    r = cli("list", SPINQUANT_TOKEN=None)
    assert r.returncode == 2 and "error: no token" in r.stderr and "SPINQUANT_TOKEN" in r.stderr
    r = cli("list", SPINQUANT_TOKEN="sq_wrong")
    assert r.returncode == 2 and "HTTP 401" in r.stderr and "invalid or revoked token" in r.stderr
    assert cli("list", "--token", cli.token, SPINQUANT_TOKEN="sq_wrong").returncode == 0  # the flag wins


def test_job_failing_in_the_worker_is_exit_3(cli: Cli) -> None:
    # 96 passes the API's config check and fails in the worker: it does not divide llama-tiny's widths.
    r = cli("submit", "local:llama-tiny", *FAST, "--steps", "1", "--seed", "301", "--w-group-size", "96", *TEXTS,
            "--wait")
    assert r.returncode == 3, r.stderr
    job_id = r.stdout.strip()
    assert re.search(rf"job {job_id} queued", r.stderr)  # the API accepted it
    assert f"error: job {job_id} failed: bad_config: weights.group_size=96 does not divide" in r.stderr
    assert cli.client.status(job_id)["error"]["code"] == "bad_config"


def test_cancel_while_waiting_is_exit_4_and_timeout_is_exit_5(cli: Cli) -> None:
    long = ["local:llama-tiny", *FAST, "--steps", "400", *TEXTS]
    waiting = cli.popen("submit", *long, "--seed", "401", "--wait")
    try:
        job_id = waiting.stdout.readline().strip()  # the id comes first, before the wait
        assert re.fullmatch(r"[0-9a-f]{32}", job_id), job_id
        cli.wait_running(job_id)
        # A second long job queues behind it on the single worker; --timeout 1 gives up on it: exit 5.
        t0 = time.monotonic()
        r = cli("submit", *long, "--seed", "402", "--wait", "--timeout", "1", "--json")
        assert r.returncode == 5, r.stderr
        queued = json.loads(r.stdout)
        assert time.monotonic() - t0 < 20 and queued["status"] == "queued"
        assert f"timed out waiting for job {queued['id']} after 1s" in r.stderr and "keeps running" in r.stderr
        c = cli("cancel", queued["id"], "--json")
        assert c.returncode == 0 and json.loads(c.stdout)["status"] == "cancelled"
        # Cancel the running one through the API: the waiting client exits 4.
        assert cli.client.cancel(job_id)["cancel_requested"] is True
        _, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate()
    assert waiting.returncode == 4, err
    assert f"error: job {job_id} was cancelled" in err and "[log] cancel requested" in err
    assert cli.client.status(job_id)["status"] == "cancelled"


def test_unreachable_server_is_exit_7(cli: Cli) -> None:
    t0 = time.monotonic()
    r = cli("status", "abc", "--retries", "1", SPINQUANT_URL=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 7, r.stderr
    assert "error: GET /v1/jobs/abc failed after 2 tries" in r.stderr and "ConnectError" in r.stderr
    assert time.monotonic() - t0 < 15


def test_same_idempotency_key_returns_the_first_job(cli: Cli) -> None:
    args = ["submit", "local:llama-tiny", "--method", "rtn", "--seed", "501", "--calib-dataset", "wikitext2",
            "--eval-dataset", "wikitext2", "--json"]
    first = cli(*args, "--idempotency-key", "ci-sha-123-w4a4")
    assert first.returncode == 0, first.stderr
    job_id = json.loads(first.stdout)["id"]
    try:
        again = cli(*args, SPINQUANT_IDEMPOTENCY_KEY="ci-sha-123-w4a4")  # the key from the environment
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["id"] == job_id and "Idempotency-Key matched" in again.stderr
        listed = cli("list", "--json", "--limit", "1000")
        assert [j["id"] for j in json.loads(listed.stdout)].count(job_id) == 1
        changed = cli(*args[:-1], "--seed", "502", "--idempotency-key", "ci-sha-123-w4a4")
        assert changed.returncode == 2 and "different request" in changed.stderr
        human = cli("status", job_id)
        assert human.returncode == 0 and re.search(rf"^id\s+{job_id}$", human.stdout, re.M)
    finally:
        cli.client.cancel(job_id)
    assert cli.wait_done(job_id)["status"] in ("cancelled", "failed")  # offline: wikitext2 cannot load


def test_same_idempotency_key_with_uploaded_texts(cli: Cli) -> None:
    args = ["submit", "local:llama-tiny", "--method", "rtn", "--seed", "601", *TEXTS, "--json",
            "--idempotency-key", "ci-sha-456-rtn"]
    first = cli(*args)
    job_id = json.loads(first.stdout)["id"]
    try:
        again = cli(*args)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["id"] == job_id  # the texts were uploaded again: same ids, same job
    finally:
        cli.client.cancel(job_id)


# -- the library alone, on a mock transport ------------------------------------------------------------------

def _mock(handler: Any, **kw: Any) -> Client:
    return Client("http://mock", "sq_test", transport=httpx.MockTransport(handler), sleep=lambda s: None, **kw)


def test_retries_5xx_and_connection_errors_never_4xx_and_one_key_per_submit() -> None:
    calls: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=req)
        if len(calls) == 2:
            return httpx.Response(503, json={"detail": "not ready"})
        return httpx.Response(202, json={"id": "j1", "status": "queued"})

    assert _mock(handler).submit("local:x")["id"] == "j1"
    keys = {c.headers["idempotency-key"] for c in calls}
    assert len(calls) == 3 and len(keys) == 1 and keys.pop().startswith("spinquant-cli-")

    calls.clear()
    with pytest.raises(RequestRefused) as exc:
        _mock(lambda req: calls.append(req) or httpx.Response(
            422, json={"detail": [{"loc": ["body", "settings", "w_bits"], "msg": "bad", "type": "x"}]})).status("j")
    assert len(calls) == 1 and exc.value.lines == ["body.settings.w_bits: bad"] and exc.value.exit_code == 2
    with pytest.raises(Unreachable) as down:
        _mock(lambda req: httpx.Response(502, text="bad gateway"), retries=2).status("j")
    assert "3 tries" in str(down.value) and down.value.exit_code == 7
    with pytest.raises(ClientError, match="no token"):
        Client("http://mock", "")


def test_events_resume_with_last_event_id_after_a_drop() -> None:
    seen: list[str | None] = []

    def frame(i: str, kind: str, data: dict) -> str:
        return f"id: {i}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/events"):
            seen.append(req.headers.get("last-event-id"))
            if len(seen) == 1:  # two events, then the connection ends without 'end'
                body = "retry: 10\n\n" + frame("1-0", "status", {"status": "running"}) + \
                    frame("2-0", "progress", {"stage": "learn", "progress": 0.5})
            else:
                body = ": keep-alive\n\n" + frame("3-0", "status", {"status": "succeeded"}) + \
                    frame("3-1", "end", {"status": "succeeded"})
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"id": "j", "status": "succeeded"})

    got: list[Event] = []
    job = _mock(handler).wait("j", on_event=got.append)
    assert seen == [None, "2-0"] and [e.id for e in got] == ["1-0", "2-0", "3-0", "3-1"]
    assert job["status"] == "succeeded" and got[1].data["progress"] == 0.5


def test_checksum_mismatch_from_the_api_is_exit_6_in_the_library(tmp_path: Path) -> None:
    body = b"hello\n"
    arts = [{"name": "SHA256SUMS", "bytes": 0, "sha256": ""}, {"name": "a.txt", "bytes": 6, "sha256": "f" * 64}]
    sums = f"{hashlib.sha256(body).hexdigest()}  a.txt\n".encode()
    arts[0].update(bytes=len(sums), sha256=hashlib.sha256(sums).hexdigest())

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sums if req.url.path.endswith("SHA256SUMS") else body)

    with pytest.raises(ChecksumMismatch) as exc:
        _mock(handler).download("j", tmp_path, job={"id": "j", "artifacts": arts})
    assert exc.value.exit_code == 6 and any(p.startswith("a.txt: sha256 ") for p in exc.value.problems)
    assert any("a.txt: SHA256SUMS says" in p for p in exc.value.problems)
    assert not (tmp_path / "a.txt").exists() and (tmp_path / "SHA256SUMS").read_bytes() == sums
    with pytest.raises(ChecksumMismatch, match="not a safe relative path"):
        _mock(handler).download("j", "/tmp", job={"id": "j", "artifacts": [dict(arts[1], name="../evil")]})


def test_plain_progress_lines_are_short_and_throttled(capsys: pytest.CaptureFixture) -> None:
    assert progress_line({"stage": "learn", "progress": 0.45, "step": 12, "loss": 3.1234, "eta_s": 40.2}) == \
        "[learn] 45% step 12 loss 3.12 eta 40s"
    show = LineProgress()
    for i in range(201):
        show(Event(str(i), "progress", {"stage": "learn", "stage_fraction": i / 200, "progress": 0.2 + i / 400,
                                        "step": i, "steps": 200, "loss": 3.0, "eta_s": 200 - i}))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11 and lines[0].startswith("[learn] 20% step 0/200") and lines[-1].endswith("eta 0s")


def test_the_clients_checksums_agree_with_the_checkpoint_writer(tmp_path: Path) -> None:
    """The client reads SHA256SUMS with its own few lines (it installs alone); quant_core.checksums writes it."""
    from spinquant_client.client import sha256_of

    from quant_core.checksums import SUMS, folder_digests, sha256_file, write_sums

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"a": 1}')
    (tmp_path / "model" / "model.safetensors").write_bytes(os.urandom(3 << 20))  # several read chunks
    write_sums(tmp_path)
    digests = folder_digests(tmp_path)
    arts = [{"name": n, "sha256": d, "bytes": (tmp_path / n).stat().st_size} for n, d in digests.items()]
    arts.append({"name": SUMS, "sha256": sha256_file(tmp_path / SUMS), "bytes": (tmp_path / SUMS).stat().st_size})
    assert verify_checksums(tmp_path, arts) == []
    assert all(sha256_of(tmp_path / n) == d for n, d in digests.items())
    (tmp_path / "model" / "config.json").write_text('{"a": 2}')  # one changed byte is caught
    assert any(p.startswith("model/config.json: sha256") for p in verify_checksums(tmp_path, arts))

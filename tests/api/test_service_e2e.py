"""End to end over real HTTP, a real redis-server and a real Celery worker process (no mocks)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from quant_core.calibration import encode, eval_windows, load_text, load_tokenizer
from quant_core.evaluate import perplexity
from quant_core.runtime import load
from tests.conftest import TEST_TEXT, TRAIN_TEXT
from tests.stack_helpers import Api

STAGES = ["load", "evaluate_fp", "prepare", "learn", "quantize", "evaluate", "export"]


def test_submit_watch_download_and_reload(api: Api, tmp_path: Path) -> None:
    r = api.submit(api.job_body())
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.json()["status"] == "queued" and r.json()["links"]["events"] == f"/v1/jobs/{job_id}/events"

    events = api.events(job_id)
    kinds = [e for _, e, _ in events]
    assert kinds[0] == "status" and events[0][2]["status"] == "queued"
    assert kinds[-1] == "end" and events[-1][2]["status"] == "succeeded"
    stages = [d["stage"] for _, e, d in events if e == "stage"]
    assert stages == STAGES  # every stage, in order, once
    progress = [d["progress"] for _, e, d in events if e == "progress"]
    assert progress == sorted(progress) and progress[0] < 0.1 and progress[-1] == 1.0
    steps = [d["step"] for _, e, d in events if e == "progress" and d["stage"] == "learn" and d.get("step")]
    assert steps == [1, 2, 3, 4]
    ids = [i for i, _, _ in events]
    assert len(set(ids)) == len(ids)

    job = api.job(job_id)
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    assert set(job["timings"]) == set(STAGES) and all(t["seconds"] >= 0 for t in job["timings"].values())
    rep = job["report"]
    assert rep["quant_ppl"] > rep["fp_ppl"] > 1 and len(rep["loss_curve"]) == 4
    assert rep["settings"] == job["settings"] and job["settings"]["_data"]["calib"]["source"].startswith("upload:")

    # Download every artifact; each sha256 matches the API's and the folder's SHA256SUMS.
    names = {a["name"]: a for a in job["artifacts"]}
    assert {"SHA256SUMS", "model/model.safetensors", "model/config.json", "model/eval_report.json"} <= set(names)
    for name, art in names.items():
        resp = api.http.get(art["url"])
        assert resp.status_code == 200
        assert resp.headers["etag"] == f'"{art["sha256"]}"'
        dest = tmp_path / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(resp.content)
        assert hashlib.sha256(resp.content).hexdigest() == art["sha256"] and len(resp.content) == art["bytes"]
    assert rep["serve_commands"]["model"] == (tmp_path / "model" / "serve.sh").read_text().strip()
    for line in (tmp_path / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert names[name.lstrip("*")]["sha256"] == digest

    # The runtime reproduces the report's perplexity from the downloaded checkpoint.
    model, cfg, report = load(tmp_path, int4_kernels=False)
    assert report["quant_ppl"] == rep["quant_ppl"]
    tok = load_tokenizer(tmp_path / "model")
    windows = eval_windows(encode(tok, load_text(f"file:{TEST_TEXT}", "test")), cfg.eval.seq_len, cfg.eval.max_windows)
    ppl = perplexity(model, windows)
    assert ppl == pytest.approx(rep["quant_ppl"], rel=1e-6)
    print(f"e2e: {len(stages)} stages in order, {len(progress)} progress events, {len(names)} files sha256-checked, "
          f"runtime ppl {ppl:.6f} vs report {rep['quant_ppl']:.6f} (rel diff {abs(ppl / rep['quant_ppl'] - 1):.1e})")


def test_cancel_running_job_stops_within_one_step(api: Api) -> None:
    r = api.submit(api.job_body(steps=400, seed=11))
    job_id = r.json()["id"]
    api.wait_learning(job_id, min_step=2)
    c = api.http.post(f"/v1/jobs/{job_id}/cancel")
    assert c.status_code == 202 and c.json()["cancel_requested"] is True
    t0 = time.monotonic()
    job = api.wait(job_id, timeout=60)
    stop_s = time.monotonic() - t0
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled", job
    assert job["artifacts"] == [] and job["step"] < 400
    events = api.events(job_id)
    at = next(i for i, (_, e, d) in enumerate(events) if e == "log" and d["message"] == "cancel requested")
    steps_after = [d["step"] for _, e, d in events[at:] if e == "progress" and d.get("stage") == "learn"]
    assert len(steps_after) <= 1, steps_after  # only the step already in flight completes
    assert events[-1][2]["status"] == "cancelled"
    # Nothing of the job is left in the store (published or scratch).
    root = api.stack.root / "artifacts"
    assert not (root / "jobs" / job_id).exists() and not (root / ".work" / job_id).exists()
    print(f"cancel: stopped {stop_s:.2f}s after the request, {len(steps_after)} step(s) after it")


def test_cancel_queued_job_never_runs(api: Api) -> None:
    blocker = api.submit(api.job_body(steps=60, seed=12)).json()["id"]
    queued = api.submit(api.job_body(steps=3, seed=13)).json()["id"]
    c = api.http.post(f"/v1/jobs/{queued}/cancel")
    assert c.status_code == 202
    assert c.json()["status"] == "cancelled"
    api.http.post(f"/v1/jobs/{blocker}/cancel")
    assert api.wait(blocker)["status"] == "cancelled"
    time.sleep(1.0)  # the worker now sees the revoked/cancelled message
    j = api.job(queued)
    assert j["status"] == "cancelled" and j["started_at"] is None and j["attempts"] == 0


def test_idempotency_key_gives_one_job(api: Api) -> None:
    body = api.job_body(seed=21, steps=2)
    a = api.submit(body, **{"Idempotency-Key": "ci-commit-abc123"})
    b = api.submit(body, **{"Idempotency-Key": "ci-commit-abc123"})
    assert a.status_code == 202 and b.status_code == 200
    assert a.json()["id"] == b.json()["id"] and b.json()["idempotent_replay"] is True
    listed = [j["id"] for j in api.http.get("/v1/jobs").json()["jobs"]]
    assert listed.count(a.json()["id"]) == 1 and len(listed) == 1
    changed = dict(body, settings={**body["settings"], "seed": 22})
    c = api.submit(changed, **{"Idempotency-Key": "ci-commit-abc123"})
    assert c.status_code == 422 and "different request" in c.text
    assert api.wait(a.json()["id"])["status"] == "succeeded"


def test_identical_finished_job_is_a_cache_hit(api: Api, other_api: Api) -> None:
    body = api.job_body(seed=31, steps=2)
    first = api.submit(body).json()["id"]
    done = api.wait(first)
    assert done["status"] == "succeeded"
    again = api.submit(body)
    assert again.status_code == 202 and again.json()["cache_hit"] is True
    hit = api.job(again.json()["id"])
    assert hit["status"] == "succeeded" and hit["reused_from"] == first and hit["attempts"] == 0
    assert [(a["name"], a["sha256"]) for a in hit["artifacts"]] == [(a["name"], a["sha256"]) for a in done["artifacts"]]
    assert hit["report"]["quant_ppl"] == done["report"]["quant_ppl"]
    assert [e for _, e, _ in api.events(hit["id"])] == ["status", "end"]
    # Another owner uploading the same texts gets the cache too, as its own job.
    other = other_api.submit(dict(body, calib={"text_id": other_api.upload(TRAIN_TEXT, limit=300_000)},
                                  eval={"text_id": other_api.upload(TEST_TEXT)}))
    assert other.json()["cache_hit"] is True and other.json()["id"] != hit["id"]
    forced = api.submit(dict(body, force=True))
    assert forced.json()["cache_hit"] is False
    assert api.wait(forced.json()["id"])["status"] == "succeeded"


def test_download_range_etag_and_metrics(api: Api) -> None:
    job_id = api.submit(api.job_body(seed=41, steps=1)).json()["id"]
    job = api.wait(job_id)
    art = next(a for a in job["artifacts"] if a["name"] == "model/model.safetensors")
    full = api.http.get(art["url"]).content
    part = api.http.get(art["url"], headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == full[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{art['bytes']}"
    same = api.http.get(art["url"], headers={"If-None-Match": f'"{art["sha256"]}"'})
    assert same.status_code == 304 and same.content == b""
    assert api.http.get(f"/v1/jobs/{job_id}/artifacts/model/nope.bin").status_code == 404
    text = api.http.get("/metrics").text
    assert 'spinquant_jobs{status="succeeded"}' in text and "spinquant_queue_depth" in text
    succeeded = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith('spinquant_jobs{status="succeeded"}')))
    assert succeeded >= 1
    assert json.loads(api.http.get("/readyz").text) == {"status": "ready"}


def test_events_resume_from_last_event_id(api: Api) -> None:
    job_id = api.submit(api.job_body(seed=51, steps=2)).json()["id"]
    full = api.events(job_id)
    cut = len(full) // 2
    rest = api.events(job_id, last_id=full[cut][0])
    assert rest == full[cut + 1:]
    bad = api.http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "not-an-id"})
    assert bad.status_code == 400

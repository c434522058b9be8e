"""Per-owner limits of a shared GPU pool (issue 14), on the real API over HTTP with no worker (jobs stay queued):
at most SPINQUANT_MAX_ACTIVE_JOBS queued + running jobs per token (429 with Retry-After past it, other tokens
unaffected, a finished or cancelled job frees its place), and read-only tokens that read but never write."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from scripts.stack import Stack
from tests.stack_helpers import Api


def test_active_job_limit_and_read_only_tokens(tmp_path: Path) -> None:
    with Stack(tmp_path / "stack", worker=False, extra_env={"SPINQUANT_MAX_ACTIVE_JOBS": "2"}) as stack:
        a, b = Api(stack, stack.token("a")), Api(stack, stack.token("b"))
        body = a.job_body(steps=2)
        ids = []
        for seed in (1, 2):
            r = a.submit({**body, "settings": {**body["settings"], "seed": seed}})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        over = a.submit({**body, "settings": {**body["settings"], "seed": 3}})
        assert over.status_code == 429 and int(over.headers["retry-after"]) > 0, over.text
        assert over.json()["detail"][0]["type"] == "too_many_jobs" and "SPINQUANT_MAX_ACTIVE_JOBS=2" in over.text
        assert len(a.http.get("/v1/jobs").json()["jobs"]) == 2  # the refused submit left nothing
        replay = a.submit({**body, "settings": {**body["settings"], "seed": 1}}, **{"Idempotency-Key": "k"})
        assert replay.status_code == 429  # a new request (no earlier job with this key) counts
        assert b.submit(b.job_body(steps=2)).status_code == 202  # another token has its own share
        assert a.http.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 202
        assert a.submit({**body, "settings": {**body["settings"], "seed": 3}}).status_code == 202

        ro = Api(stack, stack.token("dashboard", read_only=True))
        assert ro.http.get("/v1/jobs").status_code == 200 and ro.http.get("/v1/jobs").json()["jobs"] == []
        refused = ro.submit(body)
        assert refused.status_code == 403 and "read-only" in refused.json()["detail"], refused.text
        assert ro.http.post("/v1/texts", params={"name": "t.txt"}, content=b"text " * 50).status_code == 403
        assert ro.http.post(f"/v1/jobs/{ids[1]}/cancel").status_code == 403
        admin_ro = Api(stack, stack.token("monitor", admin=True, read_only=True))
        assert len(admin_ro.http.get("/v1/jobs").json()["jobs"]) == 4  # an admin monitor reads every owner's
        assert admin_ro.http.post(f"/v1/jobs/{ids[1]}/cancel").status_code == 403
        assert a.job(ids[1])["status"] == "queued"


def test_concurrent_submits_at_the_limit_never_pass_it(tmp_path: Path, db_url: str) -> None:
    """Twelve submits from twelve threads at once with one token and a limit of 3, on SQLite and PostgreSQL: exactly
    3 are accepted and 9 are 429, and exactly 3 rows exist (the count and the insert are one step per owner)."""
    with Stack(tmp_path / "stack", worker=False, database_url=db_url,
               extra_env={"SPINQUANT_MAX_ACTIVE_JOBS": "3"}) as stack:
        a = Api(stack, stack.token("a"))
        body = a.job_body(steps=2)
        barrier = threading.Barrier(12)

        def submit(seed: int) -> int:
            with httpx.Client(base_url=stack.url, headers=a.http.headers, timeout=60) as http:
                barrier.wait()
                return http.post("/v1/jobs", json={**body, "settings": {**body["settings"], "seed": seed}}).status_code

        with ThreadPoolExecutor(12) as pool:
            codes = sorted(pool.map(submit, range(12)))
        assert codes == [202] * 3 + [429] * 9, codes
        assert len(a.http.get("/v1/jobs").json()["jobs"]) == 3

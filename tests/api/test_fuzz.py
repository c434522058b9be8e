"""The API fuzzed from its own OpenAPI schema (bench/fuzz.py, schemathesis) over real HTTP on the session stack:
a fixed seed, 85 generated requests per operation, each sent with the owner's token, an invalid one and another
owner's (over 2,000 requests, about a minute here). No 5xx, every response documented and matching its schema,
and another owner gets 404 on every route of a real job of the owner."""

from __future__ import annotations

import pytest

from bench.fuzz import fuzz, setup_owner_job

pytestmark = pytest.mark.faults


def test_fuzzing_the_schema_finds_no_5xx_and_no_undocumented_response(stack) -> None:
    tokens, job_id = setup_owner_job(stack)
    res = fuzz(stack.url, tokens, job_id, per_operation=85, seed=0)
    failures = {op: row["examples"] for op, row in res["operations"].items() if row["failures"] or row["5xx"]}
    assert res["5xx"] == 0 and res["schema_failures"] == 0, failures
    assert res["requests"] >= 2000, res["requests"]
    assert len(res["ownership_sweep"]) == 5 and res["ownership_leaks"] == [], res["ownership_sweep"]
    assert all(row["requests"] > 0 for row in res["operations"].values())

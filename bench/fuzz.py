"""Fuzz the API from its own OpenAPI schema (schemathesis) over real HTTP: every response must be documented and
match its schema, and none may be a 5xx.

Starts the real stack (redis-server, the API over uvicorn, one Celery worker, SQLite) in a temp folder, makes one
finished job for owner A, then for every operation of ``/openapi.json`` generates ``--per-operation`` requests
(hypothesis, seeded) and sends each three times: with A's token, with an invalid token, and with another owner
B's token. Then a sweep of every operation that takes a ``job_id`` with A's real job id and B's token: each must be
404 (B may not learn that A's job exists). Prints a table per operation and writes JSON.

    .venv/bin/python bench/fuzz.py --json runs/bench/fuzz.json               # the full run (>= 2,000 requests)
    .venv/bin/python bench/fuzz.py --per-operation 20 --json /tmp/fuzz.json  # what tests/api/test_fuzz.py runs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.stack import Stack  # noqa: E402

IDENTITIES = ("owner", "invalid", "other")


def fuzz(url: str, tokens: dict[str, str], job_id: str, per_operation: int, seed: int) -> dict[str, Any]:
    """The fuzz run against a live API: per operation the count of requests, of 5xx, of responses that break
    their documented schema or status list (with the first few failures), and the ownership sweep."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    rows: dict[str, dict[str, Any]] = {}
    ops = _operations(schema)
    for op in ops:
        row: dict[str, Any] = {"requests": 0, "5xx": 0, "failures": 0, "statuses": Counter(), "examples": []}
        rows[f"{op.method.upper()} {op.path}"] = row

        run = _runner(op, row, url, tokens)
        run = hseed(seed)(settings(max_examples=per_operation, phases=[Phase.generate], database=None, deadline=None,
                                   suppress_health_check=list(HealthCheck))(given(case=op.as_strategy())(run)))
        run()
        row["statuses"] = {str(k): v for k, v in sorted(row["statuses"].items())}
    sweep = _ownership_sweep(url, tokens["other"], job_id, ops)
    total = sum(r["requests"] for r in rows.values())
    return {"per_operation": per_operation, "seed": seed, "requests": total + len(sweep),
            "fuzzed_requests": total, "5xx": sum(r["5xx"] for r in rows.values()),
            "schema_failures": sum(r["failures"] for r in rows.values()), "operations": rows,
            "ownership_sweep": sweep, "ownership_leaks": [s for s in sweep if s["status"] != 404]}


def _operations(schema: Any) -> list[Any]:
    """Every operation of the schema; one schemathesis cannot read is an error of the schema itself."""
    from schemathesis.core.result import Ok

    ops = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise RuntimeError(f"the API's OpenAPI schema has an operation schemathesis cannot read: {result.err()}")
        ops.append(result.ok())
    return ops


def _runner(op: Any, row: dict[str, Any], url: str, tokens: dict[str, str]) -> Any:
    """One generated case, sent once per identity; the row counts what came back. The checks are the
    documented-contract ones (no 5xx; status, content type, headers and body as the schema says), not
    schemathesis' guesses that a schema-valid body must be accepted: the API refuses with 422 what its config
    object refuses (a model id that is no Hugging Face id, a setting out of range) beyond the JSON schema."""
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]

    def run(case: Any) -> None:
        for who in IDENTITIES:
            headers = {**(case.headers or {}), "Authorization": f"Bearer {tokens[who]}"}
            response = case.call(base_url=url, headers=headers, timeout=30)
            row["requests"] += 1
            row["statuses"][response.status_code] += 1
            if response.status_code >= 500:
                row["5xx"] += 1
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup: recorded, not raised
                row["failures"] += 1
                if len(row["examples"]) < 3:
                    what = "; ".join(str(e).strip().splitlines()[0] for e in getattr(exc, "exceptions", [exc]))
                    row["examples"].append(f"{who} {response.status_code} {case.formatted_path}: {what[:300]}")

    return run


def _ownership_sweep(url: str, other_token: str, job_id: str, ops: list[Any]) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {other_token}"}, timeout=30) as http:
        for op in ops:
            if "{job_id}" not in op.path:
                continue
            path = op.path.replace("{job_id}", job_id).replace("{name}", "SHA256SUMS")
            r = http.request(op.method.upper(), path)
            out.append({"operation": f"{op.method.upper()} {op.path}", "status": r.status_code})
    return out


def setup_owner_job(stack: Stack) -> tuple[dict[str, str], str]:
    """Tokens for A, B and an invalid one, and A's finished job (a small RTN job on the fixture)."""
    tokens = {"owner": stack.token("fuzz-a"), "other": stack.token("fuzz-b"), "invalid": "not-a-token"}
    text = (ROOT / "tests" / "fixtures" / "text" / "test.txt").read_bytes()
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {tokens['owner']}"}, timeout=60) as http:
        tid = http.post("/v1/texts", params={"name": "t.txt"}, content=text).json()["id"]
        body = {"model": "local:llama-tiny", "method": "rtn", "settings": {"w_bits": 4, "seq_len": 128,
                                                                            "eval_windows": 2},
                "calib": {"text_id": tid}, "eval": {"text_id": tid}}
        job_id = http.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 180
        while http.get(f"/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"setup job {job_id} did not finish")
            time.sleep(0.3)
    return tokens, job_id


def run_on_stack(per_operation: int, seed: int, root: Path) -> dict[str, Any]:
    with Stack(root) as stack:
        tokens, job_id = setup_owner_job(stack)
        t0 = time.perf_counter()
        res = fuzz(stack.url, tokens, job_id, per_operation, seed)
        res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--per-operation", type=int, default=250, help="generated cases per operation (x3 identities)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        res = run_on_stack(a.per_operation, a.seed, Path(tmp))
    print(f"{'operation':<46} {'requests':>8} {'5xx':>4} {'schema':>6}  statuses")
    for name, row in res["operations"].items():
        print(f"{name:<46} {row['requests']:>8} {row['5xx']:>4} {row['failures']:>6}  {row['statuses']}")
        for ex in row["examples"]:
            print(f"    {ex}")
    print(f"total {res['requests']} requests ({res['fuzzed_requests']} generated, {len(res['ownership_sweep'])} "
          f"ownership sweep) in {res['seconds']} s: {res['5xx']} 5xx, {res['schema_failures']} schema failures, "
          f"{len(res['ownership_leaks'])} ownership leaks")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    return 0 if res["5xx"] == 0 and res["schema_failures"] == 0 and not res["ownership_leaks"] else 1


if __name__ == "__main__":
    sys.exit(main())

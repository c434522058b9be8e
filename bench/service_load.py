"""Service benchmark: job overhead (submit -> worker start, finish -> downloadable) and status-read throughput;
with --load N, N submissions from --clients concurrent clients (own tokens) while status reads run.

Starts the real stack (redis-server, the API over HTTP, one Celery worker) in a temp folder, runs a
few small RTN jobs on the fixture one after another, and hammers GET /v1/jobs/{id} from several
client threads. Prints a table and writes JSON. Absolute times here are noisy (2 shared cores);
compare the rows with each other.

    .venv/bin/python bench/service_load.py --json runs/bench/service.json
    .venv/bin/python bench/service_load.py --jobs 1 --load 200 --clients 20 --json runs/bench/service-load.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.stack import Stack  # noqa: E402

FIXTURE_TEXT = ROOT / "tests" / "fixtures" / "text"


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_jobs(c: httpx.Client, n: int) -> list[dict[str, Any]]:
    train = (FIXTURE_TEXT / "train.txt").read_bytes()[:200_000]
    calib = c.post("/v1/texts", params={"name": "train"}, content=train).json()["id"]
    evals = c.post("/v1/texts", params={"name": "test"}, content=(FIXTURE_TEXT / "test.txt").read_bytes()).json()["id"]
    rows = []
    for i in range(n):
        body = {"model": "local:llama-tiny", "method": "rtn", "settings": {"w_bits": 4, "seq_len": 128,
                "eval_windows": 4, "seed": i}, "calib": {"text_id": calib}, "eval": {"text_id": evals}, "force": True}
        t0 = time.time()
        r = c.post("/v1/jobs", json=body)
        submit_s = time.time() - t0
        job_id = r.json()["id"]
        with c.stream("GET", f"/v1/jobs/{job_id}/events", timeout=300) as s:
            for line in s.iter_lines():
                if line.startswith("event: end"):
                    break
        t_end = time.time()
        job = c.get(f"/v1/jobs/{job_id}").json()
        art = next(a for a in job["artifacts"] if a["name"] == "SHA256SUMS")
        assert c.get(art["url"]).status_code == 200
        t_dl = time.time()
        export_end = job["timings"]["export"]["end"]
        load_start = job["timings"]["load"]["start"]
        rows.append({
            "job": job_id, "status": job["status"], "submit_http_s": submit_s,
            "queued_to_started_s": _ts(job["started_at"]) - _ts(job["created_at"]),
            "started_to_first_progress_s": load_start - _ts(job["started_at"]),
            "compute_s": export_end - load_start,
            "export_done_to_recorded_s": _ts(job["finished_at"]) - export_end,
            "recorded_to_downloaded_s": t_dl - max(t_end, _ts(job["finished_at"])),
            "submit_to_downloaded_s": t_dl - t0,
        })
    return rows


def read_throughput(url: str, token: str, path: str, threads: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        nonlocal errors
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                ok = c.get(path).status_code == 200
                d = time.perf_counter() - t
                with lock:
                    lat.append(d)
                    errors += not ok

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.monotonic() - t0
    return {"path": path, "threads": threads, "requests": len(lat), "errors": errors, "req_per_s": len(lat) / wall,
            "p50_ms": 1000 * _pct(lat, 0.5), "p99_ms": 1000 * _pct(lat, 0.99)}


def load_test(stack: Stack, n: int, clients: int, threads: int) -> dict[str, Any]:
    """``n`` RTN submissions from ``clients`` threads (each its own token, as separate CI systems are), one worker
    draining them; status reads (GET /v1/jobs/{id}) from ``threads`` more while the queue drains. Then every job
    must have succeeded exactly once: one row per submission, attempts 1, one 'succeeded' status event."""
    train = (FIXTURE_TEXT / "train.txt").read_bytes()[:100_000]
    evals = (FIXTURE_TEXT / "test.txt").read_bytes()[:60_000]
    from sqlalchemy import func, select

    from service.db import TERMINAL, Job, make_engine, make_sessionmaker

    sessions = make_sessionmaker(make_engine(stack.database_url))

    def count(*where: Any) -> int:
        with sessions() as db:
            return int(db.scalar(select(func.count()).select_from(Job).where(*where)) or 0)

    rows_before = count()
    tokens = [stack.token(f"load-{i}") for i in range(clients)]
    submit_lat: list[float] = []
    ids: list[str] = []
    owner_of: dict[str, str] = {}  # job id -> its owner's token: a status read with another token is 404
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {tokens[i]}"}, timeout=60) as c:
            calib = c.post("/v1/texts", params={"name": "train"}, content=train).json()["id"]
            ev = c.post("/v1/texts", params={"name": "test"}, content=evals).json()["id"]
            for k in range(i, n, clients):
                body = {"model": "local:llama-tiny", "method": "rtn", "settings": {
                    "w_bits": 4, "seq_len": 64, "eval_windows": 1, "seed": k}, "calib": {"text_id": calib},
                    "eval": {"text_id": ev}}
                t = time.perf_counter()
                r = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"load-{k}"})
                d = time.perf_counter() - t
                with lock:
                    submit_lat.append(d)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 202:
                        ids.append(r.json()["id"])
                        owner_of[ids[-1]] = tokens[i]

    t0 = time.monotonic()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    submit_wall = time.monotonic() - t0
    reads = read_throughput(stack.url, owner_of[ids[0]], f"/v1/jobs/{ids[0]}", threads, 10.0) if ids else {}
    admin = stack.token("load-admin", admin=True)
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {admin}"}, timeout=60) as c:
        deadline = time.monotonic() + 6 * 3600
        while time.monotonic() < deadline and count(Job.status.not_in(TERMINAL)):
            time.sleep(2)
        drain_wall = time.monotonic() - t0
        jobs = [c.get(f"/v1/jobs/{i}").json() for i in ids]
        once = 0
        not_once: list[dict[str, Any]] = []
        for j in jobs:
            ends = []
            with c.stream("GET", f"/v1/jobs/{j['id']}/events", timeout=60) as s:
                event = ""
                for line in s.iter_lines():
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: ") and event in ("status", "end"):
                        data = json.loads(line.removeprefix("data: "))
                        if data.get("status") in TERMINAL:
                            ends.append((event, data["status"]))
                    if event == "end" and line == "":
                        break
            # one terminal status event and the stream's end, both 'succeeded'
            ok = j["status"] == "succeeded" and j["attempts"] == 1 and ends == [("status", "succeeded"),
                                                                                   ("end", "succeeded")]
            once += ok
            if not ok and len(not_once) < 5:
                not_once.append({"id": j["id"], "status": j["status"], "attempts": j["attempts"], "ends": ends})
    return {"submissions": n, "clients": clients, "http_statuses": statuses, "jobs_created": len(ids),
            "distinct_ids": len(set(ids)), "rows_added": count() - rows_before,
            "succeeded_exactly_once": once, "not_exactly_once": not_once, "submit_p50_ms": 1000 * _pct(submit_lat, 0.5),
            "submit_p99_ms": 1000 * _pct(submit_lat, 0.99), "submit_wall_s": submit_wall,
            "drain_wall_s": drain_wall, "reads_under_load": reads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--load", type=int, default=0, help="submissions for the load test (0 = none)")
    p.add_argument("--clients", type=int, default=20, help="concurrent submitting clients in the load test")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    load: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp, Stack(Path(tmp)) as stack:
        token = stack.token("bench")
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            jobs = run_jobs(c, a.jobs)
            reads = [read_throughput(stack.url, token, f"/v1/jobs/{jobs[-1]['job']}", a.threads, a.seconds),
                     read_throughput(stack.url, token, "/v1/jobs?limit=50", a.threads, a.seconds)]
        if a.load:
            load = load_test(stack, a.load, a.clients, a.threads)
    keys = ["submit_http_s", "queued_to_started_s", "started_to_first_progress_s", "compute_s",
            "export_done_to_recorded_s", "recorded_to_downloaded_s", "submit_to_downloaded_s"]
    print(f"\nJob overhead over {len(jobs)} RTN W4 jobs on llama-tiny (median / max, seconds)")
    print(f"{'phase':<32}{'median':>10}{'max':>10}")
    summary = {}
    for k in keys:
        vals = [j[k] for j in jobs]
        summary[k] = {"median": statistics.median(vals), "max": max(vals)}
        print(f"{k:<32}{summary[k]['median']:>10.3f}{summary[k]['max']:>10.3f}")
    print(f"\nStatus reads ({a.threads} client threads, {a.seconds:.0f} s each)")
    print(f"{'endpoint':<40}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in reads:
        print(f"{r['path'][:39]:<40}{r['req_per_s']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['errors']:>8}")
    if load:
        r = load["reads_under_load"]
        print(f"\nLoad: {load['submissions']} RTN submissions from {load['clients']} clients, one worker")
        print(f"{'http statuses':<32}{json.dumps(load['http_statuses'])}")
        print(f"{'jobs created / distinct / rows':<32}{load['jobs_created']} / {load['distinct_ids']} / "
              f"{load['rows_added']}")
        print(f"{'succeeded exactly once':<32}{load['succeeded_exactly_once']}")
        for bad in load["not_exactly_once"]:
            print(f"  not once: {json.dumps(bad)}")
        print(f"{'submit p50 / p99 ms':<32}{load['submit_p50_ms']:.1f} / {load['submit_p99_ms']:.1f}")
        print(f"{'submit wall / drain wall s':<32}{load['submit_wall_s']:.1f} / {load['drain_wall_s']:.1f}")
        if r:
            print(f"{'status reads under load':<32}{r['req_per_s']:.1f} req/s, p99 {r['p99_ms']:.1f} ms, "
                  f"{r['errors']} errors ({r['threads']} threads)")
    out = {"jobs": jobs, "overhead": summary, "reads": reads, "statuses": [j["status"] for j in jobs], "load": load}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))
    ok = all(j["status"] == "succeeded" for j in jobs)
    if load:
        ok = ok and load["succeeded_exactly_once"] == load["submissions"] == load["distinct_ids"] == load["rows_added"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

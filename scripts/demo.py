"""``make demo``: quantize the bundled fixture model through the real service, end to end.

Starts Redis, the API and one worker (scripts/stack.py) under runs/demo-stack, uploads the fixture
texts, submits a SpinQuant W4A4KV4 job, follows its Server-Sent Events with a progress bar, downloads
every artifact into runs/demo/checkpoint, verifies the sha256 of each (the API's value and the
checkpoint's SHA256SUMS), prints the report, and stops the stack. The client speaks HTTP only (httpx);
``--runtime-check`` then reloads the checkpoint with ``python -m quant_core eval`` (torch, a subprocess).

Exit status: 0 success, 1 job failed or cancelled, 2 checksum mismatch or setup error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx

from scripts.stack import ROOT, Stack

STACK_DIR = ROOT / "runs" / "demo-stack"
OUT_DIR = ROOT / "runs" / "demo" / "checkpoint"
TEXTS = ROOT / "tests" / "fixtures" / "text"
MODEL = "local:llama-outlier"
SETTINGS = {"w_bits": 4, "a_bits": 4, "kv_bits": 4, "seq_len": 256, "calib_samples": 32,
            "train_samples": 200, "steps": 50}
MAX_RECONNECTS = 10


class DemoError(Exception):
    """Ends the demo with a message and an exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def check(r: httpx.Response, what: str) -> Any:
    if r.is_error:
        raise DemoError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def upload_text(client: httpx.Client, path: Path) -> str:
    row = check(client.post("/v1/texts", params={"name": path.name}, content=path.read_bytes(),
                            headers={"Content-Type": "text/plain; charset=utf-8"}), f"uploading {path.name}")
    print(f"uploaded {path.name}: {row['bytes']} bytes, text id {row['id']}")
    return row["id"]


def submit(client: httpx.Client, calib_id: str, eval_id: str) -> str:
    body = {"model": MODEL, "method": "spinquant", "settings": SETTINGS,
            "calib": {"text_id": calib_id}, "eval": {"text_id": eval_id}}
    key = str(uuid.uuid4())  # a retried POST with the same key returns the same job, never a second one
    for attempt in range(3):
        try:
            r = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
            break
        except httpx.TransportError as exc:
            if attempt == 2:
                raise DemoError(f"submitting the job: {exc}") from exc
            time.sleep(1)
    job = check(r, "submitting the job")
    print(f"job {job['id']}: {job['status']} ({MODEL}, spinquant W4A4KV4, {SETTINGS['steps']} learning steps)")
    return job["id"]


def sse(lines: Iterator[str]) -> Iterator[tuple[str | None, str, str, int | None]]:
    """(id, event, data, retry ms) per Server-Sent Events frame."""
    eid, kind, data, retry = None, "message", [], None
    for line in lines:
        if not line:
            if data or retry is not None:
                yield eid, kind, "\n".join(data), retry
            eid, kind, data, retry = None, "message", [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            eid = value
        elif field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "retry" and value.isdigit():
            retry = int(value)


class Bar:
    """One overall bar on a terminal (tqdm); plain ``[stage] NN%`` lines otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.stage, self.tenth = None, -1
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc="queued", bar_format="{desc:<12} {percentage:3.0f}%|{bar}| {elapsed}{postfix}")

    def update(self, d: dict[str, Any]) -> None:
        stage, frac, overall = d.get("stage") or "?", d.get("stage_fraction") or 0.0, d.get("progress") or 0.0
        eta = d.get("eta_s")
        if self.bar is not None:
            post = {"stage": f"{frac * 100:3.0f}%"}
            if stage == "learn" and d.get("step") is not None:
                post.update(step=d["step"], loss=f"{d['loss']:.4g}" if d.get("loss") is not None else "-")
            if eta is not None:
                post["eta"] = f"{eta:.0f}s"
            self.bar.set_description_str(stage)
            self.bar.n = int(overall * 1000)
            self.bar.set_postfix(post, refresh=True)
            return
        if (stage, int(frac * 10)) != (self.stage, self.tenth):  # each stage's start, then every 10%
            self.stage, self.tenth = stage, int(frac * 10)
            extra = f" step={d['step']} loss={d['loss']:.4g}" if stage == "learn" and d.get("loss") is not None else ""
            eta_s = f", eta {eta:.0f}s" if eta is not None else ""
            print(f"[{stage}] {frac * 100:3.0f}% (job {overall * 100:3.0f}%{eta_s}){extra}", flush=True)

    def note(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def follow(client: httpx.Client, job_id: str) -> str:
    """Follow the job's events until ``end``, resuming with Last-Event-ID; returns the final status."""
    last_id: str | None = None
    delay, failures, bar = 2.0, 0, Bar()
    try:
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                   timeout=httpx.Timeout(10, read=60)) as r:
                    if r.is_error:
                        r.read()
                        raise DemoError(f"following the job: HTTP {r.status_code}: {r.text[:500]}")
                    for eid, kind, data, retry in sse(r.iter_lines()):
                        failures = 0
                        delay = retry / 1000 if retry is not None else delay
                        last_id = eid or last_id
                        payload = json.loads(data) if data else {}
                        if kind == "progress":
                            bar.update(payload)
                        elif kind == "status" and payload.get("status") == "running":
                            bar.note(f"running on {payload.get('worker', '?')} (attempt {payload.get('attempt', '?')})")
                        elif kind == "log":
                            bar.note(str(payload.get("message", payload)))
                        elif kind == "end":
                            return str(payload.get("status"))
            except httpx.TransportError as exc:
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise DemoError(f"lost the event stream {failures} times in a row: {exc}") from exc
                bar.note(f"event stream dropped ({type(exc).__name__}); resuming from {last_id or 'the start'}")
            time.sleep(delay)  # closed without `end` (or dropped): reconnect and replay from last_id
    finally:
        bar.close()


def download(client: httpx.Client, job: dict[str, Any]) -> bool:
    """Every artifact into OUT_DIR, checked against the API's sha256 and SHA256SUMS; prints a table."""
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    got: dict[str, str] = {}
    for art in job["artifacts"]:
        dest = (OUT_DIR / art["name"]).resolve()
        if not dest.is_relative_to(OUT_DIR.resolve()):
            raise DemoError(f"artifact name {art['name']!r} points outside {OUT_DIR}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with client.stream("GET", f"/v1/jobs/{job['id']}/artifacts/{art['name']}") as r:
            if r.is_error:
                r.read()
                raise DemoError(f"downloading {art['name']}: HTTP {r.status_code}: {r.text[:300]}")
            h = hashlib.sha256()
            with open(dest, "wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
        got[art["name"]] = h.hexdigest()
    if "SHA256SUMS" not in got:
        raise DemoError("the job has no SHA256SUMS artifact")
    lines = (OUT_DIR / "SHA256SUMS").read_text().splitlines()
    sums = {name: digest for digest, _, name in (line.partition("  ") for line in lines if line.strip())}
    ok_all = set(sums) == set(got) - {"SHA256SUMS"}
    if not ok_all:
        print(f"SHA256SUMS and the artifact list differ: {sorted(set(sums) ^ (set(got) - {'SHA256SUMS'}))}")
    width = max(len(n) for n in got)
    print(f"\n{'file':<{width}}  {'bytes':>10}  sha256 ok (api / SHA256SUMS)")
    for art in job["artifacts"]:
        name, digest = art["name"], got[art["name"]]
        api_ok = digest == art["sha256"] and (OUT_DIR / name).stat().st_size == art["bytes"]
        sums_ok = name == "SHA256SUMS" or sums.get(name) == digest
        ok_all &= api_ok and sums_ok
        mark = f"{'yes' if api_ok else 'NO'} / {'-' if name == 'SHA256SUMS' else 'yes' if sums_ok else 'NO'}"
        print(f"{name:<{width}}  {art['bytes']:>10}  {mark}")
    total = sum(a["bytes"] for a in job["artifacts"])
    print(f"{len(got)} files, {total} bytes in {OUT_DIR.relative_to(ROOT)}")
    return ok_all


def print_report(job: dict[str, Any]) -> None:
    r = job["report"] or {}
    fp, q = r.get("fp_ppl"), r.get("quant_ppl")
    gap = f"{(q / fp - 1) * 100:+.2f} %" if fp and q else "-"
    print(f"\nreport: method {r.get('method')}, scheme {r.get('scheme')}")
    print(f"  fp_ppl {fp:.4f}  quant_ppl {q:.4f}  gap {gap}" if fp and q else f"  fp_ppl {fp}  quant_ppl {q}")
    print("  timings_s: " + ", ".join(f"{k} {v:.1f}" for k, v in (r.get("timings_s") or {}).items()))
    stages = {k: v.get("seconds") for k, v in (job.get("timings") or {}).items()}
    print("stage timings (worker): " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items() if v is not None))


def runtime_check(quant_ppl: float) -> bool:
    """Reload the downloaded checkpoint with quant_core's runtime (torch, in a subprocess)."""
    out = OUT_DIR.parent / "runtime_check.json"
    cmd = [sys.executable, "-m", "quant_core", "eval", str(OUT_DIR.relative_to(ROOT)),
           "--eval-text", str((TEXTS / "test.txt").relative_to(ROOT)), "--report-json", str(out.relative_to(ROOT))]
    print("\nruntime check: python " + " ".join(cmd[1:]))
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        return False
    ppl = json.loads(out.read_text())["ppl"]
    ok = abs(ppl - quant_ppl) <= 1e-3 * quant_ppl
    print(f"runtime check: reloaded ppl {ppl:.4f} vs report {quant_ppl:.4f}: {'ok' if ok else 'MISMATCH'}")
    return ok


def run(args: argparse.Namespace) -> int:
    shutil.rmtree(STACK_DIR, ignore_errors=True)
    print(f"starting Redis, the API and a worker (logs in {STACK_DIR.relative_to(ROOT)}/*.log) ...")
    t0 = time.monotonic()
    stack = Stack(STACK_DIR)
    try:
        try:
            stack.start()
            token = stack.token("demo")
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            raise DemoError(f"could not start the stack: {exc}") from exc
        print(f"stack up in {time.monotonic() - t0:.1f}s: API {stack.url} (docs {stack.url}/docs)")
        with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"},
                          timeout=httpx.Timeout(30)) as client:
            calib_id = upload_text(client, TEXTS / "train.txt")
            eval_id = upload_text(client, TEXTS / "test.txt")
            job_id = submit(client, calib_id, eval_id)
            t_job = time.monotonic()
            status = follow(client, job_id)
            job = check(client.get(f"/v1/jobs/{job_id}"), "reading the job")
            print(f"job {job_id}: {job['status']} after {time.monotonic() - t_job:.1f}s")
            if job["status"] != "succeeded":
                err = job.get("error") or {"code": "?", "message": f"ended as {status}"}
                print(f"error {err['code']}: {err['message']}", file=sys.stderr)
                print(f"worker log: {(STACK_DIR / 'worker-gpu0.log').relative_to(ROOT)}", file=sys.stderr)
                return 1
            if not download(client, job):
                raise DemoError("checksum mismatch in the downloaded checkpoint")
            print_report(job)
        stack.stop()  # before the runtime check: it needs the CPU, not the service
        if args.runtime_check and not runtime_check(job["report"]["quant_ppl"]):
            raise DemoError("the reloaded checkpoint does not reproduce the report")
        print(f"\ndemo done in {time.monotonic() - t0:.1f}s; checkpoint in {OUT_DIR.relative_to(ROOT)}")
        return 0
    finally:
        stack.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-check", action="store_true",
                   help="also reload the downloaded checkpoint with quant_core (imports torch) and compare perplexity")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # stop the stack on `kill` too, not only on Ctrl-C
    try:
        return run(args)
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return exc.code
    except httpx.HTTPError as exc:
        print(f"demo: error: talking to the API: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the stack is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

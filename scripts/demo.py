"""``make demo``: quantize the bundled fixture model through the real service, end to end.

Starts Redis, the API and one worker (scripts/stack.py) under runs/demo-stack, uploads the fixture
texts, submits a SpinQuant W4A4KV4 job, follows its Server-Sent Events with a progress bar, downloads
every artifact into runs/demo/checkpoint, verifies the sha256 of each (the API's value and the
checkpoint's SHA256SUMS), prints the report, and stops the stack. It uses the client library (spinquant_client: HTTP only);
``--runtime-check`` then reloads the checkpoint with ``python -m quant_core eval`` (torch, a subprocess).

Exit status: 0 success, 1 job failed or cancelled, 2 checksum mismatch or setup error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from spinquant_client.cli import BarProgress, LineProgress
from spinquant_client.client import ChecksumMismatch, Client, ClientError

from scripts.stack import ROOT, Stack

STACK_DIR = ROOT / "runs" / "demo-stack"
OUT_DIR = ROOT / "runs" / "demo" / "checkpoint"
TEXTS = ROOT / "tests" / "fixtures" / "text"
MODEL = "local:llama-massive"
SETTINGS = {"w_bits": 4, "a_bits": 4, "kv_bits": 4, "seq_len": 256, "calib_samples": 32,
            "train_samples": 200, "steps": 50}


class DemoError(Exception):
    """Ends the demo with a message and an exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def follow(client: Client, job_id: str) -> dict[str, Any]:
    """The client's own wait (SSE, resumed with Last-Event-ID) with its bar or plain lines; the final job."""
    show = BarProgress() if sys.stderr.isatty() else LineProgress(out=sys.stdout)
    try:
        return client.wait(job_id, on_event=show)
    finally:
        show.close()


def download(client: Client, job: dict[str, Any]) -> None:
    """Every artifact into OUT_DIR, each checked against the API's sha256 and SHA256SUMS; prints a table."""
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    try:
        client.download(job["id"], OUT_DIR, job=job)
    except ChecksumMismatch as exc:
        raise DemoError(f"checksum mismatch in the downloaded checkpoint: {exc}") from exc
    width = max(len(a["name"]) for a in job["artifacts"])
    print(f"\n{'file':<{width}}  {'bytes':>10}  sha256 ok (api / SHA256SUMS)")
    for art in job["artifacts"]:
        sums = "-" if art["name"] == "SHA256SUMS" else "yes"
        print(f"{art['name']:<{width}}  {art['bytes']:>10}  yes / {sums}")
    total = sum(a["bytes"] for a in job["artifacts"])
    print(f"{len(job['artifacts'])} files, {total} bytes in {OUT_DIR.relative_to(ROOT)}")


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
        with Client(stack.url, token) as client:
            ids = {}
            for part in ("train", "test"):
                row = client.upload_text(TEXTS / f"{part}.txt")
                print(f"uploaded {part}.txt: {row['bytes']} bytes, text id {row['id']}")
                ids[part] = row["id"]
            acc = client.submit(MODEL, method="spinquant", settings=SETTINGS, calib={"text_id": ids["train"]},
                                eval={"text_id": ids["test"]}, idempotency_key=f"demo-{uuid.uuid4().hex}")
            job_id = acc["id"]
            print(f"job {job_id}: {acc['status']} ({MODEL}, spinquant W4A4KV4, {SETTINGS['steps']} learning steps)")
            t_job = time.monotonic()
            job = follow(client, job_id)
            print(f"job {job_id}: {job['status']} after {time.monotonic() - t_job:.1f}s")
            if job["status"] != "succeeded":
                err = job.get("error") or {"code": "?", "message": f"ended as {job['status']}"}
                print(f"error {err['code']}: {err['message']}", file=sys.stderr)
                print(f"worker log: {(STACK_DIR / 'worker-gpu0.log').relative_to(ROOT)}", file=sys.stderr)
                return 1
            download(client, job)
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
    except ClientError as exc:
        print(f"demo: error: talking to the API: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the stack is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

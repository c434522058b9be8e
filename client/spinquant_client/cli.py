"""The ``spinquant`` command line (``python -m spinquant_client``): argument parsing, progress display, exit codes.

The work is done by ``spinquant_client.Client``; this module only turns flags into calls and results into output:
machine-readable output (the job id, or JSON with --json) on stdout, everything for people on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .client import (
    DEFAULT_URL,
    EXIT_BAD_REQUEST,
    EXIT_FOR_STATUS,
    EXIT_OK,
    ChecksumMismatch,
    Client,
    ClientError,
    Event,
    RequestRefused,
    WaitTimeout,
)

EXIT_CODES = """exit codes:
  0  succeeded (with --download: every file's sha256 matches the API and SHA256SUMS)
  2  bad request: the server refused it (4xx; its detail is printed) or a missing token / bad flag
  3  the job failed (error code and message printed)
  4  the job was cancelled
  5  timed out waiting (--timeout); the job keeps running on the server
  6  checksum mismatch in a download
  7  server unreachable (connection errors or 5xx after --retries)"""

EXAMPLES = """examples:
  export SPINQUANT_URL=https://quant.example.com SPINQUANT_TOKEN=sq_...
  spinquant submit meta-llama/Llama-3.2-1B --w-bits 4 --a-bits 4 --kv-bits 4 --steps 100 \\
      --calib-dataset wikitext2 --idempotency-key "$GITHUB_SHA-w4a4" --download out/
  spinquant submit local:llama-tiny --method rtn --calib-text train.txt --eval-text test.txt --wait --json
  spinquant status ID;  spinquant list --status running;  spinquant cancel ID;  spinquant download ID out/"""

# Flags that are config fields; --set KEY=VALUE reaches every other one (flat or dotted names).
SETTING_FLAGS = (("--w-bits", "w_bits", int), ("--a-bits", "a_bits", int), ("--kv-bits", "kv_bits", int),
                 ("--w-group-size", "w_group_size", int), ("--steps", "steps", int), ("--seed", "seed", int),
                 ("--seq-len", "seq_len", int), ("--calib-samples", "calib_samples", int), ("--lr", "lr", float))
FORMATS = {"ct": ["ct"], "gptq": ["gptq"], "both": ["ct", "gptq"]}


def _err(msg: str) -> None:
    for line in str(msg).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)


def _info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_eta(s: float | None) -> str:
    if s is None:
        return "?"
    s = round(s)
    return f"{s}s" if s < 90 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(d: dict[str, Any]) -> str:
    """``[learn] 45% step 12 loss 3.12 eta 40s`` from a progress event's data (overall percent)."""
    parts = [f"[{d.get('stage') or '?'}]", f"{100 * float(d.get('progress') or 0):.0f}%"]
    if d.get("step") is not None and d.get("stage") == "learn":
        parts.append(f"step {d['step']}" + (f"/{d['steps']}" if d.get("steps") else ""))
    if d.get("loss") is not None:
        parts.append(f"loss {float(d['loss']):.3g}")
    if d.get("eta_s") is not None:
        parts.append(f"eta {_fmt_eta(d['eta_s'])}")
    return " ".join(parts)


class LineProgress:
    """Plain lines for logs: at most one progress line per stage per 10% of that stage, plus status/log lines."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out
        self.seen: set[tuple[str, int]] = set()

    def _print(self, text: str) -> None:
        print(text, file=self.out or sys.stderr, flush=True)

    def __call__(self, ev: Event) -> None:
        d = ev.data
        if ev.event == "progress":
            key = (str(d.get("stage")), int(10 * min(max(float(d.get("stage_fraction") or 0.0), 0.0), 1.0)))
            if key not in self.seen:
                self.seen.add(key)
                self._print(progress_line(d))
        elif ev.event == "status":
            extra = f" on {d['worker']}" if d.get("worker") else ""
            extra += f": {d.get('code')}: {d.get('message')}" if d.get("code") else ""
            extra += f" (cache hit: reuses job {d['reused_from']})" if d.get("cache_hit") else ""
            self._print(f"[status] {d.get('status')}{extra}")
        elif ev.event == "log":
            self._print(f"[log] {d.get('message', d)}")

    def close(self) -> None:
        pass


class BarProgress(LineProgress):
    """A tqdm bar on a terminal (overall percent; stage, step, loss and ETA beside it)."""

    def __init__(self) -> None:
        super().__init__()
        from tqdm import tqdm

        class Bar(tqdm):
            stats = ""

            @property
            def format_dict(self) -> dict[str, Any]:  # tqdm's {postfix} adds a comma; {stats} is as given
                return {**super().format_dict, "stats": self.stats}

        self.bar = Bar(total=100, file=sys.stderr, desc="[queued]", leave=True, dynamic_ncols=True,
                       bar_format="{desc} {percentage:3.0f}%|{bar}| {stats}")

    def _print(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def __call__(self, ev: Event) -> None:
        if ev.event != "progress":
            return super().__call__(ev)
        d = ev.data
        self.bar.set_description_str(f"[{d.get('stage')}]".ljust(13), refresh=False)
        self.bar.stats = progress_line(d).split("%", 1)[1].strip()
        self.bar.n = round(100 * float(d.get("progress") or 0), 1)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ClientError(f"--set {item!r}: expected KEY=VALUE (e.g. --set weights.gptq.damp=0.02)")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def _make_client(a: argparse.Namespace) -> Client:
    token = getattr(a, "token", None) or os.environ.get("SPINQUANT_TOKEN")
    url = getattr(a, "url", None) or os.environ.get("SPINQUANT_URL") or DEFAULT_URL
    return Client(url, token or "", retries=getattr(a, "retries", 4))


def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str), flush=True)


def _outcome(job: dict[str, Any]) -> int:
    """Print why a finished job did not succeed; its exit code."""
    code = EXIT_FOR_STATUS.get(job["status"], EXIT_BAD_REQUEST)
    err = job.get("error") or {}
    if job["status"] == "failed":
        _err(f"job {job['id']} failed: {err.get('code', '?')}: {err.get('message', '')}")
    elif job["status"] == "cancelled":
        _err(f"job {job['id']} was cancelled" + (f": {err['message']}" if err.get("message") else ""))
    return code


def _summary(job: dict[str, Any]) -> str:
    rep = job.get("report") or {}
    ppl = f"; ppl {rep['fp_ppl']:.3f} -> {rep['quant_ppl']:.3f}" if rep.get("fp_ppl") and rep.get("quant_ppl") else ""
    reused = f" (reuses job {job['reused_from']})" if job.get("reused_from") else ""
    return f"job {job['id']} {job['status']}{reused}: {job['method']} {job['scheme']} on {job['model']}{ppl}"


def _wait(c: Client, a: argparse.Namespace, job_id: str) -> dict[str, Any]:
    show = BarProgress() if sys.stderr.isatty() and not a.json else LineProgress()
    try:
        return c.wait(job_id, timeout=a.timeout, on_event=show)
    finally:
        show.close()


def _download(c: Client, job: dict[str, Any], dest: Path) -> None:
    total = sum(x["bytes"] for x in job["artifacts"])
    _info(f"downloading {len(job['artifacts'])} files ({total / 1e6:.1f} MB) to {dest}")
    c.download(job["id"], dest, job=job)
    _info(f"downloaded {len(job['artifacts'])} files to {dest}; every sha256 matches the API and SHA256SUMS")


def _finish(c: Client, a: argparse.Namespace, job: dict[str, Any], dest: Path | None) -> int:
    """A finished job: download when asked and it succeeded; print the result; the exit code."""
    code = _outcome(job)
    if code == EXIT_OK:
        _info(_summary(job))
        if dest is not None:
            try:
                _download(c, job, dest)
            except ChecksumMismatch:
                if a.json:
                    _emit_json(job)
                raise
    if a.json:
        _emit_json(job)
    return code


def _data_ref(c: Client, dataset: str | None, text: Path | None) -> dict[str, str] | None:
    if dataset:
        return {"dataset": dataset}
    if text is None:
        return None
    if not text.is_file():
        raise ClientError(f"{text}: no such file")
    up = c.upload_text(text)
    _info(f"uploaded {text} ({up['bytes'] / 1e6:.2f} MB, sha256 {up['sha256'][:12]}) as text {up['id']}")
    return {"text_id": up["id"]}


def cmd_submit(c: Client, a: argparse.Namespace) -> int:
    settings = {field: getattr(a, field) for _, field, _ in SETTING_FLAGS if getattr(a, field) is not None}
    settings.update(_parse_set(a.set))
    calib = _data_ref(c, a.calib_dataset, a.calib_text)
    evals = _data_ref(c, a.eval_dataset, a.eval_text)
    acc = c.submit(a.model, method=a.method, settings=settings, calib=calib, eval=evals,
                   formats=FORMATS[a.format] if a.format else None, force=a.force, revision=a.revision,
                   idempotency_key=a.idempotency_key or os.environ.get("SPINQUANT_IDEMPOTENCY_KEY") or None)
    note = (" (Idempotency-Key matched: the job submitted earlier)" if acc.get("idempotent_replay") else
            f" (cache hit: reuses finished job {acc['reused_from']})" if acc.get("cache_hit") else "")
    _info(f"job {acc['id']} {acc['status']}{note}")
    if not a.json:
        print(acc["id"], flush=True)
    return _follow(c, a, acc["id"], a.download, wait=a.wait or a.download is not None or a.timeout is not None)


def _follow(c: Client, a: argparse.Namespace, job_id: str, dest: Path | None, wait: bool) -> int:
    if not wait:
        job = c.status(job_id)
        if a.json:
            _emit_json(job)
        return EXIT_OK
    try:
        job = _wait(c, a, job_id)
    except WaitTimeout as exc:
        if a.json and exc.job:
            _emit_json(exc.job)
        raise WaitTimeout(f"{exc}; it keeps running (spinquant cancel {job_id} stops it)", exc.job) from None
    return _finish(c, a, job, dest)


def cmd_wait(c: Client, a: argparse.Namespace) -> int:
    return _follow(c, a, a.id, None, wait=True)


def cmd_status(c: Client, a: argparse.Namespace) -> int:
    j = c.status(a.id)
    if a.json:
        _emit_json(j)
        return EXIT_OK
    rows = [("id", j["id"]), ("status", j["status"]), ("stage", j["stage"]), ("progress", f"{100 * j['progress']:.0f}%"),
            ("eta", _fmt_eta(j["eta_s"]) if j["status"] in ("queued", "running") else None),
            ("step", j["step"]), ("loss", f"{j['loss']:.4g}" if j["loss"] is not None else None),
            ("model", j["model"] + (f"@{j['revision']}" if j["revision"] else "")),
            ("method", f"{j['method']} ({j['scheme']})"), ("formats", ",".join(j["formats"])),
            ("created", j["created_at"]), ("finished", j["finished_at"]), ("reused_from", j["reused_from"])]
    rep = j.get("report") or {}
    rows += [(k, f"{rep[k]:.4f}") for k in ("fp_ppl", "quant_ppl") if isinstance(rep.get(k), (int, float))]
    rows += [
             ("error", f"{j['error']['code']}: {j['error']['message']}" if j.get("error") else None),
             ("artifacts", f"{len(j['artifacts'])} files, {sum(x['bytes'] for x in j['artifacts']) / 1e6:.1f} MB"
              if j["artifacts"] else None)]
    for k, v in rows:
        if v is not None:
            print(f"{k:12} {v}")
    return EXIT_OK


def cmd_list(c: Client, a: argparse.Namespace) -> int:
    jobs = c.list(status=a.status, limit=a.limit)
    if a.json:
        _emit_json(jobs)
        return EXIT_OK
    print(f"{'ID':32}  {'STATUS':9}  {'STAGE':11}  {'PROG':>4}  {'QUANT_PPL':>9}  {'CREATED':19}  MODEL / METHOD")
    for j in jobs:
        ppl = f"{j['quant_ppl']:.3f}" if j.get("quant_ppl") else "-"
        print(f"{j['id']:32}  {j['status']:9}  {j['stage'] or '-':11}  {100 * j['progress']:3.0f}%  {ppl:>9}  "
              f"{str(j['created_at'])[:19]:19}  {j['model']} / {j['method']} {j['scheme']}")
    return EXIT_OK


def cmd_cancel(c: Client, a: argparse.Namespace) -> int:
    j = c.cancel(a.id)
    if a.json:
        _emit_json(j)
    elif j["status"] == "cancelled":
        _info(f"job {j['id']} cancelled")
    elif j["status"] in ("succeeded", "failed"):
        _info(f"job {j['id']} already {j['status']}; nothing to cancel")
    else:
        _info(f"job {j['id']} cancel requested (status {j['status']}): it stops at its next step, layer or window")
    return EXIT_OK


def cmd_download(c: Client, a: argparse.Namespace) -> int:
    job = _wait(c, a, a.id) if a.wait else c.status(a.id)
    if job["status"] in ("queued", "running"):
        raise ClientError(f"job {a.id} is {job['status']}: nothing to download yet (add --wait)")
    return _finish(c, a, job, a.dir)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"API base URL (env SPINQUANT_URL; default {DEFAULT_URL})")
    common.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (env SPINQUANT_TOKEN)")
    common.add_argument("--retries", type=int, default=argparse.SUPPRESS, metavar="N",
                        help="retries after the first try on connection errors and 5xx, 0.5 s doubling (default 4)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON on stdout (the job, or the list) for scripts")
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="spinquant", parents=[common], formatter_class=fmt,
                                description="Client for the SpinQuant quantization service.",
                                epilog=EXIT_CODES + "\n\n" + EXAMPLES)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{submit,status,list,cancel,download,wait}")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_, description=help_, epilog=EXIT_CODES, formatter_class=fmt)

    s = add("submit", "submit a quantization job; --wait follows it, --download DIR fetches and verifies its files")
    s.add_argument("model", help="Hugging Face id (org/name) or local:<name> on the server")
    s.add_argument("--method", default="spinquant", help="spinquant, spinquant-vllm, quarot, gptq, rtn (default spinquant)")
    s.add_argument("--revision", help="branch, tag or commit of a hub model")
    for flag, field, typ in SETTING_FLAGS:
        s.add_argument(flag, dest=field, type=typ, metavar="X" if typ is float else "N", help=f"config {field}")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, flat or dotted (weights.gptq.damp=0.02); VALUE is JSON when it parses, "
                        "else a string; repeatable; wins over the flags above")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--calib-dataset", metavar="NAME", help="datasets name for calibration, e.g. wikitext2")
    g.add_argument("--calib-text", type=Path, metavar="FILE", help="plain-text file, uploaded first (POST /v1/texts)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--eval-dataset", metavar="NAME", help="datasets name for evaluation")
    g.add_argument("--eval-text", type=Path, metavar="FILE", help="plain-text file for evaluation, uploaded first")
    s.add_argument("--format", choices=sorted(FORMATS), help="ct (compressed-tensors, default), gptq (W4A16 only), both")
    s.add_argument("--force", action="store_true", help="rebuild even when an identical finished job exists")
    s.add_argument("--idempotency-key", metavar="KEY", help="same key, same request -> the same job, never a second "
                   "(env SPINQUANT_IDEMPOTENCY_KEY; e.g. \"$GITHUB_SHA-w4a4\"); default: a fresh key per run")
    s.add_argument("--wait", action="store_true", help="follow the job's progress until it ends")
    s.add_argument("--timeout", type=float, metavar="SECONDS", help="give up waiting after this long (exit 5; implies --wait)")
    s.add_argument("--download", type=Path, metavar="DIR", help="after success, download and verify every file (implies --wait)")
    s.set_defaults(fn=cmd_submit)

    s = add("status", "show one job")
    s.add_argument("id")
    s.set_defaults(fn=cmd_status)
    s = add("list", "list your jobs, newest first")
    s.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    s.add_argument("--limit", type=int, default=50)
    s.set_defaults(fn=cmd_list)
    s = add("cancel", "cancel a job (queued: at once; running: at its next step, layer or window)")
    s.add_argument("id")
    s.set_defaults(fn=cmd_cancel)
    s = add("download", "download and verify every file of a finished job")
    s.add_argument("id")
    s.add_argument("dir", type=Path)
    s.add_argument("--wait", action="store_true", help="wait for the job to finish first")
    s.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long (exit 5)")
    s.set_defaults(fn=cmd_download)
    s = add("wait", "follow a job until it ends; exit code by its outcome")
    s.add_argument("id")
    s.add_argument("--timeout", type=float, metavar="SECONDS", help="give up waiting after this long (exit 5)")
    s.set_defaults(fn=cmd_wait)
    return p


def main(argv: list[str] | None = None, *, client_factory: Callable[[argparse.Namespace], Client] = _make_client) -> int:
    a = build_parser().parse_args(argv)
    a.json = getattr(a, "json", False)
    try:
        with client_factory(a) as c:
            return a.fn(c, a)
    except RequestRefused as exc:
        _err(f"{exc.where} refused (HTTP {exc.status}):" if len(exc.lines) > 1 else
             f"{exc.where} refused (HTTP {exc.status}): {exc.lines[0]}")
        for line in exc.lines if len(exc.lines) > 1 else []:
            _err(f"  {line}")
        return exc.exit_code
    except ChecksumMismatch as exc:
        _err("checksum mismatch:")
        for line in exc.problems:
            _err(f"  {line}")
        return exc.exit_code
    except ClientError as exc:
        _err(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _err("interrupted (a submitted job keeps running; spinquant cancel ID stops it)")
        return 130


if __name__ == "__main__":
    sys.exit(main())

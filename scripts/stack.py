"""Start the whole service locally: a Redis server, the API (uvicorn) and one Celery worker.

Used by ``make serve``, ``make demo`` and the integration tests, so all three run the same real parts.

    python -m scripts.stack --dir runs/service --port 8000     # runs until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# SIGTERM stops a worker as a deploy should (QUEUE.md): a cold shutdown after the soft-shutdown wait, the running
# job handed back to the queue. Without it Celery's warm shutdown waits for the job however long it runs, and the
# orchestrator's SIGKILL then strands its message in the broker. Read by billiard as it is imported: an
# environment variable of the worker process, set here and in docker/worker.Dockerfile.
WORKER_ENV = {"REMAP_SIGTERM": "SIGQUIT"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: object, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``check()`` until it is true; a dead ``proc`` or the deadline fails at once with the tail of ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode}:\n{tail}")
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s\n{tail}")


class Stack:
    """Redis + API + worker as child processes, state under ``root``; ``stop()`` ends them all."""

    def __init__(self, root: Path, *, port: int | None = None, models_dir: Path | None = None,
                 database_url: str | None = None, extra_env: dict[str, str] | None = None,
                 worker: bool = True, redis_url: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.redis_port = free_port()
        self.models_dir = Path(models_dir or ROOT / "tests" / "fixtures" / "models").resolve()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = redis_url or f"redis://127.0.0.1:{self.redis_port}/0"
        self.database_url = database_url or f"sqlite:///{self.root / 'spinquant.db'}"
        self.with_worker = worker
        self.own_redis = redis_url is None
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ)
        self.env.update({
            "SPINQUANT_DATABASE_URL": self.database_url,
            "SPINQUANT_REDIS_URL": self.redis_url,
            "SPINQUANT_ARTIFACT_ROOT": str(self.root / "artifacts"),
            "SPINQUANT_MODELS_DIR": str(self.models_dir),
            "SPINQUANT_HUB_CHECK": "false",
            "PYTHONPATH": str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": self.env.get("HF_HUB_OFFLINE", "1"),
            # OpenMP threads sleep instead of spinning when they wait: on a small shared CPU a spinning
            # worker slows every other process (and itself) several-fold.
            "OMP_WAIT_POLICY": self.env.get("OMP_WAIT_POLICY", "PASSIVE"),
        })
        self.env.update(extra_env or {})

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps writing to it)
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; run `make setup` (installs the Debian package) "
                               "or point SPINQUANT_REDIS_URL at a running Redis")
        (self.root / "redis").mkdir(parents=True, exist_ok=True)
        proc = self._spawn("redis", [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                     "--dir", str(self.root / "redis"), "--save", "", "--appendonly", "yes",
                                     "--maxmemory-policy", "noeviction", "--protected-mode", "no"])
        import redis

        client = redis.Redis.from_url(self.redis_url)
        wait_until(client.ping, "redis-server", 20, proc, self.root / "redis.log")

    def start_api(self) -> None:
        py = sys.executable
        subprocess.run([py, "-m", "api", "db", "upgrade"], cwd=ROOT, env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        proc = self._spawn("api", [py, "-m", "api", "serve", "--host", "127.0.0.1", "--port", str(self.port)])

        def ready() -> bool:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                return r.status == 200

        wait_until(ready, "API", 60, proc, self.root / "api.log")

    def start_worker(self, name: str = "gpu0") -> subprocess.Popen:
        py = sys.executable
        proc = self._spawn(f"worker-{name}", [
            py, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "-c", "1", "-n", f"{name}@%h",
            "--prefetch-multiplier=1", "--max-tasks-per-child=1", "--pool=prefork", "--loglevel=INFO",
            f"--statedb={self.root / (name + '.state')}"], env=WORKER_ENV)
        wait_until(lambda: "ready." in (self.root / f"worker-{name}.log").read_text(), "celery worker", 90, proc,
              self.root / f"worker-{name}.log")
        return proc

    def start(self) -> Stack:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            if self.own_redis:
                self.start_redis()
            self.start_api()
            if self.with_worker:
                self.start_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def token(self, name: str = "demo", admin: bool = False, read_only: bool = False) -> str:
        cmd = [sys.executable, "-m", "api", "tokens", "create", "--name", name, "--json"] + (["--admin"] if admin else [])
        cmd += ["--read-only"] if read_only else []
        out = subprocess.run(cmd, cwd=ROOT, env=self.env, check=True, capture_output=True, text=True).stdout
        return json.loads(out)["token"]

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: n == "redis"):  # redis last
            proc = self.procs[name]
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    p = argparse.ArgumentParser(description="Run Redis, the API and one worker locally until Ctrl-C")
    p.add_argument("--dir", type=Path, default=ROOT / "runs" / "service")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models-dir", type=Path, default=None)
    a = p.parse_args()
    # SIGTERM (systemd, docker stop, a CI timeout) ends the stack as Ctrl-C does, at any point: an exception
    # here unwinds through Stack.start's and main's cleanup, where the default action would kill this process
    # alone and leave its children running. (Blocking the signals for sigwait instead would hand the blocked
    # mask to every child, which could then not be stopped by SIGTERM.)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    stack = Stack(a.dir, port=a.port, models_dir=a.models_dir)
    try:
        stack.start()
        token = stack.token("local")
        print(f"API on {stack.url} (docs at {stack.url}/docs); logs in {stack.root}")
        print(f"token: {token}")
        print("Ctrl-C (or SIGTERM) stops Redis, the API and the worker.", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())

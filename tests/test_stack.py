"""`make serve` (python -m scripts.stack) under the signals that stop it: SIGTERM (systemd, docker stop, a CI
timeout) and Ctrl-C end Redis, the API and the worker with it, at any moment, and leave no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.stack import free_port
from tests.conftest import ROOT


def _stack_processes(root: Path, exclude: int) -> set[int]:
    """Every live process of the stack under ``root``: its path is in the command line (redis-server's --dir) or
    in the environment (the API and the worker get SPINQUANT_ARTIFACT_ROOT under it); children orphaned by a
    dead parent count too, which a parent-pid scan would miss."""
    mark = str(root).encode()
    found = set()
    for d in Path("/proc").glob("[0-9]*"):
        pid = int(d.name)
        if pid in (exclude, os.getpid()):
            continue
        try:
            if (mark in (d / "cmdline").read_bytes() or mark in (d / "environ").read_bytes()) and _alive(pid):
                found.add(pid)
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scripts.stack", "--dir", str(tmp_path / "stack"), "--port",
                             str(free_port())], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_stops_the_whole_stack(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _start(tmp_path)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # up: redis, API and worker started, a token printed
        lines.append(line)
        if line.startswith("Ctrl-C"):
            break
    assert any(line.startswith("token: ") for line in lines), "".join(lines)
    root = tmp_path / "stack"
    assert len(_stack_processes(root, proc.pid)) >= 3  # redis-server, uvicorn, the Celery worker and its child
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    assert rc == (0 if sig == signal.SIGINT else 128 + signal.SIGTERM)
    assert _settled(root, proc.pid) == set(), "left running after the stack stopped"


def test_sigterm_while_starting_leaves_nothing_running(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    root = tmp_path / "stack"
    deadline = time.monotonic() + 60
    while not _stack_processes(root, proc.pid) and time.monotonic() < deadline:  # redis is up, the rest coming
        time.sleep(0.05)
    assert _stack_processes(root, proc.pid), "the stack started no child"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert _settled(root, proc.pid) == set(), "left running after a SIGTERM during start"


def _settled(root: Path, exclude: int, timeout: float = 10.0) -> set[int]:
    """The stack's processes still alive once they have had ``timeout`` seconds to go."""
    deadline = time.monotonic() + timeout
    while (left := _stack_processes(root, exclude)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left

"""``pip install ./client`` into an empty venv gives a working ``spinquant`` with no torch and nothing of the
server: the CI runner's install, then ``--help`` and a real job submitted, followed and downloaded with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.stack import Stack
from tests.conftest import ROOT, TEST_TEXT, TRAIN_TEXT

# What the client may bring: itself, its two dependencies and theirs (httpx: anyio, certifi, httpcore, h11, idna).
# (The empty venv's own pip and setuptools are there before the install.)
ALLOWED = {"spinquant-client", "httpx", "tqdm", "anyio", "certifi", "httpcore", "h11", "idna", "sniffio",
           "typing-extensions", "exceptiongroup", "pip", "setuptools"}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client-venv")
    src = root / "src"
    shutil.copytree(ROOT / "client", src, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return venv


def _clean_env(**extra: str) -> dict[str, str]:
    # nothing of the dev environment leaks in: no PYTHONPATH, no SPINQUANT_* but what the test sets
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINQUANT_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def test_the_client_installs_alone(client_venv: Path) -> None:
    listed = subprocess.run([str(client_venv / "bin" / "pip"), "list", "--format", "json", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=120, check=True)
    names = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    assert "spinquant-client" in names and {"httpx", "tqdm"} <= names
    assert names <= ALLOWED, names - ALLOWED
    probe = ("import sys, spinquant_client, spinquant_client.cli; print(sorted(m for m in ('torch', 'fastapi', "
             "'sqlalchemy', 'redis', 'celery', 'quant_core', 'service', 'api') if m in sys.modules))")
    out = subprocess.run([str(client_venv / "bin" / "python"), "-c", probe], cwd="/", env=_clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    help_ = subprocess.run([str(client_venv / "bin" / "spinquant"), "--help"], cwd="/", env=_clean_env(),
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "submit" in help_.stdout and "exit codes" in help_.stdout


def test_the_installed_client_runs_a_real_job(client_venv: Path, stack: Stack, tmp_path: Path) -> None:
    env = _clean_env(SPINQUANT_URL=stack.url, SPINQUANT_TOKEN=stack.token("installed-client"))
    out = tmp_path / "ckpt"
    r = subprocess.run([str(client_venv / "bin" / "spinquant"), "submit", "local:llama-tiny", "--method", "rtn",
                        "--w-bits", "4", "--seq-len", "128", "--set", "eval_windows=4", "--seed", "404",
                        "--calib-text", str(TRAIN_TEXT), "--eval-text", str(TEST_TEXT), "--download", str(out), "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded" and job["report"]["scheme"].startswith("W4A16")
    assert (out / "SHA256SUMS").is_file() and (out / "model" / "model.safetensors").is_file()
    assert "every sha256 matches" in r.stderr

"""Import boundaries: the API never loads torch; importing the worker app or quant_core never touches CUDA."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("module", ["api.main", "api.crud", "api.__main__", "scripts.stack"])
def test_api_does_not_import_torch(module: str) -> None:
    assert _run(f"import sys, {module}; print('torch' in sys.modules)") == "False"


def test_api_app_builds_without_torch_and_serves_the_documented_endpoints() -> None:
    code = ("import sys, json; from api.main import create_app; from service.settings import ApiSettings; "
            "app = create_app(ApiSettings(database_url='sqlite:///:memory:')); "
            "print(json.dumps([sorted([m.upper(), p] for p, ops in app.openapi()['paths'].items() for m in ops), "
            "'torch' in sys.modules]))")
    routes, torch_loaded = json.loads(_run(code))
    assert not torch_loaded
    # the README's endpoint table (the API contract), with path parameters written as {}
    documented = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"^\| `(GET|POST|DELETE) ", line)
        if m:  # the first cell: `GET /a`, `/b` ... (one method, several paths)
            for path in re.findall(r"`(?:[A-Z]+ )?(/[^`? ]*)", line.split("|")[1]):
                documented.add((m.group(1), re.sub(r"\{[^}]+\}", "{}", path)))
    assert {(meth, re.sub(r"\{[^}]+\}", "{}", path)) for meth, path in routes} == documented


def test_worker_app_import_leaves_torch_and_cuda_alone() -> None:
    # Celery forks a child per job; torch (and so CUDA) must first be imported inside the task.
    assert _run("import sys, worker.celery_app, worker.tasks; print('torch' in sys.modules)") == "False"


def test_quant_core_import_does_not_initialise_cuda() -> None:
    code = ("import torch, quant_core, quant_core.pipeline, quant_core.export, quant_core.runtime; "
            "print(torch.cuda.is_initialized())")
    assert _run(code) == "False"


def test_worker_with_a_bad_setting_exits_with_one_message_at_start_not_at_import() -> None:
    import os

    for bad, words in (({"SPINQUANT_STORE": "s3"}, "SPINQUANT_S3_BUCKET"),  # s3 without a bucket
                       ({"SPINQUANT_LOCK_TTL": "60"}, "did you mean SPINQUANT_LOCK_TTL_S?")):  # misspelt
        env = dict(os.environ, **bad)
        imported = subprocess.run([sys.executable, "-c", "import worker.celery_app, worker.tasks"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
        assert imported.returncode == 0, imported.stderr  # importing reads no settings
        # what `celery -A worker.celery_app worker` does first: read the app's configuration
        started = subprocess.run([sys.executable, "-c", "from worker.celery_app import app; app.conf.broker_url"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 1 and started.stderr.startswith("error: bad SPINQUANT_* setting"), started.stderr
        assert "Traceback" not in started.stderr and words in started.stderr

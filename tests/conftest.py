"""Shared fixtures: the committed trained models and texts, tiny random models of every family, and the real
service (``stack``: redis-server + API over HTTP + a Celery worker; ``api`` clients per token; ``s3_server``), and
``db_url``: an empty job store on each supported database (SQLite; PostgreSQL when the CI server is up)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from sqlalchemy import create_engine, make_url, text

if TYPE_CHECKING:
    from scripts.stack import Stack
    from tests.stack_helpers import Api

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = FIXTURES / "models"
TRAIN_TEXT = FIXTURES / "text" / "train.txt"
TEST_TEXT = FIXTURES / "text" / "test.txt"


def _cpu_has_fast_bf16() -> bool:
    """bfloat16 matmuls are fast on CPUs with AVX512-BF16 or AMX; with AVX2 alone PyTorch runs them about 60x
    slower than float32 (a (2048, 576) @ (576, 1536): 4.4 s against 69 ms on a 2-core EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


# The real-model tests run what a GPU job runs (bfloat16) where the CPU multiplies it natively, float32 elsewhere.
REAL_MODEL_DTYPE = "bfloat16" if _cpu_has_fast_bf16() else "float32"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip on a machine without a CUDA device, ``cpu_only`` ones on a machine with one."""
    gpu = torch.cuda.is_available()
    marker, skip = ("cpu_only", pytest.mark.skip(reason="checks a machine without CUDA (marked cpu_only)")) if gpu else \
        ("cuda", pytest.mark.skip(reason="needs a CUDA device (marked cuda)"))
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


_UNEXPECTED_SKIPS: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Under CI=true the only expected skips are the cuda/cpu_only-marked tests (CI has no GPU): any other skip means
    # a part of the suite did not run (a missing tool, an unset variable), and the run fails below.
    if report.skipped and os.environ.get("CI") == "true" and not {"cuda", "cpu_only"} & set(report.keywords):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _UNEXPECTED_SKIPS:
        print("\nCI=true: these tests were skipped, which CI does not accept (only tests marked cuda or cpu_only may skip):")
        for line in _UNEXPECTED_SKIPS:
            print(f"  {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """build(case) -> folder of a seeded random-init HF model (cached per session)."""
    from tests.fixtures.tiny_random import build_tiny

    base = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def build(case: str) -> Path:
        if case not in cache:
            cache[case] = build_tiny(case, base / case)
        return cache[case]

    return build


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """The real service: a redis-server, the API over HTTP and one Celery worker process (one per session)."""
    from scripts.stack import Stack

    st = Stack(tmp_path_factory.mktemp("stack"), extra_env={"SPINQUANT_LOCK_TTL_S": "10"}).start()
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture
def api(stack: Stack) -> Api:
    """A client with a fresh non-admin token (its own owner)."""
    from tests.stack_helpers import Api

    return Api(stack, stack.token("test"))


@pytest.fixture
def other_api(stack: Stack) -> Api:
    from tests.stack_helpers import Api

    return Api(stack, stack.token("other"))


@pytest.fixture
def admin_api(stack: Stack) -> Api:
    from tests.stack_helpers import Api

    return Api(stack, stack.token("admin", admin=True))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """moto's standalone S3-compatible server as a real subprocess on a free port, with one bucket."""
    import os
    import signal
    import subprocess

    from tests.stack_helpers import start_moto

    proc, server = start_moto(tmp_path_factory.mktemp("s3"), "spinquant-test")
    try:
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


PG_ENV = "SPINQUANT_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty database: a fresh SQLite file, or a fresh schema on the PostgreSQL test server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (CI sets it with: eval \"$(scripts/ci_postgres.sh)\")")
    schema = f"sqtest_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

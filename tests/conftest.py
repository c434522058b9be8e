"""Shared fixtures: the committed trained models and texts, and tiny random models of every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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

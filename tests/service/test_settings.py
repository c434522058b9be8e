"""Settings fail fast: a SPINQUANT_* variable that nothing reads is an error naming it and the closest valid name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import OTHER_VARIABLES, ApiSettings, UnknownSetting, WorkerSettings, check_environment

ROOT = Path(__file__).resolve().parents[2]
SERVER_NAMES = {f"SPINQUANT_{f.upper()}" for f in (*ApiSettings.model_fields, *WorkerSettings.model_fields)}


def test_readme_documents_exactly_the_server_settings() -> None:
    # The README's two configuration tables are what an operator reads: every setting, and nothing else.
    text = (ROOT / "README.md").read_text()
    documented = {name for line in text.splitlines() if line.startswith("| `SPINQUANT_")
                  for name in re.findall(r"`(SPINQUANT_[A-Z0-9_]+)`", line.split("|")[1])}
    assert documented == SERVER_NAMES
    assert not SERVER_NAMES & OTHER_VARIABLES


@pytest.mark.parametrize(("name", "closest"), [
    ("SPINQUANT_MAX_JOBS_LISTD", "SPINQUANT_MAX_JOBS_LISTED"),
    ("spinquant_redis_ulr", "SPINQUANT_REDIS_URL"),  # case-insensitive, as pydantic-settings reads them
    ("SPINQUANT_ZZZ", None),
])
def test_unknown_variable_is_named_with_the_closest_valid_one(name: str, closest: str | None) -> None:
    with pytest.raises(UnknownSetting) as err:
        check_environment({"SPINQUANT_REDIS_URL": "redis://x", name: "5", "OTHER_TOOL_X": "1"})
    assert err.value.field == name.upper() and err.value.closest == closest
    assert name.upper() in str(err.value)


def test_every_valid_name_passes() -> None:
    env = dict.fromkeys(SERVER_NAMES, "1")
    check_environment({**env, **dict.fromkeys(OTHER_VARIABLES, "1"), "PATH": "/bin"})


def test_api_cli_refuses_a_misspelt_variable_with_exit_2() -> None:
    env = dict(os.environ, SPINQUANT_MAX_JOBS_LISTD="5")
    out = subprocess.run([sys.executable, "-m", "api", "store", "check"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: unknown setting SPINQUANT_MAX_JOBS_LISTD; did you mean SPINQUANT_MAX_JOBS_LISTED?")
    assert "Traceback" not in out.stderr


def test_settings_refuse_unknown_keys_and_bad_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="database_url"):
        ApiSettings(database_url="mysql://x")
    with pytest.raises(ValidationError):
        ApiSettings(max_body_bytes=10)
    with pytest.raises(ValidationError):
        ApiSettings(no_such_key=1)  # type: ignore[call-arg]

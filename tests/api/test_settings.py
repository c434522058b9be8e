"""Settings fail fast: a SPINQUANT_* variable that nothing reads is an error naming it and the closest valid name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.settings import Settings
from api.settings_shared import OTHER_VARIABLES, PROCESS_SETTINGS, SharedSettings, UnknownSetting, check_environment
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


def test_process_settings_list_is_the_two_classes_fields() -> None:
    shared = set(SharedSettings.model_fields)
    assert set(PROCESS_SETTINGS) == (set(Settings.model_fields) | set(WorkerSettings.model_fields)) - shared
    assert not {f"SPINQUANT_{f.upper()}" for f in PROCESS_SETTINGS | shared} & OTHER_VARIABLES


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
    env = {f"SPINQUANT_{f.upper()}": "1" for f in (*SharedSettings.model_fields, *PROCESS_SETTINGS)}
    check_environment({**env, **dict.fromkeys(OTHER_VARIABLES, "1"), "PATH": "/bin"})


def test_api_cli_refuses_a_misspelt_variable_with_exit_2() -> None:
    env = dict(os.environ, SPINQUANT_MAX_JOBS_LISTD="5")
    out = subprocess.run([sys.executable, "-m", "api", "store", "check"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: unknown setting SPINQUANT_MAX_JOBS_LISTD; did you mean SPINQUANT_MAX_JOBS_LISTED?")
    assert "Traceback" not in out.stderr

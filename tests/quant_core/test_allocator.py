"""Huge-page CPU tensors (quant_core.allocator): the CLI and the worker ask torch for them before it loads,
an explicit setting wins, and torch really backs large tensors by huge pages then (Linux with THP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quant_core.allocator import HUGE_PAGES_ENV, prefer_huge_pages
from tests.conftest import ROOT

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_an_explicit_setting_wins_and_late_calls_say_so() -> None:
    env: dict[str, str] = {}
    assert prefer_huge_pages(env) is False  # torch is imported in this process: too late, and it says so
    assert env == {HUGE_PAGES_ENV: "1"}
    off = {HUGE_PAGES_ENV: "0"}
    assert prefer_huge_pages(off) is False and off == {HUGE_PAGES_ENV: "0"}


def test_the_cli_sets_it_before_torch_loads() -> None:
    code = ("import os, runpy, sys\nsys.argv = ['quant_core', '--help']\n"
            "try:\n    runpy.run_module('quant_core', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print(os.environ.get('{HUGE_PAGES_ENV}'))")
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"


def _huge_kib(setting: str | None) -> tuple[bool, int]:
    """In a fresh process: prefer_huge_pages() under ``setting``, then a 128 MiB tensor; (returned, AnonHugePages)."""
    code = ("from quant_core.allocator import prefer_huge_pages\non = prefer_huge_pages()\nimport re, torch\n"
            "t = torch.ones(1 << 25)\n"
            "kib = re.search(r'AnonHugePages:\\s+(\\d+)', open('/proc/self/smaps_rollup').read()).group(1)\n"
            "print(on, kib)")
    env = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    if setting is not None:
        env[HUGE_PAGES_ENV] = setting
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    on, kib = out.stdout.split()
    return on == "True", int(kib)


@pytest.mark.skipif(not THP_MODE.exists() or "[never]" in THP_MODE.read_text(), reason="no transparent huge pages")
def test_torch_backs_large_tensors_by_huge_pages_only_when_asked() -> None:
    on, kib = _huge_kib(None)
    assert on and kib >= 64 * 1024, kib  # most of the 128 MiB tensor
    if "[always]" not in THP_MODE.read_text():  # under "always" the kernel gives them to everyone
        off, kib_off = _huge_kib("0")
        assert not off and kib_off < 8 * 1024, kib_off

"""The two callables the pipeline takes from its caller: progress and cancellation.

quant_core never prints progress and never reads Redis: the CLI turns these calls into a
progress bar, the worker into Redis/DB updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class ProgressFn(Protocol):
    def __call__(self, stage: str, fraction: float, info: dict[str, Any]) -> None: ...


CancelFn = Callable[[], bool]

# Stages in the order the pipeline reports them.
STAGES = ("load", "evaluate_fp", "prepare", "learn", "quantize", "evaluate", "export")


class Cancelled(RuntimeError):
    """Raised at the first check after should_cancel() returned True."""


def no_progress(stage: str, fraction: float, info: dict[str, Any]) -> None:
    return None


def never_cancel() -> bool:
    return False


def check_cancel(should_cancel: CancelFn, where: str) -> None:
    if should_cancel():
        raise Cancelled(f"cancelled during {where}")

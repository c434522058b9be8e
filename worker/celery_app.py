"""The Celery app of the GPU workers. Torch-free at import: quant_core is imported inside the task.

Run one per GPU (QUEUE.md §3):
    CUDA_VISIBLE_DEVICES=0 celery -A worker.celery_app worker -Q gpu -c 1 -n gpu0@%h \
        --prefetch-multiplier=1 --max-tasks-per-child=1 --statedb=/var/lib/spinquant/gpu0.state
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from pydantic import ValidationError

from service.queue import celery_config
from service.settings import UnknownSetting, worker_settings

app = Celery("spinquant-worker", include=["worker.tasks"])


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    """Settings are read when Celery first needs its configuration (worker start), not when this module is
    imported: importing it (tests, tooling) never exits the process."""
    try:
        settings = worker_settings()
    except (ValidationError, UnknownSetting) as exc:  # one clear message at startup, no traceback
        sys.exit(f"error: bad SPINQUANT_* setting for the worker: {exc}")
    sender.conf.update(celery_config(settings.redis_url, settings.shutdown_timeout_s))

"""The Celery app of the GPU workers. Torch-free at import: quant_core is imported inside the task.

Run one per GPU (QUEUE.md §3):
    CUDA_VISIBLE_DEVICES=0 celery -A worker.celery_app worker -Q gpu -c 1 -n gpu0@%h \
        --prefetch-multiplier=1 --max-tasks-per-child=1 --statedb=/var/lib/spinquant/gpu0.state
"""

from __future__ import annotations

import sys

from celery import Celery
from pydantic import ValidationError

from api.queue import celery_config

from .settings import get_settings

try:
    _settings = get_settings()
except ValidationError as exc:  # a bad SPINQUANT_* variable: one clear message at startup, no traceback
    sys.exit(f"error: bad SPINQUANT_* setting for the worker: {exc}")

app = Celery("spinquant-worker", include=["worker.tasks"])
app.conf.update(celery_config(_settings.redis_url))

"""The Celery settings shared by the API (which only sends) and the workers (QUEUE.md §8).

One module for both, because when several apps share a broker the shortest visibility timeout wins
(celery#7651): a value set in only one place silently keeps the 1-hour default and a long job would
be delivered twice. The API enqueues ``worker.quantize`` by name and never imports ``worker/``.
"""

from __future__ import annotations

from typing import Any

QUANTIZE_TASK = "worker.quantize"  # the task name is the contract between api/ and worker/
GPU_QUEUE = "gpu"

MIN_SOFT_LIMIT_S = 1800  # half an hour even for a tiny model (hub download, evaluation)
MAX_HARD_LIMIT_S = 48 * 3600  # the longest job we accept
LIMIT_MARGIN_S = 300  # hard limit = soft + margin: time to clean up after SoftTimeLimitExceeded
# Redelivery only after this: above every hard limit, plus a margin (QUEUE.md §1).
VISIBILITY_TIMEOUT_S = MAX_HARD_LIMIT_S + 3600


def time_limits(weight_bytes: int | None) -> tuple[int, int]:
    """(soft, hard) seconds for a job on a model with this many bytes of fp16 weights.

    About 4 h per GB of weights on one GPU covers 800 Cayley steps plus GPTQ and two evaluations
    with headroom (the paper's 8B run takes ~1.5 h on A100s); unknown sizes get 12 h.
    """
    if weight_bytes is None:
        soft = 12 * 3600
    else:
        soft = int(MIN_SOFT_LIMIT_S + 4 * 3600 * weight_bytes / 1e9)
    soft = min(max(soft, MIN_SOFT_LIMIT_S), MAX_HARD_LIMIT_S - LIMIT_MARGIN_S)
    return soft, soft + LIMIT_MARGIN_S


def celery_config(broker_url: str, shutdown_timeout_s: float = 60) -> dict[str, Any]:
    """The one Celery configuration (QUEUE.md §8); ``shutdown_timeout_s`` is the workers' soft-shutdown wait."""
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": VISIBILITY_TIMEOUT_S,
        "result_backend": None,  # nothing relies on Celery results; the SQL row is the truth
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,  # with the DB attempt cap in the task
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,  # a fresh child per job: its CUDA context and leaks die with it
        # QUEUE.md's default is True, which stops the running job on any Redis blip (hours of GPU work lost, the job
        # rerun from scratch). Here a job keeps running through the blip: a second delivery of its message can
        # never run it twice (the job lock, re-created by the heartbeat after a Redis restart, and the terminal
        # row; tests/api/test_service_faults.py kills Redis mid-job), and its events wait in the worker meanwhile.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # SIGTERM (a deploy) is a cold shutdown (REMAP_SIGTERM=SIGQUIT, worker/celery_app.py): a running job
        # gets this long to finish, then its child is stopped and the job goes back to the queue.
        "worker_soft_shutdown_timeout": shutdown_timeout_s,
        "worker_hijack_root_logger": False,
        "task_track_started": True,
        "result_extended": True,
        "task_default_queue": GPU_QUEUE,
        "task_routes": {QUANTIZE_TASK: {"queue": GPU_QUEUE}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
    }


def make_sender(broker_url: str) -> Any:
    """A Celery app used only to send tasks by name (no task code is imported)."""
    from celery import Celery

    app = Celery("spinquant-api")
    app.conf.update(celery_config(broker_url))
    return app


def enqueue(sender: Any, job_id: str, soft_limit_s: int, hard_limit_s: int) -> None:
    sender.send_task(QUANTIZE_TASK, kwargs={"job_id": job_id}, task_id=job_id, queue=GPU_QUEUE,
                     soft_time_limit=soft_limit_s, time_limit=hard_limit_s)

"""How a failed job is classified (worker.tasks.classify): a UserError by its own code, the rest by its class."""

from __future__ import annotations

import pytest
import torch
from celery.exceptions import SoftTimeLimitExceeded

from quant_core.errors import CheckpointError, ConfigError, DataError, ExportError, ModelError, UserError
from quant_core.progress import Cancelled
from service.sources import SourceError
from worker.tasks import classify


@pytest.mark.parametrize(("exc", "code"), [
    (ConfigError("train.steps", "train.steps=-1 is not valid", "an integer >= 0"), "bad_config"),
    (ExportError("GPTQ v1 cannot hold this job"), "bad_config"),
    (ModelError("no config.json"), "bad_model"),
    (SourceError("model", "unknown local model 'x'"), "bad_model"),
    (DataError("the text is empty"), "bad_data"),
    (CheckpointError("SHA256SUMS mismatch"), "bad_checkpoint"),
])
def test_user_errors_keep_their_code_and_message(exc: UserError, code: str) -> None:
    assert classify(exc) == (code, str(exc))


def test_config_error_message_carries_what_is_accepted() -> None:
    exc = ConfigError("train.steps", "train.steps=-1 is not valid", "an integer >= 0")
    assert (exc.field, str(exc)) == ("train.steps", "train.steps=-1 is not valid; accepted: an integer >= 0")


def test_other_failures_are_classified_by_class_not_text() -> None:
    assert classify(Cancelled("x"))[0] == "cancelled"
    assert classify(SoftTimeLimitExceeded())[0] == "timeout"
    assert classify(MemoryError())[0] == "out_of_memory"
    assert classify(torch.cuda.OutOfMemoryError("CUDA out of memory"))[0] == "out_of_memory"  # constructible on CPU
    assert classify(RuntimeError("CUDA out of memory"))[0] == "internal"
    assert classify(ValueError("bad model"))[0] == "internal"  # a bare ValueError is a bug, not the user's input
    assert classify(ZeroDivisionError("boom")) == ("internal", "ZeroDivisionError: boom")


def test_a_full_disk_is_disk_full_however_the_writer_reports_it() -> None:
    import errno

    from safetensors import SafetensorError

    assert classify(OSError(errno.ENOSPC, "No space left on device"))[0] == "disk_full"
    assert classify(OSError(errno.EDQUOT, "Disk quota exceeded"))[0] == "disk_full"
    # safetensors' Rust writer carries only the OS message, no errno
    assert classify(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))[0] \
        == "disk_full"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as outer:
        assert classify(outer)[0] == "disk_full"
    assert classify(OSError(errno.EACCES, "Permission denied"))[0] == "internal"
    assert classify(SafetensorError("header too large"))[0] == "internal"

"""Measured peak memory of each pipeline stage, to set beside what ``quant_core.plan`` predicts.

- CUDA: ``torch.cuda.max_memory_allocated``, reset at each stage's start: the bytes of live tensors, which
  is what the plan counts.
- CPU: the process's resident-set high-water mark (``VmHWM``), reset at each stage's start by writing 5 to
  ``/proc/self/clear_refs`` (Linux), after the allocator has returned the pages the previous stage freed. It
  includes the interpreter, torch's own libraries and allocator slack,
  so the report also gives the resident set before the model was loaded (``baseline``): the stage's tensors
  are about ``peak - baseline``. Where the reset is not possible (not Linux), each figure is the running
  peak and says so (``resettable: false``).

Example:
    >>> meter = StageMeter("cpu")
    >>> meter.begin("load"); model = load_model(src); meter.end()   # or: with meter.stage("load"): ...
    >>> meter.report()   # {"unit": "MiB", "kind": "rss", "baseline": ..., "stages": {"load": ...}}
"""

from __future__ import annotations

import ctypes
import re
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20
_LIBC: Any = None  # glibc, loaded on first use by release_free_memory (False where there is none)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes(field: str = "VmRSS") -> int:
    """The process's resident set (VmRSS) or its high-water mark (VmHWM) in bytes; ru_maxrss off Linux."""
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        m = None
    if m is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; the running peak
    return int(m.group(1)) * 1024


def _libc() -> Any:
    """glibc, or False where there is none (musl, macOS): every allocator call here is then a no-op."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (glibc only)
            _LIBC.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``): the heap keeps what a stage freed
    (torch's CPU tensors come from malloc), so without this a later stage's resident set still holds an earlier
    stage's peak. A no-op off glibc."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


# mallopt(3) parameters and the values tune_allocator sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
ALLOCATOR_SETTINGS = {"mmap_threshold": 1 << 20, "trim_threshold": 1 << 20, "arena_max": 2}


def tune_allocator() -> bool:
    """Keep a CPU job's resident set nearer its live tensors (glibc; False, changing nothing, elsewhere). Off by
    default: nothing calls it but ``bench/learn_step.py --tune-allocator``.

    glibc raises its mmap threshold every time a large mmapped block is freed (up to 32 MiB), so after the first
    stage most activation-sized tensors come from the heap, whose freed holes stay resident. A fixed 1 MiB
    threshold serves every larger tensor by mmap, returned to the OS when freed; two arenas bound the small
    allocations' spread. Measured on SmolLM2-135M, float32, quarot W4A4KV4 with 4 calibration and 4 evaluation
    windows: peak resident set 1462 -> 1257 MB, but GPTQ 59 -> 151 s (every fresh mapping is zeroed by the
    kernel), so the default stays glibc's. CUDA memory is not affected."""
    libc = _libc()
    if not libc:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, ALLOCATOR_SETTINGS["mmap_threshold"]),
        (_M_TRIM_THRESHOLD, ALLOCATOR_SETTINGS["trim_threshold"]),
        (_M_ARENA_MAX, ALLOCATOR_SETTINGS["arena_max"])))


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "reset the peak resident set size to the current one" (proc(5))
    except OSError:
        return False
    return True


class StageMeter:
    """Peak memory per stage on one device; stages may repeat (their peaks are merged by max)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.baseline = torch.cuda.memory_allocated() if self.cuda else rss_bytes()
        self.resettable = True
        self.peaks: dict[str, int] = {}

    def begin(self, name: str) -> None:
        """Start measuring stage ``name`` (ends the stage before it, if any)."""
        self.end()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_memory()
            self.resettable = _reset_rss_peak() and self.resettable
        self._current: str | None = name

    def end(self) -> None:
        name = getattr(self, "_current", None)
        if name is None:
            return
        peak = torch.cuda.max_memory_allocated() if self.cuda else rss_bytes("VmHWM")
        self.peaks[name] = max(self.peaks.get(name, 0), peak)
        self._current = None

    def peak_bytes(self) -> int:
        """The job's peak over every stage so far. Each stage's start resets the process's own high-water mark
        (VmHWM, which ru_maxrss reads; CUDA's max_memory_allocated), so after the first reset neither says the
        job's peak any more: this does."""
        self.end()
        return max(self.peaks.values(), default=0)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def report(self) -> dict[str, Any]:
        """{"unit": "MiB", "kind", "baseline", "resettable", "stages": {name: peak}} for the job report."""
        self.end()
        return {"unit": "MiB", "kind": self.kind, "baseline": round(self.baseline / MiB, 1),
                "resettable": self.resettable, "stages": {k: round(v / MiB, 1) for k, v in self.peaks.items()}}


__all__ = ["ALLOCATOR_SETTINGS", "StageMeter", "release_free_memory", "rss_bytes", "tune_allocator"]

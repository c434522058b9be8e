"""CPU allocator setting a quantization process applies before torch is imported (torch-free).

torch reads ``THP_MEM_ALLOC_ENABLE`` once, when its C++ core loads: with it, every CPU tensor of 2 MiB or
more is 2 MiB-aligned and advised to the kernel as transparent huge pages (``madvise(MADV_HUGEPAGE)``), where
the kernel's THP mode is ``madvise`` or ``always``. Measured on SmolLM2-135M (float32, quarot W4A4KV4, 32
calibration windows, with export; ``bench/real.py --sections memory``): the GPTQ stage's resident peak came down
by about 0.2 GB at the same wall time, because freed activation-sized blocks stop leaving 4 KiB-page holes in
the heap. GPU memory is not affected; a GPU job's host copies (offload, the CPU evaluation) are.

The CLI (``python -m quant_core``) and the worker call :func:`prefer_huge_pages` first thing; a library user
sets the variable before importing torch. An explicit value in the environment wins (``0`` turns it off).

Example:
    >>> prefer_huge_pages()   # before `import torch`
    True
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Ask torch for huge-page CPU tensors unless the environment already says; True when it is on and takes
    effect, False when it is turned off or torch was imported before (torch reads the variable once)."""
    environ.setdefault(HUGE_PAGES_ENV, "1")
    return environ[HUGE_PAGES_ENV] not in ("", "0") and "torch" not in sys.modules


__all__ = ["HUGE_PAGES_ENV", "prefer_huge_pages"]

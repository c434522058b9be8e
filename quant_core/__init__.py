"""quant_core: SpinQuant learned rotations + 4-bit quantization, as a library and a CLI.

Importing the package is cheap and torch-free; the heavy modules are imported where they are used. The
modules in ``TORCH_FREE`` import neither torch nor any other heavy dependency: ``service/`` and ``api/`` may
import those and no others (tests/test_layout.py holds every package to its import rules). The public verb is
``quant_core.pipeline.quantize_model(model, config, progress=..., should_cancel=...)``.
"""

TORCH_FREE = ("allocator", "checksums", "config", "errors", "formats", "plan", "progress", "sizes")

__version__ = "0.1.0"

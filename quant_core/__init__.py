"""quant_core: SpinQuant learned rotations + 4-bit quantization, as a library and a CLI.

Importing the package is cheap and torch-free (``api/`` imports ``quant_core.config``); the heavy
modules are imported where they are used. The public verb is
``quant_core.pipeline.quantize_model(model, config, progress=..., should_cancel=...)``.
"""

__version__ = "0.1.0"

"""Which checkpoint formats can hold a job: torch-free, so the API refuses a bad request before queueing it.

``check_formats`` runs at the API edge, in the CLI before any compute, and again in ``export_checkpoint``.
"""

from __future__ import annotations

from typing import Any

from .config import SpinQuantConfig
from .errors import ExportError as ExportError

FORMATS: dict[str, str] = {"ct": "model", "gptq": "gptq"}  # format -> folder in the job




def gptq_refusals(cfg: SpinQuantConfig, online_r4: bool) -> list[str]:
    """Why GPTQ v1 cannot hold this job (CHECKPOINT.md §2); empty when it can."""
    why = []
    if cfg.weights.bits != 4:
        why.append(f"weights.bits={cfg.weights.bits} (GPTQ v1 export writes 4-bit weights only)")
    if not cfg.weights.sym:
        why.append("asymmetric weights (weights.sym=false; the GPTQ export is symmetric only)")
    if cfg.weights.permutes_groups:
        why.append("act_order without static groups (a permuted g_idx; the GPTQ export writes desc_act=false: "
                   "keep weights.gptq.static_groups=true)")
    if online_r4:
        why.append("an online R4 Hadamard on down_proj (GPTQ has nowhere to store it; use rotation.r4=none)")
    if cfg.r3_on:
        why.append("R3 on (an online Hadamard on queries/keys)")
    if cfg.activations.bits < 16:
        why.append(f"activation bits {cfg.activations.bits} < 16 (GPTQ is weight-only, W4A16)")
    if cfg.kv.bits < 16:
        why.append(f"KV bits {cfg.kv.bits} < 16 (GPTQ holds no KV-cache quantization)")
    return why


def check_formats(cfg: SpinQuantConfig, formats: Any, online_r4: bool | None = None) -> tuple[str, ...]:
    """The normalised formats, or ExportError naming why one cannot hold the job.

    ``online_r4`` None derives it from the config (the CLI checks before spending any compute).
    """
    if isinstance(formats, str):
        formats = ("ct", "gptq") if formats == "both" else (formats,)
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ExportError(f"unknown export format(s) {bad or formats!r}; accepted: ct, gptq (or both)")
    if "ct" in formats and cfg.weights.bits != 4:
        raise ExportError(f"the compressed-tensors pack-quantized folder holds 4-bit weights; this job has "
                          f"weights.bits={cfg.weights.bits}. Accepted: w_bits=4 (or no export)")
    if "gptq" in formats:
        why = gptq_refusals(cfg, cfg.r4_mode[0] != "none" if online_r4 is None else online_r4)
        if why:
            raise ExportError(f"GPTQ v1 cannot hold this {cfg.scheme} job: {'; '.join(why)}. "
                              "Use the default compressed-tensors format (--format ct).")
    return formats

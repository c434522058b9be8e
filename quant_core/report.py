"""The job report (ARCHITECTURE.md's report contract), built in one place: ``build_report(cfg, run, export)``.

The pipeline's stages measure facts (``RunFacts``), the export measures its own (``ExportFacts``); this pure
function turns them and the config into the report dict that the CLI prints, the worker stores, the API
serves and every exported folder carries as ``eval_report.json``. Nothing edits a report afterwards: a
report with export facts is a new report. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import SpinQuantConfig, config_to_dict, vllm_serving_verdict


@dataclass(frozen=True)
class ModelFacts:
    id: str  # what the job names the model by (a hub id, a folder, or the service's local:<name>)
    revision: str | None
    family: str
    tied: bool  # the source ties lm_head to the embeddings (the export always unties it)
    dtype: str
    device: str
    offload: bool  # weights rest in host memory, one layer at a time on the device


@dataclass(frozen=True)
class RunFacts:
    """What the pipeline's stages measured."""

    model: ModelFacts
    fp_ppl: float
    quant_ppl: float
    eval_windows: int
    eval_seq_len: int
    r3: str  # the online R3/R4 transforms, as HadamardPlan.describe() says them ('off' when none)
    r4: str
    invariance: float | None  # max |logit diff| of the FP model before and after merging rotations
    learn: dict[str, Any] = field(default_factory=dict)  # the learn stage's own facts (pre-fit, grad norms...)
    loss_curve: list[float] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)  # load, evaluate, learn, quantize
    total_s: float = 0.0
    peak_rss_mb: float = 0.0
    memory_mb: dict[str, Any] = field(default_factory=dict)  # quant_core.memory.StageMeter.report()
    zero_shot: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    peak_gpu_mb: float | None = None


@dataclass(frozen=True)
class ExportFacts:
    """What writing the checkpoint measured."""

    seconds: float
    bytes_by_folder: dict[str, int]  # model/ (compressed-tensors) and/or gptq/
    serve_commands: dict[str, str]  # folder -> its serve.sh command
    gptq_export: dict[str, Any] | None = None

    @property
    def checkpoint_bytes(self) -> int:
        """The bytes of the model folder (gptq/ when it is the only one)."""
        return self.bytes_by_folder.get("model", self.bytes_by_folder.get("gptq", 0))


def build_report(cfg: SpinQuantConfig, run: RunFacts, export: ExportFacts | None = None) -> dict[str, Any]:
    """The report of one job: its config, what the stages measured and, once exported, what the export wrote."""
    m = run.model
    export_s = export.seconds if export is not None else 0.0
    report: dict[str, Any] = {
        "method": cfg.method.value,
        "scheme": cfg.scheme,
        "settings": config_to_dict(cfg),
        "model": {"id": m.id, "revision": m.revision, "family": m.family, "untied": m.tied, "dtype": m.dtype,
                  "device": m.device, "placement": "layer-wise offload" if m.offload else "whole model on the device"},
        "fp_ppl": run.fp_ppl,
        "quant_ppl": run.quant_ppl,
        "eval": {"windows": run.eval_windows, "seq_len": run.eval_seq_len, "tokens": run.eval_windows * run.eval_seq_len,
                 "source": cfg.eval.source},
        "serving": {"vllm": vllm_serving_verdict(cfg)},
        "rotation": {"r1r2": cfg.rotation.r1r2.value, "r3": run.r3, "r4": run.r4,
                     "center_embeddings": cfg.rotation.center_embeddings and cfg.rotating,
                     "invariance_max_abs_logit_diff": run.invariance, **run.learn},
        "timings_s": {**run.timings_s, "export": export_s, "total": run.total_s + export_s},
        "peak_rss_mb": run.peak_rss_mb,
        "memory_mb": dict(run.memory_mb),
        "loss_curve": list(run.loss_curve),
        "zero_shot": run.zero_shot,
        "checkpoint_bytes": export.checkpoint_bytes if export is not None else 0,
        "versions": dict(run.versions),
    }
    if run.peak_gpu_mb is not None:
        report["peak_gpu_mb"] = run.peak_gpu_mb
    if export is not None:
        if export.gptq_export is not None:
            report["gptq_export"] = export.gptq_export
        if len(export.bytes_by_folder) > 1:
            report["checkpoint_bytes_by_folder"] = dict(export.bytes_by_folder)
        report["serve_commands"] = dict(export.serve_commands)
    return report

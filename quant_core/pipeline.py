"""The whole job on one machine: load -> evaluate FP -> prepare -> learn -> quantize -> evaluate -> save.

``quantize_model`` is the one public verb used by the CLI and the worker. It takes the config and
two callables (progress, should_cancel) and returns the report of ARCHITECTURE.md.

Example:
    >>> cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4,
    ...                   calib_source="file:train.txt", eval_source="file:test.txt", seq_len=256)
    >>> report = quantize_model("tests/fixtures/models/llama-tiny", cfg).report
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .calibration import (
    calibration_windows,
    encode,
    eval_windows,
    load_text,
    load_tokenizer,
    train_blocks,
    with_bos,
)
from .config import ConfigError, SpinQuantConfig, config_to_dict, vllm_serving_verdict
from .convert import quantize_weights
from .evaluate import perplexity
from .evaluate import zero_shot as evaluate_zero_shot
from .gptq import GPTQResult
from .hadamard import HadamardPlan, largest_pow2_block, plan_hadamard, random_hadamard_matrix
from .learn import train_rotations
from .memory import StageMeter
from .models import (
    ArchSpec,
    DecoderLM,
    ModelError,
    QuantRuntime,
    arch_from_config,
    load_model,
    resolve_model,
    weight_files,
)
from .placement import Placement, offloaded_hidden, pick_device
from .plan import decide as placement_decision
from .prefit import prefit_rotations
from .progress import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress
from .rotation import center_embeddings, fold_norms, fuse_r4, merge_rotations

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QuantizeResult:
    """What a job produced, in memory: the fake-quantized model, its integers, rotations and report."""

    model: DecoderLM
    arch: ArchSpec
    cfg: SpinQuantConfig
    report: dict[str, Any]
    source_path: Path
    r1: Tensor | None = None
    r2s: list[Tensor] | None = None
    qweights: dict[str, GPTQResult] = field(default_factory=dict)
    runtime: QuantRuntime | None = None
    eval_windows: Tensor | None = None


def resolve_device(cfg: SpinQuantConfig) -> tuple[str, torch.dtype]:
    device = pick_device(cfg.device)
    if cfg.dtype == "auto":
        return device, (torch.bfloat16 if device == "cuda" else torch.float32)
    return device, _DTYPES[cfg.dtype]


@dataclass(frozen=True)
class Plans:
    r3: HadamardPlan | None
    r4: HadamardPlan | None


def validate_environment(cfg: SpinQuantConfig, arch: ArchSpec) -> Plans:
    """Refuse impossible combinations for this model before any compute is spent."""
    g = cfg.weights.group_size
    if cfg.weights.bits < 16 and g != -1:
        for name, (_, fan_in) in arch.linear_shapes().items():
            if fan_in % g:
                raise ConfigError(
                    f"weights.group_size={g} does not divide the input width {fan_in} of {name}; "
                    f"accepted: -1 or a divisor of {arch.hidden}, {arch.n_heads * arch.head_dim} and {arch.intermediate}"
                )
    if cfg.zero_shot_tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError("zero_shot_tasks needs the optional extra: pip install '.[eval]' (lm-eval)") from None
    fallback = cfg.rotation.fallback.value
    r3 = r4 = None
    try:
        if cfg.r3_on:
            r3 = plan_hadamard(arch.head_dim, mode="full", fallback=fallback, seed=cfg.seed)
        mode, block = cfg.r4_mode
        if mode == "full":
            r4 = plan_hadamard(arch.intermediate, mode="full", fallback=fallback, seed=cfg.seed)
        elif mode == "block":
            if block is None:  # block:auto: vLLM's kernel and llm-compressor use 128 where it divides d_ff
                block = min(128, largest_pow2_block(arch.intermediate))
            r4 = plan_hadamard(arch.intermediate, mode="block", block=block, fallback=fallback, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"rotation: {exc}") from None
    if cfg.activations.o_proj_per_head and cfg.activations.bits < 16 and arch.head_dim < 2:
        raise ConfigError("activations.o_proj_per_head needs head_dim >= 2")
    return Plans(r3=r3, r4=r4)


def build_runtime(cfg: SpinQuantConfig, arch: ArchSpec, plans: Plans, *, a_bits: int, kv_bits: int,
                  learning: bool = False) -> QuantRuntime:
    """The online transforms and quantizers a config implies; the pipeline and quant_core.runtime share it.
    ``learning`` selects the training gradient (train.ste); values are the same either way."""
    a, kv = cfg.activations, cfg.kv
    return QuantRuntime(
        a_bits=a_bits, a_sym=a.sym, a_clip=a.clip_ratio, a_half_range=a.half_range,
        o_group=arch.head_dim if a.o_proj_per_head else -1,
        kv_bits=kv_bits, kv_sym=kv.sym, kv_clip=kv.clip_ratio, r3=plans.r3, r4=plans.r4,
        range_grad=learning and cfg.train.ste == "range",
    )


def _init_rotations(arch: ArchSpec, seed: int) -> tuple[Tensor, list[Tensor]]:
    """Random-Hadamard R1 and per-layer R2 (float64, seeded); QR-orthogonal where no K exists."""
    gen = torch.Generator().manual_seed(seed)
    r1 = random_hadamard_matrix(arch.hidden, gen)
    r2s = [random_hadamard_matrix(arch.head_dim, gen) for _ in range(arch.n_layers)]
    return r1, r2s


def _prefit_share(cfg: SpinQuantConfig) -> float:
    """The pre-fit's part of the learn stage's progress, in units of one sequence's end-to-end forward and
    backward: a pre-fit step costs about 0.1 of it and the pre-fit's FP forward a third per block (SmolLM2-135M,
    2 CPU cores: 0.25 s per pre-fit step against about 2.5 s per sequence of 512 tokens)."""
    if not cfg.prefit_on:
        return 0.0
    prefit = cfg.train.prefit_steps / 10 + cfg.train.prefit_blocks / 3
    return prefit / (prefit + cfg.train.steps * cfg.train.batch_size)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


PROBE_POSITIONS = 32  # the invariance probe's logits: this many evenly spaced positions of the first window


@torch.no_grad()
def _probe_logits(model: DecoderLM, ids: Tensor, place: Placement) -> Tensor:
    """Logits (1, P, V) at PROBE_POSITIONS positions of one (1, L) window, float32 on the CPU: the whole
    window runs (every position attends to those before it), only P rows meet the lm_head."""
    pos = torch.linspace(0, ids.shape[1] - 1, min(PROBE_POSITIONS, ids.shape[1])).round().long()
    if place.offload:
        for h in offloaded_hidden(model, [ids], place):  # scored while the lm_head is on the device
            out = model.lm_head(h[:, pos.to(h.device)])
        return out.float().cpu()
    h = model.hidden(ids.to(model.lm_head.weight.device))
    return model.lm_head(h[:, pos.to(h.device)]).float().cpu()


def quantize_model(
    model_ref: str,
    cfg: SpinQuantConfig,
    *,
    revision: str | None = None,
    progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    cache_dir: str | None = None,
) -> QuantizeResult:
    """Run the pipeline for one model and return the fake-quantized model and its report.

    Args:
        model_ref: a local HF-layout folder or a Hugging Face id.
        cfg: the validated job config.
        progress: ``progress(stage, fraction, info)``, at least once per learning step and per layer.
        should_cancel: checked between steps, layers and evaluation batches; raises Cancelled.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    device, dtype = resolve_device(cfg)
    meter = StageMeter(device)  # peak memory per stage, beside what quant_core.plan predicts

    # -- load ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    meter.begin("load")
    progress("load", 0.0, {"model": model_ref})
    src = resolve_model(model_ref, revision, cache_dir)
    arch = arch_from_config(src.config)
    plans = validate_environment(cfg, arch)
    # Place the job before spending GPU time: the whole model on the device, or weights in host RAM with one
    # layer at a time on the device (quant_core.placement); refused when neither fits. On the CPU nothing is
    # short of memory, and placement=layers runs the same offload path with host and compute one device.
    gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if device == "cuda" else 1 << 62
    decision = placement_decision(src.config, cfg, gpu_bytes, str(dtype).removeprefix("torch."))
    if decision.refusal:
        raise ConfigError(decision.refusal)
    place = Placement(device, offload=decision.offload)
    weight_files(src.path)  # refuse pickle-only or missing weights before reading any text
    tokenizer = load_tokenizer(src.path)
    eval_tokens = encode(tokenizer, load_text(cfg.eval.source, "test"), bos=False)
    windows = eval_windows(eval_tokens, cfg.eval.seq_len, cfg.eval.max_windows)
    needs_calib = cfg.needs_calibration
    learning = cfg.learning
    # Tokenised once: learning uses it as is (no BOS), GPTQ calibration with one BOS in front (§6, §8).
    calib_tokens = encode(tokenizer, load_text(cfg.calib.source, "train")) if (needs_calib or learning) else None
    gptq_tokens = with_bos(tokenizer, calib_tokens) if (needs_calib and calib_tokens is not None) else None
    if not cfg.zero_shot_tasks:
        # Nothing reads text after this; a fast tokenizer holds 100+ MB (SmolLM2's: 136 MiB) for the whole job.
        del tokenizer
    check_cancel(should_cancel, "load")
    model = load_model(src, dtype=dtype, device="cpu" if place.offload else device)
    timings["load"] = time.perf_counter() - t0
    progress("load", 1.0, {"model": model_ref, "family": arch.family, "layers": arch.n_layers})

    # -- FP perplexity on exactly the windows the quantized model will see -------------------------
    t0 = time.perf_counter()
    meter.begin("evaluate_fp")
    fp_ppl = perplexity(model, windows, progress=progress, should_cancel=should_cancel, stage="evaluate_fp",
                        placement=place)
    probe = windows[:1]
    fp_logits = _probe_logits(model, probe, place)
    zero_shot: dict[str, Any] = {}
    if cfg.zero_shot_tasks:
        zero_shot["fp"] = evaluate_zero_shot(model, tokenizer, list(cfg.zero_shot_tasks))
    timings["evaluate"] = time.perf_counter() - t0

    # -- prepare: fold norms, centre embeddings, fuse R4, random-Hadamard init -------------------
    r1 = r2s = None
    invariance: float | None = None
    if cfg.rotating:
        meter.begin("prepare")
        progress("prepare", 0.0, {})
        fold_norms(model)
        if cfg.rotation.center_embeddings:
            center_embeddings(model)
        if plans.r4 is not None:
            fuse_r4(model, plans.r4)
        r1, r2s = _init_rotations(arch, cfg.seed)
        progress("prepare", 1.0, {"r3": plans.r3.describe() if plans.r3 else "off",
                                  "r4": plans.r4.describe() if plans.r4 else "off"})

    # -- learn R1/R2 -------------------------------------------------------------------------------
    loss_curve: list[float] = []
    learn_info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if learning:
        meter.begin("learn")
        assert r1 is not None and r2s is not None
        assert calib_tokens is not None
        blocks = train_blocks(calib_tokens, max(cfg.train.samples, cfg.train.prefit_blocks), cfg.calib.seq_len)
        fp_runtime = build_runtime(cfg, arch, plans, a_bits=16, kv_bits=16)  # online R3/R4, no quantizer
        share = _prefit_share(cfg)  # of the learn stage's progress bar

        def learn_progress(lo: float, hi: float) -> ProgressFn:
            return lambda stage, fraction, info: progress(stage, lo + (hi - lo) * fraction, info)

        learn_rt = build_runtime(cfg, arch, plans, a_bits=cfg.activations.bits, kv_bits=cfg.kv.bits, learning=True)
        if cfg.prefit_on:
            r1, r2s, learn_info = prefit_rotations(model, cfg, blocks, r1, r2s, fp_runtime, learn_rt, place,
                                                   learn_progress(0.0, share), should_cancel)
        if cfg.train.steps > 0:
            model.quant = learn_rt
            try:
                res = train_rotations(model, cfg, blocks[: cfg.train.samples], r1, r2s, learn_progress(share, 1.0),
                                      should_cancel, placement=place, teacher_rt=fp_runtime)
            finally:
                model.quant = None
            r1, r2s, loss_curve = res.r1, res.r2s, res.loss_curve
            learn_info.update({"loss": cfg.train.loss, "max_orth_error": res.max_orth_error,
                               "grad_norms": res.grad_norms, "train_blocks": int(min(blocks.shape[0], cfg.train.samples))})
        learn_info["train_w_bits"] = cfg.train_w_bits
    timings["learn"] = time.perf_counter() - t0

    # -- convert: merge rotations, then quantize the weights layer by layer ---------------------------
    t0 = time.perf_counter()
    meter.begin("quantize")
    if cfg.rotating:
        assert r1 is not None
        merge_rotations(model, r1, r2s)
        model.quant = build_runtime(cfg, arch, plans, a_bits=16, kv_bits=16)  # online R3/R4 only
        invariance = float((_probe_logits(model, probe, place) - fp_logits).abs().max())
    qweights: dict[str, GPTQResult] = {}
    if cfg.weights.bits < 16:
        calib = None
        if needs_calib:
            assert gptq_tokens is not None
            calib = calibration_windows(gptq_tokens, cfg.calib.samples, cfg.calib.seq_len,
                                        cfg.seed)
        rt_calib = QuantRuntime(r4=plans.r4)  # full-precision activations, R4 active (§8)
        qweights = quantize_weights(model, cfg, calib, rt_calib, progress, should_cancel, placement=place)
    timings["quantize"] = time.perf_counter() - t0

    # -- evaluate the model exactly as it will be exported -----------------------------------------------
    t0 = time.perf_counter()
    meter.begin("evaluate")
    runtime = build_runtime(cfg, arch, plans, a_bits=cfg.activations.bits, kv_bits=cfg.kv.bits)
    model.quant = runtime
    quant_ppl = perplexity(model, windows, progress=progress, should_cancel=should_cancel, stage="evaluate",
                           placement=place)
    if cfg.zero_shot_tasks:
        zero_shot["quant"] = evaluate_zero_shot(model, tokenizer, list(cfg.zero_shot_tasks))
    timings["evaluate"] += time.perf_counter() - t0
    timings["export"] = 0.0
    timings["total"] = time.perf_counter() - t_start

    report: dict[str, Any] = {
        "method": cfg.method.value,
        "scheme": cfg.scheme,
        "settings": config_to_dict(cfg),
        "model": {"id": src.model_id, "revision": src.revision, "family": arch.family, "untied": arch.tied,
                  "dtype": str(dtype).replace("torch.", ""), "device": device,
                  "placement": "layer-wise offload" if place.offload else "whole model on the device"},
        "fp_ppl": fp_ppl,
        "quant_ppl": quant_ppl,
        "eval": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                 "tokens": int(windows.numel()), "source": cfg.eval.source},
        "serving": {"vllm": vllm_serving_verdict(cfg)},
        "rotation": {"r1r2": cfg.rotation.r1r2.value,
                     "r3": plans.r3.describe() if plans.r3 else "off",
                     "r4": plans.r4.describe() if plans.r4 else "off",
                     "center_embeddings": cfg.rotation.center_embeddings and cfg.rotating,
                     "invariance_max_abs_logit_diff": invariance, **learn_info},
        "timings_s": timings,
        "peak_rss_mb": _peak_rss_mb(),
        "memory_mb": meter.report(),
        "loss_curve": loss_curve,
        "zero_shot": zero_shot or None,
        "checkpoint_bytes": 0,
        "versions": {"quant_core": __version__, "torch": torch.__version__},
    }
    if device == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return QuantizeResult(model=model, arch=arch, cfg=cfg, report=report, source_path=src.path, r1=r1, r2s=r2s,
                          qweights=qweights, runtime=runtime, eval_windows=windows)


__all__ = ["ConfigError", "ModelError", "QuantizeResult", "quantize_model", "validate_environment"]

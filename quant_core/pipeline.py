"""The whole job on one machine, as a composition of stages:

    load -> evaluate_fp -> prepare -> learn -> convert -> evaluate_quantized [-> export]

Each stage is a function taking and returning small typed values (``Job``, ``FPBaseline``, ``Rotations``,
``Learned``, ``Converted``, ``Evaluated``); the model itself is the one mutable object, changed in place by
prepare (folded norms, fused R4) and convert (merged rotations, quantized weights). ``run`` is the one entry
point of the CLI and the worker (``quantize_model`` = ``run`` without export); the report is built once, by
``quant_core.report.build_report``, from the config and the facts the stages measured.

Example:
    >>> cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4,
    ...                   calib_source="file:train.txt", eval_source="file:test.txt", seq_len=256)
    >>> report = quantize_model("tests/fixtures/models/llama-tiny", cfg).report
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .calibration import (
    calibration_windows,
    eval_windows,
    load_tokenizer,
    tokenize_texts,
    train_blocks,
    with_bos_id,
)
from .config import ConfigError, SpinQuantConfig
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
    ModelSource,
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
from .report import ExportFacts, ModelFacts, RunFacts, build_report
from .rotation import center_embeddings, fold_norms, fuse_r4, merge_rotations

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class QuantizeResult:
    """What a job produced, in memory: the fake-quantized model, its integers and rotations, and the facts its
    report is built from. ``cfg`` is the config the job records (the worker's carries ``upload:<sha>`` sources)."""

    model: DecoderLM
    arch: ArchSpec
    cfg: SpinQuantConfig
    facts: RunFacts
    source_path: Path
    r1: Tensor | None = None
    r2s: list[Tensor] | None = None
    qweights: dict[str, GPTQResult] = field(default_factory=dict)
    runtime: QuantRuntime | None = None
    eval_windows: Tensor | None = None
    export: ExportFacts | None = None  # set by export_checkpoint (a new result)

    @property
    def report(self) -> dict[str, Any]:
        return build_report(self.cfg, self.facts, self.export)


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
                raise ConfigError("weights.group_size", f"weights.group_size={g} does not divide the input width {fan_in} "
                                  f"of {name}", f"-1 or a divisor of {arch.hidden}, {arch.n_heads * arch.head_dim} and "
                                  f"{arch.intermediate}")
    if cfg.zero_shot_tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError("zero_shot_tasks", "zero_shot_tasks needs the optional extra lm-eval",
                              "pip install '.[eval]' first") from None
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
        raise ConfigError("rotation.fallback", f"rotation: {exc}") from None
    if cfg.activations.o_proj_per_head and cfg.activations.bits < 16 and arch.head_dim < 2:
        raise ConfigError("activations.o_proj_per_head", "activations.o_proj_per_head needs head_dim >= 2")
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


@contextmanager
def quant_runtime(model: DecoderLM, rt: QuantRuntime | None) -> Iterator[None]:
    """Run the block with ``model.quant = rt``, then restore what was there (also on an error)."""
    before, model.quant = model.quant, rt
    try:
        yield
    finally:
        model.quant = before


@dataclass
class Job:
    """What ``load`` produces and every later stage reads: the model, where it runs, and its token windows."""

    src: ModelSource
    arch: ArchSpec
    plans: Plans
    place: Placement
    dtype: torch.dtype
    model: DecoderLM
    windows: Tensor  # (N, seq_len) evaluation windows, the same for the FP and the quantized model
    calib_tokens: Tensor | None  # the calibration text, tokenised once (learning uses it without BOS)
    gptq_tokens: Tensor | None  # the same with one BOS in front (GPTQ calibration, §6 and §8)
    tokenizer: Any | None  # kept only when zero-shot tasks need it (a fast tokenizer holds 100+ MB)


@dataclass(frozen=True)
class FPBaseline:
    ppl: float
    probe: Tensor  # (1, seq_len): the window the invariance probe runs
    probe_logits: Tensor  # (1, P, V) float32 on the CPU
    zero_shot: dict[str, Any] | None


@dataclass(frozen=True)
class Rotations:
    r1: Tensor  # (hidden, hidden) float64
    r2s: list[Tensor]  # per layer (head_dim, head_dim) float64


@dataclass(frozen=True)
class Learned:
    rotations: Rotations | None  # None when the job does not rotate
    loss_curve: list[float]
    info: dict[str, Any]  # the report's rotation.* learning facts


@dataclass(frozen=True)
class Converted:
    qweights: dict[str, GPTQResult]  # linear name -> integer codes and scales
    invariance: float | None  # max |logit diff| on the probe after merging the rotations (FP activations)


@dataclass(frozen=True)
class Evaluated:
    ppl: float
    runtime: QuantRuntime  # the online transforms and quantizers the model is evaluated (and exported) with
    zero_shot: dict[str, Any] | None


def load(model_ref: str, cfg: SpinQuantConfig, *, revision: str | None, cache_dir: str | None,
         progress: ProgressFn, should_cancel: CancelFn) -> Job:
    """Resolve, check and place the job, read its texts, then load the weights (the refusals come first)."""
    device, dtype = resolve_device(cfg)
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
        raise ConfigError("placement", decision.refusal)
    place = Placement(device, offload=decision.offload)
    weight_files(src.path)  # refuse pickle-only or missing weights before reading any text
    texts = {"eval": (cfg.eval.source, "test")}
    if cfg.needs_calibration or cfg.learning:
        texts["calib"] = (cfg.calib.source, "train")
    # Tokenised in a child process, so the tokenizer and its libraries never stay resident here (155 MiB on
    # SmolLM2-135M: quant_core.texts). Zero-shot tasks need the tokenizer itself, so they keep it in process.
    kept = load_tokenizer(src.path) if cfg.zero_shot_tasks else None
    tokens, bos = tokenize_texts(src.path, texts)
    windows = eval_windows(tokens["eval"], cfg.eval.seq_len, cfg.eval.max_windows)
    calib_tokens = tokens.get("calib")
    gptq_tokens = with_bos_id(calib_tokens, bos) if calib_tokens is not None and cfg.needs_calibration else None
    del tokens
    check_cancel(should_cancel, "load")
    model = load_model(src, dtype=dtype, device="cpu" if place.offload else device)
    progress("load", 1.0, {"model": model_ref, "family": arch.family, "layers": arch.n_layers})
    return Job(src=src, arch=arch, plans=plans, place=place, dtype=dtype, model=model, windows=windows,
               calib_tokens=calib_tokens, gptq_tokens=gptq_tokens, tokenizer=kept)


def evaluate_fp(job: Job, cfg: SpinQuantConfig, progress: ProgressFn, should_cancel: CancelFn) -> FPBaseline:
    """FP perplexity on exactly the windows the quantized model will see, and the invariance probe's logits."""
    ppl = perplexity(job.model, job.windows, progress=progress, should_cancel=should_cancel, stage="evaluate_fp",
                     placement=job.place)
    probe = job.windows[:1]
    zero_shot = evaluate_zero_shot(job.model, job.tokenizer, list(cfg.zero_shot_tasks)) if cfg.zero_shot_tasks else None
    return FPBaseline(ppl=ppl, probe=probe, probe_logits=_probe_logits(job.model, probe, job.place), zero_shot=zero_shot)


def prepare(job: Job, cfg: SpinQuantConfig, progress: ProgressFn) -> Rotations | None:
    """Fold norms, centre embeddings (when asked), fuse R4, and the random-Hadamard R1/R2 to start from."""
    if not cfg.rotating:
        return None
    progress("prepare", 0.0, {})
    fold_norms(job.model)
    if cfg.rotation.center_embeddings:
        center_embeddings(job.model)
    if job.plans.r4 is not None:
        fuse_r4(job.model, job.plans.r4)
    r1, r2s = _init_rotations(job.arch, cfg.seed)
    progress("prepare", 1.0, {"r3": _describe(job.plans.r3), "r4": _describe(job.plans.r4)})
    return Rotations(r1, r2s)


def learn(job: Job, cfg: SpinQuantConfig, start: Rotations | None, progress: ProgressFn,
          should_cancel: CancelFn) -> Learned:
    """The R1 pre-fit and the end-to-end Cayley steps (train.*); the start rotations as they are otherwise."""
    if not cfg.learning or start is None:
        return Learned(start, [], {})
    assert job.calib_tokens is not None
    blocks = train_blocks(job.calib_tokens, max(cfg.train.samples, cfg.train.prefit_blocks), cfg.calib.seq_len)
    fp_rt = build_runtime(cfg, job.arch, job.plans, a_bits=16, kv_bits=16)  # online R3/R4, no quantizer
    learn_rt = build_runtime(cfg, job.arch, job.plans, a_bits=cfg.activations.bits, kv_bits=cfg.kv.bits, learning=True)
    share = _prefit_share(cfg)  # of the learn stage's progress bar

    def part(lo: float, hi: float) -> ProgressFn:
        return lambda stage, fraction, info: progress(stage, lo + (hi - lo) * fraction, info)

    r1, r2s = start.r1, start.r2s
    info: dict[str, Any] = {}
    if cfg.prefit_on:
        r1, r2s, info = prefit_rotations(job.model, cfg, blocks, r1, r2s, fp_rt, learn_rt, job.place, part(0.0, share),
                                         should_cancel)
    curve: list[float] = []
    if cfg.train.steps > 0:
        with quant_runtime(job.model, learn_rt):
            res = train_rotations(job.model, cfg, blocks[: cfg.train.samples], r1, r2s, part(share, 1.0), should_cancel,
                                  placement=job.place, teacher_rt=fp_rt)
        r1, r2s, curve = res.r1, res.r2s, res.loss_curve
        info = {**info, "loss": cfg.train.loss, "max_orth_error": res.max_orth_error, "grad_norms": res.grad_norms,
                "train_blocks": int(min(blocks.shape[0], cfg.train.samples))}
    return Learned(Rotations(r1, r2s), curve, {**info, "train_w_bits": cfg.train_w_bits})


def convert(job: Job, cfg: SpinQuantConfig, learned: Learned, fp: FPBaseline, progress: ProgressFn,
            should_cancel: CancelFn) -> Converted:
    """Merge the rotations into the weights (probing that the FP model is unchanged), then quantize the weights
    layer by layer (GPTQ on calibration windows, or RTN)."""
    invariance = None
    if learned.rotations is not None:
        merge_rotations(job.model, learned.rotations.r1, learned.rotations.r2s)
        with quant_runtime(job.model, build_runtime(cfg, job.arch, job.plans, a_bits=16, kv_bits=16)):  # R3/R4 only
            invariance = float((_probe_logits(job.model, fp.probe, job.place) - fp.probe_logits).abs().max())
    qweights: dict[str, GPTQResult] = {}
    if cfg.weights.bits < 16:
        calib = None
        if cfg.needs_calibration:
            assert job.gptq_tokens is not None
            calib = calibration_windows(job.gptq_tokens, cfg.calib.samples, cfg.calib.seq_len, cfg.seed)
        rt_calib = QuantRuntime(r4=job.plans.r4)  # full-precision activations, R4 active (§8)
        qweights = quantize_weights(job.model, cfg, calib, rt_calib, progress, should_cancel, placement=job.place)
    return Converted(qweights, invariance)


def evaluate_quantized(job: Job, cfg: SpinQuantConfig, progress: ProgressFn, should_cancel: CancelFn) -> Evaluated:
    """The model exactly as it will be exported; it keeps this runtime (``model.quant``) when the job returns."""
    runtime = build_runtime(cfg, job.arch, job.plans, a_bits=cfg.activations.bits, kv_bits=cfg.kv.bits)
    job.model.quant = runtime
    ppl = perplexity(job.model, job.windows, progress=progress, should_cancel=should_cancel, stage="evaluate",
                     placement=job.place)
    zero_shot = evaluate_zero_shot(job.model, job.tokenizer, list(cfg.zero_shot_tasks)) if cfg.zero_shot_tasks else None
    return Evaluated(ppl, runtime, zero_shot)


def quantize_model(
    model_ref: str,
    cfg: SpinQuantConfig,
    *,
    revision: str | None = None,
    progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    cache_dir: str | None = None,
    model_id: str | None = None,
) -> QuantizeResult:
    """Run the stages for one model: the fake-quantized model and the facts of its report (no export).

    Args:
        model_ref: a local HF-layout folder or a Hugging Face id.
        cfg: the validated job config.
        progress: ``progress(stage, fraction, info)``, at least once per learning step and per layer.
        should_cancel: checked between steps, layers and evaluation batches; raises Cancelled.
        model_id: the model's name in the report (default: the folder or hub id it resolved to).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    meter = StageMeter(pick_device(cfg.device))  # peak memory per stage, beside what quant_core.plan predicts

    @contextmanager
    def stage(name: str, timing: str | None = None, measured: bool = True) -> Iterator[None]:
        # seconds under `timing` (the report's keys: evaluate sums both evaluations), memory per stage run
        if measured:
            meter.begin(name)
        t0 = time.perf_counter()
        yield
        key = timing or name
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    with stage("load"):
        job = load(model_ref, cfg, revision=revision, cache_dir=cache_dir, progress=progress, should_cancel=should_cancel)
    with stage("evaluate_fp", "evaluate"):
        fp = evaluate_fp(job, cfg, progress, should_cancel)
    with stage("prepare", measured=cfg.rotating):
        start = prepare(job, cfg, progress)
    with stage("learn", measured=cfg.learning):
        learned = learn(job, cfg, start, progress, should_cancel)
    with stage("quantize"):
        converted = convert(job, cfg, learned, fp, progress, should_cancel)
    with stage("evaluate"):
        evaluated = evaluate_quantized(job, cfg, progress, should_cancel)
    facts = _run_facts(job, cfg, fp, learned, converted, evaluated, timings=timings, total_s=time.perf_counter() - t_start,
                       memory=meter.report(), peak_mb=meter.peak_bytes() / 2**20, model_id=model_id)
    rot = learned.rotations
    return QuantizeResult(model=job.model, arch=job.arch, cfg=cfg, facts=facts, source_path=job.src.path,
                          r1=rot.r1 if rot else None, r2s=rot.r2s if rot else None, qweights=converted.qweights,
                          runtime=evaluated.runtime, eval_windows=job.windows)


def _run_facts(job: Job, cfg: SpinQuantConfig, fp: FPBaseline, learned: Learned, converted: Converted,
               evaluated: Evaluated, *, timings: dict[str, float], total_s: float, memory: dict[str, Any],
               peak_mb: float, model_id: str | None) -> RunFacts:
    """What the stages measured, for the report (quant_core.report.build_report). ``peak_mb``: the stage meter's
    peak over the whole job (resident set on the CPU, allocated tensors on CUDA)."""
    device = job.place.compute
    cuda = device.startswith("cuda")
    return RunFacts(
        model=ModelFacts(id=model_id or job.src.model_id, revision=job.src.revision, family=job.arch.family,
                         tied=job.arch.tied, dtype=str(job.dtype).replace("torch.", ""), device=device,
                         offload=job.place.offload),
        fp_ppl=fp.ppl, quant_ppl=evaluated.ppl, eval_windows=int(job.windows.shape[0]),
        eval_seq_len=int(job.windows.shape[1]), r3=_describe(job.plans.r3), r4=_describe(job.plans.r4),
        invariance=converted.invariance, learn=learned.info, loss_curve=learned.loss_curve,
        timings_s={k: timings[k] for k in ("load", "evaluate", "learn", "quantize")},  # the report's stage keys
        total_s=total_s, peak_rss_mb=_peak_rss_mb() if cuda else max(_peak_rss_mb(), peak_mb), memory_mb=memory,
        zero_shot={"fp": fp.zero_shot, "quant": evaluated.zero_shot} if cfg.zero_shot_tasks else None,
        versions={"quant_core": __version__, "torch": torch.__version__},
        peak_gpu_mb=peak_mb if cuda else None,
    )


def run(
    model_ref: str,
    cfg: SpinQuantConfig,
    *,
    out: Path | None = None,
    formats: Any = ("ct",),
    record_cfg: SpinQuantConfig | None = None,
    model_id: str | None = None,
    revision: str | None = None,
    progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    cache_dir: str | None = None,
) -> QuantizeResult:
    """One job, as the CLI and the worker run it: the stages, then (with ``out``) the checkpoint folder.

    ``record_cfg``: the config the report and the checkpoint record, when it differs from the one that ran
    (the worker runs ``file:`` paths of uploaded texts but records their ``upload:<sha256>`` names).
    """
    result = quantize_model(model_ref, cfg, revision=revision, progress=progress, should_cancel=should_cancel,
                            cache_dir=cache_dir, model_id=model_id)
    if record_cfg is not None:
        result = replace(result, cfg=record_cfg)
    if out is None:
        return result
    from .export import export_checkpoint

    progress("export", 0.0, {})
    result = export_checkpoint(result, out, formats=formats)
    progress("export", 1.0, {"bytes": result.export.checkpoint_bytes if result.export else 0})
    return result


def _describe(plan: HadamardPlan | None) -> str:
    return plan.describe() if plan is not None else "off"


__all__ = ["ConfigError", "ModelError", "QuantizeResult", "quantize_model", "run", "validate_environment"]

"""Memory plan: what each stage of a job needs on the device, from the model's config.json alone.

``python -m quant_core plan MODEL`` prints the table. The formulas follow what the pipeline really
allocates (see each term's comment), so the table says before any GPU time is spent whether a job
fits one GPU and, when it does not, how much it must be split:

- load / evaluate: the weights (a tied lm_head is untied into its own copy), plus one evaluation batch of
  ``sizes.EVAL_BATCH_TOKENS`` tokens at its MLP, and one vocabulary chunk of logits (never a batch's);
- learn: the frozen weights, the rotations in float64 with their gradients, the checkpointed layer inputs
  of one micro-batch, one layer rotated on the fly and recomputed with its activations, the teacher's and
  the student's final hidden states, one vocabulary chunk; or the R1 pre-fit's samples when larger;
- quantize (GPTQ): the weights, the calibration hidden states and one layer's attention output, a
  micro-batch's activations, the largest group's Hessian and its GPTQ workspace;
- export: host memory for the model and its packed copy.

Each stage's prediction is checked against the measured peak of a real run (bench/real.py, section memory,
and tests/quant_core/test_real_model.py).

`decide` turns the plan into the pipeline's placement on one GPU: the whole model, layer-wise offload
(quant_core.placement), or a refusal before any weights reach the GPU.

Torch-free: it runs on the API host too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import SpinQuantConfig
from .sizes import (
    EVAL_BATCH_TOKENS,
    GPTQ_MICRO_BATCH,
    HEAD_LOSS_CHUNKS,
    LOGIT_CHUNK_ELEMS,
    PREFIT_CHUNK_LAYERS,
    PREFIT_CHUNK_ROWS,
    PREFIT_HEAD_TOKENS,
    PREFIT_TOKENS,
)

GiB = 1 << 30
HEADROOM = 0.9  # usable share of device memory (CUDA context, allocator fragmentation)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """The numbers of config.json the plan needs."""

    vocab: int
    hidden: int  # d
    ff: int  # d_ff
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool = False  # Qwen2 (always) and Llama with attention_bias: q/k/v carry a bias vector

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Shape:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(vocab=int(cfg["vocab_size"]), hidden=hidden, ff=int(cfg["intermediate_size"]),
                   layers=int(cfg["num_hidden_layers"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), tied=bool(cfg.get("tie_word_embeddings")),
                   qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")))

    @property
    def layer_params(self) -> int:
        d, ff, qd, kvd = self.hidden, self.ff, self.heads * self.head_dim, self.kv_heads * self.head_dim
        # q, k, v, o + gate, up, down + two RMSNorm weights (+ the q/k/v biases)
        return d * qd + 2 * d * kvd + qd * d + 3 * d * ff + 2 * d + self._bias_params

    @property
    def _bias_params(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0

    @property
    def linear_params(self) -> int:
        """The linears' weight matrices alone (what weight quantization packs)."""
        return self.layers * (self.layer_params - 2 * self.hidden - self._bias_params)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def loaded_params(self) -> int:
        """What a job holds: tied embeddings are untied into a separate lm_head copy when the model loads."""
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden


@dataclass(frozen=True)
class StageMemory:
    stage: str
    device_bytes: int  # peak on the device running the stage
    terms: dict[str, int]  # what makes up the peak
    fits: bool
    placement: str


def _act_bytes(s: Shape, cfg: SpinQuantConfig, tokens: int, wb: int, quantized: bool = True) -> dict[str, int]:
    """What one forward batch of ``tokens`` holds at its peak, inside one layer's MLP: the residual, the norm
    output, gate, up and their product in the model dtype; the online R4 (float32 in, two transform buffers,
    out) and the down_proj input quantizer's private float32 copy when they run (GPTQ calibrates unquantized)."""
    terms = {"one batch's MLP activations (model dtype)": tokens * (3 * s.hidden + 3 * s.ff) * wb}
    r4, _ = cfg.r4_mode
    f32 = (3 if r4 != "none" else 0) + (1 if quantized and cfg.activations.bits < 16 else 0)
    if f32:
        terms["online R4 and quantizer buffers (float32)"] = tokens * s.ff * 4 * f32
    return terms


def _eval_terms(s: Shape, cfg: SpinQuantConfig, wb: int) -> dict[str, int]:
    tokens = max(1, EVAL_BATCH_TOKENS // cfg.eval.seq_len) * cfg.eval.seq_len
    rows = max(1, LOGIT_CHUNK_ELEMS // s.vocab)
    return {**_act_bytes(s, cfg, tokens, wb),
            "one vocabulary chunk of logits (model dtype, float32, log-softmax)": rows * s.vocab * (wb + 8)}


def _learn_terms(s: Shape, cfg: SpinQuantConfig, wb: int) -> dict[str, int]:
    """The larger of the pre-fit and an end-to-end step (quant_core.prefit, quant_core.learn)."""
    L, m, d, ff = cfg.calib.seq_len, cfg.train.micro_batch, s.hidden, s.ff
    qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    rot = d * d + s.layers * s.head_dim**2
    rows = max(1, LOGIT_CHUNK_ELEMS // s.vocab)
    linear = s.layer_params - 2 * d
    step = {
        "R1 + R2 in float64: value, gradient, update workspace": rot * 8 * 3,
        "checkpointed layer inputs": s.layers * m * L * d * wb,
        "FP teacher and quantized final hidden states, their gradient": 3 * m * L * d * wb,
        # the product in the model dtype (quant_core.learn rotates in it); in backward the product again and its gradient
        "one layer's weights rotated on the fly and their gradient": linear * 3 * wb,
        # autograd's saved tensors of one recomputed layer: its inputs and outputs in the model dtype, the
        # quantizers' float32 dx/ds, the online R3/R4 in float32
        "one layer's activations kept for backward": m * L * (wb * (3 * d + 6 * qd + 4 * kvd + 4 * ff)
                                                          + 4 * (2 * d + 2 * qd + 2 * kvd + 3 * ff)),
        # the lm_head's output in the model dtype beside the float32 log-softmaxes; the gradient is made in place
        "one vocabulary chunk: logits, log-softmaxes (float32)": rows * s.vocab * (wb + 4 * HEAD_LOSS_CHUNKS),
    }
    if not cfg.prefit_on:
        return step
    blocks = cfg.train.prefit_blocks
    tokens = min(PREFIT_TOKENS, blocks * L)
    prefit = {
        "pre-fit samples: q/k/v and gate/up inputs, V heads, o_proj inputs (float32)":
            s.layers * tokens * (2 * d + kvd + qd) * 4,
        # autograd holds about 15 copies of a quantized row (the float32 grid, its range-gradient terms, the
        # error and their gradients) for one chunk at a time
        "pre-fit step: every layer's sampled R2 rows, one chunk's rows with autograd's copies (float32)":
            (s.layers * PREFIT_HEAD_TOKENS * (kvd + qd)
             + 15 * max(PREFIT_CHUNK_ROWS * d, PREFIT_CHUNK_LAYERS * PREFIT_HEAD_TOKENS * (kvd + qd))) * 4,
        "pre-fit forward: the blocks' hidden states and one layer's four sites":
            blocks * L * (3 * d + kvd + qd) * wb,
    }
    return step if sum(step.values()) >= sum(prefit.values()) else prefit


def _gptq_terms(s: Shape, cfg: SpinQuantConfig, wb: int) -> dict[str, int]:
    """GPTQ (quant_core.convert, quant_core.gptq): the calibration windows' hidden states and one layer's
    attention output, a micro-batch's activations, and the largest group's Hessian and GPTQ workspace: the
    stacked weight (float32 working copy, codes, dequantized result, the model-dtype stack), and beside the
    accumulated H its working copy and at most two (in, in) factorisation matrices at a time."""
    N, L, d, ff = cfg.calib.samples, cfg.calib.seq_len, s.hidden, s.ff
    qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
    groups = [(qd + 2 * kvd, d), (d, qd), (2 * ff, d), (d, ff)]  # (rows, in) of [q,k,v], [o], [gate,up], [down]
    work = max(rows * n_in * (3 * 4 + wb) + 3 * n_in * n_in * 4 for rows, n_in in groups)
    return {
        "calibration hidden states + one layer's attention output": N * L * (d + qd) * wb,
        **_act_bytes(s, cfg, GPTQ_MICRO_BATCH * L, wb, quantized=False),
        "the largest group's Hessian and GPTQ workspace (float32)": max(d, qd, ff) ** 2 * 4 + work,
    }


def stage_memory(s: Shape, cfg: SpinQuantConfig, dtype: str = "bfloat16") -> dict[str, dict[str, int]]:
    """Peak device bytes per stage, as named terms (pure arithmetic; see the module docstring)."""
    wb = _DTYPE_BYTES[dtype]
    weights = s.loaded_params * wb
    stages: dict[str, dict[str, int]] = {
        "load": {"weights": weights},
        "evaluate_fp": {"weights": weights, **_eval_terms(s, cfg, wb)},
    }
    if cfg.learning:
        stages["learn"] = {"weights (frozen)": weights, **_learn_terms(s, cfg, wb)}
    if cfg.weights.bits < 16:
        if cfg.needs_calibration:
            stages["quantize"] = {"weights": weights, **_gptq_terms(s, cfg, wb)}
        else:
            stages["quantize"] = {"weights": weights, "one weight matrix in float32": s.ff * s.hidden * 4}
    stages["evaluate"] = {"weights": weights, **_eval_terms(s, cfg, wb)}
    packed = s.linear_params * cfg.weights.bits // 8 if cfg.weights.bits < 16 else s.linear_params * wb
    stages["export (host memory)"] = {"model": weights, "packed copy": packed}
    return stages


def _placement(stage: str, need: int, usable: int, s: Shape, terms: dict[str, int], wb: int) -> tuple[bool, str]:
    if stage.startswith("export"):
        return True, "host RAM"
    if need <= usable:
        return True, "one GPU"
    if stage == "learn":
        # Offload: the frozen weights stay in host RAM; one layer visits (twice per micro-batch: forward and the
        # checkpoint recompute), and the embedding and lm_head visit in turn (the fused loss needs no lm_head
        # in backward).
        streamed = need - terms["weights (frozen)"] + s.layer_params * wb + s.vocab * s.hidden * wb
        if streamed <= usable:
            return False, (f"offload: {streamed / GiB:.1f} GiB on GPU, weights in host RAM "
                           "(each layer streamed twice per micro-batch)")
        # FSDP would shard the frozen weights (and the float64 layer copies) across k GPUs; activations stay per GPU.
        sharded = terms["weights (frozen)"] + terms.get("one layer's weights rotated on the fly and their gradient", 0)
        rest = need - sharded
        if rest >= usable:
            return False, "does not fit even sharded: lower seq_len or micro_batch"
        k = math.ceil(sharded / (usable - rest))
        return False, f"FSDP over {k} GPUs (not implemented)"
    # Layer-wise offload: weights stay in host RAM and stream to the GPU one layer at a time.
    per_layer = need - terms.get("weights", 0) + s.layer_params * wb + s.vocab * s.hidden * wb
    if per_layer <= usable:
        return False, f"offload: {per_layer / GiB:.1f} GiB on GPU, weights in host RAM"
    return False, "does not fit even with offload: lower seq_len or calibration samples"


def plan(model_config: dict[str, Any], cfg: SpinQuantConfig, *, gpu_gib: float = 80.0,
         dtype: str = "bfloat16") -> tuple[Shape, list[StageMemory]]:
    """Per-stage memory for ``model_config`` under ``cfg`` on a GPU of ``gpu_gib``.

    Example:
        >>> shape, stages = plan(json.load(open("config.json")), make_config("spinquant"))
    """
    s = Shape.from_config(model_config)
    usable = int(gpu_gib * GiB * HEADROOM)
    out = []
    for stage, terms in stage_memory(s, cfg, dtype).items():
        need = sum(terms.values())
        fits, where = _placement(stage, need, usable, s, terms, _DTYPE_BYTES[dtype])
        out.append(StageMemory(stage=stage, device_bytes=need, terms=terms, fits=fits, placement=where))
    return s, out


def render(name: str, s: Shape, stages: list[StageMemory], gpu_gib: float, dtype: str) -> str:
    lines = [f"{name}: {s.layers} layers, d {s.hidden}, d_ff {s.ff}, heads {s.heads}/{s.kv_heads} (q/kv), "
             f"vocab {s.vocab}; {s.params / 1e9:.2f} B parameters, {s.params * _DTYPE_BYTES[dtype] / GiB:.1f} GiB "
             f"in {dtype}",
             f"device: {gpu_gib:g} GiB GPU ({HEADROOM:.0%} usable = {gpu_gib * HEADROOM:.1f} GiB)", "",
             f"{'stage':<22}{'peak GiB':>10}  placement", "-" * 60]
    for st in stages:
        lines.append(f"{st.stage:<22}{st.device_bytes / GiB:>10.1f}  {st.placement}")
        for term, b in st.terms.items():
            lines.append(f"{'':<4}{term:<52}{b / GiB:>8.2f}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Decision:
    """How the pipeline places a job on one GPU: the whole model, layer-wise offload, or a refusal."""

    offload: bool  # weights in host RAM, one decoder layer at a time on the GPU (evaluation, GPTQ)
    refusal: str | None = None  # why the job cannot run on this GPU (None: it can)


def decide(model_config: dict[str, Any], cfg: SpinQuantConfig, gpu_bytes: int, dtype: str = "bfloat16") -> Decision:
    """Place a job on one GPU of ``gpu_bytes`` from its plan and ``cfg.placement``.

    - every stage fits and placement is auto or whole: the whole model on the GPU;
    - placement layers, or auto with a stage that fits only with offload: layer-wise offload;
    - refused: a stage that does not fit even with offload (learning: the plan then names the FSDP split
      it would take, which is not implemented), placement whole when something does not fit, learning with
      offload but without layer checkpointing, and zero-shot evaluation when the model needs offload.
    """
    _, stages = plan(model_config, cfg, gpu_gib=gpu_bytes / GiB, dtype=dtype)
    over = [s for s in stages if not s.fits]
    gib = f"{gpu_bytes / GiB:.0f} GiB"
    hint = "python -m quant_core plan MODEL shows every stage"
    if not over:
        offload = cfg.placement == "layers"
    else:
        worst = max(over, key=lambda s: s.device_bytes)
        summary = (f"this model does not fit one {gib} GPU: {worst.stage} needs {worst.device_bytes / GiB:.1f} GiB "
                   f"(it would need {worst.placement}); stages over the limit: {', '.join(s.stage for s in over)}")
        if cfg.placement == "whole":
            return Decision(False, f"{summary}. placement=whole keeps every weight on the GPU; use placement=auto "
                                   f"for layer-wise offload, or a larger GPU ({hint})")
        stuck = [s for s in over if not s.placement.startswith("offload")]
        if stuck:
            why = "; ".join(f"{s.stage} needs {s.device_bytes / GiB:.1f} GiB and {s.placement}" for s in stuck)
            return Decision(False, f"this model does not fit one {gib} GPU even with layer-wise offload: {why}. "
                                   f"Lower seq_len, calib_samples or micro_batch, or use a larger GPU ({hint})")
        offload = True
    learning = cfg.learning
    if offload and learning and not cfg.train.checkpoint_layers:
        return Decision(True, f"learning with layer-wise offload (needed on one {gib} GPU) recomputes each layer in "
                              f"backward; set train.checkpoint_layers=true ({hint})")
    if offload and cfg.zero_shot_tasks:
        return Decision(True, "zero-shot evaluation runs the whole model at once and is not available with "
                              "layer-wise offload; drop zero_shot_tasks or use a larger GPU")
    return Decision(offload)


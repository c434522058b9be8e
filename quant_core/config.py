"""The one quantization config: frozen, versioned, validated, torch-free.

It is defined here once, validated at the API edge, carried unchanged through the queue as
``config_to_dict(cfg)`` and saved beside every artifact. ``api/`` imports this module, so it must
never import torch (a test checks it).

Example:
    >>> cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4)
    >>> config_from_dict(config_to_dict(cfg)) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError as ConfigError

CONFIG_VERSION = 1

W_BITS = (2, 3, 4, 8, 16)  # 16 = weights not quantized
A_BITS = (4, 8, 16)  # 16 = activations not quantized
KV_BITS = (4, 8, 16)  # 16 = KV cache not quantized
PLACEMENTS = ("auto", "whole", "layers")  # where the weights rest while a job runs (SpinQuantConfig.placement)
STE_MODES = ("range", "identity")  # rotation-learning gradient through the fake quantizers (TrainConfig.ste)
MAX_STEPS = 100_000  # the most end-to-end steps, and the most pre-fit steps, a job may ask for
# A Hugging Face model id, org/name (ASCII: `\w` alone would take any letter; match it with fullmatch, since `$`
# lets a trailing newline through). The CLI's loader and the service's submission check both use it.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", re.ASCII)
MAX_COUNT = 1 << 24  # the most windows, blocks or sequences any count may name (16.7M: far past any real job)
TRAIN_LOSSES = ("kl", "ce")  # rotation-learning loss (TrainConfig.loss); quant_core.losses implements both




class Method(str, enum.Enum):
    SPINQUANT = "spinquant"  # learned R1/R2 (Cayley SGD), online R3/R4, paper-faithful quantizers
    SPINQUANT_VLLM = "spinquant-vllm"  # learned R1/R2, block R4, symmetric activations: what vLLM serves
    QUAROT = "quarot"  # random-Hadamard R1/R2, online R3/R4, nothing learned
    GPTQ = "gptq"  # no rotation, GPTQ weights
    RTN = "rtn"  # no rotation, round-to-nearest weights


class Rotation(str, enum.Enum):
    NONE = "none"  # no R1/R2, norms not folded (the plain GPTQ/RTN baselines)
    RANDOM = "random"  # R1/R2 random Hadamard (QuaRot / SpinQuant "random" variant)
    LEARNED = "learned"  # R1/R2 learned by Cayley SGD on the Stiefel manifold


class WeightAlgo(str, enum.Enum):
    GPTQ = "gptq"
    RTN = "rtn"


class HadamardFallback(str, enum.Enum):
    ORTHOGONAL = "orthogonal"  # seeded random KxK orthogonal (x) Walsh-Hadamard: exact, fake-quant only
    BLOCK = "block"  # largest power-of-two block-diagonal Hadamard: exportable
    REJECT = "reject"  # refuse the job, naming the factorisation


def _choice(enum_type: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in enum_type)
        raise ConfigError(name, f"{name}={value!r} is not valid", accepted) from None


def _check_in(value: Any, allowed: tuple[Any, ...], name: str) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(name, f"{name}={value!r} is not valid", ", ".join(map(str, allowed)))


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(name, f"{name}={value!r} is not valid", f"an integer {rng}")


def _check_float(value: Any, name: str, lo: float, hi: float, lo_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ConfigError(name, f"{name}={value!r} is not valid", f"a number in {bracket}{lo}, {hi}]")


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, f"{name}={value!r} is not valid", "true or false")


def parse_r4(value: str) -> tuple[str, int | None]:
    """Parse an R4 mode: 'none', 'full', 'block:<b>' (b a power of two) or 'block:auto' (the largest
    power of two <= 128 dividing d_ff, decided per model). Returns (mode, block or None for auto)."""
    if value in ("none", "full"):
        return value, None
    if value == "block:auto":
        return "block", None
    if isinstance(value, str) and value.startswith("block:"):
        tail = value.split(":", 1)[1]
        if tail.isdigit() and int(tail) >= 2 and (int(tail) & (int(tail) - 1)) == 0:
            return "block", int(tail)
    raise ConfigError("rotation.r4", f"rotation.r4={value!r} is not valid",
                      "'none', 'full', 'block:<power of two>', 'block:auto'")


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    # Columns by descending diag(H), every group's scale fitted on the original weights up front (llm-compressor's
    # actorder "static"): the stored groups stay contiguous, so every format and kernel holds the result as is.
    # On SmolLM2-135M W4A16 g64: 29.52 against 31.92 in plain column order (llm-compressor 31.23, GPTQModel 30.47).
    act_order: bool = True
    block_size: int = 128  # columns per lazy-update block
    static_groups: bool = True

    def __post_init__(self) -> None:
        _check_float(self.damp, "weights.gptq.damp", 0.0, 1.0)
        _check_bool(self.act_order, "weights.gptq.act_order")
        _check_int(self.block_size, "weights.gptq.block_size", 1, MAX_COUNT)
        _check_bool(self.static_groups, "weights.gptq.static_groups")


@dataclass(frozen=True)
class WeightQuantConfig:
    bits: int = 4  # 2, 3, 4, 8; 16 = not quantized
    group_size: int = -1  # -1 = one scale per output channel; else input columns per scale
    sym: bool = True  # symmetric signed integers (no zero point)
    mse_clip: bool = True  # per-row/group clip search minimising sum |Q(w)-w|^2.4
    algo: WeightAlgo = WeightAlgo.GPTQ  # gptq or rtn
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    @property
    def permutes_groups(self) -> bool:
        """Groups follow GPTQ's processing order (act_order without static groups, at a group size): the checkpoint
        needs a g_idx that no GPTQ v1 (desc_act=false) loader or int4 kernel reads. Per channel there is one group
        per row whatever the order."""
        return self.group_size > 0 and self.gptq.act_order and not self.gptq.static_groups

    def __post_init__(self) -> None:
        _check_in(self.bits, W_BITS, "weights.bits")
        if self.group_size != -1:
            _check_int(self.group_size, "weights.group_size (-1 = per channel)", 1)
        _check_bool(self.sym, "weights.sym")
        _check_bool(self.mse_clip, "weights.mse_clip")
        object.__setattr__(self, "algo", _choice(WeightAlgo, self.algo, "weights.algo"))


@dataclass(frozen=True)
class ActQuantConfig:
    bits: int = 16  # 4, 8; 16 = not quantized
    sym: bool = False  # the official scripts quantize activations asymmetrically
    clip_ratio: float = 1.0  # scale the per-token range by this before quantizing
    o_proj_per_head: bool = True  # o_proj input quantized in head_dim groups (SpinQuant, no cross-head Hadamard)
    half_range: bool = False  # symmetric scale amax/((qmax-qmin)/2) (compressed-tensors) instead of amax/qmax

    def __post_init__(self) -> None:
        _check_in(self.bits, A_BITS, "activations.bits")
        _check_bool(self.sym, "activations.sym")
        _check_float(self.clip_ratio, "activations.clip_ratio", 0.0, 1.0)
        _check_bool(self.o_proj_per_head, "activations.o_proj_per_head")
        _check_bool(self.half_range, "activations.half_range")


@dataclass(frozen=True)
class KVQuantConfig:
    bits: int = 16  # 4, 8; 16 = not quantized
    sym: bool = False  # per token, per head; asymmetric in the official scripts
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        _check_in(self.bits, KV_BITS, "kv.bits")
        _check_bool(self.sym, "kv.sym")
        _check_float(self.clip_ratio, "kv.clip_ratio", 0.0, 1.0)


@dataclass(frozen=True)
class RotationConfig:
    r1r2: Rotation = Rotation.LEARNED  # none, random (Hadamard) or learned
    r3: str = "auto"  # online Hadamard on Q and K after RoPE: auto (on when KV < 16 and rotating), on, off
    r4: str = "auto"  # online Hadamard on the down_proj input: auto, none, full, block:<b>, block:auto
    fallback: HadamardFallback = HadamardFallback.ORTHOGONAL  # sizes with no known Hadamard K
    # E <- E - rowmean(E), as the official repo does (SQ#14). Off by default: RMSNorm does not remove the mean, so
    # centering changes the FP model (SmolLM2-135M: invariance probe 0.52 max |logit diff| on, 1e-4 off)
    center_embeddings: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "r1r2", _choice(Rotation, self.r1r2, "rotation.r1r2"))
        if self.r3 not in ("auto", "on", "off"):
            raise ConfigError("rotation.r3", f"rotation.r3={self.r3!r} is not valid", "'auto', 'on', 'off'")
        if self.r4 != "auto":
            parse_r4(self.r4)
        object.__setattr__(self, "fallback", _choice(HadamardFallback, self.fallback, "rotation.fallback"))
        _check_bool(self.center_embeddings, "rotation.center_embeddings")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # Cayley SGD steps
    lr: float = 1.5  # initial step size, cosine-decayed to 0 without warmup
    grad_clip: float = 1.0  # global norm over R1 and all R2, before each step
    batch_size: int = 8  # sequences per step
    micro_batch: int = 1  # sequences per forward (accumulated to batch_size); raise it when memory allows
    checkpoint_layers: bool = True  # recompute each layer (and its rotated weights) in backward to save memory
    samples: int = 800  # training blocks taken from the start of the calibration text
    step_cap: bool = False  # cap the step at 1/||A||_1 like the official optimizer
    train_w_bits: int | None = None  # None: 16 when GPTQ follows, else the target weight bits
    # identity: SpinQuant's STE, the gradient passes every fake quantizer unchanged; range: also through
    # each token's activation/KV scale (its min/max), so learning sees a rotation narrow a token's range
    ste: str = "range"
    # kl: KL(FP model || quantized model) on the same batch, every position (OSTQuant's KL-Top, full vocabulary);
    # ce: next-token cross-entropy, SpinQuant's loss
    loss: str = "kl"
    # pre-fit (quant_core.prefit), before the end-to-end steps when activations are quantized: Riemannian Adam
    # steps for R1 and every R2 on the quantization error of the activations they rotate (q/k/v and gate/up
    # inputs; V heads and o_proj inputs), sampled from prefit_blocks blocks
    prefit_steps: int = 600
    prefit_lr: float = 0.01
    prefit_blocks: int = 8
    # share of the R1 pre-fit error given to each block's first position (the attention sink every later position
    # reads: on SmolLM2-135M it carries a quarter of the q/k/v and gate/up inputs' quantization damage while a
    # random sample holds it at 1 row in 512); 0 = rows sampled uniformly only
    prefit_sink_share: float = 0.25

    def __post_init__(self) -> None:
        _check_int(self.steps, "train.steps", 0, MAX_STEPS)
        _check_float(self.lr, "train.lr", 0.0, 1000.0)
        _check_float(self.grad_clip, "train.grad_clip", 0.0, 1e9)
        _check_int(self.batch_size, "train.batch_size", 1, MAX_COUNT)
        _check_int(self.micro_batch, "train.micro_batch", 1, MAX_COUNT)
        if self.batch_size % self.micro_batch:
            raise ConfigError("train.batch_size", f"train.batch_size={self.batch_size} is not a multiple of "
                              f"train.micro_batch={self.micro_batch}")
        _check_int(self.samples, "train.samples", 1, MAX_COUNT)
        _check_bool(self.step_cap, "train.step_cap")
        _check_bool(self.checkpoint_layers, "train.checkpoint_layers")
        if self.train_w_bits is not None:
            _check_in(self.train_w_bits, W_BITS, "train.train_w_bits")
        _check_in(self.ste, STE_MODES, "train.ste")
        _check_in(self.loss, TRAIN_LOSSES, "train.loss")
        _check_int(self.prefit_steps, "train.prefit_steps", 0, MAX_STEPS)
        _check_float(self.prefit_lr, "train.prefit_lr", 0.0, 10.0)
        _check_int(self.prefit_blocks, "train.prefit_blocks", 1, 4096)
        _check_float(self.prefit_sink_share, "train.prefit_sink_share", 0.0, 0.95, lo_open=False)


@dataclass(frozen=True)
class DataConfig:
    source: str = "wikitext2"  # a datasets name (wikitext2, or name[:config]) or "file:<path>" of plain text
    samples: int = 128  # calibration windows (random, seeded); eval ignores it
    seq_len: int = 2048  # tokens per window
    max_windows: int = 0  # eval only: 0 = every window of the text

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("source", "data source is empty", "a datasets name such as 'wikitext2' or 'file:<path>'")
        _check_int(self.samples, "samples", 1, MAX_COUNT)
        _check_int(self.seq_len, "seq_len", 8, 1 << 20)
        _check_int(self.max_windows, "max_windows", 0, MAX_COUNT)


@dataclass(frozen=True)
class SpinQuantConfig:
    """Every setting of one quantization job. Build it with :func:`make_config`."""

    method: Method = Method.SPINQUANT
    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activations: ActQuantConfig = field(default_factory=ActQuantConfig)
    kv: KVQuantConfig = field(default_factory=KVQuantConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calib: DataConfig = field(default_factory=DataConfig)
    eval: DataConfig = field(default_factory=lambda: DataConfig(samples=1))
    zero_shot_tasks: tuple[str, ...] = ()  # lm-eval task names (optional extra 'eval'), FP and quantized
    seed: int = 0
    device: str = "auto"  # auto (cuda when available), cpu, cuda
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16
    # auto: the whole model on the GPU when the plan says it fits, else weights in host RAM with one layer
    # at a time on the GPU for evaluation and GPTQ; whole; layers (always offload)
    placement: str = "auto"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _choice(Method, self.method, "method"))
        tasks = self.zero_shot_tasks
        if isinstance(tasks, str):
            tasks = tuple(t for t in tasks.split(",") if t.strip())
        if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in tasks):
            raise ConfigError("zero_shot_tasks", f"zero_shot_tasks={tasks!r} is not valid", "a list of lm-eval task names")
        object.__setattr__(self, "zero_shot_tasks", tuple(t.strip() for t in tasks))
        _check_int(self.seed, "seed", 0, 2**63 - 1)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("device", f"device={self.device!r} is not valid", "auto, cpu, cuda")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("dtype", f"dtype={self.dtype!r} is not valid", "auto, float32, bfloat16, float16")
        _check_in(self.placement, PLACEMENTS, "placement")
        if self.placement == "layers" and self.rotation.r1r2 is Rotation.LEARNED and not self.train.checkpoint_layers:
            raise ConfigError("placement", "placement='layers' learns with each layer recomputed in backward",
                              "train.checkpoint_layers=true (the default) with placement layers")
        if self.placement == "layers" and self.zero_shot_tasks:
            raise ConfigError("placement", "placement='layers' cannot run zero-shot tasks",
                              "placement auto or whole, or no zero_shot_tasks")
        if self.version != CONFIG_VERSION:
            raise ConfigError("version", f"config version {self.version} is not supported; this build reads {CONFIG_VERSION}")
        rot = self.rotation.r1r2
        if rot is Rotation.NONE and self.rotation.r4 not in ("auto", "none"):
            raise ConfigError("rotation.r4", "rotation.r4 needs rotation.r1r2 'random' or 'learned' (norms are folded only then)")
        if rot is Rotation.NONE and self.rotation.r3 == "on":
            raise ConfigError("rotation.r3", "rotation.r3='on' needs rotation.r1r2 'random' or 'learned'")
        if self.weights.bits == 16 and self.activations.bits == 16 and self.kv.bits == 16:
            raise ConfigError(None, "nothing to quantize: w_bits, a_bits and kv_bits are all 16")

    # -- derived settings (one place decides them) --------------------------------------------
    @property
    def rotating(self) -> bool:
        return self.rotation.r1r2 is not Rotation.NONE

    @property
    def prefit_on(self) -> bool:
        """R1 is pre-fitted to the activations' own quantization error (only quantized activations have one)."""
        return self.rotation.r1r2 is Rotation.LEARNED and self.train.prefit_steps > 0 and self.activations.bits < 16

    @property
    def learning(self) -> bool:
        """The job learns R1/R2: a pre-fit, end-to-end steps, or both."""
        return self.rotation.r1r2 is Rotation.LEARNED and (self.train.steps > 0 or self.prefit_on)

    @property
    def needs_calibration(self) -> bool:
        """GPTQ quantizes the weights: it needs calibration windows (RTN and 16-bit weights do not)."""
        return self.weights.bits < 16 and self.weights.algo is WeightAlgo.GPTQ

    @property
    def r3_on(self) -> bool:
        if self.rotation.r3 == "auto":
            return self.rotating and self.kv.bits < 16
        return self.rotation.r3 == "on"

    @property
    def r4_mode(self) -> tuple[str, int | None]:
        """('none'|'full'|'block', block). auto: 'full' when activations are quantized (SpinQuant_had),
        'none' for W-only targets (SpinQuant_no_had: nothing online, exportable to GPTQ)."""
        if self.rotation.r4 == "auto":
            return ("full", None) if (self.rotating and self.activations.bits < 16) else ("none", None)
        return parse_r4(self.rotation.r4)

    @property
    def train_w_bits(self) -> int:
        """Weight bits inside the learning loss (SPINQUANT.md §6): W16 when GPTQ follows and activations
        or KV are quantized (the paper's main results); otherwise the target bits, because a loss with
        no quantizer in it is rotation-invariant and gives no signal."""
        if self.train.train_w_bits is not None:
            return self.train.train_w_bits
        acts_quantized = self.activations.bits < 16 or self.kv.bits < 16
        return 16 if (self.weights.algo is WeightAlgo.GPTQ and acts_quantized) else self.weights.bits

    @property
    def scheme(self) -> str:
        return f"W{self.weights.bits}A{self.activations.bits}KV{self.kv.bits}"


# -- presets -------------------------------------------------------------------------------------

# Flat override names accepted by make_config (CLI flags and API fields use these) -> dotted path.
ALIASES: dict[str, str] = {
    "w_bits": "weights.bits",
    "w_group_size": "weights.group_size",
    "w_sym": "weights.sym",
    "w_mse_clip": "weights.mse_clip",
    "w_algo": "weights.algo",
    "gptq_damp": "weights.gptq.damp",
    "act_order": "weights.gptq.act_order",
    "a_bits": "activations.bits",
    "a_sym": "activations.sym",
    "a_clip_ratio": "activations.clip_ratio",
    "kv_bits": "kv.bits",
    "kv_sym": "kv.sym",
    "kv_clip_ratio": "kv.clip_ratio",
    "r3": "rotation.r3",
    "r4": "rotation.r4",
    "hadamard_fallback": "rotation.fallback",
    "center_embeddings": "rotation.center_embeddings",
    "steps": "train.steps",
    "lr": "train.lr",
    "grad_clip": "train.grad_clip",
    "batch_size": "train.batch_size",
    "micro_batch": "train.micro_batch",
    "train_samples": "train.samples",
    "ste": "train.ste",
    "loss": "train.loss",
    "prefit_steps": "train.prefit_steps",
    "prefit_sink_share": "train.prefit_sink_share",
    "calib_source": "calib.source",
    "calib_samples": "calib.samples",
    "seq_len": ("calib.seq_len", "eval.seq_len"),  # type: ignore[dict-item]
    "eval_source": "eval.source",
    "eval_windows": "eval.max_windows",
}

PRESETS: dict[Method, dict[str, Any]] = {
    # Paper-faithful: learned R1/R2, full R4, asymmetric per-token activations and KV, clip 1.0, GPTQ.
    Method.SPINQUANT: {"rotation.r1r2": "learned"},
    # What vLLM serves as is: symmetric per-token activations without clipping, block R4 (128, or the
    # largest power of two dividing d_ff when 128 does not),
    # no R3 (no runtime applies it), KV symmetric per token-head like --kv-cache-dtype int4_per_token_head.
    Method.SPINQUANT_VLLM: {
        "rotation.r1r2": "learned",
        "rotation.r4": "block:auto",
        "rotation.r3": "off",
        "activations.sym": True,
        "activations.o_proj_per_head": False,
        "activations.half_range": True,  # compressed-tensors' symmetric scale, the format we export to
        "kv.sym": True,
    },
    # QuaRot's settings: random Hadamard, symmetric activations clip 0.9, asymmetric KV clip 0.95.
    Method.QUAROT: {
        "rotation.r1r2": "random",
        "activations.sym": True,
        "activations.clip_ratio": 0.9,
        "kv.clip_ratio": 0.95,
    },
    Method.GPTQ: {"rotation.r1r2": "none", "weights.algo": "gptq"},
    Method.RTN: {"rotation.r1r2": "none", "weights.algo": "rtn"},
}


def _as_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple):
        return list(obj)
    return obj


_SECTIONS: dict[str, type] = {
    "weights": WeightQuantConfig,
    "activations": ActQuantConfig,
    "kv": KVQuantConfig,
    "rotation": RotationConfig,
    "train": TrainConfig,
    "calib": DataConfig,
    "eval": DataConfig,
}


def _build(cls: type, data: Any, where: str) -> Any:
    """Rebuild a (nested) dataclass from plain data; unknown keys are errors, not silently dropped."""
    if not isinstance(data, dict):
        raise ConfigError(where.rstrip(".") or None, f"{where or 'config'} must be an object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(where + unknown[0], f"unknown setting(s) {', '.join(where + k for k in unknown)}", ", ".join(known))
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub: type | None = None
        if cls is SpinQuantConfig and name in _SECTIONS:
            sub = _SECTIONS[name]
        elif cls is WeightQuantConfig and name == "gptq":
            sub = GPTQConfig
        kwargs[name] = _build(sub, value, f"{where}{name}.") if sub else value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # e.g. a number where an object belongs
        raise ConfigError(where.rstrip(".") or None, f"invalid {where or 'config'}: {exc}") from None
    except ConfigError as exc:  # a section's own check names its field without the section (DataConfig: calib/eval)
        if exc.field is None or not where or "." in exc.field:  # already a full dotted path
            raise
        raise ConfigError(where + exc.field, exc.message, exc.accepted) from None


def make_config(method: str | Method = Method.SPINQUANT, **overrides: Any) -> SpinQuantConfig:
    """Build a validated config from a method preset plus overrides.

    Args:
        method: one of spinquant, spinquant-vllm, quarot, gptq, rtn.
        **overrides: flat names from ``ALIASES`` (w_bits=4, a_bits=4, steps=100 ...) or dotted
            paths given as a dict under ``settings`` (``settings={"weights.gptq.damp": 0.02}``).
            ``None`` values are ignored, so CLI defaults can be passed straight through.

    Example:
        >>> make_config("quarot", w_bits=4, a_bits=4, kv_bits=4).scheme
        'W4A4KV4'
    """
    m = _choice(Method, method, "method")
    data = _as_dict(SpinQuantConfig(method=m, weights=WeightQuantConfig(), kv=KVQuantConfig()))
    dotted: dict[str, Any] = dict(PRESETS[m])
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "settings":
            if not isinstance(value, dict):
                raise ConfigError("settings", "settings must be an object of dotted names to values")
            dotted.update(value)
            continue
        if key in ("seed", "device", "dtype", "zero_shot_tasks", "placement"):
            dotted[key] = value
            continue
        if key not in ALIASES:
            accepted = ", ".join(sorted([*ALIASES, "seed", "device", "dtype", "zero_shot_tasks", "placement", "settings"]))
            raise ConfigError(key, f"unknown setting {key!r}", accepted)
        targets = ALIASES[key]
        for path in targets if isinstance(targets, tuple) else (targets,):
            dotted[path] = value
    for path, value in dotted.items():
        node = data
        parts = path.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(path, f"unknown setting {path!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(path, f"unknown setting {path!r}; accepted under {'.'.join(parts[:-1]) or 'config'}: "
                              f"{', '.join(node)}")
        node[parts[-1]] = value.value if isinstance(value, enum.Enum) else value
    return _build(SpinQuantConfig, data, "")


def config_to_dict(cfg: SpinQuantConfig) -> dict[str, Any]:
    """Versioned plain form ``{_type, _version, _data}``, the form that crosses every boundary."""
    return {"_type": "SpinQuantConfig", "_version": cfg.version, "_data": _as_dict(cfg)}


def config_from_dict(payload: dict[str, Any]) -> SpinQuantConfig:
    """Inverse of :func:`config_to_dict`; only the allow-listed type and version are accepted."""
    if not isinstance(payload, dict) or payload.get("_type") != "SpinQuantConfig":
        raise ConfigError(None, "not a SpinQuantConfig payload (expected {_type: 'SpinQuantConfig', _version, _data})")
    if payload.get("_version") != CONFIG_VERSION:
        raise ConfigError("version", f"config version {payload.get('_version')!r} is not supported; expected {CONFIG_VERSION}")
    return _build(SpinQuantConfig, payload.get("_data"), "")


def vllm_serving_verdict(cfg: SpinQuantConfig, head_dim: int | None = None) -> Literal[True] | list[str]:
    """True when vLLM serves exactly what this config evaluates; otherwise the reasons it does not."""
    reasons: list[str] = []
    if cfg.weights.bits not in (4, 8, 16):
        reasons.append(f"{cfg.weights.bits}-bit weights have no vLLM kernel")
    if not cfg.weights.sym and cfg.activations.bits < 16:
        reasons.append("asymmetric weights are not served together with int4/int8 activations")
    if cfg.activations.bits < 16:
        if not cfg.activations.sym:
            reasons.append("asymmetric activations (vLLM quantizes activations symmetrically)")
        if cfg.activations.clip_ratio != 1.0:
            reasons.append(f"activation clip ratio {cfg.activations.clip_ratio} (vLLM does not clip)")
        if cfg.activations.o_proj_per_head:
            reasons.append("o_proj input quantized per head group (served per token)")
    mode, _ = cfg.r4_mode
    if mode == "full":
        reasons.append("full K*2^m R4 has no fast runtime kernel; use r4=block:<b>")
    if cfg.r3_on:
        reasons.append("R3 (online Q/K Hadamard) is not applied by vLLM")
    if cfg.kv.bits < 16:
        if not cfg.kv.sym:
            reasons.append("asymmetric KV cache (vLLM int4_per_token_head is symmetric)")
        if cfg.kv.clip_ratio != 1.0:
            reasons.append(f"KV clip ratio {cfg.kv.clip_ratio}")
    return reasons or True

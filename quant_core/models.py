"""Family adapters and our own decoder forward for Llama, Mistral and Qwen2.

We run the model with our own ~200-line forward instead of patching transformers' attention:
R3 must sit between RoPE and the KV cache, activations and KV are fake-quantized at fixed
points, and R1/R2 are applied on the fly during learning. Parameter names are exactly the
Hugging Face checkpoint names, so weights load without a mapping table, and tests check that
the logits equal transformers' own implementation.

Example:
    >>> src = resolve_model("tests/fixtures/models/llama-tiny")
    >>> model = load_model(src, dtype=torch.float32)
    >>> logits = model(torch.tensor([[1, 2, 3]]))
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HUB_ID
from .errors import ModelError as ModelError
from .hadamard import HadamardPlan, apply_plan
from .quantizers import fake_quant_act

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ArchSpec:
    """The architecture map of one model: everything the rotations and quantizers need."""

    family: str  # llama, mistral, qwen2
    vocab_size: int
    hidden: int  # d
    intermediate: int  # d_ff
    n_layers: int
    n_heads: int  # query heads
    n_kv: int  # key/value heads (GQA when < n_heads)
    head_dim: int  # hd
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None = default RoPE
    tied: bool  # tie_word_embeddings in the source
    qkv_bias: bool  # Qwen2
    sliding_window: int | None  # Mistral; None = full attention
    max_position: int
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every decoder linear, by its short name."""
        d, ff, hd = self.hidden, self.intermediate, self.head_dim
        return {
            "q_proj": (self.n_heads * hd, d),
            "k_proj": (self.n_kv * hd, d),
            "v_proj": (self.n_kv * hd, d),
            "o_proj": (d, self.n_heads * hd),
            "gate_proj": (ff, d),
            "up_proj": (ff, d),
            "down_proj": (d, ff),
        }


def arch_from_config(cfg: dict[str, Any]) -> ArchSpec:
    """Read config.json (transformers 4.x or 5.x keys) into an ArchSpec, refusing what we cannot fold."""
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ModelError(
            f"model family {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)} "
            "(Llama incl. GQA, Mistral, Qwen2)"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelError(f"hidden_act={cfg.get('hidden_act')!r} is not supported; accepted: 'silu'")
    if cfg.get("mlp_bias"):
        raise ModelError("mlp_bias=true is not supported (no Llama/Mistral/Qwen2 release uses it)")
    if family == "llama" and cfg.get("attention_bias"):
        raise ModelError("attention_bias=true on a Llama config is not supported")
    try:
        n_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        if scaling:
            rope = {**rope, **scaling}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ModelError(f"RoPE type {rope_type!r} is not supported; accepted: {', '.join(_ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelError("partial_rotary_factor != 1 is not supported")
        rope_scaling = None if rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
        window = cfg.get("sliding_window") if family == "mistral" else None
        if family == "qwen2" and cfg.get("use_sliding_window"):
            raise ModelError("Qwen2 with use_sliding_window=true is not supported")
        spec = ArchSpec(
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
            sliding_window=int(window) if window else None,
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"config.json is missing or has a bad value for {exc}") from None
    if spec.n_heads % spec.n_kv:
        raise ModelError(f"num_attention_heads={spec.n_heads} is not a multiple of num_key_value_heads={spec.n_kv}")
    return spec


# -- runtime quantization settings carried by the model ------------------------------------------


@dataclass
class QuantRuntime:
    """What the forward applies online; None fields are off. Set by the pipeline, read by the forward."""

    a_bits: int = 16
    a_sym: bool = False
    a_clip: float = 1.0
    a_half_range: bool = False  # symmetric scale amax/((qmax-qmin)/2), compressed-tensors' convention
    o_group: int = -1  # o_proj input activation group (head_dim for SpinQuant), -1 = per token
    kv_bits: int = 16
    kv_sym: bool = False
    kv_clip: float = 1.0
    r3: HadamardPlan | None = None  # on Q and K after RoPE (size head_dim)
    r4: HadamardPlan | None = None  # on the down_proj input (size d_ff)
    range_grad: bool = False  # learning only: gradients also reach each token's scale (train.ste = range)

    def act(self, x: Tensor, group: int = -1) -> Tensor:
        if self.a_bits >= 16:
            return x
        return fake_quant_act(x, bits=self.a_bits, sym=self.a_sym, clip_ratio=self.a_clip, group_size=group,
                              half_range=self.a_half_range, range_grad=self.range_grad)

    def kv(self, x: Tensor) -> Tensor:
        # x: (B, n_kv, L, hd): per token, per head = groups of hd over the last dim.
        if self.kv_bits >= 16:
            return x
        return fake_quant_act(x, bits=self.kv_bits, sym=self.kv_sym, clip_ratio=self.kv_clip, group_size=-1,
                              range_grad=self.range_grad)


# -- modules ---------------------------------------------------------------------------------------


def quant_input(x: Tensor, rt: QuantRuntime | None) -> Tensor:
    """A linear input through the activation quantizer (identity without a runtime or at 16 bits)."""
    return x if rt is None else rt.act(x)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Same arithmetic as transformers: normalise in fp32, cast, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(arch: ArchSpec) -> Tensor:
    """Inverse frequencies for RoPE, with linear or llama3 scaling as in the configs."""
    hd = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = arch.rope_scaling
    if sc is None:
        return inv.float()
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return (inv / float(sc["factor"])).float()
    # llama3: long wavelengths divided by factor, short kept, a smooth ramp between.
    factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(is_mid, mid, scaled).float()


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        d, hd = arch.hidden, arch.head_dim
        self.arch = arch
        self.q_proj = nn.Linear(d, arch.n_heads * hd, bias=arch.qkv_bias)
        self.k_proj = nn.Linear(d, arch.n_kv * hd, bias=arch.qkv_bias)
        self.v_proj = nn.Linear(d, arch.n_kv * hd, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.n_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, rt: QuantRuntime | None) -> Tensor:
        return self.o_proj(self.mix(quant_input(x, rt), cos, sin, rt))  # one shared quantizer for q/k/v

    def mix(self, x: Tensor, cos: Tensor, sin: Tensor, rt: QuantRuntime | None) -> Tensor:
        """Attention from the (quantized) q/k/v input to the o_proj input (B, L, n_h*hd), quantized as o_proj
        reads it. GPTQ runs forward's pieces one at a time (convert.py): the very same operations."""
        a = self.arch
        bsz, seq, _ = x.shape
        # (B, L, n*hd) -> (B, n, L, hd)
        q = self.q_proj(x).view(bsz, seq, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, a.n_kv, a.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, a.n_kv, a.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if rt is not None:
            if rt.r3 is not None:
                # R3 after RoPE, in fp32: scores unchanged because (qH)(kH)^T = q k^T.
                q = apply_plan(q.float(), rt.r3).to(v.dtype)
                k = apply_plan(k.float(), rt.r3).to(v.dtype)
            k, v = rt.kv(k), rt.kv(v)
        if a.n_kv != a.n_heads:
            # (B, n_kv, L, hd) -> (B, n_h, L, hd): each KV head serves n_h / n_kv query heads.
            k = k.repeat_interleave(a.n_heads // a.n_kv, dim=1)
            v = v.repeat_interleave(a.n_heads // a.n_kv, dim=1)
        if a.sliding_window is not None and seq > a.sliding_window:
            i = torch.arange(seq, device=x.device)
            keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < a.sliding_window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o = o.transpose(1, 2).reshape(bsz, seq, a.n_heads * a.head_dim)  # (B, n_h, L, hd) -> (B, L, n_h*hd)
        return o if rt is None else rt.act(o, rt.o_group)


class MLP(nn.Module):
    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden, arch.intermediate, bias=False)
        self.up_proj = nn.Linear(arch.hidden, arch.intermediate, bias=False)
        self.down_proj = nn.Linear(arch.intermediate, arch.hidden, bias=False)

    def forward(self, x: Tensor, rt: QuantRuntime | None) -> Tensor:
        return self.down_proj(self.inner(quant_input(x, rt), rt))  # one shared quantizer for gate/up

    def inner(self, x: Tensor, rt: QuantRuntime | None) -> Tensor:
        """From the (quantized) gate/up input to the down_proj input: silu(gate) * up, the online R4, quantized."""
        a = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if rt is not None:
            if rt.r4 is not None:
                a = apply_plan(a.float(), rt.r4).to(x.dtype)  # online half of R4
            a = rt.act(a)
        return a


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden, arch.rms_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden, arch.rms_eps)
        self.mlp = MLP(arch)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, rt: QuantRuntime | None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, rt)
        return h + self.mlp(self.post_attention_layernorm(h), rt)


class LayerStack(nn.ModuleList):
    """The decoder layers: an nn.ModuleList (the same state-dict names) whose items a type checker knows are
    DecoderLayers (a plain ModuleList's are bare Modules)."""

    def __getitem__(self, idx: int) -> DecoderLayer:  # type: ignore[override]
        return cast(DecoderLayer, super().__getitem__(idx))

    def __iter__(self) -> Iterator[DecoderLayer]:
        return cast(Iterator[DecoderLayer], super().__iter__())


class Backbone(nn.Module):
    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden)
        self.layers = LayerStack(DecoderLayer(arch) for _ in range(arch.n_layers))
        self.norm = RMSNorm(arch.hidden, arch.rms_eps)


class DecoderLM(nn.Module):
    """Llama/Mistral/Qwen2 causal LM with the checkpoint's parameter names.

    ``quant`` (a QuantRuntime) switches on online rotations and activation/KV fake quantization.
    ``forward(ids, r1=R)`` runs the unmerged learning form: the embedding output is rotated by R1
    and the final hidden state by R1^T before an unrotated lm_head (identical to merging R1).
    """

    inv_freq: Tensor  # a buffer (register_buffer), (hd/2,)

    def __init__(self, arch: ArchSpec) -> None:
        super().__init__()
        self.arch = arch
        self.model = Backbone(arch)
        self.lm_head = nn.Linear(arch.hidden, arch.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)
        self.quant: QuantRuntime | None = None

    def rope(self, seq: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        pos = torch.arange(seq, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))  # (L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def embed(self, ids: Tensor, r1: Tensor | None = None) -> Tensor:
        h = self.model.embed_tokens(ids)
        if r1 is not None:
            h = (h.double() @ r1).to(h.dtype)
        return h

    def final_hidden(self, h: Tensor, r1: Tensor | None = None) -> Tensor:
        """The final norm (and R1^T in the learning form): what lm_head reads, (B, L, d)."""
        h = self.model.norm(h)
        if r1 is not None:
            h = (h.double() @ r1.T).to(h.dtype)
        return h

    def hidden(self, ids: Tensor, r1: Tensor | None = None) -> Tensor:
        """The final hidden states of (B, L) ids, (B, L, d): the forward without the lm_head, so losses can
        walk the vocabulary in chunks (quant_core.losses) instead of holding (B, L, V) logits."""
        h = self.embed(ids, r1)
        cos, sin = self.rope(ids.shape[1], ids.device, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, self.quant)
        return self.final_hidden(h, r1)

    def forward(self, ids: Tensor, r1: Tensor | None = None) -> Tensor:
        return self.lm_head(self.hidden(ids, r1))


# -- loading -----------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """Where a model came from: a local HF-layout folder, resolved from a hub id or a path."""

    path: Path
    model_id: str
    revision: str | None = None  # resolved commit SHA for hub models
    config: dict[str, Any] = field(default_factory=dict)




def resolve_model(model: str, revision: str | None = None, cache_dir: str | None = None) -> ModelSource:
    """A local HF-layout directory, or a Hugging Face id downloaded (safetensors only).

    Args:
        model: a directory with config.json and *.safetensors, or an id such as "meta-llama/Llama-3.2-1B".
        revision: branch, tag or commit for hub ids.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return ModelSource(path=local.resolve(), model_id=str(model), revision=revision, config=_read_config(local))
    if local.exists():
        raise ModelError(f"{model} is a file; expected a directory in Hugging Face layout (config.json + *.safetensors)")
    if not HUB_ID.fullmatch(model):
        raise ModelError(f"model {model!r} is neither a local directory nor a Hugging Face id like 'org/name'")
    try:
        from huggingface_hub import HfApi, snapshot_download

        info = HfApi().model_info(model, revision=revision)
        names = [s.rfilename for s in (info.siblings or [])]
        if not any(n.endswith(".safetensors") for n in names):
            raise ModelError(f"{model} has no .safetensors weights; only safetensors are loaded (pickle can run code)")
        path = snapshot_download(
            model,
            revision=info.sha,
            cache_dir=cache_dir,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"],
        )
    except ModelError:
        raise
    except (OSError, ValueError) as exc:  # network, auth, missing repo (the hub's errors are OSError), bad id
        raise ModelError(f"could not download {model!r} from the Hugging Face hub: {type(exc).__name__}: {exc}") from None
    return ModelSource(path=Path(path), model_id=model, revision=info.sha, config=_read_config(Path(path)))


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json; expected a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_file} must hold a JSON object")
    return cfg


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder; refuses pickle-based weights with a clear message."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise ModelError(f"{index} is not a valid safetensors index: {exc}") from None
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{path} is missing weight shards listed in the index: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ModelError(
            f"{path} holds only non-safetensors weights ({', '.join(pickled)}); only .safetensors are loaded "
            "because pickle files can run code. Convert them with safetensors first."
        )
    raise ModelError(f"{path} has no weights (*.safetensors)")


def load_model(src: ModelSource | str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> DecoderLM:
    """Build the model on the meta device and assign the checkpoint tensors; tied embeddings are untied
    into a separate lm_head copy (SQ#13), so the final-norm fold and R1 never touch the embedding twice."""
    from safetensors import SafetensorError, safe_open

    if not isinstance(src, ModelSource):
        src = resolve_model(str(src))
    arch = arch_from_config(src.config)
    with torch.device("meta"):
        model = DecoderLM(arch)
    expected = {k for k in model.state_dict() if k != "inv_freq"}
    state: dict[str, Tensor] = {}
    for f in weight_files(src.path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                keys = [k for k in fh.keys() if k in expected]
            for key in keys:
                # One mapping per tensor, copied out at once: get_tensor's result is backed by the file's pages,
                # which would otherwise stay mapped (and count) until each weight is first written, so loading
                # peaks at the model plus one tensor, and the loaded model is the process's own memory.
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    t = fh.get_tensor(key)
                    state[key] = t.to(dtype) if t.dtype != dtype else t.clone()
                    del t
        except (OSError, SafetensorError) as exc:  # truncated or malformed file
            raise ModelError(f"cannot read {f.name}: {exc}") from None
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        if not arch.tied:
            raise ModelError(f"{src.path}: lm_head.weight is missing and tie_word_embeddings is false")
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    missing = sorted(expected - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelError(f"{src.path} is missing {len(missing)} weight(s): {shown}")
    for key, t in state.items():
        want = model.state_dict()[key].shape
        if t.shape != want:
            raise ModelError(f"{key} has shape {tuple(t.shape)}; config.json implies {tuple(want)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(arch)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def decoder_linears(model: DecoderLM, i: int) -> dict[str, nn.Linear]:
    layer = model.model.layers[i]
    at, mlp = layer.self_attn, layer.mlp
    return {
        "q_proj": at.q_proj, "k_proj": at.k_proj, "v_proj": at.v_proj, "o_proj": at.o_proj,
        "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj,
    }


def layer_prefix(name: str, i: int) -> str:
    """Checkpoint name of a decoder linear: model.layers.{i}.self_attn.q_proj etc."""
    block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{i}.{block}.{name}"

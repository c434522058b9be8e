"""Norm folding and the R1/R2/R4 merge formulas (SPINQUANT.md §2-4), all in float64.

The same per-layer function forms rotated weights on the fly during learning (with autograd
through R1/R2) and merges them into the model for CONVERT, so the trained and the exported
model cannot disagree.

Conventions: Linear weights are (out, in); activations are row vectors; B2 = blockdiag(R2, ...).

Example:
    >>> fold_norms(model); fuse_r4(model, plan)
    >>> merge_rotations(model, r1, r2s)   # function unchanged, residual stream now x @ R1
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .hadamard import HadamardPlan, apply_plan
from .models import ArchSpec, DecoderLM
from .sizes import ROW_CHUNK

# Short names of the tensors of one decoder layer that rotations touch.
LAYER_KEYS = (
    "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
    "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
)


def rotate_in(w: Tensor, r1: Tensor) -> Tensor:
    """Input side: (x R1)(W R1)^T = x W^T. w (out, in) float64."""
    assert w.ndim == 2 and w.shape[1] == r1.shape[0], (w.shape, r1.shape)
    return w @ r1


def rotate_out(w: Tensor, r1: Tensor) -> Tensor:
    """Output side: a layer writing y R1 needs W' = R1^T W (and b' = R1^T b)."""
    assert w.ndim == 2 and w.shape[0] == r1.shape[0], (w.shape, r1.shape)
    return r1.T @ w


def rotate_v(w: Tensor, b: Tensor | None, r2: Tensor, n_kv: int) -> tuple[Tensor, Tensor | None]:
    """v_proj output per KV head: W_h <- R2^T W_h and b_h <- b_h R2 (row form), so v_h -> v_h R2."""
    hd = r2.shape[0]
    assert w.shape[0] == n_kv * hd, (w.shape, n_kv, hd)
    # (n_kv*hd, d) -> (n_kv, hd, d): R2^T applied to each head's block of rows
    wv = torch.matmul(r2.T, w.reshape(n_kv, hd, w.shape[1])).reshape_as(w)
    bv = None if b is None else (b.reshape(n_kv, hd) @ r2).reshape_as(b)  # (n_kv*hd,) -> (n_kv, hd)
    return wv, bv


def rotate_o_in(w: Tensor, r2: Tensor, n_heads: int) -> Tensor:
    """o_proj input per head: W B2, undoing R2 since (a_h R2)(W_h R2)^T = a_h W_h^T."""
    hd = r2.shape[0]
    assert w.shape[1] == n_heads * hd, (w.shape, n_heads, hd)
    # (d, n_h*hd) -> (d, n_h, hd) @ R2 -> (d, n_h*hd)
    return (w.reshape(w.shape[0], n_heads, hd) @ r2).reshape_as(w)


def rotate_layer(t: dict[str, Tensor | None], arch: ArchSpec, r1: Tensor, r2: Tensor | None) -> dict[str, Tensor | None]:
    """Rotated float64 tensors of one (norm-folded) layer. t maps LAYER_KEYS to float64 tensors or None.

    q/k biases are untouched: R1 acts on their input side and R3 acts after RoPE.
    """
    out: dict[str, Tensor | None] = dict(t)
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        out[f"{name}.weight"] = rotate_in(t[f"{name}.weight"], r1)  # type: ignore[arg-type]
    out["o_proj.weight"] = rotate_out(t["o_proj.weight"], r1)  # type: ignore[arg-type]
    out["down_proj.weight"] = rotate_out(t["down_proj.weight"], r1)  # type: ignore[arg-type]
    if r2 is not None:
        out["v_proj.weight"], out["v_proj.bias"] = rotate_v(out["v_proj.weight"], t.get("v_proj.bias"), r2, arch.n_kv)  # type: ignore[arg-type]
        out["o_proj.weight"] = rotate_o_in(out["o_proj.weight"], r2, arch.n_heads)  # type: ignore[arg-type]
    return out


def layer_tensors(model: DecoderLM, i: int) -> dict[str, Tensor | None]:
    """The current tensors of layer i under LAYER_KEYS (None where the family has no bias)."""
    layer = model.model.layers[i]
    mods = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "v_proj": layer.self_attn.v_proj,
            "o_proj": layer.self_attn.o_proj, "gate_proj": layer.mlp.gate_proj, "up_proj": layer.mlp.up_proj,
            "down_proj": layer.mlp.down_proj}
    out: dict[str, Tensor | None] = {}
    for key in LAYER_KEYS:
        mod, attr = key.split(".")
        if mod in mods:
            out[key] = getattr(mods[mod], attr)
    return out


@torch.no_grad()
def _assign(param: torch.nn.Parameter | Tensor, value: Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def _map_rows(param: torch.nn.Parameter | Tensor, fn: Callable[[Tensor], Tensor]) -> None:
    """param <- fn(param) row block by row block, in float64: a (V, d) matrix then needs a float64 copy of
    ROW_CHUNK rows at a time, not of the whole vocabulary (2 x 1 GiB for Llama-3's 128k x 4096)."""
    for s in range(0, param.shape[0], ROW_CHUNK):
        block = param[s : s + ROW_CHUNK]
        block.copy_(fn(block.double()).to(param.dtype))


@torch.no_grad()
def fold_norms(model: DecoderLM) -> None:
    """W <- W diag(gamma) for every Linear reading a norm, then gamma <- 1 (float64).

    input_layernorm -> q, k, v; post_attention_layernorm -> gate, up; model.norm -> lm_head.
    After this every norm computes x / rms(x), which commutes with any orthogonal R1.
    """
    for layer in model.model.layers:
        g1 = layer.input_layernorm.weight.double()
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            _assign(lin.weight, lin.weight.double() * g1)
        g2 = layer.post_attention_layernorm.weight.double()
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            _assign(lin.weight, lin.weight.double() * g2)
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    gf = model.model.norm.weight.double()
    _map_rows(model.lm_head.weight, lambda w: w * gf)
    model.model.norm.weight.fill_(1.0)


@torch.no_grad()
def center_embeddings(model: DecoderLM) -> None:
    """E <- E - rowmean(E). Inherited from QuaRot; not exactly function-preserving for RMSNorm (SQ#14)."""
    _map_rows(model.model.embed_tokens.weight, lambda e: e - e.mean(dim=1, keepdim=True))


@torch.no_grad()
def fuse_r4(model: DecoderLM, plan: HadamardPlan) -> None:
    """Offline half of R4: W_down <- had_rows(W_down), the same transform the forward applies online."""
    for layer in model.model.layers:
        w = layer.mlp.down_proj.weight
        _assign(w, apply_plan(w.double(), plan))


@torch.no_grad()
def merge_rotations(model: DecoderLM, r1: Tensor, r2s: list[Tensor] | None) -> None:
    """Merge R1 (residual) and per-layer R2 into the weights in float64, then cast to the model dtype."""
    arch = model.arch
    r1 = r1.double().to(model.lm_head.weight.device)
    _map_rows(model.model.embed_tokens.weight, lambda e: e @ r1)
    for i in range(len(model.model.layers)):
        t = {k: (None if v is None else v.double()) for k, v in layer_tensors(model, i).items()}
        r2 = None if r2s is None else r2s[i].double().to(r1.device)
        rotated = rotate_layer(t, arch, r1, r2)
        for key, value in layer_tensors(model, i).items():
            if value is not None:
                _assign(value, rotated[key])  # type: ignore[arg-type]
    _map_rows(model.lm_head.weight, lambda w: rotate_in(w, r1))

"""CONVERT: quantize the (rotated, merged) decoder weights with GPTQ or RTN, layer by layer.

GPTQ follows SPINQUANT.md §8: within each layer the sub-groups [k, v, q] -> [o] -> [up, gate] ->
[down] are quantized in order, each sub-group's Hessian collected with the earlier ones already
quantized; the layer output on the quantized weights becomes the next layer's input. Each group's
pass runs only the part of the layer its Hessian needs (_gptq_layer), about 1.5 layer forwards per
layer in all. Calibration activations are full precision with R4 active, so peak memory is the
model plus the calibration windows' hidden states and the attention output of one layer.

Example:
    >>> qweights = quantize_weights(model, cfg, calib, rt_calib, progress, should_cancel)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .config import SpinQuantConfig
from .gptq import GPTQResult, HessianAccumulator, gptq_quantize, rtn_quantize
from .memory import release_free_memory
from .models import DecoderLM, QuantRuntime, decoder_linears, layer_prefix, quant_input
from .placement import Placement, visiting
from .progress import CancelFn, ProgressFn, check_cancel
from .sizes import GPTQ_MICRO_BATCH

SEQUENTIAL_GROUPS = (("k_proj", "v_proj", "q_proj"), ("o_proj",), ("up_proj", "gate_proj"), ("down_proj",))


def _quantize_one(lin: nn.Linear, cfg: SpinQuantConfig, hessian: Tensor | None, offload: bool = False) -> GPTQResult:
    wq = cfg.weights
    scale_dtype = lin.weight.dtype  # scales are stored in the model dtype, so round them to it first
    w = lin.weight.detach().float()
    if hessian is None:
        res = rtn_quantize(w, bits=wq.bits, group_size=wq.group_size, sym=wq.sym, mse_clip=wq.mse_clip,
                           scale_dtype=scale_dtype)
    else:
        g = wq.gptq
        res = gptq_quantize(w, hessian, bits=wq.bits, group_size=wq.group_size, sym=wq.sym, mse_clip=wq.mse_clip,
                            damp=g.damp, block_size=g.block_size, act_order=g.act_order,
                            static_groups=g.static_groups, scale_dtype=scale_dtype)
    assert res.weight is not None
    with torch.no_grad():
        lin.weight.copy_(res.weight.to(lin.weight.dtype))
    # The model now holds the dequantized weight; keep only the integer form (host memory when the
    # weights are offloaded, since the GPU holds one layer at a time).
    store = "cpu" if offload else res.q.device
    return replace(res, weight=None, q=res.q.to(store), scale=res.scale.to(store),
                   zero=None if res.zero is None else res.zero.to(store), g_idx=res.g_idx.to(store),
                   perm=None if res.perm is None else res.perm.to(store),
                   row_loss=None if res.row_loss is None else res.row_loss.to(store))


def quantize_weights(
    model: DecoderLM,
    cfg: SpinQuantConfig,
    calib: Tensor | None,
    rt_calib: QuantRuntime | None,
    progress: ProgressFn,
    should_cancel: CancelFn,
    micro_batch: int = GPTQ_MICRO_BATCH,
    placement: Placement | None = None,
) -> dict[str, GPTQResult]:
    """Quantize every decoder linear in place (dequantized values stay in the weights) and return the
    integer results keyed by checkpoint prefix, e.g. ``model.layers.0.self_attn.q_proj``.

    Args:
        calib: (N, L) calibration windows; required for GPTQ, ignored for RTN.
        rt_calib: the runtime during calibration (R4 online, no activation/KV quantization).
        placement: with ``offload`` the weights rest in host memory and each layer visits the compute
            device for its turn (the calibration hidden states stay on the compute device).
    """
    arch = model.arch
    place = placement or Placement(str(model.lm_head.weight.device))
    results: dict[str, GPTQResult] = {}
    progress("quantize", 0.0, {"layer": 0, "of": arch.n_layers})  # marks the stage's start for timings
    if not cfg.needs_calibration:  # RTN (convert runs only when weights are quantized)
        for i in range(arch.n_layers):
            check_cancel(should_cancel, f"quantizing layer {i + 1}/{arch.n_layers}")
            with visiting(model.model.layers[i], place):
                for name, lin in decoder_linears(model, i).items():
                    results[layer_prefix(name, i)] = _quantize_one(lin, cfg, None, place.offload)
            progress("quantize", (i + 1) / arch.n_layers, {"layer": i + 1, "of": arch.n_layers})
        return results

    assert calib is not None and calib.ndim == 2, "GPTQ needs (N, L) calibration windows"
    device = torch.device(place.compute)
    with visiting(model.model.embed_tokens, place):
        h = torch.cat([model.embed(calib[s : s + micro_batch].to(device))
                       for s in range(0, calib.shape[0], micro_batch)])
    for i in range(arch.n_layers):
        check_cancel(should_cancel, f"quantizing layer {i + 1}/{arch.n_layers}")
        with visiting(model.model.layers[i], place):
            loss = _gptq_layer(model, i, h, cfg, rt_calib, micro_batch, place, results)  # h becomes its output
        release_free_memory()  # the layer's temporaries leave the resident set (quant_core.memory)
        progress("quantize", (i + 1) / arch.n_layers, {"layer": i + 1, "of": arch.n_layers, "gptq_loss": loss})
    return results


def _quantize_shared(linears: dict[str, nn.Linear], names: tuple[str, ...], cfg: SpinQuantConfig, hessian: Tensor,
                     offload: bool) -> list[GPTQResult]:
    """GPTQ of linears that read the same input (one Hessian) as one matrix: their rows stacked, so the column
    loop runs once for the group instead of once per linear. GPTQ treats rows independently given H (the
    scale search is per row, the error feedback is per row), so each linear gets exactly its own result."""
    if len(names) == 1:
        return [_quantize_one(linears[names[0]], cfg, hessian, offload)]
    mods = [linears[n] for n in names]
    stacked = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=False,
                        device=mods[0].weight.device, dtype=mods[0].weight.dtype)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([m.weight for m in mods]))  # (sum out, in)
    res = _quantize_one(stacked, cfg, hessian, offload)
    assert res.row_loss is not None
    out, start = [], 0
    for m in mods:
        rows = slice(start, start + m.out_features)
        start += m.out_features
        with torch.no_grad():
            m.weight.copy_(stacked.weight[rows])
        out.append(replace(res, q=res.q[rows], scale=res.scale[rows], zero=None if res.zero is None else res.zero[rows],
                           loss=float(res.row_loss[rows].sum().item()), row_loss=None))
    return out


@torch.no_grad()
def _gptq_layer(model: DecoderLM, i: int, h: Tensor, cfg: SpinQuantConfig, rt: QuantRuntime | None,
                micro: int, place: Placement, results: dict[str, GPTQResult]) -> dict[str, Any]:
    """GPTQ layer i's sub-groups in order (SEQUENTIAL_GROUPS), each Hessian collected with the earlier groups
    already quantized, and replace ``h`` (N, L, d) by the quantized layer's output, in place.

    One pass over the calibration windows per group, each computing only the part of the layer forward that
    its Hessian reads, with the model's own pieces (the same operations as ``layer(h)``): the input norm for
    [k, v, q] (one Hessian: they read the same input); the attention mix for [o], kept for the residual; the
    post-attention norm of the new residual for [up, gate]; the MLP's inner activations for [down]; then the
    MLP once more on the quantized weights for the output. That is about 1.5 layer forwards of matmuls, where
    a whole-layer forward per group and one for the output took 5, with the same integers (tested).
    Adds the results and returns each linear's GPTQ loss."""
    layer = model.model.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    linears = decoder_linears(model, i)
    dev = torch.device(place.compute)
    cos, sin = model.rope(h.shape[1], h.device, h.dtype)
    parts = [slice(s, s + micro) for s in range(0, h.shape[0], micro)]
    loss: dict[str, Any] = {}

    def quantize(names: tuple[str, ...], acc: HessianAccumulator) -> None:
        for name, res in zip(names, _quantize_shared(linears, names, cfg, acc.hessian, place.offload), strict=True):
            results[layer_prefix(name, i)] = res
            loss[name] = res.loss

    def attn_in(p: slice) -> Tensor:
        return quant_input(layer.input_layernorm(h[p]), rt)

    def mlp_in(p: slice) -> Tensor:
        return quant_input(layer.post_attention_layernorm(h[p]), rt)

    qkv, o, gate_up, down = SEQUENTIAL_GROUPS
    acc = HessianAccumulator(linears["q_proj"].in_features, dev)
    for p in parts:
        acc.add_batch(attn_in(p).float())
    quantize(qkv, acc)

    acc = HessianAccumulator(linears["o_proj"].in_features, dev)
    # (N, L, n_h*hd), the o_proj input of every window: one buffer written in place, so the heap does not keep
    # a micro-batch's piece between each batch's freed attention temporaries (quant_core.memory)
    mixed = h.new_empty(*h.shape[:2], linears["o_proj"].in_features)
    for p in parts:
        mixed[p] = attn.mix(attn_in(p), cos, sin, rt)
        acc.add_batch(mixed[p].float())
    quantize(o, acc)

    acc = HessianAccumulator(linears["up_proj"].in_features, dev)
    for p in parts:
        h[p] = h[p] + attn.o_proj(mixed[p])  # the residual after attention, in place of the layer input
        acc.add_batch(mlp_in(p).float())
    del mixed
    quantize(gate_up, acc)

    acc = HessianAccumulator(linears["down_proj"].in_features, dev)
    for p in parts:
        acc.add_batch(mlp.inner(mlp_in(p), rt).float())
    quantize(down, acc)

    for p in parts:
        h[p] = h[p] + mlp.down_proj(mlp.inner(mlp_in(p), rt))  # the quantized layer's output
    return loss

"""Pre-fit: R1 and every layer's R2 fitted to the quantization error of the very activations they rotate.

SpinQuant learns R1 and R2 end to end (quant_core.learn): the loss of the whole quantized model on one batch
at a time. That signal is weak and noisy: on SmolLM2-135M, 60 end-to-end steps of 4 x 512 tokens close about
5% of the W16A4KV4 gap of the random-Hadamard start. Yet the activations R1 feeds to the 4-bit quantizers
(every layer's input-norm and post-attention-norm outputs: the q/k/v and gate/up inputs) lie near a
low-dimensional subspace, and a rotation can spread each token of that subspace more evenly over the channels
than a random Hadamard does. A smaller range per token is a smaller quantization step for that token. R2 does
the same, per layer, for the V heads (into the KV quantizer) and the o_proj input (into the activation
quantizer): both are rotated by it, and neither depends on R1.

This stage collects those inputs once, from one FP forward of ``train.prefit_blocks`` training blocks: a seeded
sample of ``PREFIT_TOKENS`` tokens per layer, each row scaled to unit norm so every token counts the same. It
then minimises their mean per-row fake-quantization error, ``||Q(x R) - x R||^2``, under the job's own
quantizers (bits, symmetry, clip, groups). The gradient reaches each row's range through the LSQ term
(quantizers.fake_quant_act, range_grad). The optimiser is Riemannian Adam on the Cayley retraction
(cayley.cayley_adam_step), one state per rotation, lr cosine-decayed from ``train.prefit_lr``. The end-to-end
steps, if any, then start from these rotations. What it buys on SmolLM2-135M is measured by bench/real.py.

Example:
    >>> r1, r2s, info = prefit_rotations(model, cfg, blocks, r1, r2s, fp_runtime, quant_runtime)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .cayley import AdamState, cayley_adam_step, cosine_lr, reorthonormalize
from .config import SpinQuantConfig
from .memory import release_free_memory
from .models import DecoderLM, QuantRuntime
from .placement import Placement, visiting
from .progress import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress
from .sizes import PREFIT_BATCH, PREFIT_CHUNK_LAYERS, PREFIT_CHUNK_ROWS, PREFIT_HEAD_TOKENS, PREFIT_TOKENS


@dataclass
class PrefitSamples:
    """What the pre-fit fits, from one FP forward. x: (n_layers * 2 * T, d) unit rows R1 rotates into a
    quantizer (each layer's q/k/v input, then its gate/up input); v: (n_layers, T * n_kv, hd) unit rows of
    each layer's V heads (R2 rotates them into the KV quantizer); o: (n_layers, T, n_h * hd) unit rows of each
    layer's o_proj input (R2 rotates every head of it into the activation quantizer); sink: (n_layers * 2 * N, d)
    x's two sites at each of the N blocks' first position (the attention sink), in x's layer and site order.
    All float32."""

    x: Tensor
    v: Tensor
    o: Tensor
    sink: Tensor


def _unit(t: Tensor) -> Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def collect_samples(model: DecoderLM, blocks: Tensor, rt: QuantRuntime | None, micro: int, seed: int,
                    place: Placement | None = None) -> PrefitSamples:
    """A seeded sample of ``PREFIT_TOKENS`` tokens per layer (and site) from the FP forward of ``blocks``
    (N, L) with ``rt``'s online transforms and no quantizer; every row scaled to unit norm so every token
    counts the same."""
    place = place or Placement(str(model.lm_head.weight.device))
    dev = torch.device(place.compute)
    gen = torch.Generator().manual_seed(seed)
    with visiting(model.model.embed_tokens, place):
        hs = [model.embed(blocks[s : s + micro].to(dev)) for s in range(0, blocks.shape[0], micro)]
    cos, sin = model.rope(blocks.shape[1], dev, hs[0].dtype)
    arch = model.arch
    d, hd = arch.hidden, arch.head_dim
    tokens = blocks.numel()
    take = min(PREFIT_TOKENS, tokens)
    n_o = arch.n_heads * hd
    # Filled layer by layer, so the samples are never held twice (a list of parts, then their concatenation).
    x = torch.empty(arch.n_layers * 2 * take, d, device=dev)
    v = torch.empty(arch.n_layers, take * arch.n_kv, hd, device=dev)
    o = torch.empty(arch.n_layers, take, n_o, device=dev)
    n_blocks = blocks.shape[0]
    sink = torch.empty(arch.n_layers * 2 * n_blocks, d, device=dev)
    for li, layer in enumerate(model.model.layers):
        at = layer.self_attn
        with visiting(layer, place):
            sites: list[list[Tensor]] = [[], [], [], []]  # q/k/v input, gate/up input, V, o_proj input
            for k, h in enumerate(hs):
                x1 = layer.input_layernorm(h)
                a = at.mix(x1, cos, sin, rt)  # forward's own pieces, with no quantizer in rt
                h = h + at.o_proj(a)
                x2 = layer.post_attention_layernorm(h)
                hs[k] = h + layer.mlp(x2, rt)
                for site, t in zip(sites, (x1, x2, at.v_proj(x1), a), strict=True):
                    site.append(t.reshape(-1, t.shape[-1]))  # (m, L, w) -> (m*L, w)
            picks = [torch.randperm(tokens, generator=gen)[:take].to(dev) for _ in range(3)]
            for j, (site, pick) in enumerate(zip(sites[:2], picks, strict=False)):
                at_rows = slice((2 * li + j) * take, (2 * li + j + 1) * take)
                rows = torch.cat(site)  # (N*L, d): row b*L is block b's position 0
                x[at_rows] = _unit(rows[pick].float())
                sink[(2 * li + j) * n_blocks : (2 * li + j + 1) * n_blocks] = _unit(
                    rows.view(n_blocks, -1, d)[:, 0].float())  # (N*L, d) -> (N, L, d)[:, 0]
                del rows
            # (T, n_kv*hd) -> (T*n_kv, hd): one row per token-head
            v[li] = _unit(torch.cat(sites[2])[picks[2]].float().reshape(take * arch.n_kv, hd))
            o[li] = _unit(torch.cat(sites[3])[picks[2]].float())
        release_free_memory()  # the layer's four sites leave the resident set (quant_core.memory)
    return PrefitSamples(x=x, v=v, o=o, sink=sink)


def head_quant_error(v: Tensor, o: Tensor, r2: Tensor, qrt: QuantRuntime) -> Tensor:
    """Summed over layers, the mean per-row ||Q(x R2) - x R2||^2 of the V heads under ``qrt``'s KV quantizer
    plus that of the o_proj input (every head rotated) under its activation quantizer (with its o_proj group);
    v (n, rows, hd), o (n, T, n_h*hd), r2 (n, hd, hd). A side whose quantizer is 16-bit adds nothing."""
    rf = r2.to(v.dtype)
    total = v.new_zeros(())
    if qrt.kv_bits < 16:
        y = v @ rf  # (n, rows, hd): one row per token-head, as the KV quantizer groups them
        total = total + (qrt.kv(y) - y).pow(2).sum(-1).mean(-1).sum()
    if qrt.a_bits < 16:
        n, t, w = o.shape
        hd = r2.shape[-1]
        # (n, T, n_h*hd) -> (n, T*n_h, hd) @ R2 -> (n, T, n_h*hd): the same R2 on every head
        y = (o.reshape(n, t * (w // hd), hd) @ rf).reshape(n, t, w)
        total = total + (qrt.act(y, qrt.o_group) - y).pow(2).sum(-1).mean(-1).sum()
    return total


def quant_error(x: Tensor, r: Tensor, qrt: QuantRuntime) -> Tensor:
    """Mean over rows of ||Q(x R) - x R||^2 with ``qrt``'s activation quantizer; differentiable in r."""
    y = x @ r.to(x.dtype)
    return (qrt.act(y) - y).pow(2).sum(-1).mean()


def prefit_rotations(model: DecoderLM, cfg: SpinQuantConfig, blocks: Tensor, r1: Tensor, r2s: list[Tensor],
                     rt: QuantRuntime | None, qrt: QuantRuntime, place: Placement | None = None,
                     progress: ProgressFn = no_progress,
                     should_cancel: CancelFn = never_cancel) -> tuple[Tensor, list[Tensor], dict[str, Any]]:
    """``cfg.train.prefit_steps`` Riemannian Adam steps from ``r1``/``r2s``: R1 on :func:`quant_error`, every
    layer's R2 on :func:`head_quant_error` (one batched step for the stack; the layers do not interact). Returns the
    fitted rotations (float64, re-orthonormalised) and what the report records (the errors before and after,
    seconds). ``rt`` is the FP model's online transforms (the samples' forward), ``qrt`` the job's quantizers
    (the errors). Progress is reported as the learn stage with ``phase: prefit`` (its own step and error keys, so a
    loss chart of the end-to-end steps is not mixed with it)."""
    tc = cfg.train
    t0 = time.perf_counter()
    # The error's gradient reaches a rotation only through each row's range: the plain STE gives Q(y) - y a
    # zero derivative, whatever train.ste says for the end-to-end steps.
    qrt = replace(qrt, range_grad=True)
    progress("learn", 0.0, {"phase": "prefit", "prefit_step": 0, "prefit_steps": tc.prefit_steps})
    smp = collect_samples(model, blocks[: tc.prefit_blocks], rt, tc.micro_batch, cfg.seed, place)
    x, v, o = smp.x, smp.v, smp.o
    sink_share = tc.prefit_sink_share
    dev = x.device
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = torch.randperm(x.shape[0], generator=gen)[:PREFIT_BATCH].to(dev)
    n_tok = o.shape[1]
    head_take = min(PREFIT_HEAD_TOKENS, n_tok)
    n_kv = v.shape[1] // n_tok

    def heads(tok: Tensor) -> tuple[Tensor, Tensor]:
        # token t owns V rows t*n_kv .. t*n_kv + n_kv - 1 (collect_samples' layout)
        rows = (tok[:, None] * n_kv + torch.arange(n_kv, device=dev)).reshape(-1)
        return v[:, rows], o[:, tok]

    head_probe = heads(torch.randperm(n_tok, generator=gen)[:head_take].to(dev))
    r = r1.detach().to(device=dev, dtype=torch.float64).clone().requires_grad_(True)
    r2 = torch.stack([m.detach().to(device=dev, dtype=torch.float64) for m in r2s]).requires_grad_(True)
    with torch.no_grad():
        start, start2 = float(quant_error(x[probe], r, qrt)), float(head_quant_error(*head_probe, r2, qrt))
        start_sink = float(quant_error(smp.sink, r, qrt))
    state = AdamState.like(r)
    state2 = AdamState.like(r2)  # one stack: each layer's moments are its own entries
    for step in range(tc.prefit_steps):
        check_cancel(should_cancel, f"R1 pre-fit step {step + 1}/{tc.prefit_steps}")
        rows = torch.randint(0, x.shape[0], (PREFIT_BATCH,), generator=gen).to(dev)
        vb, ob = heads(torch.randint(0, n_tok, (head_take,), generator=gen).to(dev))
        # The same gradient as one backward of the whole batch, accumulated chunk by chunk: autograd then holds
        # one chunk's copies of the rows (about 15 per quantized row), not the batch's (0.6 GB on SmolLM2).
        loss = loss2 = 0.0
        for part in rows.split(PREFIT_CHUNK_ROWS):
            term = quant_error(x[part], r, qrt) * ((1.0 - sink_share) * part.numel() / rows.numel())
            term.backward()
            loss += float(term.detach())
        if sink_share > 0:  # every sink row, every step: a few hundred rows
            term = quant_error(smp.sink, r, qrt) * sink_share
            term.backward()
            loss += float(term.detach())
        for lo in range(0, vb.shape[0], PREFIT_CHUNK_LAYERS):
            layers = slice(lo, lo + PREFIT_CHUNK_LAYERS)
            term = head_quant_error(vb[layers], ob[layers], r2[layers], qrt)  # summed over layers
            term.backward()
            loss2 += float(term.detach())
        lr = cosine_lr(tc.prefit_lr, step, tc.prefit_steps)
        with torch.no_grad():
            assert r.grad is not None and r2.grad is not None
            r.copy_(cayley_adam_step(r, r.grad, state, lr))
            r2.copy_(cayley_adam_step(r2, r2.grad, state2, lr))
            r.grad = r2.grad = None
        progress("learn", (step + 1) / tc.prefit_steps, {"phase": "prefit", "prefit_step": step + 1,
                                                         "prefit_steps": tc.prefit_steps,
                                                         "prefit_error": loss, "prefit_head_error": loss2})
    fitted = reorthonormalize(r.detach())
    fitted2 = list(reorthonormalize(r2.detach()).unbind())
    with torch.no_grad():
        end = float(quant_error(x[probe], fitted, qrt))
        end2 = float(head_quant_error(*head_probe, torch.stack(fitted2), qrt))
        end_sink = float(quant_error(smp.sink, fitted, qrt))
    return fitted, fitted2, {"prefit_steps": tc.prefit_steps, "prefit_error_start": start, "prefit_error_end": end,
                             "prefit_head_error_start": start2, "prefit_head_error_end": end2,
                             "prefit_sink_error_start": start_sink, "prefit_sink_error_end": end_sink,
                             "prefit_rows": int(x.shape[0]), "prefit_seconds": time.perf_counter() - t0}


__all__ = ["PrefitSamples", "collect_samples", "head_quant_error", "prefit_rotations", "quant_error"]

"""R1 pre-fit: the residual rotation fitted to the quantization error of the very activations it rotates.

SpinQuant learns R1 end to end (quant_core.learn): the loss of the whole quantized model on one batch at a
time. That signal is weak and noisy: on SmolLM2-135M, 60 end-to-end steps of 4 x 512 tokens close about 5%
of the W16A4KV4 gap of the random-Hadamard start. Yet the activations R1 feeds to the 4-bit quantizers (every
layer's input-norm and post-attention-norm outputs: the q/k/v and gate/up inputs) lie near a low-dimensional
subspace, and a rotation can spread each token of that subspace more evenly over the channels than a random
Hadamard does. A smaller range per token is a smaller quantization step for that token.

This stage collects those inputs once, from one FP forward of ``train.prefit_blocks`` training blocks: a seeded
sample of ``PREFIT_TOKENS`` tokens per layer and site, each scaled to unit norm so every token counts the same.
It then minimises their mean per-token fake-quantization error, ``||Q(x R) - x R||^2``, under the job's own
activation quantizer (bits, symmetry, clip). The gradient reaches each token's range through the LSQ term
(quantizers.fake_quant_act, range_grad). The optimiser is Riemannian Adam on the Cayley retraction
(cayley.cayley_adam_step), lr cosine-decayed from ``train.prefit_lr``. On SmolLM2-135M, 300 such steps take
about 40 s on 2 CPU cores and cut that error 2.6x. The W16A4KV4 perplexity gap falls from +56% to +37%.
The end-to-end steps then start from this R1.

Example:
    >>> r1, info = prefit_r1(model, cfg, blocks, r1, fp_runtime)
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from .cayley import AdamState, cayley_adam_step, reorthonormalize
from .config import SpinQuantConfig
from .models import DecoderLM, QuantRuntime
from .placement import Placement, visiting
from .progress import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress
from .quantizers import fake_quant_act
from .sizes import PREFIT_BATCH, PREFIT_TOKENS



@torch.no_grad()
def collect_residual_inputs(model: DecoderLM, blocks: Tensor, rt: QuantRuntime | None, micro: int, seed: int,
                            place: Placement | None = None) -> Tensor:
    """Unit-norm samples (n_layers * 2 * PREFIT_TOKENS, d), float32, of what R1 rotates into a quantizer: each
    layer's input-norm output (the q/k/v input) and post-attention-norm output (the gate/up input), from the
    FP forward of ``blocks`` (N, L) with ``rt``'s online transforms and no quantizer."""
    place = place or Placement(str(model.lm_head.weight.device))
    dev = torch.device(place.compute)
    gen = torch.Generator().manual_seed(seed)
    with visiting(model.model.embed_tokens, place):
        hs = [model.embed(blocks[s : s + micro].to(dev)) for s in range(0, blocks.shape[0], micro)]
    cos, sin = model.rope(blocks.shape[1], dev, hs[0].dtype)
    d = model.arch.hidden
    tokens = blocks.numel()
    take = min(PREFIT_TOKENS, tokens)
    samples = []
    for layer in model.model.layers:
        with visiting(layer, place):
            sites: list[list[Tensor]] = [[], []]
            for k, h in enumerate(hs):
                x1 = layer.input_layernorm(h)
                h = h + layer.self_attn(x1, cos, sin, rt)
                x2 = layer.post_attention_layernorm(h)
                hs[k] = h + layer.mlp(x2, rt)
                sites[0].append(x1.reshape(-1, d))  # (m, L, d) -> (m*L, d)
                sites[1].append(x2.reshape(-1, d))
            for site in sites:
                rows = torch.cat(site)
                pick = torch.randperm(tokens, generator=gen)[:take].to(rows.device)
                samples.append(rows[pick].float())
    x = torch.cat(samples)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def site_grams(model: DecoderLM) -> Tensor:
    """(n_layers * 2, d, d) float32: W^T W of the linears reading each site (q/k/v stacked, gate/up stacked), in
    the order collect_residual_inputs samples them: the output error of an input error e is e W^T W e^T."""
    grams = []
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        for mods in ((at.q_proj, at.k_proj, at.v_proj), (mlp.gate_proj, mlp.up_proj)):
            w = torch.cat([m.weight for m in mods]).float()  # (sum out, d)
            grams.append(w.T @ w)
    return torch.stack(grams)


def output_error(x: Tensor, r: Tensor, cfg: SpinQuantConfig, grams: Tensor, energy: Tensor) -> Tensor:
    """Mean over sites of E||(Q(xR) - xR) R^T W^T||^2 / E||x W^T||^2: the relative output error of each site's
    linears. x (S, b, d) samples per site, grams (S, d, d), energy (S,)."""
    a = cfg.activations
    rf = r.to(x.dtype)
    y = x @ rf
    q = fake_quant_act(y, bits=a.bits, sym=a.sym, clip_ratio=a.clip_ratio, half_range=a.half_range, range_grad=True)
    u = (q - y) @ rf.T  # the error back in the weights' basis
    return (((u @ grams) * u).sum(-1).mean(-1) / energy).mean()


def quant_error(x: Tensor, r: Tensor, cfg: SpinQuantConfig) -> Tensor:
    """Mean over rows of ||Q(x R) - x R||^2 with the job's activation quantizer; differentiable in r."""
    a = cfg.activations
    y = x @ r.to(x.dtype)
    q = fake_quant_act(y, bits=a.bits, sym=a.sym, clip_ratio=a.clip_ratio, half_range=a.half_range, range_grad=True)
    return (q - y).pow(2).sum(-1).mean()


def prefit_r1(model: DecoderLM, cfg: SpinQuantConfig, blocks: Tensor, r1: Tensor, rt: QuantRuntime | None,
              place: Placement | None = None, progress: ProgressFn = no_progress,
              should_cancel: CancelFn = never_cancel) -> tuple[Tensor, dict[str, Any]]:
    """``cfg.train.prefit_steps`` Riemannian Adam steps on :func:`quant_error` from ``r1``; returns the fitted
    R1 (float64, re-orthonormalised) and what the report records (the error before and after, seconds).
    Progress is reported as the learn stage with ``phase: prefit`` (its own step and error keys, so a loss
    chart of the end-to-end steps is not mixed with it)."""
    tc = cfg.train
    t0 = time.perf_counter()
    progress("learn", 0.0, {"phase": "prefit", "prefit_step": 0, "prefit_steps": tc.prefit_steps})
    x = collect_residual_inputs(model, blocks[: tc.prefit_blocks], rt, tc.micro_batch, cfg.seed, place)
    gen = torch.Generator().manual_seed(cfg.seed)
    weighted = getattr(tc, "prefit_weighting", "none") == "output"
    if weighted:
        grams = site_grams(model).to(x.device)
        xs = x.view(grams.shape[0], -1, x.shape[-1])  # (S*T, d) -> (S, T, d)
        energy = ((xs @ grams) * xs).sum(-1).mean(-1)  # (S,)
        per = max(1, PREFIT_BATCH // grams.shape[0])

        def objective(r: Tensor, rows: Tensor | None) -> Tensor:
            sub = xs[:, rows] if rows is not None else xs[:, :per]
            return output_error(sub, r, cfg, grams, energy)

        def draw() -> Tensor:
            return torch.randint(0, xs.shape[1], (per,), generator=gen).to(x.device)
    else:
        probe_rows = torch.randperm(x.shape[0], generator=gen)[:PREFIT_BATCH].to(x.device)

        def objective(r: Tensor, rows: Tensor | None) -> Tensor:
            return quant_error(x[rows] if rows is not None else x[probe_rows], r, cfg)

        def draw() -> Tensor:
            return torch.randint(0, x.shape[0], (PREFIT_BATCH,), generator=gen).to(x.device)
    r = r1.detach().to(device=x.device, dtype=torch.float64).clone().requires_grad_(True)
    with torch.no_grad():
        start = float(objective(r, None))
    state = AdamState.like(r)
    for step in range(tc.prefit_steps):
        check_cancel(should_cancel, f"R1 pre-fit step {step + 1}/{tc.prefit_steps}")
        loss = objective(r, draw())
        loss.backward()
        lr = 0.5 * tc.prefit_lr * (1.0 + math.cos(math.pi * step / tc.prefit_steps))
        with torch.no_grad():
            assert r.grad is not None
            r.copy_(cayley_adam_step(r, r.grad, state, lr))
            r.grad = None
        progress("learn", (step + 1) / tc.prefit_steps, {"phase": "prefit", "prefit_step": step + 1,
                                                         "prefit_steps": tc.prefit_steps,
                                                         "prefit_error": float(loss.detach())})
    fitted = reorthonormalize(r.detach())
    with torch.no_grad():
        end = float(objective(fitted, None))
    return fitted, {"prefit_steps": tc.prefit_steps, "prefit_error_start": start, "prefit_error_end": end,
                    "prefit_rows": int(x.shape[0]), "prefit_seconds": time.perf_counter() - t0}


__all__ = ["collect_residual_inputs", "prefit_r1", "quant_error"]

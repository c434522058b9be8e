"""Rotation learning (TRAIN_ROTATION): R1 and every R2 by Cayley SGD on the Stiefel manifold.

The loss (train.loss) is the KL divergence from the FP model's next-token distribution to the
fake-quantized model's, at every position of the same batch (the default: the FP logits are one
no-grad forward, and what learning follows is the quantization error, not the batch), or SpinQuant's
next-token cross-entropy. Every fake quantizer is a straight-through estimator, so gradients reach
R1/R2 through the rotated weights, which are formed on the fly (in the model dtype) each forward (nothing is
merged while learning). Model weights stay frozen. With no quantizer in the loss the loss is exactly
rotation-invariant and gives no signal, so callers must enable activation/KV (or weight) quantization
first. Neither loss materialises a batch's full-vocabulary logits (quant_core.losses).

Example:
    >>> result = train_rotations(model, cfg, blocks, r1, r2s, progress, should_cancel)
    >>> result.loss_curve[:3]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from .cayley import cayley_step, cosine_lr, orthogonality_error, reorthonormalize
from .config import SpinQuantConfig
from .losses import head_loss
from .memory import release_free_memory
from .models import DecoderLM, QuantRuntime
from .placement import Placement, visiting
from .progress import CancelFn, ProgressFn, check_cancel
from .quantizers import fake_quant_weight
from .rotation import layer_tensors, rotate_layer


@dataclass
class LearnResult:
    r1: Tensor  # (d, d) float64
    r2s: list[Tensor]  # n_layers x (hd, hd) float64
    loss_curve: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # pre-clip, as the HF Trainer logs them
    max_orth_error: float = 0.0


# The learning forward rotates every weight on the fly, in the model dtype: the product is the model-dtype
# weight the forward then uses, so a wider type would only buy digits the cast drops at once (bf16 keeps 3
# significant digits; a bf16 R1 changes each product by a relative 2^-9, as the final cast does). It is the
# largest extra cost of a step (params x d multiply-adds per forward, twice with the backward recompute), and
# CPUs and GPUs both multiply bf16 several times faster than float32 (SmolLM2's (1536, 576) @ (576, 576) on
# the 2-core dev machine: 3.5 ms against 13.8 ms). The merge for CONVERT stays in float64
# (rotation.merge_rotations), and R1/R2 themselves and their Cayley updates are float64.


def _layer_params(model: DecoderLM, i: int, r1: Tensor, r2: Tensor, w_bits: int, cfg: SpinQuantConfig) -> dict[str, Tensor]:
    """Layer i's linear parameters with R1/R2 applied (in the model dtype), weight-fake-quantized with STE
    when w_bits < 16. Keys are relative to the layer (``self_attn.q_proj.weight``)."""
    dtype = model.lm_head.weight.dtype
    out: dict[str, Tensor] = {}
    for key, value in rotate_layer(layer_tensors(model, i), model.arch, r1.to(dtype), r2.to(dtype)).items():
        if value is None:
            continue
        if w_bits < 16 and key.endswith(".weight"):
            wq = cfg.weights
            value = fake_quant_weight(value, bits=w_bits, group_size=wq.group_size, sym=wq.sym, mse_clip=wq.mse_clip)
        block = "self_attn" if key.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        out[f"{block}.{key}"] = value
    return out


def learning_hidden(model: DecoderLM, ids: Tensor, r1: Tensor, r2s: list[Tensor], w_bits: int,
                    cfg: SpinQuantConfig, checkpoint_layers: bool, place: Placement | None = None) -> Tensor:
    """Final hidden states (B, L, d) of the unmerged rotated model, in the basis the lm_head reads (after R1^T).
    With checkpointing, each layer's rotated weights and activations are recomputed in backward, so memory
    holds one layer's rotated weights at a time.

    With ``place.offload`` (checkpointing required) the weights rest in host memory and each layer visits the
    compute device twice per micro-batch: in the forward, and again when backward recomputes it."""
    place = place or Placement(str(ids.device))
    assert checkpoint_layers or not place.offload, "offloaded learning needs checkpoint_layers"
    with visiting(model.model.embed_tokens, place):
        h = model.embed(ids, r1)
    cos, sin = model.rope(ids.shape[1], ids.device, h.dtype)

    def run_layer(i: int, h: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
        with visiting(model.model.layers[i], place):
            params = _layer_params(model, i, r1, r2, w_bits, cfg)
            return functional_call(model.model.layers[i], params, (h, cos, sin, model.quant))

    for i in range(model.arch.n_layers):
        if checkpoint_layers:
            h = checkpoint(run_layer, i, h, r1, r2s[i], use_reentrant=False)
        else:
            h = run_layer(i, h, r1, r2s[i])
    with visiting(model.model.norm, place):
        return model.final_hidden(h, r1)


@torch.no_grad()
def teacher_hidden(model: DecoderLM, ids: Tensor, rt: QuantRuntime | None, place: Placement | None = None) -> Tensor:
    """The FP model's final hidden states (B, L, d) for the KL loss: the prepared weights as they are (norms
    folded, R4 fused, nothing rotated: the function does not depend on R1/R2) with ``rt``'s online
    transforms and no quantizer."""
    place = place or Placement(str(ids.device))
    with visiting(model.model.embed_tokens, place):
        h = model.embed(ids)
    cos, sin = model.rope(ids.shape[1], ids.device, h.dtype)
    for layer in model.model.layers:
        with visiting(layer, place):
            h = layer(h, cos, sin, rt)
    with visiting(model.model.norm, place):
        return model.final_hidden(h)


def batch_loss(model: DecoderLM, hidden: Tensor, ids: Tensor, teacher: Tensor | None,
               place: Placement | None = None) -> Tensor:
    """The learning loss of one micro-batch: KL to ``teacher`` at every position, or next-token cross-entropy
    when ``teacher`` is None. The lm_head's gradient work is done here (quant_core.losses), so the lm_head
    can leave the device before backward."""
    d = hidden.shape[-1]
    with visiting(model.lm_head, place or Placement(str(ids.device))):
        w = model.lm_head.weight
        if teacher is not None:
            # (B, L, d) -> (B*L, d): every position's distribution is a target
            return head_loss(hidden.reshape(-1, d), w, teacher=teacher.reshape(-1, d))
        # position t predicts token t+1: (B, L-1, d) -> (B*(L-1), d)
        return head_loss(hidden[:, :-1].reshape(-1, d), w, targets=ids[:, 1:].reshape(-1))


def train_rotations(
    model: DecoderLM,
    cfg: SpinQuantConfig,
    blocks: Tensor,
    r1: Tensor,
    r2s: list[Tensor],
    progress: ProgressFn,
    should_cancel: CancelFn,
    placement: Placement | None = None,
    teacher_rt: QuantRuntime | None = None,
) -> LearnResult:
    """Learn R1 and all R2 for cfg.train.steps Cayley-SGD steps.

    Args:
        model: norm-folded model with R4 fused and ``model.quant`` set to the training quantizers.
        cfg: the job config (train.* hyperparameters; train_w_bits for weight fake-quant).
        blocks: (N, L) token blocks; step t uses blocks [t*B, (t+1)*B) modulo N.
        r1, r2s: float64 initial rotations (random Hadamard).
        progress: called once per step with {"step", "loss", "grad_norm", "orth_error", "lr"}.
        should_cancel: checked before every step.
        placement: with ``offload``, the weights stay in host memory and stream layer by layer
            (learning_hidden); needs train.checkpoint_layers.
        teacher_rt: the FP model's online transforms (R3/R4, no quantizer), for train.loss = kl.
    """
    tc = cfg.train
    assert blocks.ndim == 2 and blocks.shape[0] >= 1, f"blocks must be (N, L), got {tuple(blocks.shape)}"
    device = torch.device(placement.compute) if placement is not None else model.lm_head.weight.device
    # Own copies: the Cayley update is in place and must not alter the caller's initial rotations.
    r1 = r1.detach().to(device=device, dtype=torch.float64).clone().requires_grad_(True)
    r2s = [r.detach().to(device=device, dtype=torch.float64).clone().requires_grad_(True) for r in r2s]
    w_bits = cfg.train_w_bits
    result = LearnResult(r1=r1.detach(), r2s=[r.detach() for r in r2s])
    accum = tc.batch_size // tc.micro_batch
    n = blocks.shape[0]
    cursor = 0
    progress("learn", 0.0, {"step": 0, "steps": tc.steps})  # marks the stage's start for timings
    for step in range(tc.steps):
        check_cancel(should_cancel, f"rotation learning step {step + 1}/{tc.steps}")
        step_loss = 0.0
        for _ in range(accum):
            idx = torch.arange(cursor, cursor + tc.micro_batch) % n
            cursor = (cursor + tc.micro_batch) % n
            ids = blocks[idx].to(device)
            teacher = teacher_hidden(model, ids, teacher_rt, placement) if tc.loss == "kl" else None
            hidden = learning_hidden(model, ids, r1, r2s, w_bits, cfg, tc.checkpoint_layers, placement)
            loss = batch_loss(model, hidden, ids, teacher, placement) / accum
            loss.backward()
            step_loss += float(loss.detach())
        release_free_memory()  # the step's temporaries leave the resident set (quant_core.memory)
        grads = [r1.grad, *(r.grad for r in r2s)]
        sq = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
        norm = math.sqrt(sq)
        clip = min(1.0, tc.grad_clip / (norm + 1e-6))  # global-norm clipping over R1 and all R2
        lr = cosine_lr(tc.lr, step, tc.steps)
        orth = 0.0
        with torch.no_grad():
            for r in (r1, *r2s):
                g = torch.zeros_like(r) if r.grad is None else r.grad * clip
                r.copy_(cayley_step(r, g, lr, step_cap=tc.step_cap))
                r.grad = None
                orth = max(orth, float(orthogonality_error(r)))
        result.loss_curve.append(step_loss)
        result.grad_norms.append(norm)
        result.max_orth_error = max(result.max_orth_error, orth)
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"rotation learning diverged at step {step + 1}: loss {step_loss}")
        info: dict[str, Any] = {"step": step + 1, "steps": tc.steps, "loss": step_loss, "grad_norm": norm,
                                "orth_error": orth, "lr": lr}
        progress("learn", (step + 1) / tc.steps, info)
    with torch.no_grad():
        result.r1 = reorthonormalize(r1.detach())
        result.r2s = [reorthonormalize(r.detach()) for r in r2s]
    return result

"""Losses over the vocabulary that never hold a batch's full-vocabulary logits.

The lm_head turns every token's final hidden state into V logits: for 4 x 512 tokens and a 49k vocabulary
that is 0.4 GB in float32 (Llama-3's 128k vocabulary at 8 x 2048 tokens: 8 GB), and a softmax gradient
as large again. These functions walk the tokens in chunks of at most ``sizes.LOGIT_CHUNK_ELEMS`` logits. The
learning losses are fused with the lm_head: the gradient with respect to the hidden states is computed
chunk by chunk in the forward pass and kept (N x d, small), so backward needs neither the logits nor a
recompute. Per chunk the lm_head runs once forward (twice for KL: the teacher's logits too) and once for
the gradient; the weight is frozen and gets no gradient.

Positions and targets: ``hidden`` is (N, d) rows (callers flatten (B, L, d)), ``weight`` the (V, d) lm_head.

Example:
    >>> nll, count = nll_sum(h[:, :-1].reshape(-1, d), model.lm_head.weight, ids[:, 1:].reshape(-1))
    >>> loss = head_loss(h_student.reshape(-1, d), w, teacher=h_teacher.reshape(-1, d))  # mean KL
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import sizes


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab`` (at least one)."""
    return max(1, sizes.LOGIT_CHUNK_ELEMS // vocab)


def _logits(h: Tensor, weight: Tensor) -> Tensor:
    # The same arithmetic as nn.Linear in the model dtype, then float32 for the softmax: what model(ids) gives.
    return F.linear(h, weight).float()


@torch.no_grad()
def nll_sum(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[float, int]:
    """Summed next-token NLL (float64) of (N, d) hidden rows against (N,) targets, and N."""
    assert hidden.ndim == 2 and targets.shape == hidden.shape[:1], (tuple(hidden.shape), tuple(targets.shape))
    step = chunk_rows(weight.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, hidden.shape[0], step):
        z = _logits(hidden[s : s + step], weight)  # (c, V)
        total += F.cross_entropy(z, targets[s : s + step], reduction="sum").double()
    return float(total), int(targets.numel())


class _FusedHeadLoss(torch.autograd.Function):
    """Mean loss over N rows; forward also computes d(loss)/d(hidden), so backward is one multiply."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, target: Tensor, kind: str) -> Tensor:
        n = hidden.shape[0]
        step = chunk_rows(weight.shape[0])
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, n, step):
            # In place where a chunk-sized result is not needed again: at most sizes.HEAD_LOSS_CHUNKS (c, V) float32
            # buffers live at once, where the plain expressions would hold seven.
            logp = _logits(hidden[s : s + step], weight).log_softmax(-1)  # (c, V) student log-probabilities
            if kind == "kl":
                logq = _logits(target[s : s + step], weight).log_softmax(-1)  # the FP model's distribution
                q = logq.exp()
                total += logq.sub_(logp).mul_(q).sum().double()  # KL(q || p) = sum q (log q - log p), the chunk's rows
                del logq
                dz = logp.exp_().sub_(q)  # d KL / d z = p - q
                del q
            else:
                t = target[s : s + step]
                total += -logp.gather(1, t[:, None]).sum().double()
                dz = logp.exp_()
                dz[torch.arange(t.numel(), device=t.device), t] -= 1.0  # d CE / d z = p - onehot(t)
            grad[s : s + step] = (dz.to(weight.dtype) @ weight).to(hidden.dtype) / n  # (c, V) @ (V, d)
            del logp, dz
        ctx.save_for_backward(grad)
        return (total / n).to(torch.float32)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def head_loss(hidden: Tensor, weight: Tensor, *, targets: Tensor | None = None, teacher: Tensor | None = None) -> Tensor:
    """Mean per-row loss through the frozen lm_head ``weight`` (V, d), differentiable in ``hidden`` (N, d).

    - ``teacher`` (N, d), the FP model's final hidden states at the same positions: KL(FP || quantized), the
      quantization error alone; the same batch's token noise cancels between the two models;
    - ``targets`` (N,): next-token cross-entropy (SpinQuant's loss).
    """
    assert hidden.ndim == 2, f"hidden must be (N, d), got {tuple(hidden.shape)}"
    assert not weight.requires_grad, "the lm_head is frozen: the fused loss gives no weight gradient"
    if (teacher is None) == (targets is None):
        raise ValueError("head_loss needs exactly one of targets (cross-entropy) or teacher (KL)")
    if teacher is not None:
        assert teacher.shape == hidden.shape, (tuple(teacher.shape), tuple(hidden.shape))
        return _FusedHeadLoss.apply(hidden, weight, teacher.detach(), "kl")
    assert targets is not None and targets.shape == hidden.shape[:1]
    return _FusedHeadLoss.apply(hidden, weight, targets, "ce")


__all__ = ["chunk_rows", "head_loss", "nll_sum"]

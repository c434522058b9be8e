"""Perplexity (the FP and the quantized model on the same windows) and optional lm-eval zero-shot.

PPL = exp(mean next-token NLL) over non-overlapping windows, each scored on its own with no
added BOS (SPINQUANT.md §9); the sum is kept in float64 so large texts do not lose precision.

Example:
    >>> ppl = perplexity(model, eval_windows(tokens, 2048))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import nll_sum
from .models import DecoderLM
from .placement import Placement, offloaded_hidden
from .progress import CancelFn, ProgressFn, check_cancel, never_cancel, no_progress
from .sizes import EVAL_BATCH_TOKENS


def logits_nll(logits: Tensor, ids: Tensor) -> tuple[float, int]:
    """Summed next-token NLL of (B, L, V) logits for (B, L) ids, and the number of predicted tokens."""
    # (B, L-1, V) -> (B*(L-1), V): position t predicts token t+1
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
    )
    return float(nll.double()), ids[:, 1:].numel()


def hidden_nll(model: DecoderLM, hidden: Tensor, ids: Tensor) -> tuple[float, int]:
    """Summed next-token NLL from (B, L, d) final hidden states, the vocabulary walked in chunks."""
    d = hidden.shape[-1]
    # position t predicts token t+1: (B, L-1, d) -> (B*(L-1), d) against (B*(L-1),)
    return nll_sum(hidden[:, :-1].reshape(-1, d), model.lm_head.weight, ids[:, 1:].reshape(-1))


@torch.no_grad()
def window_nll(model: DecoderLM, ids: Tensor) -> tuple[float, int]:
    """Summed next-token NLL of a (B, L) batch and the number of predicted tokens."""
    return hidden_nll(model, model.hidden(ids), ids)


def perplexity(
    model: DecoderLM,
    windows: Tensor,
    *,
    batch_tokens: int = EVAL_BATCH_TOKENS,
    progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    stage: str = "evaluate",
    placement: Placement | None = None,
) -> float:
    """exp(mean NLL) of ``model`` over (N, L) windows, batched to about ``batch_tokens`` tokens.

    Args:
        model: the model with whatever ``model.quant`` the caller set.
        windows: (N, L) token ids from :func:`calibration.eval_windows`.
        progress: called after every batch with {"windows": done, "of": N} (with offload: after every
            layer with {"layer": i, "of": n_layers}).
        placement: with ``offload`` the weights stay in host memory and visit the compute device one
            layer at a time (quant_core.placement); same batches, same value.
    """
    assert windows.ndim == 2 and windows.shape[0] > 0, f"windows must be (N, L), got {tuple(windows.shape)}"
    batch = max(1, batch_tokens // windows.shape[1])
    total, count = 0.0, 0
    progress(stage, 0.0, {"windows": 0, "of": windows.shape[0]})  # marks the stage's start for timings
    if placement is not None and placement.offload:
        batches = [windows[s : s + batch] for s in range(0, windows.shape[0], batch)]
        hidden = offloaded_hidden(model, batches, placement, progress=progress, should_cancel=should_cancel,
                                  stage=stage)
        for ids, h in zip(batches, hidden, strict=True):  # lm_head is on the compute device while each batch is scored
            nll, n = hidden_nll(model, h, ids.to(h.device))
            total, count = total + nll, count + n
        progress(stage, 1.0, {"windows": windows.shape[0], "of": windows.shape[0]})
        return math.exp(total / count)
    device = model.lm_head.weight.device
    for start in range(0, windows.shape[0], batch):
        check_cancel(should_cancel, stage)
        nll, n = window_nll(model, windows[start : start + batch].to(device))
        total, count = total + nll, count + n
        done = min(start + batch, windows.shape[0])
        progress(stage, done / windows.shape[0], {"windows": done, "of": windows.shape[0]})
    return math.exp(total / count)


def zero_shot(model: DecoderLM, tokenizer: Any, tasks: list[str], batch_size: int = 8) -> dict[str, Any]:
    """lm-eval-harness zero-shot scores (optional extra ``eval``; needs the task data reachable).

    Returns {"lm_eval_version", "tasks": {task: {"metric": name, "value": x}}, "batch_size"}.
    """
    try:
        import lm_eval
        from lm_eval.api.model import LM
    except ImportError:
        raise RuntimeError("zero-shot evaluation needs the optional extra: pip install '.[eval]'") from None

    device = model.lm_head.weight.device

    class _Wrapped(LM):  # type: ignore[misc]
        """Scores continuations with our forward, so quantizers and online rotations apply."""

        @torch.no_grad()
        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            out = []
            for req in requests:
                ctx, cont = req.args
                c_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
                t_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
                if getattr(tokenizer, "bos_token_id", None) is not None:
                    c_ids = [tokenizer.bos_token_id, *c_ids]
                ids = torch.tensor([c_ids + t_ids], device=device)
                logp = torch.log_softmax(model(ids)[0, len(c_ids) - 1 : -1].float(), dim=-1)
                tgt = torch.tensor(t_ids, device=device)
                picked = logp.gather(1, tgt[:, None]).squeeze(1)
                out.append((float(picked.sum()), bool((logp.argmax(-1) == tgt).all())))
            return out

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            raise NotImplementedError("rolling loglikelihood is not used by the zero-shot tasks")

        def generate_until(self, requests: list[Any]) -> list[str]:
            raise NotImplementedError("generation tasks are not supported in zero-shot scoring")

    res = lm_eval.simple_evaluate(model=_Wrapped(), tasks=tasks, num_fewshot=0, batch_size=batch_size)
    scores: dict[str, Any] = {}
    for task, metrics in res["results"].items():
        metric = "acc_norm,none" if "acc_norm,none" in metrics else "acc,none"
        scores[task] = {"metric": metric.split(",")[0], "value": metrics.get(metric)}
    return {"lm_eval_version": getattr(lm_eval, "__version__", "unknown"), "tasks": scores, "batch_size": batch_size}

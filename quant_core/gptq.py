"""GPTQ and RTN weight quantization (SPINQUANT.md §8).

Both return a `GPTQResult` whose integer codes, scales and zero points use the
exact conventions of `quantizers.py`; the dequantized weight is produced by
`dequantize_weight_gidx`, so re-dequantizing the stored codes reproduces it bit
for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The private elementwise maps are shared on purpose: GPTQ's in-loop rounding must be
# the exact map the exporter and fake quantization use, not a lookalike.
from .packing import group_index
from .quantizers import (
    _check_weight_args,
    _dequant_elem,
    _int_dtype,
    _int_range,
    _quant_elem,
    dequantize_weight_gidx,
    quantize_weight,
    weight_qparams,
)


class HessianAccumulator:
    """Running mean H = (2/N)·Σ x·xᵀ over all calibration tokens, in float32.

    Args:
        in_features: width of the layer input.
        device: where H lives.

    Example:
        >>> acc = HessianAccumulator(256, "cpu")
        >>> acc.add_batch(torch.randn(4, 128, 256))  # (batch, seq, in)
        >>> acc.nsamples, acc.hessian.shape
        (512, torch.Size([256, 256]))
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        assert in_features > 0, f"in_features must be positive, got {in_features}"
        self.in_features = in_features
        self.nsamples = 0
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add_batch(self, x: Tensor) -> None:
        """Fold a batch of layer inputs of shape (..., in) into the running mean."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs (..., {self.in_features}), got {tuple(x.shape)}")
        xf = x.detach().reshape(-1, self.in_features).to(self._h.device, torch.float32)  # (..., in) -> (m, in)
        m = xf.shape[0]
        if m == 0:
            return
        # Rescale the old mean, then add the new tokens pre-scaled by sqrt(2/N):
        # keeps H a mean (bounded magnitude) without storing a running sum.
        self._h *= self.nsamples / (self.nsamples + m)
        self.nsamples += m
        xf = xf * math.sqrt(2.0 / self.nsamples)
        self._h += xf.T @ xf  # (in, m) @ (m, in) -> (in, in)

    @property
    def hessian(self) -> Tensor:
        """The (in, in) float32 running mean (the live buffer; gptq_quantize copies it)."""
        return self._h


@dataclass
class GPTQResult:
    """Quantized weight in export-ready form; all tensors on the weight's device."""

    # (out, in) float32, dequantized; == dequantize_weight_gidx(q, scale, zero, g_idx). None once
    # convert.quantize_weights has written it into the model (it keeps only the integer form).
    weight: Tensor | None
    q: Tensor  # (out, in) int8 codes (uint8 for asymmetric 8-bit), original column order
    scale: Tensor  # (out, n_groups) float32, exactly representable in scale_dtype if given
    zero: Tensor | None  # (out, n_groups) integer-valued float32, None when symmetric
    g_idx: Tensor  # (in,) int32: group of each original column
    perm: Tensor | None  # (in,) act-order permutation (processing order), None without act_order
    loss: float  # Σ over columns of |w - ŵ|² / (2·[H⁻¹]_jj²) (RTN: ½·|W - Ŵ|²)
    row_loss: Tensor | None = None  # (out,) the same per output row (GPTQ), so stacked linears can be split


def _damped_inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H); retry once at 10·damp."""
    assert h.dim() == 2 and h.shape[0] == h.shape[1] and h.dtype == torch.float32
    mean_diag = torch.diagonal(h).mean()
    for d in (damp, 10.0 * damp):
        # At most two (in, in) matrices beside h at a time (d_ff = 28672: 3.3 GB each in float32).
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        del hd
        if info.item() != 0:
            continue
        hinv = torch.cholesky_inverse(lower)
        del lower
        # GPTQ needs rows of the inverse's upper factor: [U]_jj is the per-column
        # error scale and U[j, j:] the feedback direction.
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        del hinv
        if info.item() == 0 and bool(torch.isfinite(upper).all()):
            return upper
    raise ValueError(
        f"Hessian is not positive definite even with damp={10.0 * damp:g} "
        f"(mean diag {mean_diag.item():.3g}); raise damp or collect more calibration tokens"
    )


def _check_gptq_inputs(w: Tensor, hessian: Tensor, group_size: int, damp: float, block_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"GPTQ needs a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    n_in = w.shape[1]
    if hessian.shape != (n_in, n_in):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features={n_in}")
    if group_size != -1 and n_in % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide in_features={n_in}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")


def gptq_quantize(
    w: Tensor,
    hessian: Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    mse_clip: bool,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> GPTQResult:
    """GPTQ: quantize columns one at a time, feeding each error back into later columns.

    Args:
        w: (out, in) weight (copied; computed in float32).
        hessian: (in, in) H = (2/N)·Σ x·xᵀ, e.g. `HessianAccumulator.hessian`.
        bits, group_size, sym, mse_clip, scale_dtype: quantizer settings (`weight_qparams`).
        damp: fraction of mean(diag H) added to the diagonal.
        block_size: columns per lazy batch update.
        act_order: process columns by descending diag(H).
        static_groups: fit all group qparams on the original W up front instead of
            refitting on the updated weights at each group boundary.

    Returns:
        GPTQResult with codes in original column order and g_idx mapping columns to groups.

    Example:
        >>> acc = HessianAccumulator(256, "cpu"); acc.add_batch(torch.randn(512, 256))
        >>> res = gptq_quantize(torch.randn(64, 256), acc.hessian, bits=4, group_size=128,
        ...                     sym=True, mse_clip=True)
        >>> res.q.dtype, res.scale.shape
        (torch.int8, torch.Size([64, 2]))
    """
    _check_weight_args(bits, group_size, sym)
    _check_gptq_inputs(w, hessian, group_size, damp, block_size)
    out, n_in = w.shape
    g = n_in if group_size == -1 else group_size
    n_groups = n_in // g
    qmin, qmax = _int_range(bits, sym)
    W = w.detach().to(torch.float32).clone()
    H = hessian.detach().to(W.device, torch.float32).clone()

    # Columns that never saw input: their weights cannot matter, so zero them
    # (exactly representable) and give H a unit diagonal there to stay invertible.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    def fit(x: Tensor, gs: int) -> tuple[Tensor, Tensor | None]:
        return weight_qparams(
            x, bits=bits, group_size=gs, sym=sym, mse_clip=mse_clip, scale_dtype=scale_dtype
        )

    refit = group_size != -1 and not static_groups
    scale = torch.zeros(out, n_groups, dtype=torch.float32, device=W.device)
    zero = None if sym else torch.zeros_like(scale)
    if not refit:  # per channel, or static groups: fit once on the original (dead-zeroed) W
        s0, z0 = fit(W, group_size)
        scale.copy_(s0)
        if zero is not None and z0 is not None:
            zero.copy_(z0)

    perm = None
    order = torch.arange(n_in, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        order = perm
        W = W[:, perm]  # columns in processing order
        H = H[perm][:, perm]
    # Group of each processing position: refit groups are contiguous in processing
    # order; static groups (and per channel) are defined on the original columns.
    pos_group = torch.arange(n_in, device=W.device) // g if refit else order // g
    pos_group_host = pos_group.tolist()  # read per column without a device sync

    U = _damped_inverse_cholesky(H, damp)
    # With refitting, blocks must hold whole groups so each group is fitted on
    # weights that already carry all earlier error feedback.
    block = max(g, (block_size // g) * g) if refit else block_size
    Qc = torch.zeros_like(W)  # float-valued codes, processing order
    losses = torch.zeros(out, dtype=torch.float32, device=W.device)

    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = W[:, i1:i2].clone()  # (out, count)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if refit and j % g == 0:
                s_new, z_new = fit(W1[:, i : i + g], -1)  # (out, g) -> (out, 1)
                scale[:, j // g] = s_new[:, 0]
                if zero is not None and z_new is not None:
                    zero[:, j // g] = z_new[:, 0]
            k = pos_group_host[j]
            s_col = scale[:, k]
            z_col = None if zero is None else zero[:, k]
            w_col = W1[:, i]
            q_col = _quant_elem(w_col, s_col, z_col, qmin, qmax)
            dq_col = _dequant_elem(q_col, s_col, z_col)
            Qc[:, j] = q_col
            d = U1[i, i]
            losses += (w_col - dq_col) ** 2 / d**2 / 2
            err = (w_col - dq_col) / d
            # Column-wise feedback inside the block: (out, 1) @ (1, count - i).
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        # Lazy batch update of all later columns: (out, count) @ (count, in - i2).
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        Qc = Qc[:, inv]  # back to original column order
    g_idx = torch.empty(n_in, dtype=torch.int32, device=W.device)
    g_idx[order] = pos_group.to(torch.int32)
    q = Qc.to(_int_dtype(bits, sym))
    weight = dequantize_weight_gidx(q, scale, zero, g_idx, sym=sym, dtype=torch.float32)
    return GPTQResult(weight, q, scale, zero, g_idx, perm, float(losses.sum().item()), losses)


def rtn_quantize(
    w: Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    mse_clip: bool,
    scale_dtype: torch.dtype | None = None,
) -> GPTQResult:
    """Round-to-nearest with the same quantizer as GPTQ (no error feedback).

    Args:
        w: (out, in) weight (computed in float32).
        bits, group_size, sym, mse_clip, scale_dtype: as for `weight_qparams`.

    Returns:
        GPTQResult; perm is None, loss is ½·|W - Ŵ|² (GPTQ's loss with H⁻¹ = I).

    Example:
        >>> res = rtn_quantize(torch.randn(64, 256), bits=4, group_size=-1, sym=True, mse_clip=True)
    """
    _check_weight_args(bits, group_size, sym)
    if w.dim() != 2:
        raise ValueError(f"RTN needs a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    n_in = w.shape[1]
    if group_size != -1 and n_in % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide in_features={n_in}")
    W = w.detach().to(torch.float32)
    scale, zero = weight_qparams(
        W, bits=bits, group_size=group_size, sym=sym, mse_clip=mse_clip, scale_dtype=scale_dtype
    )
    q = quantize_weight(W, scale, zero, bits=bits, group_size=group_size, sym=sym)
    g_idx = group_index(n_in, group_size).to(W.device)
    weight = dequantize_weight_gidx(q, scale, zero, g_idx, sym=sym, dtype=torch.float32)
    loss = 0.5 * float((W - weight).pow(2).sum().item())
    return GPTQResult(weight, q, scale, zero, g_idx, None, loss)

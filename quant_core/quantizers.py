"""Integer quantizers for weights, activations and the KV cache (SPINQUANT.md §7).

Conventions, shared by every function here and by `gptq.py`:

- A weight is an HF Linear weight of shape (out, in). `group_size == -1` means
  one group per output row (per channel); otherwise each row is cut into groups
  of `group_size` contiguous input columns.
- Symmetric: q in [-2^(b-1), 2^(b-1) - 1], s = amax / (2^(b-1) - 1), w ≈ q·s.
- Asymmetric: q in [0, 2^b - 1], s = (max - min) / (2^b - 1) with min <= 0 <= max,
  z = round(-min / s), w ≈ (q - z)·s.
- Rounding is `torch.round` (half to even) everywhere.
- Scales are returned in the compute dtype (float32, or float64 for float64
  weights). With `scale_dtype` they are rounded to that storage dtype *before*
  q is computed, so exporting `scale.to(scale_dtype)` next to q is exact
  (CHECKPOINT.md §1.3). Zero points are integer-valued floats of the same dtype.

Every quantize/dequantize path goes through `_quant_elem` / `_dequant_elem`, so
fake quantization, RTN, GPTQ and the exporter produce bit-identical values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

WEIGHT_BITS = (2, 3, 4, 8)  # 16 = no quantization, handled by callers
ACT_BITS = (4, 8)  # activations and KV cache
_SCALE_FLOOR = 1e-5  # weights: amax (sym) or max - min (asym) never below this
_ACT_FLOOR = 1e-8  # activations: tiny, only guards against division by zero
_MSE_CHUNK_ELEMS = 1 << 20  # clip-search temporaries: at most this many elements (4 MB fp32, cache-sized: 2.4x faster than 16 MB)


# ----------------------------------------------------------------------------
# Private elementwise primitives: the single source of truth for the integer map.
# ----------------------------------------------------------------------------


def _int_range(bits: int, sym: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid."""
    if sym:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _int_dtype(bits: int, sym: bool) -> torch.dtype:
    # Asymmetric 8-bit needs 0..255, which int8 cannot hold.
    assert bits <= 8, f"bits={bits} > 8 is not an integer format we store"
    return torch.uint8 if (not sym and bits == 8) else torch.int8


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _quant_elem(x: Tensor, s: Tensor, z: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """Float-valued integer codes: clamp(round(x / s) + z, qmin, qmax)."""
    q = torch.round(x / s)
    if z is not None:
        q = q + z
    return q.clamp(qmin, qmax)


def _dequant_elem(q: Tensor, s: Tensor, z: Tensor | None) -> Tensor:
    """(q - z)·s, or q·s when symmetric; q must already be in s's float dtype."""
    if z is not None:
        q = q - z
    return q * s


def _round_scale(s: Tensor, scale_dtype: torch.dtype | None) -> Tensor:
    """Round s to its storage dtype and back, so q is computed with the stored scale."""
    if scale_dtype is None:
        return s
    assert scale_dtype.is_floating_point, f"scale_dtype must be a float dtype, got {scale_dtype}"
    # A scale that underflows in a narrow dtype (fp16) would divide by zero.
    tiny = torch.finfo(scale_dtype).tiny
    return s.to(scale_dtype).clamp_min(tiny).to(s.dtype)


def _minmax_qparams(
    xmin: Tensor, xmax: Tensor, *, bits: int, sym: bool, scale_dtype: torch.dtype | None
) -> tuple[Tensor, Tensor | None]:
    """Scale/zero from a range with xmin <= 0 <= xmax (any shape, elementwise)."""
    _, qmax = _int_range(bits, sym)
    if sym:
        amax = torch.maximum(-xmin, xmax).clamp_min(_SCALE_FLOOR)
        return _round_scale(amax / qmax, scale_dtype), None
    # An all-zero group gets [-1, 1] (GPTQ convention): it still dequantizes to 0.
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    s = _round_scale((xmax - xmin).clamp_min(_SCALE_FLOOR) / qmax, scale_dtype)
    # Clamp: a scale rounded down to its storage dtype can push -xmin/s past qmax.
    z = torch.round(-xmin / s).clamp(0, qmax)
    return s, z


def _group_view(w: Tensor, group_size: int) -> Tensor:
    """(out, in) -> (out, n_groups, g)."""
    assert w.dim() == 2, f"expected a 2-D (out, in) weight, got shape {tuple(w.shape)}"
    out, n_in = w.shape
    g = n_in if group_size == -1 else group_size
    assert g > 0 and n_in % g == 0, f"group_size={group_size} must divide in_features={n_in}"
    return w.reshape(out, n_in // g, g)  # (out, in) -> (out, in // g, g)


def _check_weight_args(bits: int, group_size: int, sym: bool) -> None:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {group_size}")
    assert isinstance(sym, bool), f"sym must be a bool, got {type(sym)}"


# ----------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------


def _clip_search(
    wg: Tensor,
    xmin: Tensor,
    xmax: Tensor,
    *,
    bits: int,
    sym: bool,
    shrinks: Tensor,
    norm: float,
    scale_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None]:
    """Per-group best shrink p of [xmin, xmax] under sum |Q(w) - w|^norm.

    wg is (rows, n_groups, g); xmin/xmax are (rows, n_groups); shrinks is (P,).
    Candidates are scored a batch of p values at a time: one kernel per op for a
    small matrix instead of P (launch-bound on GPU, barrier-bound on busy CPUs).
    """
    assert wg.dim() == 3 and xmin.shape == wg.shape[:2] == xmax.shape
    assert shrinks.dim() == 1 and shrinks.dtype == wg.dtype
    qmin, qmax = _int_range(bits, sym)
    p_batch = max(1, _MSE_CHUNK_ELEMS // wg.numel())  # bound each (pb, rows, ng, g) temporary
    best_err = torch.full_like(xmin, math.inf)
    best_s = torch.empty_like(xmin)
    best_z = None if sym else torch.empty_like(xmin)
    for b0 in range(0, shrinks.numel(), p_batch):
        p = shrinks[b0 : b0 + p_batch].reshape(-1, 1, 1)  # (pb,) -> (pb, 1, 1)
        s, z = _minmax_qparams(p * xmin, p * xmax, bits=bits, sym=sym, scale_dtype=scale_dtype)
        s4 = s.unsqueeze(-1)  # (pb, rows, ng) -> (pb, rows, ng, 1)
        z4 = None if z is None else z.unsqueeze(-1)  # (pb, rows, ng) -> (pb, rows, ng, 1)
        dq = _dequant_elem(_quant_elem(wg, s4, z4, qmin, qmax), s4, z4)  # (pb, rows, ng, g)
        err = (dq - wg).abs_().pow_(norm).sum(-1)  # (pb, rows, ng, g) -> (pb, rows, ng)
        # argmin returns the first minimum and '<' keeps the earlier batch on ties, so
        # among equal errors the largest p wins: p = 1 unless clipping really helps.
        idx = err.argmin(0, keepdim=True)  # (1, rows, ng)
        err_b = err.gather(0, idx).squeeze(0)  # (1, rows, ng) -> (rows, ng)
        better = err_b < best_err
        best_err = torch.where(better, err_b, best_err)
        best_s = torch.where(better, s.gather(0, idx).squeeze(0), best_s)
        if best_z is not None and z is not None:
            best_z = torch.where(better, z.gather(0, idx).squeeze(0), best_z)
    return best_s, best_z


def weight_qparams(
    w: Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    mse_clip: bool,
    clip_grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    scale_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-row or per-group scale (and zero point) of a weight.

    Args:
        w: (out, in) weight; used detached, in float32 (float64 if w is float64).
        bits: one of 2, 3, 4, 8.
        group_size: -1 for one group per row, else a divisor of in.
        sym: symmetric (no zero point) or asymmetric.
        mse_clip: search shrink factors p = 1, 1 - 1/clip_grid, ... (int(max_shrink·clip_grid)
            values) of the row/group range and keep the p minimising sum |Q(w) - w|^norm.
        clip_grid, max_shrink, norm: the clip-search grid and criterion.
        scale_dtype: storage dtype the scale is rounded to before use (e.g. torch.bfloat16).

    Returns:
        scale (out, n_groups) and zero (out, n_groups) as integer-valued floats, or None if sym.

    Example:
        >>> w = torch.randn(64, 256)
        >>> s, z = weight_qparams(w, bits=4, group_size=128, sym=True, mse_clip=True)
        >>> s.shape, z
        (torch.Size([64, 2]), None)
    """
    _check_weight_args(bits, group_size, sym)
    assert clip_grid > 0 and 0.0 < max_shrink <= 1.0, "need clip_grid > 0 and 0 < max_shrink <= 1"
    wc = w.detach().to(_compute_dtype(w))
    wg = _group_view(wc, group_size)  # (out, in) -> (out, n_groups, g)
    # The range always contains 0, so an all-positive group still maps 0 exactly.
    xmin = wg.amin(-1).clamp_max(0.0)  # (out, n_groups)
    xmax = wg.amax(-1).clamp_min(0.0)  # (out, n_groups)
    if not mse_clip:
        return _minmax_qparams(xmin, xmax, bits=bits, sym=sym, scale_dtype=scale_dtype)
    n_p = int(max_shrink * clip_grid)  # 80 by default: p = 1.00, 0.99, ..., 0.21
    shrinks = torch.tensor([1.0 - i / clip_grid for i in range(n_p)], dtype=wc.dtype, device=wc.device)
    out, n_groups, g = wg.shape
    rows = max(1, _MSE_CHUNK_ELEMS // (n_groups * g))
    scales, zeros = [], []
    for r0 in range(0, out, rows):  # chunk rows so no temporary holds more than the budget
        s, z = _clip_search(
            wg[r0 : r0 + rows], xmin[r0 : r0 + rows], xmax[r0 : r0 + rows],
            bits=bits, sym=sym, shrinks=shrinks, norm=norm, scale_dtype=scale_dtype,
        )  # fmt: skip
        scales.append(s)
        zeros.append(z)
    zero = None if sym else torch.cat([z for z in zeros if z is not None])
    return torch.cat(scales), zero


def quantize_weight(
    w: Tensor, scale: Tensor, zero: Tensor | None, *, bits: int, group_size: int, sym: bool
) -> Tensor:
    """Integer codes of a weight for given qparams.

    Args:
        w: (out, in) weight (any float dtype; computed in scale's dtype).
        scale, zero: (out, n_groups) from `weight_qparams`; zero is None when sym.
        bits, group_size, sym: as for `weight_qparams`.

    Returns:
        (out, in) torch.int8 codes (torch.uint8 for asymmetric 8-bit, whose range is 0..255).

    Example:
        >>> s, z = weight_qparams(w, bits=4, group_size=-1, sym=True, mse_clip=False)
        >>> q = quantize_weight(w, s, z, bits=4, group_size=-1, sym=True)  # values in [-8, 7]
    """
    _check_weight_args(bits, group_size, sym)
    assert (zero is None) == sym, "zero must be None exactly when sym"
    wg = _group_view(w.detach().to(scale.dtype), group_size)  # (out, in) -> (out, ng, g)
    assert scale.shape == wg.shape[:2], f"scale {tuple(scale.shape)} != {tuple(wg.shape[:2])}"
    qmin, qmax = _int_range(bits, sym)
    z3 = None if zero is None else zero.unsqueeze(-1)  # (out, ng) -> (out, ng, 1)
    q = _quant_elem(wg, scale.unsqueeze(-1), z3, qmin, qmax)  # (out, ng, g)
    return q.reshape(w.shape).to(_int_dtype(bits, sym))  # (out, ng, g) -> (out, in)


def dequantize_weight(
    q: Tensor, scale: Tensor, zero: Tensor | None, *, group_size: int, sym: bool, dtype: torch.dtype
) -> Tensor:
    """(q - z)·s per group, computed in scale's dtype and cast to `dtype`.

    Args:
        q: (out, in) integer codes from `quantize_weight`.
        scale, zero: (out, n_groups); zero is None when sym.
        group_size: -1 or the group size used to quantize.
        sym: whether q is symmetric.
        dtype: output dtype.

    Example:
        >>> w_hat = dequantize_weight(q, s, z, group_size=-1, sym=True, dtype=torch.bfloat16)
    """
    assert not q.is_floating_point(), f"q must be an integer tensor, got {q.dtype}"
    assert (zero is None) == sym, "zero must be None exactly when sym"
    qg = _group_view(q.to(scale.dtype), group_size)  # (out, in) -> (out, ng, g)
    assert scale.shape == qg.shape[:2], f"scale {tuple(scale.shape)} != {tuple(qg.shape[:2])}"
    z3 = None if zero is None else zero.unsqueeze(-1)  # (out, ng) -> (out, ng, 1)
    w = _dequant_elem(qg, scale.unsqueeze(-1), z3)
    return w.reshape(q.shape).to(dtype)  # (out, ng, g) -> (out, in)


def dequantize_weight_gidx(
    q: Tensor, scale: Tensor, zero: Tensor | None, g_idx: Tensor, *, sym: bool, dtype: torch.dtype
) -> Tensor:
    """(q - z)·s where column j uses group g_idx[j] (GPTQ act-order layout).

    Args:
        q: (out, in) integer codes.
        scale, zero: (out, n_groups); zero is None when sym.
        g_idx: (in,) integer group index of each column.
        sym: whether q is symmetric.
        dtype: output dtype.

    Example:
        >>> g_idx = torch.arange(256) // 128
        >>> w_hat = dequantize_weight_gidx(q, s, None, g_idx, sym=True, dtype=torch.float32)
    """
    assert q.dim() == 2 and not q.is_floating_point(), "q must be a 2-D integer tensor"
    assert g_idx.shape == (q.shape[1],) and not g_idx.is_floating_point(), "g_idx must be (in,) ints"
    assert (zero is None) == sym, "zero must be None exactly when sym"
    assert scale.dim() == 2 and scale.shape[0] == q.shape[0], "scale must be (out, n_groups)"
    idx = g_idx.long()
    s = scale[:, idx]  # (out, ng) -> (out, in)
    z = None if zero is None else zero[:, idx]  # (out, ng) -> (out, in)
    return _dequant_elem(q.to(scale.dtype), s, z).to(dtype)


def _ste(x: Tensor, x_hat: Tensor) -> Tensor:
    """Forward value x_hat exactly, gradient 1 w.r.t. x.

    Why not x + (x_hat - x).detach(): that form rounds twice in float, so the
    forward value can differ from x_hat in the last bit (and in bf16 by much
    more); here x - x.detach() is exactly 0 for finite x.
    """
    return x_hat.detach() + (x - x.detach())


def fake_quant_weight(
    w: Tensor,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    mse_clip: bool,
    scale_dtype: torch.dtype | None = None,
) -> Tensor:
    """Quantize-dequantize a weight with a straight-through gradient.

    Qparams come from the detached weight; the gradient passes through
    unchanged (no clipping mask). The value equals
    `dequantize_weight(quantize_weight(w, ...), ...)` bit for bit.

    Args:
        w: (out, in) weight.
        bits, group_size, sym, mse_clip, scale_dtype: as for `weight_qparams`.

    Returns:
        (out, in) tensor in w.dtype.

    Example:
        >>> w = torch.randn(64, 256, requires_grad=True)
        >>> w_hat = fake_quant_weight(w, bits=4, group_size=128, sym=True, mse_clip=False)
    """
    wd = w.detach()
    s, z = weight_qparams(
        wd, bits=bits, group_size=group_size, sym=sym, mse_clip=mse_clip, scale_dtype=scale_dtype
    )
    q = quantize_weight(wd, s, z, bits=bits, group_size=group_size, sym=sym)
    w_hat = dequantize_weight(q, s, z, group_size=group_size, sym=sym, dtype=w.dtype)
    return _ste(w, w_hat)


# ----------------------------------------------------------------------------
# Activations and KV cache
# ----------------------------------------------------------------------------


def fake_quant_act(
    x: Tensor, *, bits: int, sym: bool, clip_ratio: float = 1.0, group_size: int = -1, half_range: bool = False,
    range_grad: bool = False,
) -> Tensor:
    """Dynamic per-token (optionally per-group) fake quantization over the last dim.

    Asymmetric: lo = c·min(0, min), hi = c·max(0, max), s = (hi - lo)/(2^b - 1),
    z = round(-lo/s), x̂ = (clamp(round(x/s) + z, 0, 2^b - 1) - z)·s; an all-zero
    token/group uses [-1, 1]. Symmetric: s = c·max|x|/(2^(b-1) - 1), codes clamped to
    [-2^(b-1), 2^(b-1) - 1]. Computed in float32, returned in x.dtype, STE gradient.

    Args:
        x: (..., d) activations; any leading batch shape.
        bits: 4 or 8.
        sym: symmetric or asymmetric.
        clip_ratio: c in (0, 1]; values beyond c·range are clamped.
        group_size: -1 for one scale per token, else groups of this many contiguous
            channels (KV cache: head_dim, one scale per token per head).
        half_range: symmetric only: s = c·max|x| / ((qmax - qmin)/2), i.e. amax/7.5 at 4 bits,
            the compressed-tensors convention, instead of amax/qmax (SpinQuant/QuaRot).
        range_grad: gradient only (the value is identical): besides the straight-through
            identity, let the gradient reach each token's scale, i.e. its min/max (or max|x|)
            elements, with the LSQ derivative ∂x̂/∂s = (q - z) - x/s (q - z where clamped).
            Rotation learning then sees that a rotation which narrows a token's range shrinks
            that token's rounding error; the plain STE (SpinQuant's) cannot see it.

    Example:
        >>> k = torch.randn(2, 16, 8 * 64)  # (batch, seq, heads·hd)
        >>> k_hat = fake_quant_act(k, bits=4, sym=False, group_size=64)
    """
    if bits not in ACT_BITS:
        raise ValueError(f"activation bits must be one of {ACT_BITS}, got {bits}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    assert x.dim() >= 1 and x.is_floating_point(), "x must be a float tensor of rank >= 1"
    d = x.shape[-1]
    g = d if group_size == -1 else group_size
    assert g > 0 and d % g == 0, f"group_size={group_size} must divide the last dim {d}"
    qmin, qmax = _int_range(bits, sym=sym)
    if not x.requires_grad:
        return _act_grid(x, g, sym, clip_ratio, qmin, qmax, half_range)[0]
    return _ActSTE.apply(x, g, sym, clip_ratio, qmin, qmax, half_range, range_grad)


def _act_grid(x: Tensor, g: int, sym: bool, clip: float, qmin: int, qmax: int, half_range: bool,
              with_grad_terms: bool = False) -> tuple[Tensor, Any]:
    """x_hat (x's shape and dtype) and, when asked, what the range gradient needs: per element dx̂/ds and,
    per group, the index of each extreme element with ds/d(that element)."""
    d = x.shape[-1]
    # A private float32 copy (grouped): the arithmetic below runs in place on it, since a fresh buffer per
    # elementwise step costs more than the step on a CPU. (..., d) -> (..., d // g, g)
    xf = x.detach().to(torch.float32, copy=True).reshape(*x.shape[:-1], d // g, g)
    extremes: list[tuple[Tensor, Tensor]] = []  # (index, ds/dx there), each (..., d // g, 1)
    if sym:
        den = (qmax - qmin) / 2 if half_range else qmax
        amax, k = xf.abs().max(-1, keepdim=True)  # (..., d // g, 1)
        s = (clip * amax / den).clamp_min(_ACT_FLOOR)
        z = None
        if with_grad_terms:
            extremes.append((k, clip / den * torch.sign(xf.gather(-1, k))))
    else:
        mn, k_lo = xf.min(-1, keepdim=True)  # (..., d // g, 1)
        mx, k_hi = xf.max(-1, keepdim=True)
        lo, hi = clip * mn.clamp_max(0.0), clip * mx.clamp_min(0.0)
        empty = (lo == 0) & (hi == 0)
        lo = torch.where(empty, -1.0, lo)  # an all-zero group's range is a constant (no gradient)
        hi = torch.where(empty, 1.0, hi)
        s = ((hi - lo) / qmax).clamp_min(_ACT_FLOOR)
        z = torch.round(-lo / s)
        if with_grad_terms:  # s = (hi - lo)/qmax, hi = c*max(0, max), lo = c*min(0, min)
            extremes.append((k_hi, torch.where(~empty & (mx > 0), clip / qmax, 0.0)))
            extremes.append((k_lo, torch.where(~empty & (mn < 0), -clip / qmax, 0.0)))
    r = xf.div_(s)  # x / s, in place of the copy
    # The integer map of _quant_elem / _dequant_elem, step by step: clamp(round(x/s) + z) - z, times s.
    pre = r.round() if with_grad_terms else r.round_()  # codes before the clamp
    if z is not None:
        pre.add_(z)
    q = pre.clamp(qmin, qmax) if with_grad_terms else pre.clamp_(qmin, qmax)
    codes = q if z is None else q.sub_(z)
    x_hat = (codes * s if with_grad_terms else codes.mul_(s)).reshape(x.shape).to(x.dtype)  # -> (..., d)
    if not with_grad_terms:
        return x_hat, None
    clamped = pre < qmin
    clamped |= pre > qmax
    # LSQ: d/ds [s*(round(x/s) + z - z)] = round(x/s) - x/s inside the grid, the code itself where clamped
    dxhat_ds = torch.where(clamped, codes, r.neg_().add_(codes))
    return x_hat, (dxhat_ds, extremes)


class _ActSTE(torch.autograd.Function):
    """Activation fake quantization with a straight-through gradient; with ``range_grad`` also the LSQ term
    through each group's scale (see fake_quant_act). Written as one autograd node: backward needs only
    dx̂/ds per element and the extremes' indices, not the graph of a dozen elementwise ops."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, g: int, sym: bool, clip: float, qmin: int, qmax: int, half_range: bool,
                range_grad: bool) -> Tensor:
        x_hat, terms = _act_grid(x, g, sym, clip, qmin, qmax, half_range, with_grad_terms=range_grad)
        ctx.range_grad, ctx.g = range_grad, g
        if range_grad:
            dxhat_ds, extremes = terms
            ctx.save_for_backward(dxhat_ds, *(t for pair in extremes for t in pair))
        return x_hat

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        none = (None,) * 7
        if not ctx.range_grad:
            return grad, *none  # the straight-through identity
        dxhat_ds, *flat = ctx.saved_tensors
        gg = grad.float().reshape(dxhat_ds.shape).clone()  # (..., d) -> (..., d // g, g)
        dl_ds = (grad.float().reshape(dxhat_ds.shape) * dxhat_ds).sum(-1, keepdim=True)  # (..., d // g, 1)
        for k, ds_dx in zip(flat[0::2], flat[1::2], strict=True):
            gg.scatter_add_(-1, k, dl_ds * ds_dx)
        return gg.reshape(grad.shape).to(grad.dtype), *none


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(|ref|² / |ref - approx|²) in dB.

    Args:
        ref: reference tensor.
        approx: approximation, same shape.

    Example:
        >>> sqnr_db(w, fake_quant_weight(w, bits=8, group_size=-1, sym=True, mse_clip=False))
    """
    assert ref.shape == approx.shape, f"shape mismatch {tuple(ref.shape)} vs {tuple(approx.shape)}"
    r = ref.detach().double()
    noise = (r - approx.detach().double()).pow(2).sum().item()
    signal = r.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)

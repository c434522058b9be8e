"""int4 packing for the compressed-tensors ``pack-quantized`` and GPTQ v1 formats (CHECKPOINT.md §1.3, §2).

Every function here is a pure tensor transform; nothing is quantized or rounded.

compressed-tensors (CT) ``pack-quantized``, 4 bit:
    - codes q are signed, in [-8, 7]; the stored nibble is u = q + 8 (0..15);
    - ``weight_packed`` (out, in/8) int32: column 8k + j of row r lies in word [r, k], bits 4j..4j+3
      (lowest nibble first); words are int32 bit patterns and may be negative;
    - ``weight_zero_point`` (asymmetric only) (ceil(out/8), n_groups) int32: the same nibble rule along
      dim 0 (output rows), rows padded at the end with nibble 0;
    - dequantization is (q - z) * scale[:, col // g].

    Zero-point convention, read from compressed-tensors 0.20.0 (``quantization/utils/helpers.py``
    ``calculate_qparams``; ``compressors/pack_quantized/base.py``): the zero point z lives in the same
    signed domain as q: z = clamp(-8 - min/scale, -8, 7), rounded to int8 (``zp_dtype`` defaults to
    ``pytorch_dtype()`` = int8 for int4), quantization is q = clamp(round(x/scale) + z, -8, 7) and
    dequantization (q - z) * scale. ``PackedQuantizationCompressor`` packs that signed z with
    ``pack_to_int32(z, 4, packed_dim=0)``, which adds the same +8 offset. So a quantizer that works
    with unsigned codes u in 0..15 and an unsigned zero z_u in 0..15 passes q = u - 8 and z = z_u - 8;
    the stored zero-point nibble is then z_u itself, and (q - z) == (u - z_u).

GPTQ v1 (``checkpoint_format: "gptq"``):
    - ``qweight`` (in/8, out) int32: u = q + 8 transposed to (in, out); input row r lies in word
      [r // 8, c], bits 4*(r % 8)..;
    - ``qzeros`` (n_groups, out/8) int32: stored value zero - 1 (v1 convention) packed along the output
      dim with the same nibble order; zero is the unsigned zero point, 8 when symmetric, so a
      symmetric layer has every word 0x77777777.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "INT4_OFFSET",
    "gptq_qzeros",
    "group_index",
    "pack_gptq_qweight",
    "pack_int4_rows",
    "pack_int4_zero_points",
    "unpack_gptq_qweight",
    "unpack_gptq_qzeros",
    "unpack_int4_rows",
    "unpack_int4_zero_points",
]

_NIBBLES = 8  # int4 values per int32 word
_OFFSET = 8  # signed [-8, 7] <-> unsigned [0, 15]


# --------------------------------------------------------------------------- helpers


INT4_OFFSET = 8  # stored nibble u = signed code q + 8; our asymmetric quantizer's codes are u themselves


def group_index(in_features: int, group_size: int) -> Tensor:
    """(in_features,) int32: the scale group of each input column (``g_idx``): col // g, or 0 per channel."""
    if group_size > 0:
        return (torch.arange(in_features) // group_size).to(torch.int32)
    return torch.zeros(in_features, dtype=torch.int32)


def _check_int_matrix(t: Tensor, name: str) -> None:
    """Raise ValueError unless t is a non-empty 2-D integer (non-bool) tensor."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")


def _check_range(t: Tensor, lo: int, hi: int, name: str) -> None:
    tmin, tmax = int(t.min()), int(t.max())
    if tmin < lo or tmax > hi:
        raise ValueError(f"{name} values must lie in [{lo}, {hi}], got [{tmin}, {tmax}]")


def _check_packed(packed: Tensor, name: str) -> None:
    if not isinstance(packed, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(packed.shape)}")
    if packed.dtype != torch.int32:
        raise ValueError(f"{name} must be torch.int32, got {packed.dtype}")


def _shifts(device: torch.device) -> Tensor:
    return torch.arange(0, 4 * _NIBBLES, 4, dtype=torch.int64, device=device)  # (8,): 0, 4, ..., 28


def _pack_last(u: Tensor) -> Tensor:
    """Pack unsigned nibbles along the last dim, lowest nibble first.

    Args:
        u: (rows, n) integer tensor with values in 0..15 and n % 8 == 0.

    Returns:
        (rows, n/8) int32; element 8k + j of a row goes to word k, bits 4j..4j+3.
    """
    rows, n = u.shape
    assert n % _NIBBLES == 0, f"last dim {n} is not a multiple of {_NIBBLES}"
    u3 = u.to(torch.int64).reshape(rows, n // _NIBBLES, _NIBBLES)  # (rows, n) -> (rows, n/8, 8)
    words = (u3 << _shifts(u.device)).sum(-1)  # (rows, n/8) int64 in [0, 2^32): disjoint bit fields
    words = torch.where(words >= 2**31, words - 2**32, words)  # low 32 bits as a signed value
    return words.to(torch.int32)


def _unpack_last(packed: Tensor) -> Tensor:
    """Inverse of `_pack_last`.

    Args:
        packed: (rows, m) int32.

    Returns:
        (rows, 8m) int64 nibbles in 0..15.
    """
    rows, m = packed.shape
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (rows, m): the unsigned bit pattern
    nib = (words.unsqueeze(-1) >> _shifts(packed.device)) & 0xF  # (rows, m) -> (rows, m, 8)
    return nib.reshape(rows, m * _NIBBLES)  # (rows, m, 8) -> (rows, 8m)


def _check_features(n: int, name: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


def _check_words(n: int, name: str, packed: Tensor, packed_name: str, words: int) -> None:
    """n (a feature count) must be exactly 8 nibbles per packed word along the packed dim."""
    _check_features(n, name)
    if n != _NIBBLES * words:
        raise ValueError(
            f"{name}={n} does not match {packed_name} shape {tuple(packed.shape)} "
            f"(expected {_NIBBLES} * {words} = {_NIBBLES * words})"
        )


# --------------------------------------------------------------------------- compressed-tensors


def pack_int4_rows(q: Tensor) -> Tensor:
    """Pack signed int4 weight codes into CT ``weight_packed`` words (along the input dim).

    Args:
        q: (out, in) integer tensor (any integer dtype) with values in [-8, 7]; in % 8 == 0.

    Returns:
        (out, in/8) int32: nibble u = q + 8 of column 8k + j in word k, bits 4j..4j+3.

    Raises:
        ValueError: q not a non-empty 2-D integer tensor, values out of [-8, 7], or in % 8 != 0.

    Example:
        >>> pack_int4_rows(torch.arange(-8, 0).reshape(1, 8))  # nibbles 0..7
        tensor([[1985229328]], dtype=torch.int32)
    """
    _check_int_matrix(q, "q")
    out, in_features = q.shape
    if in_features % _NIBBLES != 0:
        raise ValueError(f"in_features={in_features} must be a multiple of {_NIBBLES} to pack int4 rows")
    _check_range(q, -8, 7, "q")
    packed = _pack_last(q.to(torch.int64) + _OFFSET)  # (out, in) -> (out, in/8)
    assert packed.shape == (out, in_features // _NIBBLES)
    return packed


def unpack_int4_rows(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of `pack_int4_rows`.

    Args:
        packed: (out, in/8) int32 ``weight_packed``.
        in_features: number of input columns; must equal 8 * packed.shape[1].

    Returns:
        (out, in) int8 codes in [-8, 7].

    Example:
        >>> unpack_int4_rows(torch.tensor([[1985229328]], dtype=torch.int32), 8)
        tensor([[-8, -7, -6, -5, -4, -3, -2, -1]], dtype=torch.int8)
    """
    _check_packed(packed, "packed")
    _check_words(in_features, "in_features", packed, "packed", packed.shape[1])
    return (_unpack_last(packed) - _OFFSET).to(torch.int8)  # (out, in/8) -> (out, in)


def pack_int4_zero_points(z: Tensor) -> Tensor:
    """Pack signed zero points into CT ``weight_zero_point`` (along dim 0, the output rows).

    CT 0.20.0 stores the zero point in the same signed domain as the codes (z = z_unsigned - 8, in
    [-8, 7]; dequantization (q - z) * scale) and packs it with +8, 8 rows per word, lowest nibble
    first; rows are padded to a multiple of 8 with nibble 0 (what CT's ``pack_to_int32`` writes).

    Args:
        z: (out, n_groups) integer tensor with values in [-8, 7]; any out >= 1.

    Returns:
        (ceil(out/8), n_groups) int32: nibble z[8k + j, g] + 8 in word [k, g], bits 4j..4j+3.

    Example:
        >>> pack_int4_zero_points(torch.zeros(3, 2, dtype=torch.int16))  # three rows of nibble 8
        tensor([[2184, 2184]], dtype=torch.int32)
    """
    _check_int_matrix(z, "z")
    out, n_groups = z.shape
    _check_range(z, -8, 7, "z")
    out_pad = -(-out // _NIBBLES) * _NIBBLES
    u = torch.zeros(out_pad, n_groups, dtype=torch.int64, device=z.device)  # pad rows hold nibble 0
    u[:out] = z.to(torch.int64) + _OFFSET
    packed = _pack_last(u.t()).t().contiguous()  # (out_pad, ng) -> (ng, out_pad) -> (ng, out_pad/8) -> (out_pad/8, ng)
    assert packed.shape == (out_pad // _NIBBLES, n_groups)
    return packed


def unpack_int4_zero_points(packed: Tensor, out_features: int) -> Tensor:
    """Inverse of `pack_int4_zero_points`.

    Args:
        packed: (ceil(out/8), n_groups) int32 ``weight_zero_point``.
        out_features: number of output rows (padding rows are dropped).

    Returns:
        (out, n_groups) int8 signed zero points in [-8, 7].

    Example:
        >>> unpack_int4_zero_points(torch.tensor([[2184, 2184]], dtype=torch.int32), 3)
        tensor([[0, 0],
                [0, 0],
                [0, 0]], dtype=torch.int8)
    """
    _check_packed(packed, "packed")
    _check_features(out_features, "out_features")
    if -(-out_features // _NIBBLES) != packed.shape[0]:
        raise ValueError(
            f"out_features={out_features} needs {-(-out_features // _NIBBLES)} packed rows, "
            f"got packed shape {tuple(packed.shape)}"
        )
    u = _unpack_last(packed.t()).t()  # (out_pad/8, ng) -> (ng, out_pad/8) -> (ng, out_pad) -> (out_pad, ng)
    return (u[:out_features] - _OFFSET).to(torch.int8).contiguous()  # (out_pad, ng) -> (out, ng)


# --------------------------------------------------------------------------- GPTQ v1


def pack_gptq_qweight(q: Tensor) -> Tensor:
    """Pack signed int4 codes into a GPTQ ``qweight`` (along the input dim, transposed layout).

    Args:
        q: (out, in) integer tensor with values in [-8, 7]; in % 8 == 0.

    Returns:
        (in/8, out) int32: u = q + 8; input row r of column c in word [r // 8, c], bits 4*(r % 8)..

    Example:
        >>> pack_gptq_qweight(torch.arange(-8, 0).reshape(1, 8))  # one output, 8 inputs
        tensor([[1985229328]], dtype=torch.int32)
    """
    _check_int_matrix(q, "q")
    out, in_features = q.shape
    if in_features % _NIBBLES != 0:
        raise ValueError(f"in_features={in_features} must be a multiple of {_NIBBLES} to pack a GPTQ qweight")
    _check_range(q, -8, 7, "q")
    # Packing the transposed (in, out) along dim 0 is packing (out, in) along its rows, transposed.
    packed = _pack_last(q.to(torch.int64) + _OFFSET).t().contiguous()  # (out, in) -> (out, in/8) -> (in/8, out)
    assert packed.shape == (in_features // _NIBBLES, out)
    return packed


def unpack_gptq_qweight(qweight: Tensor, in_features: int) -> Tensor:
    """Inverse of `pack_gptq_qweight`.

    Args:
        qweight: (in/8, out) int32.
        in_features: must equal 8 * qweight.shape[0].

    Returns:
        (out, in) int8 signed codes in [-8, 7].

    Example:
        >>> unpack_gptq_qweight(torch.tensor([[1985229328]], dtype=torch.int32), 8)
        tensor([[-8, -7, -6, -5, -4, -3, -2, -1]], dtype=torch.int8)
    """
    _check_packed(qweight, "qweight")
    _check_words(in_features, "in_features", qweight, "qweight", qweight.shape[0])
    u = _unpack_last(qweight.t())  # (in/8, out) -> (out, in/8) -> (out, in)
    return (u - _OFFSET).to(torch.int8).contiguous()


def gptq_qzeros(n_groups: int, out_features: int, zero: Tensor | None) -> Tensor:
    """GPTQ v1 ``qzeros``: the stored value zero - 1, packed along the output dim.

    Args:
        n_groups: number of input groups (1 for channel-wise, in / group_size otherwise).
        out_features: output size; must be a multiple of 8.
        zero: None for symmetric (zero 8 everywhere), else the unsigned zero point as an integer
            tensor of shape (out_features, n_groups) (our quantizers' orientation) with values in
            [1, 16]; v1 cannot store zero 0 (zero - 1 = -1 does not fit a nibble).

    Returns:
        (n_groups, out/8) int32: nibble zero[c, g] - 1 in word [g, c // 8], bits 4*(c % 8)..;
        for symmetric every word is 0x77777777 (2004318071).

    Example:
        >>> gptq_qzeros(2, 8, None)
        tensor([[2004318071],
                [2004318071]], dtype=torch.int32)
        >>> z_u = torch.full((8, 2), 8.0)  # e.g. from weight_qparams(sym=False)
        >>> gptq_qzeros(2, 8, z_u.round().to(torch.int16))  # same words
        tensor([[2004318071],
                [2004318071]], dtype=torch.int32)
    """
    _check_features(n_groups, "n_groups")
    _check_features(out_features, "out_features")
    if out_features % _NIBBLES != 0:
        raise ValueError(f"out_features={out_features} must be a multiple of {_NIBBLES} for GPTQ qzeros")
    if zero is None:
        stored = torch.full((n_groups, out_features), 7, dtype=torch.int64)  # symmetric zero 8, stored 7
    else:
        _check_int_matrix(zero, "zero")
        if tuple(zero.shape) != (out_features, n_groups):
            raise ValueError(
                f"zero must have shape (out_features, n_groups) = ({out_features}, {n_groups}), "
                f"got {tuple(zero.shape)}"
            )
        _check_range(zero, 1, 16, "zero (GPTQ v1 stores zero - 1 in a nibble)")
        stored = (zero.to(torch.int64) - 1).t()  # (out, ng) -> (ng, out)
    packed = _pack_last(stored)  # (ng, out) -> (ng, out/8)
    assert packed.shape == (n_groups, out_features // _NIBBLES)
    return packed


def unpack_gptq_qzeros(qzeros: Tensor, out_features: int) -> Tensor:
    """Inverse of `gptq_qzeros` (with a zero tensor): the unsigned zero point, stored value + 1.

    Args:
        qzeros: (n_groups, out/8) int32.
        out_features: must equal 8 * qzeros.shape[1].

    Returns:
        (out, n_groups) int8 zero points in [1, 16] (8 everywhere for a symmetric layer).

    Example:
        >>> unpack_gptq_qzeros(gptq_qzeros(1, 8, None), 8).flatten()
        tensor([8, 8, 8, 8, 8, 8, 8, 8], dtype=torch.int8)
    """
    _check_packed(qzeros, "qzeros")
    _check_words(out_features, "out_features", qzeros, "qzeros", qzeros.shape[1])
    stored = _unpack_last(qzeros)  # (ng, out/8) -> (ng, out)
    return (stored + 1).t().to(torch.int8).contiguous()  # (ng, out) -> (out, ng)

"""Hadamard transforms for SpinQuant: H_K tables, fast WHT, R3/R4 transforms, fallbacks.

The normalised transform of size n = K·2^m is M = (H_K ⊗ H_{2^m}) / √n, where H_K is a
±1 Hadamard matrix of order K and H_{2^m} is Sylvester's. Index order is k·2^m + j, so a
vector viewed as (K, 2^m) has WHT applied along its rows and H_K along its columns
(SPINQUANT.md §5). Every H_K is built in code and checked with H·Hᵀ = K·I in integers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from quant_core.hadamard_tables import WILLIAMSON_ROWS

# Official SpinQuant/QuaRot search order, then our two Paley II additions for Qwen2.5 d_ff.
OFFICIAL_K_ORDER = (172, 156, 140, 108, 60, 52, 36, 28, 44, 40, 20, 12, 76, 148)

# K -> (construction, parameter). Paley I: q ≡ 3 mod 4, order q+1. Paley II: q ≡ 1 mod 4,
# order 2(q+1). "kron2": H_2 ⊗ H_{K/2}. "williamson": order 4w from WILLIAMSON_ROWS.
_CONSTRUCTIONS = {
    **{q + 1: ("paley1", q) for q in (11, 19, 43, 59, 107, 139)},  # 12 20 44 60 108 140
    **{2 * (q + 1): ("paley2", q) for q in (13, 17, 25, 37, 73)},  # 28 36 52 76 148
    40: ("kron2", 20),
    156: ("williamson", 39),
    172: ("williamson", 43),
}


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _factorisation(n: int) -> str:
    """'13696 = 2^7·107' style string for error messages."""
    parts, rest, p = [], n, 2
    while p * p <= rest:
        e = 0
        while rest % p == 0:
            rest, e = rest // p, e + 1
        if e:
            parts.append(f"{p}^{e}" if e > 1 else str(p))
        p += 1
    if rest > 1 or not parts:
        parts.append(str(rest))
    return f"{n} = " + "·".join(parts)


def select_k(n: int) -> int | None:
    """Pick the Hadamard factor K for n = K·2^m, in the official search order.

    Args:
        n: transform size (>= 1).

    Returns:
        The first K in OFFICIAL_K_ORDER with n/K a power of two; 1 if n itself is a power
        of two; None if neither (then a fallback from `plan_hadamard` is needed).

    Example:
        >>> select_k(11008), select_k(4096), select_k(13696)
        (172, 1, None)
    """
    assert isinstance(n, int) and n >= 1, f"n must be a positive int, got {n!r}"
    for k in OFFICIAL_K_ORDER:
        if n % k == 0 and _is_pow2(n // k):
            return k
    return 1 if _is_pow2(n) else None


# --- ±1 matrices of order K --------------------------------------------------------------


def sylvester(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j): the natural order that `fwht` computes."""
    assert _is_pow2(n), f"Sylvester order must be a power of two, got {n}"
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])  # (n, n)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1 - 2 * parity


def _quadratic_character_matrix(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[a, b] = χ(e_a − e_b) over GF(q), q = p or p², p odd.

    GF(p²) is GF(p)[t]/(t² − r) with r a non-residue mod p (so t² − r is irreducible);
    element a0 + a1·t has index a0 + p·a1. For q = p this degenerates to integers mod p.
    """
    p = next(d for d in range(2, q + 1) if q % d == 0)
    deg = round(math.log(q, p))
    assert p > 2 and deg in (1, 2) and p**deg == q, f"q={q} must be an odd prime or prime²"
    r = next(c for c in range(2, p) if pow(c, (p - 1) // 2, p) == p - 1) if deg == 2 else 0
    idx = torch.arange(q)
    a0, a1 = idx % p, idx // p  # (q,), (q,): coordinates in the basis 1, t
    # Squares of all non-zero elements: (a0 + a1 t)² = a0² + r a1² + 2 a0 a1 t.
    sq = ((a0 * a0 + r * a1 * a1) % p + p * ((2 * a0 * a1) % p))[1:]
    chi = -torch.ones(q, dtype=torch.int64)
    chi[sq] = 1
    chi[0] = 0
    # Difference e_a − e_b coordinate-wise mod p, then look up χ.
    d0 = (a0[:, None] - a0[None, :]) % p  # (q, q)
    d1 = (a1[:, None] - a1[None, :]) % p  # (q, q)
    return chi[d0 + p * d1]


def _paley1(q: int) -> torch.Tensor:
    """Order q+1, q ≡ 3 mod 4: H = I + S with S = [[0, 1ᵀ], [−1, Q]] skew, S·Sᵀ = q·I."""
    assert q % 4 == 3, f"Paley I needs q ≡ 3 mod 4, got {q}"
    Q = _quadratic_character_matrix(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return S + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q+1), q ≡ 1 mod 4: symmetric conference matrix C, 0 -> [[1,−1],[−1,−1]],
    ±1 -> ±[[1,1],[1,−1]]."""
    assert q % 4 == 1, f"Paley II needs q ≡ 1 mod 4, got {q}"
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _quadratic_character_matrix(q)
    on = torch.tensor([[1, 1], [1, -1]])
    off = torch.tensor([[1, -1], [-1, -1]])
    # C has zeros exactly on its diagonal, so the two Kronecker terms never overlap.
    return torch.kron(C, on) + torch.kron(torch.eye(q + 1, dtype=torch.int64), off)


def _williamson(w: int) -> torch.Tensor:
    """Order 4w from four symmetric circulants A, B, C, D with ΣXXᵀ = 4w·I."""
    i = torch.arange(w)
    blocks = []
    for row in WILLIAMSON_ROWS[w]:
        v = torch.tensor([1 if c == "+" else -1 for c in row])
        assert v.numel() == w, f"Williamson row of order {w} has {v.numel()} entries"
        blocks.append(v[(i[None, :] - i[:, None]) % w])  # circulant: X[i, j] = v[j − i]
    A, B, C, D = blocks
    array = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]
    return torch.cat([torch.cat(r, dim=1) for r in array], dim=0)


@functools.cache
def _hadamard_k_cached(k: int) -> torch.Tensor:
    if _is_pow2(k):
        H = sylvester(k)
    elif k in _CONSTRUCTIONS:
        kind, param = _CONSTRUCTIONS[k]
        if kind == "paley1":
            H = _paley1(param)
        elif kind == "paley2":
            H = _paley2(param)
        elif kind == "kron2":
            H = torch.kron(sylvester(2), _hadamard_k_cached(param))
        else:
            H = _williamson(param)
    else:
        raise ValueError(f"no Hadamard construction for K={k}; supported: powers of two "
                         f"and {sorted(_CONSTRUCTIONS)}")
    # Never ship an unverified matrix: exact integer check of H·Hᵀ = K·I.
    assert H.shape == (k, k) and H.dtype == torch.int64, (k, H.shape, H.dtype)
    assert bool((H.abs() == 1).all()), f"H_{k} has entries other than ±1"
    assert torch.equal(H @ H.T, k * torch.eye(k, dtype=torch.int64)), f"H_{k}·Hᵀ != {k}·I"
    return H


def hadamard_k(k: int) -> torch.Tensor:
    """The K×K ±1 Hadamard matrix used as the non-power-of-two factor (int64, a fresh copy).

    Args:
        k: a power of two, or one of OFFICIAL_K_ORDER.

    Returns:
        (k, k) int64 tensor H with H·Hᵀ = k·I (checked when first built).

    Example:
        >>> H = hadamard_k(12)
        >>> bool((H @ H.T == 12 * torch.eye(12, dtype=torch.int64)).all())
        True
    """
    assert isinstance(k, int) and k >= 1, f"k must be a positive int, got {k!r}"
    return _hadamard_k_cached(k).clone()


def orthogonal_k(k: int, seed: int) -> torch.Tensor:
    """Seeded random K×K orthogonal matrix (float64): the fallback factor when no H_K exists.

    Args:
        k: order of the factor (typically the odd part of n).
        seed: seed for a private torch.Generator; the same seed gives the same matrix.

    Returns:
        (k, k) float64 Q with Q·Qᵀ = I: sign-fixed QR of a seeded Gaussian.

    Example:
        >>> Q = orthogonal_k(7, seed=0)
        >>> torch.allclose(Q @ Q.T, torch.eye(7, dtype=torch.float64))
        True
    """
    assert isinstance(k, int) and k >= 1, f"k must be a positive int, got {k!r}"
    return _qr_orthogonal(k, torch.Generator().manual_seed(seed))


def _qr_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    # Fix column signs by sign(diag R): makes Q unique (Haar) instead of LAPACK-dependent.
    d = torch.sign(torch.diagonal(R))
    return (Q * torch.where(d == 0, torch.ones_like(d), d)).contiguous()  # Q·diag(sign r_ii)


# --- Fast transforms ---------------------------------------------------------------------


def _fwht_raw(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised WHT over the last dim, no autograd (the kernel behind `fwht`)."""
    assert x.dim() >= 1 and x.is_floating_point(), (x.shape, x.dtype)
    n = x.shape[-1]
    assert _is_pow2(n), f"WHT needs a power-of-two last dim, got {n}"
    src = x.reshape(-1, n).contiguous()  # (..., n) -> (B, n)
    if n == 1:
        return src.clone().reshape(x.shape)
    # Butterfly on pairs (i, i + h) inside each block of 2h, one vectorised op per stage,
    # written with out= into two ping-pong buffers (never into x): several times faster
    # on CPU than allocating a fresh tensor per stage.
    B, bufs = src.shape[0], [torch.empty_like(src) for _ in range(min(2, n.bit_length() - 1))]
    for stage in range(n.bit_length() - 1):
        h, dst = 1 << stage, bufs[stage % len(bufs)]
        s = src.view(B, n // (2 * h), 2, h)  # (B, n/2h, 2, h)
        d = dst.view(B, n // (2 * h), 2, h)  # (B, n/2h, 2, h)
        torch.add(s[:, :, 0, :], s[:, :, 1, :], out=d[:, :, 0, :])
        torch.sub(s[:, :, 0, :], s[:, :, 1, :], out=d[:, :, 1, :])
        src = dst
    return src.reshape(x.shape)  # (B, n) -> (..., n)


class _FWHTFn(torch.autograd.Function):
    # H_n is symmetric, so the backward of y = x·H_n is grad_y·H_n: the same transform.
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _fwht_raw(x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> torch.Tensor:
        return _FWHTFn.apply(grad_y)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform (Sylvester order) over the last dim.

    O(n log n): log2(n) vectorised butterfly stages. Differentiable.

    Args:
        x: floating tensor (..., n) with n a power of two; computed in x's own dtype.

    Returns:
        x · H_n (H_n symmetric, H[i, j] = (-1)^popcount(i & j)), same shape and dtype.

    Example:
        >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([1., 1., 1., 1.])
    """
    assert x.dim() >= 1, "fwht needs at least one dim"
    assert x.is_floating_point(), f"fwht needs a float tensor, got {x.dtype}"
    assert _is_pow2(x.shape[-1]), f"fwht needs a power-of-two last dim, got {x.shape[-1]}"
    return _FWHTFn.apply(x)


@functools.lru_cache(maxsize=1)
def _cuda_wht_kernel() -> Callable[..., torch.Tensor] | None:
    """Dao-AILab `hadamard_transform(x, scale)` if installed; imported lazily so that
    importing quant_core never touches CUDA."""
    try:
        from fast_hadamard_transform import hadamard_transform
    except ImportError:
        return None
    return hadamard_transform


DENSE_WHT_MAX = 256  # up to this size the WHT is one matmul with H_n (faster than log2(n) butterfly passes)


@functools.lru_cache(maxsize=32)
def _sylvester_on(n: int, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """scale * H_n (Sylvester, symmetric) cast once per dtype/device; read-only."""
    return (sylvester(n).double() * scale).to(device=device, dtype=dtype)


def _wht_pow2(y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * y @ H_m over the last (power-of-two) axis."""
    # The CUDA kernel zero-pads non-powers of two, so it only ever sees the 2^m axis
    # (and only up to its 2^15 size limit).
    kernel = _cuda_wht_kernel() if y.is_cuda else None
    if kernel is not None and y.dtype == torch.float32 and y.shape[-1] <= 32768:
        return kernel(y.contiguous(), scale)
    n = y.shape[-1]
    if 1 < n <= DENSE_WHT_MAX:
        # n multiply-adds per element in one GEMM (the scale folded into H) beat 2*log2(n) memory-bound
        # passes on a CPU; same values up to float rounding.
        return y @ _sylvester_on(n, scale, y.dtype, y.device)
    y = _fwht_raw(y)
    return y if scale == 1.0 else y.mul_(scale)  # _fwht_raw returns its own buffer


@functools.lru_cache(maxsize=64)
def _factor_on(k: int, seed: int | None, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """H_K (seed None) or orthogonal_k(K, seed), cast once per dtype/device; read-only."""
    mat = hadamard_k(k) if seed is None else orthogonal_k(k, seed)
    return mat.to(device=device, dtype=dtype)


def _kron_wht(x: torch.Tensor, k: int, seed: int | None, scale: float,
              transpose: bool) -> torch.Tensor:
    """y = x · (F ⊗ H_{n/K})ᵀ · scale; F = H_K or the orthogonal factor, Fᵀ if transpose."""
    assert x.dim() >= 1 and x.is_floating_point(), (x.shape, x.dtype)
    n = x.shape[-1]
    assert n % k == 0 and _is_pow2(n // k), f"n={n} is not K·2^m for K={k}"
    # Low-precision inputs are upcast: bf16 sums over thousands of terms lose too much.
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work).reshape(*x.shape[:-1], k, n // k)  # (..., n) -> (..., K, n/K)
    y = _wht_pow2(y, scale)
    if k > 1:
        F = _factor_on(k, seed, work, y.device)
        y = torch.matmul(F.T if transpose else F, y)  # (K, K) @ (..., K, n/K)
    return y.reshape(x.shape).to(x.dtype)  # (..., K, n/K) -> (..., n)


class _KronWHTFn(torch.autograd.Function):
    """Orthogonal transform with backward = the transposed transform (grad_x = grad_y · M)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: int, seed: int, scale: float, transpose: bool) -> torch.Tensor:
        ctx.args = (k, seed, scale, transpose)
        return _kron_wht(x, k, seed, scale, transpose)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        k, seed, scale, transpose = ctx.args
        return _KronWHTFn.apply(grad_y, k, seed, scale, not transpose), None, None, None, None


def had_transform(x: torch.Tensor, k: int | None = None, transpose: bool = False) -> torch.Tensor:
    """Orthonormal Hadamard transform over the last dim (R3/R4, offline and online).

    Computes y = x · Mᵀ with M = (H_K ⊗ H_{2^m}) / √n, n = K·2^m, index order k·2^m + j.
    M is not symmetric for Paley H_K, so `transpose=True` computes y = x · M (uses H_Kᵀ).
    Runs in float32 (float64 stays float64) and casts back; gradients flow (backward is
    the transposed transform).

    Args:
        x: floating tensor (..., n).
        k: the Hadamard factor; None selects it with `select_k(n)`.
        transpose: compute x · M instead, the inverse of the default transform.

    Returns:
        Tensor of x's shape and dtype.

    Example:
        >>> x = torch.randn(2, 28 * 4, dtype=torch.float64)
        >>> y = had_transform(x)
        >>> torch.allclose(had_transform(y, transpose=True), x)
        True
    """
    assert x.dim() >= 1, "had_transform needs at least one dim"
    assert x.is_floating_point(), f"had_transform needs a float tensor, got {x.dtype}"
    assert k is None or (isinstance(k, int) and k >= 1), f"k must be a positive int, got {k!r}"
    n = x.shape[-1]
    if k is None:
        k = select_k(n)
        if k is None:
            raise ValueError(f"no Hadamard transform of size n={n} ({_factorisation(n)}): "
                             f"n must be K·2^m with K in {OFFICIAL_K_ORDER} or 1; "
                             "use plan_hadamard(...) with a fallback")
    if n % k != 0 or not _is_pow2(n // k):
        raise ValueError(f"n={n} ({_factorisation(n)}) is not K·2^m for K={k}")
    return _KronWHTFn.apply(x, k, None, 1.0 / math.sqrt(n), transpose)


def hadamard_matrix(n: int, k: int | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense normalised M = (H_K ⊗ H_{n/K}) / √n, built by the same code as `had_transform`.

    Args:
        n: size; k: factor (None: `select_k(n)`); dtype: output dtype (built in float64).

    Returns:
        (n, n) tensor with M·Mᵀ = I and had_transform(x, k) == x @ M.T.

    Example:
        >>> M = hadamard_matrix(12 * 4)
        >>> torch.allclose(M @ M.T, torch.eye(48, dtype=torch.float64))
        True
    """
    assert isinstance(n, int) and n >= 1, f"n must be a positive int, got {n!r}"
    eye = torch.eye(n, dtype=torch.float64)
    return had_transform(eye, k).T.contiguous().to(dtype)  # I · Mᵀ = Mᵀ


def block_hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """Block-diagonal normalised Sylvester Hadamard: WHT/√b on each block of b entries.

    Symmetric and orthogonal, so it is its own transpose and inverse; autograd-safe.

    Args:
        x: floating tensor (..., n); block: a power of two dividing n.

    Returns:
        Tensor of x's shape and dtype.

    Example:
        >>> x = torch.randn(3, 256, dtype=torch.float64)
        >>> y = block_hadamard_transform(x, 128)
        >>> torch.allclose(block_hadamard_transform(y, 128), x)
        True
    """
    assert x.dim() >= 1, "block_hadamard_transform needs at least one dim"
    assert x.is_floating_point(), f"block_hadamard_transform needs a float tensor, got {x.dtype}"
    n = x.shape[-1]
    if not isinstance(block, int) or not _is_pow2(block) or n % block != 0:
        raise ValueError(f"block must be a power of two dividing n={n} ({_factorisation(n)}), "
                         f"got {block!r}; largest valid block is {largest_pow2_block(n)}")
    y = x.reshape(*x.shape[:-1], n // block, block)  # (..., n) -> (..., n/b, b)
    y = _KronWHTFn.apply(y, 1, None, 1.0 / math.sqrt(block), False)
    return y.reshape(x.shape)  # (..., n/b, b) -> (..., n)


def largest_pow2_block(n: int) -> int:
    """Largest power of two dividing n (the `block:b` fallback).

    Example:
        >>> largest_pow2_block(13696)
        128
    """
    assert isinstance(n, int) and n >= 1, f"n must be a positive int, got {n!r}"
    return n & -n


# --- Plans: one record of which transform a job uses, including fallbacks ----------------

_MODES = ("full", "block", "orthogonal")
_FALLBACKS = ("block", "orthogonal", "reject")


@dataclass(frozen=True)
class HadamardPlan:
    n: int  # transform size (last dim)
    mode: str  # "full": M_K; "block": block-diagonal WHT; "orthogonal": Q_K ⊗ WHT
    k: int | None  # H_K order ("full") or orthogonal factor order ("orthogonal"); else None
    block: int | None  # block size for "block"; else None
    seed: int = 0  # seed of the orthogonal factor (recorded for every mode)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.mode == "block":
            ok = self.block is not None and _is_pow2(self.block) and self.n % self.block == 0
            if not ok or self.k is not None:
                raise ValueError(f"block plan needs k=None and a power-of-two block dividing "
                                 f"n={self.n}, got k={self.k}, block={self.block}")
        else:
            ok = self.k is not None and self.n % self.k == 0 and _is_pow2(self.n // self.k)
            if not ok or self.block is not None:
                raise ValueError(f"{self.mode} plan needs block=None and n={self.n} = k·2^m, "
                                 f"got k={self.k}, block={self.block}")

    def describe(self) -> str:
        """Short label for reports: 'full K=28', 'block:128', 'orthogonal K=107 seed=0'."""
        if self.mode == "block":
            return f"block:{self.block}"
        if self.mode == "orthogonal":
            return f"orthogonal K={self.k} seed={self.seed}"
        return f"full K={self.k}"


def plan_hadamard(n: int, mode: str = "full", block: int | None = None,
                  fallback: str = "orthogonal", seed: int = 0) -> HadamardPlan:
    """Decide the transform for size n, applying a fallback when no H_K exists.

    Args:
        n: transform size.
        mode: "full" (M = H_K ⊗ WHT) or "block" (block-diagonal WHT of size `block`).
        block: power of two dividing n; required for mode "block", else must be None.
        fallback: for "full" without K: "block" (largest power-of-two block, exportable),
            "orthogonal" (seeded orthogonal K×K ⊗ WHT, K = odd part of n, fake-quant only)
            or "reject" (ValueError naming the factorisation).
        seed: seed of the orthogonal factor.

    Returns:
        A frozen HadamardPlan for `apply_plan`.

    Example:
        >>> plan_hadamard(14336).describe(), plan_hadamard(13696).describe()
        ('full K=28', 'orthogonal K=107 seed=0')
    """
    assert isinstance(n, int) and n >= 1, f"n must be a positive int, got {n!r}"
    if mode == "block":
        if block is None or not _is_pow2(block) or n % block != 0:
            raise ValueError(f"mode='block' needs a power-of-two block dividing n={n} "
                             f"({_factorisation(n)}), got block={block!r}; "
                             f"largest valid block is {largest_pow2_block(n)}")
        return HadamardPlan(n, "block", None, block, seed)
    if mode != "full":
        raise ValueError(f"mode must be 'full' or 'block', got {mode!r}")
    if block is not None:
        raise ValueError(f"block={block} only applies to mode='block'")
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
    k = select_k(n)
    if k is not None:
        return HadamardPlan(n, "full", k, None, seed)
    b = largest_pow2_block(n)
    if fallback == "reject" or (fallback == "block" and b == 1):
        raise ValueError(f"no Hadamard transform of size n={n} ({_factorisation(n)}): no K in "
                         f"{OFFICIAL_K_ORDER} with n/K a power of two, and n is not a power "
                         f"of two (fallback={fallback!r})")
    if fallback == "block":
        return HadamardPlan(n, "block", None, b, seed)
    return HadamardPlan(n, "orthogonal", n // b, None, seed)


def apply_plan(x: torch.Tensor, plan: HadamardPlan, transpose: bool = False) -> torch.Tensor:
    """Apply the planned orthonormal transform over the last dim (autograd-safe).

    Args:
        x: floating tensor (..., plan.n).
        plan: from `plan_hadamard`.
        transpose: apply the transposed transform (inverse); a no-op flag for "block".

    Returns:
        Tensor of x's shape and dtype.

    Example:
        >>> plan = plan_hadamard(17 * 8, fallback="orthogonal")  # no K: Q_17 ⊗ H_8
        >>> x = torch.randn(4, 136, dtype=torch.float64)
        >>> torch.allclose(apply_plan(apply_plan(x, plan), plan, transpose=True), x)
        True
    """
    assert x.dim() >= 1 and x.is_floating_point(), (x.shape, x.dtype)
    assert x.shape[-1] == plan.n, f"last dim {x.shape[-1]} != plan.n {plan.n}"
    if plan.mode == "full":
        return had_transform(x, plan.k, transpose)
    if plan.mode == "block":
        assert plan.block is not None, plan
        return block_hadamard_transform(x, plan.block)
    assert plan.k is not None, plan  # an orthogonal plan always has its factor
    # Orthogonal factor is already normalised; only the WHT part needs 1/√(n/K).
    scale = 1.0 / math.sqrt(plan.n // plan.k)
    return _KronWHTFn.apply(x, plan.k, plan.seed, scale, transpose)


def random_hadamard_matrix(n: int, generator: torch.Generator) -> torch.Tensor:
    """Random orthonormal R = M_n · diag(s), s uniform ±1, in float64 (R1/R2 init).

    When n has no K (select_k(n) is None) this returns a random orthogonal matrix from
    the sign-fixed QR of a Gaussian instead (the official repo's `random` mode): the
    matrix is learned anyway, so any orthogonal start is valid.

    Args:
        n: size; generator: CPU torch.Generator drawing s (or the Gaussian).

    Returns:
        (n, n) float64 tensor R with R·Rᵀ = I.

    Example:
        >>> R = random_hadamard_matrix(64, torch.Generator().manual_seed(0))
        >>> torch.allclose(R @ R.T, torch.eye(64, dtype=torch.float64))
        True
    """
    assert isinstance(n, int) and n >= 1, f"n must be a positive int, got {n!r}"
    assert isinstance(generator, torch.Generator), "generator must be a torch.Generator"
    if select_k(n) is None:
        return _qr_orthogonal(n, generator)
    s = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1  # (n,) ±1
    return hadamard_matrix(n) * s  # M · diag(s): scales column j by s_j

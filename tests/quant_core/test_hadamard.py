"""Tests for quant_core.hadamard: exact H_K, K selection, fast/dense agreement, autograd,
block transform and the fallback plans."""

import math

import pytest
import torch

from quant_core.hadamard import (
    OFFICIAL_K_ORDER,
    HadamardPlan,
    apply_plan,
    block_hadamard_transform,
    fwht,
    had_transform,
    hadamard_k,
    hadamard_matrix,
    largest_pow2_block,
    orthogonal_k,
    plan_hadamard,
    random_hadamard_matrix,
    select_k,
)

F64 = torch.float64


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


def _dense_sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=F64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- H_K ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", OFFICIAL_K_ORDER + (1, 2, 4, 8))
def test_hadamard_k_is_exact_hadamard(k):
    H = hadamard_k(k)
    assert H.dtype == torch.int64 and H.shape == (k, k)
    assert bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, k * torch.eye(k, dtype=torch.int64))


def test_hadamard_k_returns_a_copy():
    H = hadamard_k(12)
    H.zero_()
    assert bool((hadamard_k(12).abs() == 1).all())


def test_hadamard_k_unknown_order_raises():
    with pytest.raises(ValueError, match="K=24"):
        hadamard_k(24)


@pytest.mark.parametrize(
    "n, k",
    [(11008, 172), (13824, 108), (14336, 28), (28672, 28), (5120, 40), (3072, 12),
     (3584, 28), (896, 28), (4864, 76), (18944, 148), (4096, 1), (13696, None)],
)
def test_select_k_table(n, k):
    assert select_k(n) == k


# --- dense vs fast -----------------------------------------------------------------------

SIZES = [12 * 16, 20 * 8, 28 * 32, 76 * 4, 64, 128, 172 * 2, 156 * 2, 36 * 4, 40 * 4, 52 * 2,
         44 * 2, 60 * 2, 108 * 2, 140 * 2, 148 * 2]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_orthonormal(n):
    M = hadamard_matrix(n)
    assert M.dtype == F64 and M.shape == (n, n)
    assert (M @ M.T - _eye(n)).abs().max() < 1e-12
    # Every entry is ±1/√n: a genuine (scaled) Hadamard matrix, not just any rotation.
    assert torch.allclose(M.abs(), torch.full_like(M, 1 / math.sqrt(n)), atol=1e-15)


@pytest.mark.parametrize("n", [12 * 4, 28 * 8, 172 * 2, 64])
def test_had_transform_matches_dense(n):
    M = hadamard_matrix(n)
    x = torch.randn(2, 3, n, dtype=F64, generator=_gen(0))
    assert (had_transform(x) - x @ M.T).abs().max() < 1e-10
    assert (had_transform(x, transpose=True) - x @ M).abs().max() < 1e-10


def test_dense_is_kron_structure():
    # M = (H_K ⊗ H_{2^m}) / √n with index k·2^m + j.
    n, k = 12 * 8, 12
    M = torch.kron(hadamard_k(k).to(F64), _dense_sylvester(8)) / math.sqrt(n)
    assert torch.allclose(hadamard_matrix(n, k), M, atol=1e-14)


def test_transpose_matters_for_paley():
    M = hadamard_matrix(12 * 4)
    assert not torch.allclose(M, M.T)


@pytest.mark.parametrize("n", [20 * 4, 156 * 2, 148 * 2, 256])
def test_had_transform_roundtrip_and_norm(n):
    x = torch.randn(5, n, dtype=F64, generator=_gen(1))
    y = had_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert (had_transform(y, transpose=True) - x).abs().max() < 1e-12


def test_had_transform_explicit_k_and_errors():
    x = torch.randn(3, 40 * 4, dtype=F64, generator=_gen(2))
    assert torch.allclose(had_transform(x, k=20), x @ hadamard_matrix(160, k=20).T, atol=1e-12)
    with pytest.raises(ValueError, match="13696 = 2\\^7·107"):
        had_transform(torch.zeros(1, 13696))
    with pytest.raises(ValueError, match="K=12"):
        had_transform(torch.zeros(1, 28 * 4), k=12)


def test_had_transform_low_precision_dtype():
    x = torch.randn(4, 28 * 16, generator=_gen(3))
    y = had_transform(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = had_transform(x.to(torch.bfloat16).float())
    assert torch.allclose(y.float(), ref, atol=2e-2, rtol=1e-2)
    assert had_transform(x.half()).dtype == torch.float16


def test_hadamard_matrix_dtype():
    assert hadamard_matrix(48, dtype=torch.float32).dtype == torch.float32


# --- fwht --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_fwht_matches_dense_sylvester(n):
    x = torch.randn(3, 4, n, dtype=F64, generator=_gen(4))
    assert torch.allclose(fwht(x), x @ _dense_sylvester(n), atol=1e-10)


def test_fwht_does_not_mutate_and_keeps_dtype():
    x = torch.randn(2, 3, 16, generator=_gen(5)).to(torch.bfloat16)
    x0 = x.clone()
    y = fwht(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert torch.equal(x, x0)
    assert torch.allclose(y.float(), x.float() @ _dense_sylvester(16).float(), atol=0.1)


def test_fwht_non_contiguous_input():
    x = torch.randn(32, 6, dtype=F64, generator=_gen(6)).T  # (6, 32), non-contiguous
    assert torch.allclose(fwht(x), x @ _dense_sylvester(32), atol=1e-12)


# --- autograd ----------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    # gradcheck makes hundreds of tiny calls; on a busy 2-core box multi-threaded BLAS can
    # stall ~10 ms per tiny matmul waking its pool. One thread keeps the file fast.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gradcheck(fn, n):
    x = torch.randn(1, n, dtype=F64, generator=_gen(7), requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck_had_transform(transpose, one_thread):
    _gradcheck(lambda x: had_transform(x, 12, transpose), 12 * 2)


def test_gradcheck_fwht_and_block(one_thread):
    _gradcheck(fwht, 16)
    _gradcheck(lambda x: block_hadamard_transform(x, 8), 32)


@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck_orthogonal_fallback(transpose, one_thread):
    plan = plan_hadamard(17 * 2, fallback="orthogonal", seed=3)
    assert plan.describe() == "orthogonal K=17 seed=3"
    _gradcheck(lambda x: apply_plan(x, plan, transpose), 17 * 2)


def test_gradient_flows_from_low_precision():
    x = torch.randn(3, 28 * 2, generator=_gen(8)).to(torch.bfloat16).requires_grad_()
    had_transform(x).float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


# --- block transform ---------------------------------------------------------------------


@pytest.mark.parametrize("n, b", [(256, 128), (13696, 128), (96, 32), (8, 8)])
def test_block_transform_orthogonal_symmetric(n, b):
    if n > 2048:  # dense check on one representative slice is enough for big n
        x = torch.randn(2, n, dtype=F64, generator=_gen(9))
        y = block_hadamard_transform(x, b)
        assert torch.allclose(block_hadamard_transform(y, b), x, atol=1e-12)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
        return
    B = block_hadamard_transform(_eye(n), b)
    assert (B @ B.T - _eye(n)).abs().max() < 1e-12
    assert torch.allclose(B, B.T, atol=0)
    expected = torch.kron(_eye(n // b), _dense_sylvester(b) / math.sqrt(b))
    assert torch.allclose(B, expected, atol=1e-14)


@pytest.mark.parametrize("b", [3, 48, 512, 0, -4])
def test_block_transform_bad_block_raises(b):
    with pytest.raises(ValueError, match="power of two dividing n=256"):
        block_hadamard_transform(torch.zeros(2, 256), b)


def test_largest_pow2_block():
    assert [largest_pow2_block(n) for n in (13696, 896, 4096, 7, 14)] == [128, 128, 4096, 1, 2]


# --- plans -------------------------------------------------------------------------------


def _plan_matrix(plan: HadamardPlan, transpose: bool = False) -> torch.Tensor:
    return apply_plan(_eye(plan.n), plan, transpose).T  # rows of I·Pᵀ -> P


def test_plan_full_matches_had_transform():
    plan = plan_hadamard(28 * 8)
    assert (plan.mode, plan.k, plan.describe()) == ("full", 28, "full K=28")
    x = torch.randn(2, 224, dtype=F64, generator=_gen(10))
    assert torch.equal(apply_plan(x, plan), had_transform(x, 28))
    assert plan_hadamard(4096).describe() == "full K=1"


def test_plan_block_mode():
    plan = plan_hadamard(11008, mode="block", block=128)
    assert plan.describe() == "block:128"
    x = torch.randn(2, 11008, dtype=F64, generator=_gen(11))
    assert torch.equal(apply_plan(x, plan), block_hadamard_transform(x, 128))
    for bad in (None, 96, 256 * 1024):
        with pytest.raises(ValueError, match="power-of-two block dividing n=11008"):
            plan_hadamard(11008, mode="block", block=bad)


def test_plan_fallback_block_picks_largest_pow2():
    plan = plan_hadamard(13696, fallback="block")
    assert (plan.mode, plan.block, plan.describe()) == ("block", 128, "block:128")


def test_plan_fallback_orthogonal_is_orthonormal_and_seeded():
    plan = plan_hadamard(13696)
    assert plan.describe() == "orthogonal K=107 seed=0"
    small = plan_hadamard(17 * 8, seed=5)
    P = _plan_matrix(small)
    assert (P @ P.T - _eye(small.n)).abs().max() < 1e-12
    assert torch.allclose(_plan_matrix(small, transpose=True), P.T, atol=1e-14)
    assert torch.equal(P, _plan_matrix(plan_hadamard(17 * 8, seed=5)))
    assert not torch.allclose(P, _plan_matrix(plan_hadamard(17 * 8, seed=6)))
    Q = orthogonal_k(17, seed=5)
    expected = torch.kron(Q, _dense_sylvester(8) / math.sqrt(8))
    assert torch.allclose(P, expected, atol=1e-13)


def test_plan_fallback_reject_names_factorisation():
    with pytest.raises(ValueError, match="13696 = 2\\^7·107"):
        plan_hadamard(13696, fallback="reject")


def test_plan_validation():
    with pytest.raises(ValueError, match="fallback"):
        plan_hadamard(13696, fallback="nope")
    with pytest.raises(ValueError, match="mode"):
        plan_hadamard(4096, mode="diag")
    # Odd n: the orthogonal factor is all of n; a block fallback would be the identity.
    assert plan_hadamard(7).describe() == "orthogonal K=7 seed=0"
    with pytest.raises(ValueError, match="n=7"):
        plan_hadamard(7, fallback="block")
    with pytest.raises(ValueError):
        HadamardPlan(n=100, mode="full", k=12, block=None)


# --- random Hadamard ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [64, 28 * 4, 172])
def test_random_hadamard_matrix(n):
    R = random_hadamard_matrix(n, _gen(0))
    assert R.dtype == F64 and (R @ R.T - _eye(n)).abs().max() < 1e-12
    assert torch.allclose(R.abs(), torch.full_like(R, 1 / math.sqrt(n)), atol=1e-15)
    assert torch.equal(R, random_hadamard_matrix(n, _gen(0)))
    assert not torch.equal(R, random_hadamard_matrix(n, _gen(1)))
    # R = M·diag(s): dividing columns by M's columns leaves a constant ±1 per column.
    s = (R / hadamard_matrix(n)).round()
    assert torch.equal(s, s[0].expand_as(s)) and bool((s.abs() == 1).all())


def test_random_hadamard_matrix_qr_fallback():
    n = 4 * 17  # no K: random orthogonal from QR
    R = random_hadamard_matrix(n, _gen(0))
    assert (R @ R.T - _eye(n)).abs().max() < 1e-12
    assert torch.equal(R, random_hadamard_matrix(n, _gen(0)))
    assert not torch.equal(R, random_hadamard_matrix(n, _gen(1)))
    assert not torch.allclose(R.abs(), torch.full_like(R, 1 / math.sqrt(n)))


# --- CUDA --------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("n", [172 * 64, 28 * 512, 4096])
def test_cuda_matches_cpu(n):
    x = torch.randn(8, n, generator=_gen(12))
    y = had_transform(x.cuda()).cpu()
    assert torch.allclose(y, had_transform(x), atol=1e-4)
    assert torch.allclose(had_transform(x.cuda(), transpose=True).cpu(),
                          had_transform(x, transpose=True), atol=1e-4)

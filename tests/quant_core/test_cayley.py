"""Cayley SGD keeps R orthogonal, descends, and matches its first-order form."""

from __future__ import annotations

import itertools

import pytest
import torch

from quant_core.cayley import cayley_step, cosine_lr, orthogonality_error, reorthonormalize, skew_direction


def _orth(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]


@pytest.mark.parametrize("n", [16, 96, 128])
def test_orthogonal_after_200_steps(n: int) -> None:
    r = _orth(n)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        grad = torch.randn(n, n, dtype=torch.float64, generator=g)
        grad = grad / grad.norm()  # clipped to norm 1 as in training
        r = cayley_step(r, grad, lr=1.5)
    assert float(orthogonality_error(r)) <= 1e-10


def test_descent_on_a_quadratic() -> None:
    """Minimise ||R - T||^2 over orthogonal R: the loss must fall monotonically for a small step."""
    n = 24
    target = _orth(n, seed=5)
    r = _orth(n, seed=6)
    losses = []
    for _ in range(60):
        grad = 2 * (r - target)
        losses.append(float((r - target).pow(2).sum()))
        r = cayley_step(r, grad, lr=0.1)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.05 * losses[0]


def test_first_order_matches_riemannian_gradient() -> None:
    n, lr = 12, 1e-5
    r = _orth(n)
    grad = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    step = cayley_step(r, grad, lr)
    first_order = r - 0.5 * lr * (grad - r @ grad.T @ r)
    assert (step - first_order).abs().max() < 1e-9
    a = skew_direction(r, grad)
    assert torch.allclose(a, -a.T)
    assert float((grad * (a @ r)).sum()) >= 0  # -A R is a descent direction


def test_step_cap_limits_the_move() -> None:
    n = 16
    r = _orth(n)
    grad = 100 * torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    capped = cayley_step(r, grad, lr=10.0, step_cap=True)
    free = cayley_step(r, grad, lr=10.0)
    assert (capped - r).norm() < (free - r).norm()
    assert float(orthogonality_error(capped)) < 1e-12


def test_float32_input_keeps_dtype_and_reorthonormalize() -> None:
    r = _orth(8).float()
    out = cayley_step(r, torch.randn(8, 8), 0.5)
    assert out.dtype == torch.float32
    noisy = _orth(8) + 1e-4 * torch.randn(8, 8, dtype=torch.float64)
    assert float(orthogonality_error(reorthonormalize(noisy))) < 1e-13


def test_cosine_schedule_matches_the_official_logs() -> None:
    assert cosine_lr(1.5, 0, 100) == pytest.approx(1.5)
    assert cosine_lr(1.5, 50, 100) == pytest.approx(0.75)  # SQ#21 logs show 0.75 at step 50
    assert cosine_lr(1.5, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(AssertionError):
        cayley_step(torch.eye(3), torch.eye(4), 0.1)

"""Chunked and fused vocabulary losses equal the plain full-logits formulas, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quant_core.sizes as sizes
from quant_core.losses import chunk_rows, head_loss, nll_sum

V, D, N = 300, 24, 50


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 7 rows per chunk (2100 // 300): 50 rows cross 7 chunk boundaries, the last one short.
    monkeypatch.setattr(sizes, "LOGIT_CHUNK_ELEMS", 7 * V + 5)


def _data(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    h = torch.randn(N, D, generator=g).to(dtype)
    t = torch.randn(N, D, generator=g).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    return w, h, t, y


def test_chunk_rows_follows_the_element_budget() -> None:
    assert chunk_rows(V) == 7
    assert chunk_rows(10**9) == 1


def test_nll_sum_equals_full_logits_cross_entropy() -> None:
    w, h, _, y = _data()
    total, count = nll_sum(h, w, y)
    ref = F.cross_entropy((h @ w.T).double(), y, reduction="sum")
    assert count == N
    assert abs(total - float(ref)) <= 1e-5 * abs(float(ref))


def test_fused_cross_entropy_value_and_gradient() -> None:
    w, h, _, y = _data()
    h1 = h.clone().requires_grad_(True)
    loss = head_loss(h1, w, targets=y)
    loss.backward()
    h2 = h.clone().requires_grad_(True)
    ref = F.cross_entropy(h2 @ w.T, y)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-6
    assert torch.allclose(h1.grad, h2.grad, atol=1e-7, rtol=1e-5)


def test_fused_kl_value_and_gradient() -> None:
    w, h, t, _ = _data()
    h1 = h.clone().requires_grad_(True)
    loss = head_loss(h1, w, teacher=t)
    (3.0 * loss).backward()  # the upstream gradient scales the stored one
    h2 = h.clone().requires_grad_(True)
    logp, logq = (h2 @ w.T).log_softmax(-1), (t @ w.T).log_softmax(-1)
    ref = (logq.exp() * (logq - logp)).sum(-1).mean()  # KL(teacher || student) per row, averaged
    (3.0 * ref).backward()
    assert abs(loss.item() - ref.item()) <= 1e-6
    assert torch.allclose(h1.grad, h2.grad, atol=1e-7, rtol=1e-5)
    assert float(head_loss(t.clone(), w, teacher=t)) == pytest.approx(0.0, abs=1e-6)  # the teacher itself


def test_bfloat16_gradient_stays_close_to_float32() -> None:
    w, h, t, _ = _data()
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        x = h.to(dtype).detach().clone().requires_grad_(True)
        head_loss(x, w.to(dtype), teacher=t.to(dtype)).backward()
        assert x.grad.dtype == dtype
        grads.append(x.grad.float())
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 0.05


def test_bad_calls_are_refused() -> None:
    w, h, t, y = _data()
    with pytest.raises(ValueError, match="exactly one of targets"):
        head_loss(h, w)
    with pytest.raises(ValueError, match="exactly one of targets"):
        head_loss(h, w, targets=y, teacher=t)
    with pytest.raises(AssertionError, match="frozen"):
        head_loss(h, w.clone().requires_grad_(True), targets=y)

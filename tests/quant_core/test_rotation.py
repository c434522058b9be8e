"""Fold + R1/R2 merge + online R3/R4 leave the function unchanged (quantizers off), for every family."""

from __future__ import annotations

import pytest
import torch

from quant_core.config import make_config
from quant_core.hadamard import plan_hadamard, random_hadamard_matrix
from quant_core.learn import learning_hidden
from quant_core.models import QuantRuntime, load_model, resolve_model
from quant_core.rotation import center_embeddings, fold_norms, fuse_r4, merge_rotations
from tests.fixtures.tiny_random import CASES


def _rotations(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    r1 = random_hadamard_matrix(arch.hidden, g)
    return r1, [random_hadamard_matrix(arch.head_dim, g) for _ in range(arch.n_layers)]


def _ids(seq=40):
    return torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("r4_mode", ["full", "block"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_rotations_preserve_logits(case: str, r4_mode: str, tiny_dir) -> None:
    model = load_model(resolve_model(str(tiny_dir(case))))
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    arch = model.arch
    r4 = plan_hadamard(arch.intermediate, mode="full") if r4_mode == "full" else \
        plan_hadamard(arch.intermediate, mode="block", block=8)
    fold_norms(model)
    fuse_r4(model, r4)
    model.quant = QuantRuntime(r3=plan_hadamard(arch.head_dim), r4=r4)
    r1, r2s = _rotations(arch)
    merge_rotations(model, r1, r2s)
    with torch.no_grad():
        out = model(ids)
    assert (out - ref).abs().max().item() <= 1e-4
    # The norms really were folded and the weights really rotated (not a no-op).
    assert torch.all(model.model.layers[0].input_layernorm.weight == 1)
    original = load_model(resolve_model(str(tiny_dir(case)))).model.embed_tokens.weight
    assert not torch.allclose(model.model.embed_tokens.weight, original)


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2-bias", "qwen2-odd", "llama-odd"])
def test_learning_form_equals_merged_form(case: str, tiny_dir) -> None:
    """On-the-fly W*R1 / R1^T*W with the embedding output rotated equals the merged model."""
    cfg = make_config("spinquant", w_bits=4, a_bits=16, kv_bits=16)
    model = load_model(resolve_model(str(tiny_dir(case))))
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    fold_norms(model)
    r1, r2s = _rotations(model.arch, seed=3)
    with torch.no_grad():
        # the learning forward itself: every weight rotated on the fly, R1 on the embedding output and R1^T
        # before the unrotated lm_head
        learn_form = model.lm_head(learning_hidden(model, ids, r1, r2s, 16, cfg, checkpoint_layers=False))
    assert (learn_form - ref).abs().max().item() <= 1e-4
    merge_rotations(model, r1, r2s)
    with torch.no_grad():
        assert (model(ids) - learn_form).abs().max().item() <= 1e-4


def test_gradients_reach_r1_and_r2(tiny_dir) -> None:
    cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4)
    model = load_model(resolve_model(str(tiny_dir("llama-gqa"))))
    fold_norms(model)
    model.quant = QuantRuntime(a_bits=4, kv_bits=4, r3=plan_hadamard(model.arch.head_dim))
    r1, r2s = _rotations(model.arch)
    r1.requires_grad_(True)
    for r in r2s:
        r.requires_grad_(True)
    ids = _ids()
    out = model.lm_head(learning_hidden(model, ids, r1, r2s, 4, cfg, checkpoint_layers=True))
    out.float().logsumexp(-1).mean().backward()
    assert r1.grad is not None and r1.grad.abs().sum() > 0
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in r2s)


def test_centering_removes_each_embedding_rows_mean_and_is_not_invariant_under_rmsnorm(tiny_dir) -> None:
    """E <- E - rowmean(E) (QuaRot's step, SQ#14; off by default since RMSNorm, unlike LayerNorm, does not remove
    the mean): every row ends with mean 0, a second centering changes nothing, and the first changes the logits."""
    model = load_model(resolve_model(str(tiny_dir("llama-gqa"))))
    emb = model.model.embed_tokens.weight
    assert emb.mean(dim=1).abs().max() > 1e-3  # the random init has row means to remove
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).log_softmax(-1)
        center_embeddings(model)
        once = model(ids).log_softmax(-1)
        assert emb.double().mean(dim=1).abs().max() < 1e-6
        center_embeddings(model)
        twice = model(ids).log_softmax(-1)
    assert (twice - once).abs().max() < 1e-5  # idempotent: a centred table is left as it is
    assert (once - ref).abs().max() > 1e-3  # RMSNorm sees the removed mean: not an invariant transform

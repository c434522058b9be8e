"""Rotation learning: the checkpointed forward is the same function with the same gradients."""

from __future__ import annotations

import torch

from quant_core.config import make_config
from quant_core.hadamard import plan_hadamard, random_hadamard_matrix
from quant_core.learn import batch_loss, learning_hidden
from quant_core.models import QuantRuntime, load_model, resolve_model
from quant_core.rotation import fold_norms, merge_rotations


def _setup(tiny_dir, case="qwen2-bias"):
    model = load_model(resolve_model(str(tiny_dir(case))))
    fold_norms(model)
    g = torch.Generator().manual_seed(0)
    r1 = random_hadamard_matrix(model.arch.hidden, g)
    r2s = [random_hadamard_matrix(model.arch.head_dim, g) for _ in range(model.arch.n_layers)]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    return model, r1, r2s, ids


def test_checkpointed_forward_has_identical_loss_and_gradients(tiny_dir) -> None:
    cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4, settings={"train.train_w_bits": 4})
    grads = []
    for ckpt in (False, True):
        model, r1, r2s, ids = _setup(tiny_dir)
        model.quant = QuantRuntime(a_bits=4, kv_bits=4, r3=plan_hadamard(model.arch.head_dim))
        r1.requires_grad_(True)
        for r in r2s:
            r.requires_grad_(True)
        loss = batch_loss(model, learning_hidden(model, ids, r1, r2s, 4, cfg, ckpt), ids, None)
        loss.backward()
        grads.append((float(loss.detach()), r1.grad.clone(), [r.grad.clone() for r in r2s]))
    (l0, g0, h0), (l1, g1, h1) = grads
    assert l0 == l1
    assert torch.allclose(g0, g1, atol=1e-10) and all(torch.allclose(a, b, atol=1e-10) for a, b in zip(h0, h1, strict=True))
    assert g0.abs().sum() > 0


def test_learning_forward_equals_merged_model_without_quantizers(tiny_dir) -> None:
    cfg = make_config("spinquant", w_bits=4)
    model, r1, r2s, ids = _setup(tiny_dir, "llama-odd")
    with torch.no_grad():
        learned = model.lm_head(learning_hidden(model, ids, r1, r2s, 16, cfg, True))
        merge_rotations(model, r1, r2s)
        merged = model(ids)
    assert (learned - merged).abs().max().item() <= 1e-4

"""R1 pre-fit: the samples it fits, the Riemannian Adam step, and that it lowers the activations' own error."""

from __future__ import annotations

import torch

from quant_core.cayley import AdamState, cayley_adam_step, orthogonality_error
from quant_core.config import make_config
from quant_core.hadamard import random_hadamard_matrix
from quant_core.models import QuantRuntime, load_model, resolve_model
from quant_core.prefit import collect_residual_inputs, prefit_r1, quant_error
from quant_core.sizes import PREFIT_TOKENS
from quant_core.rotation import fold_norms
from tests.conftest import MODELS


def test_cayley_adam_finds_a_target_rotation_and_stays_orthogonal() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    r = torch.eye(16, dtype=torch.float64)
    state = AdamState.like(r)
    start = float((r - target).norm())
    for _ in range(300):
        r = cayley_adam_step(r, 2 * (r - target), state, lr=0.02)  # gradient of ||R - T||^2
    assert float(orthogonality_error(r)) < 1e-12
    if torch.det(target) > 0:  # reachable from I on the rotation group
        assert float((r - target).norm()) < 0.1 * start
    else:
        assert float((r - target).norm()) < start


def test_collected_inputs_are_unit_rows_from_every_layer_and_site() -> None:
    model = load_model(resolve_model(str(MODELS / "llama-tiny")))
    fold_norms(model)
    blocks = torch.randint(4, 1024, (3, 40), generator=torch.Generator().manual_seed(0))  # 120 tokens
    x = collect_residual_inputs(model, blocks, None, micro=2, seed=0)
    per_site = min(PREFIT_TOKENS, blocks.numel())
    assert x.shape == (model.arch.n_layers * 2 * per_site, model.arch.hidden) and x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5)
    again = collect_residual_inputs(model, blocks, None, micro=3, seed=0)  # micro-batching changes nothing
    assert torch.allclose(x, again, atol=1e-6)


def test_prefit_lowers_the_quantization_error_of_the_real_inputs() -> None:
    model = load_model(resolve_model(str(MODELS / "llama-massive")))
    fold_norms(model)
    cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4, seq_len=64, settings={"train.prefit_steps": 60,
                                                                                      "train.prefit_blocks": 4})
    blocks = torch.randint(4, 1024, (4, 64), generator=torch.Generator().manual_seed(1))
    r1 = random_hadamard_matrix(model.arch.hidden, torch.Generator().manual_seed(0))
    fitted, info = prefit_r1(model, cfg, blocks, r1, QuantRuntime())
    assert float(orthogonality_error(fitted)) < 1e-10
    assert info["prefit_error_end"] < 0.7 * info["prefit_error_start"], info
    x = collect_residual_inputs(model, blocks, QuantRuntime(), 4, 0)
    assert float(quant_error(x, fitted, cfg)) < float(quant_error(x, r1, cfg))  # on every sample, not only the probe

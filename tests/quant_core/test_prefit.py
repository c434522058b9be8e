"""Pre-fit: the samples it fits, the Riemannian Adam step, and that it lowers the activations' own error."""

from __future__ import annotations

import torch

from quant_core.cayley import AdamState, cayley_adam_step, orthogonality_error
from quant_core.config import make_config
from quant_core.hadamard import random_hadamard_matrix
from quant_core.models import QuantRuntime, load_model, resolve_model
from quant_core.pipeline import build_runtime, validate_environment
from quant_core.prefit import collect_samples, head_quant_error, prefit_rotations, quant_error
from quant_core.rotation import fold_norms
from quant_core.sizes import PREFIT_TOKENS
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
    smp = collect_samples(model, blocks, None, micro=2, seed=0)
    a = model.arch
    per_site = min(PREFIT_TOKENS, blocks.numel())
    assert smp.x.shape == (a.n_layers * 2 * per_site, a.hidden) and smp.x.dtype == torch.float32
    assert smp.v.shape == (a.n_layers, per_site * a.n_kv, a.head_dim)
    assert smp.o.shape == (a.n_layers, per_site, a.n_heads * a.head_dim)
    for t in (smp.x, smp.v, smp.o):
        assert torch.allclose(t.norm(dim=-1), torch.ones(t.shape[:-1]), atol=1e-5)
    again = collect_samples(model, blocks, None, micro=3, seed=0)  # micro-batching changes nothing
    for t, u in ((smp.x, again.x), (smp.v, again.v), (smp.o, again.o), (smp.sink, again.sink)):
        assert torch.allclose(t, u, atol=1e-6)


@torch.no_grad()
def test_sink_rows_are_every_blocks_first_position_at_both_sites() -> None:
    model = load_model(resolve_model(str(MODELS / "llama-tiny")))
    fold_norms(model)
    blocks = torch.randint(4, 1024, (3, 40), generator=torch.Generator().manual_seed(0))
    smp = collect_samples(model, blocks, None, micro=2, seed=0)
    a, n = model.arch, blocks.shape[0]
    assert smp.sink.shape == (a.n_layers * 2 * n, a.hidden)
    # The reference: the plain forward's layer inputs at position 0, normalised as each site sees them.
    h = model.embed(blocks)
    cos, sin = model.rope(blocks.shape[1], h.device, h.dtype)
    for li, layer in enumerate(model.model.layers):
        x1 = layer.input_layernorm(h)
        mid = h + layer.self_attn(x1, cos, sin, None)
        x2 = layer.post_attention_layernorm(mid)
        for j, site in enumerate((x1, x2)):
            want = site[:, 0] / site[:, 0].norm(dim=-1, keepdim=True)
            got = smp.sink[(2 * li + j) * n : (2 * li + j + 1) * n]
            assert torch.allclose(got, want, atol=1e-5), (li, j)
        h = mid + layer.mlp(x2, None)


def test_the_sink_share_lowers_the_sink_rows_error_further() -> None:
    model = load_model(resolve_model(str(MODELS / "llama-massive")))
    fold_norms(model)
    blocks = torch.randint(4, 1024, (4, 64), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    r1 = random_hadamard_matrix(model.arch.hidden, gen)
    r2s = [random_hadamard_matrix(model.arch.head_dim, gen) for _ in range(model.arch.n_layers)]
    ends = {}
    for share in (0.0, 0.5):
        cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4, seq_len=64, settings={
            "train.prefit_steps": 60, "train.prefit_blocks": 4, "train.prefit_sink_share": share})
        qrt = build_runtime(cfg, model.arch, validate_environment(cfg, model.arch), a_bits=4, kv_bits=4, learning=True)
        _, _, info = prefit_rotations(model, cfg, blocks, r1, r2s, QuantRuntime(), qrt)
        ends[share] = info
    assert ends[0.5]["prefit_sink_error_start"] == ends[0.0]["prefit_sink_error_start"]
    assert ends[0.5]["prefit_sink_error_end"] < 0.9 * ends[0.0]["prefit_sink_error_end"], ends


def test_prefit_lowers_the_quantization_error_of_the_real_inputs() -> None:
    model = load_model(resolve_model(str(MODELS / "llama-massive")))
    fold_norms(model)
    cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4, seq_len=64, settings={"train.prefit_steps": 60,
                                                                                      "train.prefit_blocks": 4})
    blocks = torch.randint(4, 1024, (4, 64), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    r1 = random_hadamard_matrix(model.arch.hidden, gen)
    r2s = [random_hadamard_matrix(model.arch.head_dim, gen) for _ in range(model.arch.n_layers)]
    qrt = build_runtime(cfg, model.arch, validate_environment(cfg, model.arch), a_bits=4, kv_bits=4, learning=True)
    fitted, fitted2, info = prefit_rotations(model, cfg, blocks, r1, r2s, QuantRuntime(), qrt)
    assert float(orthogonality_error(fitted)) < 1e-10 and max(float(orthogonality_error(m)) for m in fitted2) < 1e-10
    assert info["prefit_error_end"] < 0.7 * info["prefit_error_start"], info
    assert info["prefit_head_error_end"] < info["prefit_head_error_start"], info
    smp = collect_samples(model, blocks, QuantRuntime(), 4, 0)
    assert float(quant_error(smp.x, fitted, qrt)) < float(quant_error(smp.x, r1, qrt))  # every sample, not the probe
    assert float(head_quant_error(smp.v, smp.o, torch.stack(fitted2), qrt)) < float(
        head_quant_error(smp.v, smp.o, torch.stack(r2s), qrt))

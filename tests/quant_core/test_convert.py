"""GPTQ over a whole model: the staged calibration (one pass per sub-group, ~1.5 layer forwards per layer)
gives exactly the integers of the plain true-sequential order, which runs the whole layer once per group and
once more for its output (5 layer forwards), written out here as the reference."""

from __future__ import annotations

import pytest
import torch

from quant_core.config import make_config
from quant_core.convert import SEQUENTIAL_GROUPS, _quantize_one, quantize_weights
from quant_core.gptq import GPTQResult, HessianAccumulator
from quant_core.hadamard import plan_hadamard
from quant_core.models import DecoderLM, QuantRuntime, decoder_linears, layer_prefix, load_model, resolve_model
from quant_core.progress import never_cancel, no_progress
from quant_core.rotation import fold_norms, fuse_r4
from tests.conftest import MODELS


@torch.no_grad()
def reference_gptq(model: DecoderLM, cfg, calib: torch.Tensor, rt: QuantRuntime, micro: int = 8) -> dict[str, GPTQResult]:
    """SPINQUANT.md §8 as the GPTQ repo does it: for each group, hook its linears and run the whole layer over
    every window; quantize; after the last group run the layer once more for the next layer's input."""
    results: dict[str, GPTQResult] = {}
    h = torch.cat([model.embed(calib[s : s + micro]) for s in range(0, calib.shape[0], micro)])
    cos, sin = model.rope(h.shape[1], h.device, h.dtype)

    def layer_forward(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(h[s : s + micro], cos, sin, rt) for s in range(0, h.shape[0], micro)])

    forwards = 0
    for i, layer in enumerate(model.model.layers):
        linears = decoder_linears(model, i)
        for group in SEQUENTIAL_GROUPS:
            accs = {n: HessianAccumulator(linears[n].in_features) for n in group}
            hooks = [linears[n].register_forward_hook(lambda _m, inp, _o, a=accs[n]: a.add_batch(inp[0].float()))
                     for n in group]
            layer_forward(layer, h)
            forwards += 1
            for hk in hooks:
                hk.remove()
            for n in group:
                results[layer_prefix(n, i)] = _quantize_one(linears[n], cfg, accs[n].hessian)
        h = layer_forward(layer, h)
        forwards += 1
    assert forwards == 5 * len(model.model.layers)
    return results


@pytest.mark.parametrize(("case", "group_size", "r4"), [("llama-tiny", -1, True), ("qwen2-tiny", 32, False)])
def test_staged_gptq_gives_the_integers_of_the_true_sequential_order(case: str, group_size: int, r4: bool) -> None:
    cfg = make_config("quarot", w_bits=4, a_bits=4, w_group_size=group_size)
    calib = torch.randint(4, 1024, (10, 64), generator=torch.Generator().manual_seed(0))  # 10 % 8: a short last batch
    runs = []
    for _ in range(2):
        model = load_model(resolve_model(str(MODELS / case)))
        fold_norms(model)
        plan = plan_hadamard(model.arch.intermediate) if r4 else None
        if plan is not None:
            fuse_r4(model, plan)
        runs.append((model, QuantRuntime(r4=plan)))
    (staged_model, rt), (ref_model, rt_ref) = runs
    staged = quantize_weights(staged_model, cfg, calib, rt, no_progress, never_cancel)
    reference = reference_gptq(ref_model, cfg, calib, rt_ref)
    assert staged.keys() == reference.keys() and len(staged) == 7 * staged_model.arch.n_layers
    for key, ref in reference.items():
        got = staged[key]
        assert torch.equal(got.q, ref.q), key
        assert torch.equal(got.scale, ref.scale), key
        assert got.loss == ref.loss, key
    for a, b in zip(staged_model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the dequantized weights written into the model agree too

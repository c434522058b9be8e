"""Layer-wise offload: the same numbers as the whole-model path, and the placement decision from the plan.

On this CPU-only machine the compute device and host memory are one device, so these tests check that the
offload path computes exactly what the whole-model path computes (same batches, same operations) and
that nothing is left behind; the GPU memory figure needs a CUDA machine (the cuda-marked test).
"""

from __future__ import annotations

import json

import pytest
import torch

from quant_core.config import ConfigError, make_config
from quant_core.evaluate import perplexity
from quant_core.models import QuantRuntime, load_model, resolve_model
from quant_core.pipeline import quantize_model
from quant_core.placement import Placement, offloaded_hidden, pick_device, visiting
from quant_core.plan import decide
from tests.conftest import MODELS, TEST_TEXT, TRAIN_TEXT

GiB = 1 << 30
CONFIGS = MODELS.parent / "configs"
SMALL = dict(seq_len=128, calib_samples=8, eval_windows=6, prefit_steps=10, calib_source=f"file:{TRAIN_TEXT}",
             eval_source=f"file:{TEST_TEXT}", device="cpu")


def _llama_config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def test_offloaded_hidden_states_equal_the_whole_forward() -> None:
    model = load_model(resolve_model(str(MODELS / "llama-tiny")))
    model.quant = QuantRuntime(a_bits=4, kv_bits=4)
    ids = torch.randint(0, 1024, (3, 64), generator=torch.Generator().manual_seed(0))
    batches = [ids[:2], ids[2:]]
    with torch.no_grad():
        whole = [model.hidden(b) for b in batches]
    seen: list[int] = []
    streamed = list(offloaded_hidden(model, batches, Placement("cpu", offload=True),
                                     progress=lambda stage, f, info: seen.append(info["layer"])))
    assert all(torch.equal(a, b) for a, b in zip(whole, streamed, strict=True))
    assert seen == [1, 2, 3, 4]  # one progress call per layer


def test_offloaded_perplexity_equals_the_whole_model_path() -> None:
    model = load_model(resolve_model(str(MODELS / "llama-tiny")))
    model.quant = QuantRuntime(a_bits=4, kv_bits=4)
    windows = torch.randint(4, 1024, (5, 96), generator=torch.Generator().manual_seed(1))
    whole = perplexity(model, windows, batch_tokens=192)
    streamed = perplexity(model, windows, batch_tokens=192, placement=Placement("cpu", offload=True))
    assert streamed == whole


def test_visiting_returns_the_module_home_after_an_exception() -> None:
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"), visiting(lin, Placement("cpu", offload=True)):
        raise RuntimeError("boom")
    assert lin.weight.device.type == "cpu"


@pytest.mark.parametrize("method", ["quarot", "gptq"])
def test_pipeline_with_layer_offload_reports_the_same_numbers(method: str) -> None:
    """placement=layers runs load, FP evaluation, GPTQ and evaluation through the offload path."""
    whole = quantize_model(str(MODELS / "llama-tiny"), make_config(method, w_bits=4, a_bits=4, kv_bits=4, **SMALL))
    layers = quantize_model(str(MODELS / "llama-tiny"),
                            make_config(method, w_bits=4, a_bits=4, kv_bits=4, placement="layers", **SMALL))
    assert layers.report["model"]["placement"] == "layer-wise offload"
    assert whole.report["model"]["placement"] == "whole model on the device"
    assert layers.report["fp_ppl"] == whole.report["fp_ppl"]
    assert layers.report["quant_ppl"] == whole.report["quant_ppl"]
    for key, res in whole.qweights.items():
        assert res.weight is None  # only the integer form is kept once the model holds the weight
        assert torch.equal(res.q, layers.qweights[key].q) and torch.equal(res.scale, layers.qweights[key].scale)


def test_learning_with_layer_offload_equals_the_whole_model_path() -> None:
    """Offloaded learning (layers visit the device in the forward and again in the checkpoint recompute)
    gives the same loss curve and the same learned rotations as the whole-model path."""
    kw = dict(w_bits=16, a_bits=4, kv_bits=4, steps=3, train_samples=8, batch_size=4, micro_batch=2, **SMALL)
    whole = quantize_model(str(MODELS / "llama-tiny"), make_config("spinquant", **kw))
    layers = quantize_model(str(MODELS / "llama-tiny"), make_config("spinquant", placement="layers", **kw))
    assert layers.report["model"]["placement"] == "layer-wise offload"
    assert layers.report["loss_curve"] == whole.report["loss_curve"]
    assert torch.equal(layers.r1, whole.r1) and all(torch.equal(a, b) for a, b in zip(layers.r2s, whole.r2s, strict=True))
    assert layers.report["quant_ppl"] == whole.report["quant_ppl"]


def test_offload_without_checkpointing_or_with_zero_shot_is_refused_at_config_time() -> None:
    with pytest.raises(ConfigError, match=r"train.checkpoint_layers=true"):
        make_config("spinquant", w_bits=4, a_bits=4, placement="layers", settings={"train.checkpoint_layers": False})
    with pytest.raises(ConfigError, match="placement='layers' cannot run zero-shot tasks"):
        make_config("quarot", w_bits=4, placement="layers", zero_shot_tasks=["piqa"])


def test_placement_decision_for_llama_3_on_one_80gb_gpu() -> None:
    """8B: everything on the GPU. 70B: quarot/gptq run with layer-wise offload; learning is refused (FSDP)."""
    w4a4 = dict(w_bits=4, a_bits=4, kv_bits=4)
    d8 = decide(_llama_config("llama-3-8b"), make_config("spinquant", **w4a4), 80 * GiB)
    assert not d8.offload and d8.refusal is None
    d70 = decide(_llama_config("llama-3-70b"), make_config("quarot", **w4a4), 80 * GiB)
    assert d70.offload and d70.refusal is None
    d70g = decide(_llama_config("llama-3-70b"), make_config("gptq", w_bits=4), 80 * GiB)
    assert d70g.offload and d70g.refusal is None
    learn = decide(_llama_config("llama-3-70b"), make_config("spinquant", **w4a4), 80 * GiB)
    assert learn.offload and learn.refusal is None  # learning streams the layers too
    small = decide(_llama_config("llama-3-70b"), make_config("spinquant", **w4a4), 12 * GiB)
    assert small.refusal and "FSDP" in small.refusal and "not implemented" in small.refusal
    nockpt = decide(_llama_config("llama-3-70b"),
                    make_config("spinquant", settings={"train.checkpoint_layers": False}, **w4a4), 80 * GiB)
    assert nockpt.refusal and "checkpoint_layers" in nockpt.refusal
    whole = decide(_llama_config("llama-3-70b"), make_config("quarot", placement="whole", **w4a4), 80 * GiB)
    assert whole.refusal and "placement=whole" in whole.refusal
    tiny = decide(_llama_config("llama-3-70b"), make_config("quarot", **w4a4), 2 * GiB)
    assert tiny.refusal and "does not fit" in tiny.refusal


def test_placement_decision_when_only_evaluation_needs_offload() -> None:
    """8B on a 26 GiB GPU: learning (22.5 GiB) would fit whole but evaluation (28 GiB) needs offload, so the
    whole job runs with offload, learning included."""
    w4a4 = dict(w_bits=4, a_bits=4, kv_bits=4)
    assert decide(_llama_config("llama-3-8b"), make_config("quarot", **w4a4), 26 * GiB).offload
    learn = decide(_llama_config("llama-3-8b"), make_config("spinquant", **w4a4), 26 * GiB)
    assert learn.offload and learn.refusal is None


def test_bad_placement_is_refused() -> None:
    with pytest.raises(ConfigError, match="placement='disk' is not valid; accepted: auto, whole, layers"):
        make_config("quarot", placement="disk")


@pytest.mark.cuda
def test_cuda_offload_has_one_layer_on_the_gpu_at_a_time() -> None:
    model = load_model(resolve_model(str(MODELS / "llama-tiny")))
    windows = torch.randint(4, 1024, (4, 128), generator=torch.Generator().manual_seed(2))
    ref = perplexity(model, windows)
    on_gpu: list[int] = []
    hooks = [layer.register_forward_pre_hook(
        lambda _m, _a: on_gpu.append(sum(p.is_cuda for lyr in model.model.layers for p in lyr.parameters())))
        for layer in model.model.layers]
    got = perplexity(model, windows, placement=Placement("cuda", offload=True))
    for h in hooks:
        h.remove()
    per_layer = len(list(model.model.layers[0].parameters()))
    assert on_gpu and max(on_gpu) == per_layer  # the visiting layer's tensors, no other layer's
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert abs(got - ref) / ref < 1e-4


def test_plan_cli_prints_the_job_placement() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    cfg = str(CONFIGS / "llama-3-70b.json")
    out = subprocess.run([sys.executable, "-m", "quant_core", "plan", cfg, "--method", "quarot", "--w-bits", "4",
                          "--a-bits", "4", "--kv-bits", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "this quarot job on one 80 GiB GPU: layer-wise offload" in out.stdout
    out = subprocess.run([sys.executable, "-m", "quant_core", "plan", cfg, "--json", "--gpu-gib", "24"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["job"].startswith("refused: ")


@pytest.mark.cuda
def test_cuda_offloaded_learning_step_has_one_layer_on_the_gpu_at_a_time() -> None:
    from quant_core.hadamard import random_hadamard_matrix
    from quant_core.learn import batch_loss, learning_hidden
    from quant_core.rotation import fold_norms

    model = load_model(resolve_model(str(MODELS / "llama-tiny")))
    fold_norms(model)
    model.quant = QuantRuntime(a_bits=4, kv_bits=4)
    g = torch.Generator().manual_seed(0)
    r1 = random_hadamard_matrix(128, g).cuda().requires_grad_(True)
    r2s = [random_hadamard_matrix(32, g).cuda().requires_grad_(True) for _ in range(4)]
    ids = torch.randint(4, 1024, (2, 64), generator=g).cuda()
    on_gpu: list[int] = []
    hooks = [layer.register_forward_pre_hook(
        lambda _m, _a: on_gpu.append(sum(p.is_cuda for lyr in model.model.layers for p in lyr.parameters())))
        for layer in model.model.layers]
    cfg = make_config("spinquant", w_bits=16, a_bits=4, kv_bits=4)
    place = Placement("cuda", offload=True)
    batch_loss(model, learning_hidden(model, ids, r1, r2s, 16, cfg, True, place), ids, None, place).backward()
    for h in hooks:
        h.remove()
    assert len(on_gpu) == 8  # 4 forwards + 4 recomputes in backward
    assert max(on_gpu) == len(list(model.model.layers[0].parameters()))
    assert r1.grad is not None and all(r.grad is not None for r in r2s)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "CPU", ""])
def test_pick_device_refuses_names_it_does_not_know(name: str) -> None:
    with pytest.raises(ConfigError, match="accepted: auto, cpu, cuda, cuda:N"):
        pick_device(name)


@pytest.mark.cpu_only
def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused() -> None:
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="no CUDA device is available; accepted here: cpu, auto") as e:
            pick_device(name)
        assert e.value.field == "device"


@pytest.mark.cuda
def test_with_cuda_auto_is_the_gpu_and_a_missing_index_is_refused() -> None:
    assert pick_device("auto") == "cuda" and pick_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="CUDA device"):
        pick_device(f"cuda:{torch.cuda.device_count()}")  # one past the last

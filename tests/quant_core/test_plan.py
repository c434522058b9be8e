"""python -m quant_core plan: per-stage memory from config.json, checked against the published parameter counts,
the weights really on disk and (bench/real.py --sections memory, test_real_model.py) a real run's peaks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from quant_core.config import make_config
from quant_core.plan import GiB, Shape, plan, stage_memory
from tests.conftest import FIXTURES, MODELS, ROOT

CONFIGS = FIXTURES / "configs"


def _cfg(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def test_parameter_counts_match_the_published_models() -> None:
    assert Shape.from_config(_cfg("llama-3-8b")).params == 8_030_261_248
    assert Shape.from_config(_cfg("llama-3-70b")).params == 70_553_706_496


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny", "llama-massive"])
def test_planned_weight_bytes_are_the_tensors_a_load_holds(name: str) -> None:
    """The load term from config.json alone against the real file: every tensor's bytes at the plan's dtype,
    plus the lm_head copy the loader makes for a tied model."""
    from safetensors import safe_open

    config = json.loads((MODELS / name / "config.json").read_text())
    with safe_open(str(MODELS / name / "model.safetensors"), framework="pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    numel = {k: int(np.prod(v)) for k, v in shapes.items() if not k.endswith("inv_freq")}
    held = sum(numel.values())
    if "lm_head.weight" not in numel:  # tied: the loader copies the embeddings into a separate lm_head
        held += numel["model.embed_tokens.weight"]
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        stages = stage_memory(Shape.from_config(config), make_config("quarot", w_bits=4), dtype)
        assert stages["load"]["weights"] == held * nbytes


def test_llama3_8b_fits_one_80gb_gpu_and_gptq_needs_offload_on_24gb() -> None:
    """Placement decisions from the plan; how close its figures are to a real run is measured on the real model
    (test_real_model.py, bench/real.py --sections memory)."""
    shape = Shape.from_config(_cfg("llama-3-8b"))
    st = {k: sum(v.values()) for k, v in stage_memory(shape, make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4)).items()}
    assert st["load"] == 2 * shape.loaded_params == 2 * 8_030_261_248  # untied already: nothing is copied
    assert st["load"] < st["evaluate_fp"] == st["evaluate"] < st["quantize"]
    assert st["learn"] > st["load"]
    _, stages = plan(_cfg("llama-3-8b"), make_config("spinquant"), gpu_gib=80)
    assert all(s.fits for s in stages)  # an 8B job fits one 80 GB GPU
    _, small = plan(_cfg("llama-3-8b"), make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4), gpu_gib=24)
    by = {s.stage: s for s in small}
    assert not by["quantize"].fits and by["quantize"].placement.startswith("offload")


def test_a_tied_model_is_planned_with_its_untied_lm_head() -> None:
    cfg = {**_cfg("llama-3-8b"), "tie_word_embeddings": True}
    shape = Shape.from_config(cfg)
    assert shape.loaded_params - shape.params == 128_256 * 4096  # the lm_head copy the loader makes


def test_llama3_70b_needs_offload_and_fsdp_on_80gb() -> None:
    _, stages = plan(_cfg("llama-3-70b"), make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4), gpu_gib=80)
    by = {s.stage: s for s in stages}
    assert by["load"].device_bytes == 2 * 70_553_706_496
    assert not by["quantize"].fits and by["quantize"].placement.startswith("offload")
    learn = by["learn"]  # streamed: everything but the frozen weights, plus one bf16 layer and one vocabulary matrix
    assert not learn.fits and learn.placement.startswith("offload: ")
    streamed_gib = float(learn.placement.split()[1])
    assert 0 < streamed_gib < 72 and streamed_gib < learn.device_bytes / 2**30 / 4
    _, small = plan(_cfg("llama-3-70b"), make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4), gpu_gib=12)
    small_learn = {s.stage: s for s in small}["learn"]
    assert small_learn.placement.startswith("FSDP over ") and small_learn.placement.endswith("(not implemented)")
    _, big = plan(_cfg("llama-3-70b"), make_config("spinquant"), gpu_gib=192)
    assert {s.stage: s.fits for s in big}["learn"] is True
    rtn = {s.stage for s in plan(_cfg("llama-3-70b"), make_config("rtn"))[1]}
    assert "learn" not in rtn  # no learning stage without learned rotations


def test_plan_cli_prints_the_table_and_json() -> None:
    run = [sys.executable, "-m", "quant_core", "plan"]
    out = subprocess.run(run + [str(CONFIGS / "llama-3-8b.json")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "8.03 B parameters" in out.stdout and "learn" in out.stdout and "one GPU" in out.stdout
    js = subprocess.run(run + [str(CONFIGS / "llama-3-70b.json"), "--json", "--gpu-gib", "12"], cwd=ROOT,
                        capture_output=True, text=True)
    data = json.loads(js.stdout)
    assert data["params"] == 70_553_706_496 and any(s["placement"].startswith("FSDP") for s in data["stages"])
    local = subprocess.run(run + [str(MODELS / "llama-tiny")], cwd=ROOT, capture_output=True, text=True)
    assert local.returncode == 0 and "one GPU" in local.stdout
    bad = subprocess.run(run + ["missing.json"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers"])
def test_plan_refuses_incomplete_configs(tmp_path, field: str) -> None:
    cfg = _cfg("llama-3-8b")
    del cfg[field]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-m", "quant_core", "plan", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "error:" in out.stderr


def test_refusal_names_the_stage_that_does_not_fit() -> None:
    from quant_core.plan import decide

    def refusal(*args):  # the refusal alone: None when the job can run
        return decide(*args).refusal

    cfg = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4)
    assert refusal(_cfg("llama-3-8b"), cfg, 80 * GiB) is None
    assert refusal(_cfg("llama-3-70b"), cfg, 80 * GiB) is None  # layer-wise offload (test_placement.py)
    why = refusal(_cfg("llama-3-70b"), cfg, 12 * GiB)
    assert why is not None and "does not fit one 12 GiB GPU" in why and "learn" in why and "FSDP" in why
    assert refusal(json.loads((MODELS / "llama-tiny" / "config.json").read_text()), cfg, 1 * GiB) is None

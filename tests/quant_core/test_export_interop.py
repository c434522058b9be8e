"""Interop of the exported folders: GPTQ v1 vs compressed-tensors integers, transformers, CT's decompressor.

One W4A16KV16 spinquant job (no_had: nothing online) on llama-tiny, exported once with both formats.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quant_core.config import make_config
from quant_core.export import ExportError, export_checkpoint
from quant_core.hadamard import plan_hadamard
from quant_core.models import QuantRuntime, decoder_linears, layer_prefix
from quant_core.packing import unpack_gptq_qweight, unpack_int4_rows
from quant_core.pipeline import quantize_model
from quant_core.runtime import load
from tests.conftest import MODELS, ROOT, TEST_TEXT
from tests.quant_core.test_export import LLAMA, SMALL

SYM_ZERO_WORD = 0x77777777


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory):
    res = quantize_model(str(LLAMA), make_config("spinquant", w_bits=4, a_bits=16, kv_bits=16, **SMALL))
    assert res.runtime is not None and res.runtime.r4 is None and not res.cfg.r3_on  # no_had
    out = tmp_path_factory.mktemp("interop") / "job"
    export_checkpoint(res, out, formats=("ct", "gptq"))
    return res, out


def _linear_prefixes(res) -> list[tuple[str, torch.Size]]:
    return [(layer_prefix(name, i), lin.weight.shape)
            for i in range(res.arch.n_layers) for name, lin in decoder_linears(res.model, i).items()]


def _ids() -> torch.Tensor:
    return torch.randint(4, 1024, (2, 48), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- GPTQ v1


def test_gptq_folder_holds_the_same_integers_as_compressed_tensors(w4a16) -> None:
    res, out = w4a16
    sums = (out / "SHA256SUMS").read_text()
    for folder in ("model", "gptq"):  # one SHA256SUMS covers both folders and the same sidecar
        for f in ("config.json", "model.safetensors", "spinquant_config.json", "quant_config.json", "eval_report.json",
                  "serve.sh",
                  "spinquant/rotations.safetensors", "tokenizer.json", "generation_config.json"):
            assert (out / folder / f).is_file() and f"  {folder}/{f}\n" in sums, f"{folder}/{f}"
    assert "  gptq/quantize_config.json\n" in sums and not (out / "gptq" / "SHA256SUMS").exists()
    ct = load_file(str(out / "model" / "model.safetensors"))
    gq = load_file(str(out / "gptq" / "model.safetensors"))
    for prefix, (out_f, in_f) in _linear_prefixes(res):
        q_ct = unpack_int4_rows(ct[prefix + ".weight_packed"], in_f)
        qweight = gq[prefix + ".qweight"]
        assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (in_f // 8, out_f)
        assert torch.equal(unpack_gptq_qweight(qweight, in_f), q_ct), prefix
        qzeros = gq[prefix + ".qzeros"]
        assert qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (1, out_f // 8)
        assert bool(((qzeros.to(torch.int64) & 0xFFFFFFFF) == SYM_ZERO_WORD).all()), prefix
        scales = gq[prefix + ".scales"]
        assert scales.dtype == torch.float16 and tuple(scales.shape) == (1, out_f)
        assert torch.equal(scales, ct[prefix + ".weight_scale"].to(torch.float16).t()), prefix
        g_idx = gq[prefix + ".g_idx"]
        assert g_idx.dtype == torch.int32 and tuple(g_idx.shape) == (in_f,) and not bool(g_idx.any())
        assert prefix + ".weight" not in gq
    for key, value in gq.items():  # embeddings, norms and lm_head in fp16
        if not key.endswith((".qweight", ".qzeros", ".g_idx")):
            assert value.dtype == torch.float16, key
    assert torch.equal(gq["lm_head.weight"], res.model.lm_head.weight.detach().to(torch.float16))


def test_gptq_configs(w4a16) -> None:
    _, out = w4a16
    cfg = json.loads((out / "gptq" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == json.loads((out / "gptq" / "quantize_config.json").read_text())
    assert {k: qc[k] for k in ("quant_method", "checkpoint_format", "bits", "group_size", "desc_act", "sym",
                               "lm_head", "pack_dtype")} == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": -1, "desc_act": False,
        "sym": True, "lm_head": False, "pack_dtype": "int32"}
    assert qc["meta"]["quantizer"].startswith("quant_core ") and qc["meta"]["damp_percent"] == 0.01
    assert qc["meta"]["true_sequential"] is True and qc["meta"]["static_groups"] is True  # act order, contiguous groups
    assert cfg["tie_word_embeddings"] is False and cfg["dtype"] == "float16"
    assert "gptq" in (out / "gptq" / "serve.sh").read_text()
    # the compressed-tensors folder is untouched by the second format
    assert json.loads((out / "model" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"


def test_gptq_group_size_and_bias(tmp_path: Path) -> None:
    """Grouped scales, g_idx = i // g, and the q/k/v biases of Qwen2 in fp16."""
    res = quantize_model(str(MODELS / "qwen2-tiny"), make_config("spinquant", w_bits=4, a_bits=16, kv_bits=16,
                                                                  w_group_size=32, **SMALL))
    export_checkpoint(res, tmp_path / "job", formats=("gptq",))
    assert not (tmp_path / "job" / "model").exists()
    gq = load_file(str(tmp_path / "job" / "gptq" / "model.safetensors"))
    qc = json.loads((tmp_path / "job" / "gptq" / "quantize_config.json").read_text())
    assert qc["group_size"] == 32
    for prefix, (out_f, in_f) in _linear_prefixes(res):
        assert tuple(gq[prefix + ".scales"].shape) == (in_f // 32, out_f)
        assert tuple(gq[prefix + ".qzeros"].shape) == (in_f // 32, out_f // 8)
        assert torch.equal(gq[prefix + ".g_idx"], (torch.arange(in_f) // 32).to(torch.int32))
        assert torch.equal(unpack_gptq_qweight(gq[prefix + ".qweight"], in_f).to(torch.int16),
                           res.qweights[prefix].q.to(torch.int16))
    bias = gq["model.layers.0.self_attn.q_proj.bias"]
    assert bias.dtype == torch.float16
    assert torch.equal(bias, res.model.state_dict()["model.layers.0.self_attn.q_proj.bias"].to(torch.float16))


@pytest.mark.parametrize(("change", "reason"), [
    ({"a_bits": 4}, "activation bits 4"),
    ({"kv_bits": 8}, "KV bits 8"),
    ({"w_sym": False}, "asymmetric"),
    ({"act_order": True, "w_group_size": 32, "settings": {"weights.gptq.static_groups": False}},
     "act_order without static groups"),
    ({"w_bits": 8}, "weights.bits=8"),
    ({"settings": {"rotation.r3": "on"}}, "R3"),
])
def test_gptq_refuses_what_it_cannot_hold(w4a16, tmp_path: Path, change, reason) -> None:
    res, _ = w4a16
    cfg = make_config("spinquant", **{**dict(w_bits=4, a_bits=16, kv_bits=16), **change, **SMALL})
    with pytest.raises(ExportError, match=reason) as info:
        export_checkpoint(dataclasses.replace(res, cfg=cfg), tmp_path / "job", formats=("ct", "gptq"))
    assert "compressed-tensors" in str(info.value)
    assert not (tmp_path / "job").exists() and list(tmp_path.iterdir()) == []  # refused before writing


def test_gptq_refuses_an_online_r4(w4a16, tmp_path: Path) -> None:
    res, _ = w4a16
    r4 = plan_hadamard(res.arch.intermediate, mode="block", block=128)
    with pytest.raises(ExportError, match=r"online R4.*compressed-tensors"):
        export_checkpoint(dataclasses.replace(res, runtime=QuantRuntime(r4=r4)), tmp_path / "job", formats=("gptq",))
    with pytest.raises(ExportError, match="unknown export format"):
        export_checkpoint(res, tmp_path / "job", formats=("awq",))


def test_cli_format_gptq_refused_before_any_compute(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "quant_core", "quantize", str(LLAMA), "--a-bits", "4",
                        "--format", "gptq", "--out", str(tmp_path / "job"), "--calib-text", str(TEST_TEXT),
                        "--eval-text", str(TEST_TEXT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "GPTQ v1 cannot hold" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "[load]" not in r.stderr and not (tmp_path / "job").exists()


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("dequantize", [False, True])
def test_transformers_loads_the_compressed_tensors_folder(w4a16, dequantize: bool) -> None:
    """transformers 5.23 + compressed-tensors 0.20 on CPU: dequantize=False (default) keeps the linears
    compressed (weight_packed/weight_scale/weight_shape) and ModelCompressor decompresses them on the first
    forward; dequantize=True dequantizes while loading. Both must give our runtime's logits."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    res, out = w4a16
    ours, _, _ = load(out)
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    hf = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, **kw).eval()
    q_proj = hf.model.layers[0].self_attn.q_proj
    assert hasattr(q_proj, "weight_packed") != dequantize
    ids = _ids()
    with torch.no_grad():
        ref = ours(ids).float()
        got = hf(ids).logits.float()
    diff = float((got - ref).abs().max())
    print(f"transformers dequantize={dequantize}: max |logit diff| = {diff:.3e}")
    assert diff <= 1e-3
    hf_state = hf.state_dict()
    for prefix, _ in _linear_prefixes(res):  # decompressed weights are ours, bit for bit
        assert torch.equal(hf_state[prefix + ".weight"], ours.state_dict()[prefix + ".weight"]), prefix


# --------------------------------------------------------------------------- compressed-tensors


def test_compressed_tensors_decompresses_the_whole_folder(w4a16) -> None:
    """CT 0.20's model-free dequantizer (its ModelCompressor has no state-dict path any more) reads the
    folder's quantization_config and decompresses model.safetensors; every linear equals our weights."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    _, out = w4a16
    ours, _, _ = load(out)
    deq = CompressedTensorsDequantizer(out / "model", dtype=torch.float32)
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    dense = deq.validate(tensors)  # raises on any leftover quantization parameter
    ref = ours.state_dict()
    assert set(dense) == set(ref) - {"inv_freq"}
    for key, value in dense.items():
        assert value.dtype == torch.float32 and torch.equal(value, ref[key]), key


# --------------------------------------------------------------------------- the online R4 (transform_config)

# What llm-compressor 0.14.0.1 (compressed-tensors 0.19.0) writes for
# SpinQuantModifier(rotations=["R4"], transform_type="hadamard", transform_block_size=128) on llama-tiny,
# recorded from its save_pretrained(save_compressed=True) on 2026-11-24: the same scheme our block:128 R4 is.
LLMC_R4_TRANSFORM_CONFIG = {"config_groups": {"R4": {
    "type": "hadamard", "head_dim": 128, "precision": "torch.float64", "randomize": False, "requires_grad": False,
    "apply": [{"targets": ["re:.*down_proj$"], "location": "input", "inverse": False, "ignore": []},
              {"targets": ["re:.*down_proj$"], "location": "weight_input", "inverse": True, "ignore": []}]}}}
LLMC_R4_KEY = "model.layers.0.mlp.down_proj.R4_input.weight"  # one float64 (128, 128) copy, deduplicated


@pytest.fixture(scope="module")
def w4a16_r4(tmp_path_factory):
    """W4A16 with an online block-128 R4: the one online transform vLLM applies."""
    res = quantize_model(str(LLAMA), make_config("spinquant", w_bits=4, a_bits=16, kv_bits=16, r4="block:128",
                                                 **SMALL))
    assert res.runtime is not None and res.runtime.r4 is not None and res.runtime.r4.mode == "block"
    out = tmp_path_factory.mktemp("interop_r4") / "job"
    export_checkpoint(res, out)
    return res, out


def test_transform_config_and_r4_tensor_are_what_llm_compressor_writes(w4a16_r4) -> None:
    from compressed_tensors.transform import TransformConfig
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    _, out = w4a16_r4
    written = json.loads((out / "model" / "config.json").read_text())["quantization_config"]["transform_config"]
    assert written == LLMC_R4_TRANSFORM_CONFIG
    TransformConfig.model_validate(written)  # CT's own schema (extra fields forbidden)
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as fh:
        r4_keys = [k for k in fh.keys() if "R4" in k]
        assert r4_keys == [LLMC_R4_KEY]
        h = fh.get_tensor(LLMC_R4_KEY)
    assert h.dtype == torch.float64 and torch.equal(h, deterministic_hadamard_matrix(128, torch.float64))


def _online_only(tc):
    """The entries a serving runtime applies: vLLM keeps ``args.is_online()`` ones; weight_input is fused."""
    return type(tc)(config_groups={n: s.model_copy(update={"apply": [a for a in s.apply if a.is_online()]})
                                   for n, s in tc.config_groups.items()})


def test_compressed_tensors_online_r4_reproduces_our_runtime(w4a16_r4) -> None:
    """transformers loads the folder dequantized; compressed-tensors' own Hadamard, built from our
    transform_config's online entry, is hooked on every down_proj input: the logits are our runtime's.
    Without it they are far off, and so they are if a loader fuses the weight_input entry a second time."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    _, out = w4a16_r4
    ours, _, _ = load(out, int4_kernels=False)
    tc = TransformConfig.model_validate(
        json.loads((out / "model" / "config.json").read_text())["quantization_config"]["transform_config"])
    ids = _ids()
    with torch.no_grad():
        ref = ours(ids).float()
    diffs = {}
    for applied in ("online", "none", "all"):
        hf = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        if applied != "none":
            apply_transform_config(hf, _online_only(tc) if applied == "online" else tc)
        with torch.no_grad():
            diffs[applied] = float((hf(ids).logits.float() - ref).abs().max())
    print(f"max |logit diff| vs our runtime: {diffs}")
    assert diffs["online"] <= 1e-4
    assert diffs["none"] > 1.0 and diffs["all"] > 1.0

"""Export to compressed-tensors pack-quantized + sidecar, and the runtime that reproduces the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant_core.config import make_config
from quant_core.evaluate import perplexity
from quant_core.export import export_checkpoint
from quant_core.pipeline import quantize_model
from quant_core.runtime import CheckpointError, load
from tests.conftest import MODELS, ROOT, TEST_TEXT, TRAIN_TEXT

LLAMA = MODELS / "llama-tiny"
SMALL = dict(seq_len=128, calib_samples=8, train_samples=16, batch_size=4, micro_batch=4, eval_windows=6, steps=2,
             prefit_steps=10,
             calib_source=f"file:{TRAIN_TEXT}", eval_source=f"file:{TEST_TEXT}", device="cpu")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One W4A4KV4 spinquant job on llama-tiny, exported once for the module."""
    res = quantize_model(str(LLAMA), make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4, **SMALL))
    out = tmp_path_factory.mktemp("ckpt") / "job"
    export_checkpoint(res, out)
    return res, out


@pytest.mark.parametrize(("method", "bits"), [("spinquant", (4, 8, 8)), ("spinquant", (4, 16, 16)),
                                              ("spinquant-vllm", (4, 4, 16)), ("gptq", (4, 16, 16))])
def test_round_trip_reproduces_the_report(method: str, bits, tmp_path: Path) -> None:
    w, a, kv = bits
    res = quantize_model(str(LLAMA), make_config(method, w_bits=w, a_bits=a, kv_bits=kv, **SMALL))
    export_checkpoint(res, tmp_path / "job")
    model, cfg, report = load(tmp_path / "job", int4_kernels=False)  # the bit-exact path
    assert cfg == res.cfg and report["quant_ppl"] == res.report["quant_ppl"]
    ppl = perplexity(model, res.eval_windows)
    assert abs(ppl / res.report["quant_ppl"] - 1) <= 1e-3
    for key, value in res.model.state_dict().items():  # dequantized weights are the evaluated ones, bit for bit
        if key != "inv_freq":
            assert torch.equal(model.state_dict()[key], value), key


def test_w4a4kv4_round_trip_and_format(exported) -> None:
    res, out = exported
    model, _, _ = load(out)
    assert abs(perplexity(model, res.eval_windows) / res.report["quant_ppl"] - 1) <= 1e-3
    qc = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["kv_cache_scheme"] is None and qc["ignore"] == ["lm_head"]
    assert all(g["format"] == "pack-quantized" for g in qc["config_groups"].values())
    assert set(qc["config_groups"]) == {"group_0", "o_proj"}  # o_proj input quantized per head
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(  # CT's own schema reads what vLLM reads
        {k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    acts = {name: g.input_activations for name, g in parsed.config_groups.items()}
    assert acts["group_0"].strategy == "token" and acts["o_proj"].strategy == "group"
    assert acts["o_proj"].group_size == res.arch.head_dim
    assert all(a.num_bits == 4 and a.dynamic is True and a.type == "int" for a in acts.values())
    assert all(g.weights.num_bits == 4 and g.weights.dynamic is False for g in parsed.config_groups.values())
    from safetensors import safe_open

    with safe_open(str(out / "model" / "model.safetensors"), "pt") as fh:
        packed = fh.get_tensor("model.layers.0.self_attn.q_proj.weight_packed")
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (128, 16)
        assert "model.layers.0.self_attn.q_proj.weight" not in fh.keys()


@pytest.mark.parametrize("damage", ["modify", "truncate", "delete", "extra"])
def test_damaged_checkpoint_is_refused_naming_the_file(exported, tmp_path: Path, damage: str) -> None:
    _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    target = bad / "model" / "model.safetensors"
    if damage == "modify":
        data = bytearray(target.read_bytes())
        data[-10] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "delete":
        target.unlink()
    else:
        (bad / "model" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"model.safetensors|extra.safetensors"):
        load(bad)


def test_interrupted_export_leaves_nothing(monkeypatch, exported, tmp_path: Path) -> None:
    import quant_core.export as ex

    res, _ = exported

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(res, tmp_path / "job")
    assert list(tmp_path.iterdir()) == []


def test_cli_eval_and_generate(exported, tmp_path: Path) -> None:
    res, out = exported
    rep = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "quant_core", "eval", str(out), "--eval-text", str(TEST_TEXT),
                        "--eval-windows", "6", "--report-json", str(rep)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(rep.read_text())["ppl"] / res.report["quant_ppl"] - 1) <= 1e-3
    g = subprocess.run([sys.executable, "-m", "quant_core", "generate", str(out), "--prompt", "The file",
                        "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True)
    assert g.returncode == 0 and g.stdout.strip(), g.stderr
    bad = subprocess.run([sys.executable, "-m", "quant_core", "eval", str(tmp_path), "--eval-text", str(TEST_TEXT)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "not an exported checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_md_names_what_vllm_does_not_apply(exported) -> None:
    _, out = exported
    text = (out / "model" / "SERVE.md").read_text()
    assert "vllm serve ./model --tensor-parallel-size 1 --kv-cache-dtype int4_per_token_head" in text
    assert "R3 (online Q/K Hadamard) is not applied by vLLM" in text and "not applied" in text
    assert (out / "model" / "serve.sh").read_text().startswith("vllm serve ./model")
    assert "Do not serve this folder with vLLM" in text  # full K*2^m R4 cannot be described for vLLM


@pytest.fixture(scope="module")
def bf16_w4a16(tmp_path_factory):
    """A W4A16 g128 bfloat16 spinquant job: the scheme PyTorch's int4 kernels take."""
    cfg = make_config("spinquant", w_bits=4, a_bits=16, kv_bits=16, w_group_size=128, dtype="bfloat16", **SMALL)
    res = quantize_model(str(LLAMA), cfg)
    out = tmp_path_factory.mktemp("bf16") / "job"
    export_checkpoint(res, out)
    return res, out


def test_int4_kernel_path_matches_the_report_within_a_tenth_of_a_percent(bf16_w4a16) -> None:
    """W4A16 g128 bf16 on PyTorch's CPU int4 kernel: weights never dequantized, ppl within 0.1%."""
    from quant_core.runtime import Int4Linear

    res, out = bf16_w4a16
    model, _, _ = load(out)  # on by default where the kernel applies
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    exact, _, _ = load(out, int4_kernels=False)
    assert not isinstance(exact.model.layers[0].mlp.down_proj, Int4Linear)
    ppl = perplexity(model, res.eval_windows)
    assert abs(ppl / res.report["quant_ppl"] - 1) <= 1e-3


def test_kernel_probe_separates_a_right_kernel_from_a_wrong_layout(bf16_w4a16) -> None:
    """The load-time probe: the real kernel is within bf16 error, a mis-packed one is O(1) off."""
    from quant_core.runtime import KERNEL_TOLERANCE, Int4Linear, kernel_error

    res, out = bf16_w4a16
    exact, cfg, _ = load(out, int4_kernels=False)
    lin = exact.model.layers[0].mlp.down_proj
    g = cfg.weights.group_size
    codes = res.qweights["model.layers.0.mlp.down_proj"]
    q, scale = codes.q.to(torch.int16), codes.scale.float()  # (out, in) codes, (out, in/g) scales
    assert kernel_error(Int4Linear(q, scale, g, None), lin.weight) < 1e-2
    swapped = q.reshape(q.shape[0], -1, 2).flip(-1).reshape(q.shape)  # nibble pairs the other way round
    assert kernel_error(Int4Linear(swapped, scale, g, None), lin.weight) > KERNEL_TOLERANCE


def test_a_kernel_that_disagrees_falls_back_to_dequantized_weights(bf16_w4a16, monkeypatch) -> None:
    """A PyTorch build whose int4 kernel disagrees with our packing costs speed, never the numbers."""
    from quant_core.runtime import Int4Linear

    res, out = bf16_w4a16
    real_forward = Int4Linear.forward
    monkeypatch.setattr(Int4Linear, "forward", lambda self, x: -real_forward(self, x))
    with pytest.warns(UserWarning, match="int4 kernel disagrees with model.layers.0"):
        model, _, _ = load(out)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    exact, _, _ = load(out, int4_kernels=False)
    assert perplexity(model, res.eval_windows) == perplexity(exact, res.eval_windows)


def test_cli_device_is_checked(exported) -> None:
    _, out = exported
    r = subprocess.run([sys.executable, "-m", "quant_core", "generate", str(out), "--prompt", "x", "--device", "tpu"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "device='tpu' is not valid; accepted: auto, cpu, cuda, cuda:N" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.cpu_only
def test_cli_cuda_without_a_cuda_device_is_refused(exported) -> None:
    _, out = exported
    r = subprocess.run([sys.executable, "-m", "quant_core", "eval", str(out), "--eval-text", str(TEST_TEXT),
                        "--device", "cuda"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no CUDA device is available; accepted here: cpu, auto" in r.stderr


@pytest.mark.cuda
def test_cuda_int4_kernel_matches_the_report(bf16_w4a16) -> None:
    """On CUDA (sm80+) the linears run on tinygemm's int4 kernel; perplexity within 0.1% of the report."""
    from quant_core.runtime import Int4Linear

    res, out = bf16_w4a16
    model, _, _ = load(out, device="cuda")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4Linear) and down.cuda_kernel and down.packed.is_cuda
    ppl = perplexity(model, res.eval_windows)
    assert abs(ppl / res.report["quant_ppl"] - 1) <= 1e-3
    exact, _, _ = load(out, device="cuda", int4_kernels=False)
    assert abs(ppl / perplexity(exact, res.eval_windows) - 1) <= 1e-3

"""EXPORT: a compressed-tensors ``pack-quantized`` Hugging Face folder plus our sidecar, atomically.

Layout (CHECKPOINT.md §0, §1, §3)::

    <out>/model/config.json                 incl. quantization_config (+ transform_config for R4)
    <out>/model/model.safetensors           weight_packed / weight_scale / weight_shape per linear
    <out>/model/tokenizer*, generation_config.json
    <out>/model/quant_config.json           the exact versioned job config (also as spinquant_config.json,
                                            the name CHECKPOINT.md gives it for other tools)
    <out>/model/eval_report.json            the report (quant_ppl is this folder's perplexity)
    <out>/model/serve.sh                    the vLLM command for this scheme
    <out>/model/spinquant/rotations.safetensors   R1 and every layer's R2 (Meta's R.bin key names)
    <out>/gptq/...                          optional GPTQ v1 W4A16 folder (CHECKPOINT.md §2), same sidecar
    <out>/SHA256SUMS                        every file above, written last

``export_checkpoint(result, out, formats=("ct",))``: "ct" writes model/, "gptq" writes gptq/; both
go into the one job folder under one SHA256SUMS.

The folder is built in a temporary sibling, checksummed, then renamed: an interrupted export
never leaves a folder that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from .checksums import write_sums
from .config import SpinQuantConfig, config_to_dict, vllm_serving_verdict
from .errors import ConfigError
from .formats import ExportError, check_formats
from .hadamard import HadamardPlan, sylvester
from .memory import release_free_memory
from .models import decoder_linears, layer_prefix
from .packing import INT4_OFFSET, gptq_qzeros, group_index, pack_gptq_qweight, pack_int4_rows, pack_int4_zero_points
from .report import ExportFacts

if TYPE_CHECKING:
    from .pipeline import QuantizeResult

CT_VERSION = "0.20.0"  # the compressed-tensors version our interop tests decompress with


def _weight_args(cfg: SpinQuantConfig) -> dict[str, Any]:
    g = cfg.weights.group_size
    return {"num_bits": cfg.weights.bits, "type": "int", "symmetric": cfg.weights.sym,
            "strategy": "group" if g > 0 else "channel", "group_size": g if g > 0 else None,
            "dynamic": False, "actorder": _actorder(cfg) if g > 0 else None}


def _actorder(cfg: SpinQuantConfig) -> str | None:
    """compressed-tensors' name for how the groups were fitted: "group" (g_idx follows the processing order),
    "static" (act order, contiguous groups), None (plain column order)."""
    w = cfg.weights
    return "group" if w.permutes_groups else ("static" if w.gptq.act_order else None)


def _act_args(cfg: SpinQuantConfig, group: int | None) -> dict[str, Any] | None:
    a = cfg.activations
    if a.bits >= 16:
        return None
    if group:
        return {"num_bits": a.bits, "type": "int", "symmetric": a.sym, "strategy": "group", "group_size": group,
                "dynamic": True}
    return {"num_bits": a.bits, "type": "int", "symmetric": a.sym, "strategy": "token", "dynamic": True}


def quantization_config(cfg: SpinQuantConfig, head_dim: int, r4_block: int | None) -> dict[str, Any]:
    """config.json's quantization_config: pack-quantized forced everywhere (CHECKPOINT.md §1.4)."""
    per_head = cfg.activations.bits < 16 and cfg.activations.o_proj_per_head
    groups: dict[str, Any] = {
        "group_0": {"targets": ["re:.*(q|k|v|gate|up|down)_proj$" if per_head else "re:.*_proj$"],
                    "format": "pack-quantized", "weights": _weight_args(cfg),
                    "input_activations": _act_args(cfg, None), "output_activations": None},
    }
    if per_head:
        groups["o_proj"] = {"targets": ["re:.*o_proj$"], "format": "pack-quantized", "weights": _weight_args(cfg),
                            "input_activations": _act_args(cfg, head_dim), "output_activations": None}
    transform: dict[str, Any] = {}
    if r4_block is not None:
        transform = {"config_groups": {"R4": {
            "type": "hadamard", "head_dim": r4_block, "randomize": False, "requires_grad": False,
            "precision": "torch.float64",  # what llm-compressor's SpinQuantModifier writes (CT 0.19)
            "apply": [{"targets": ["re:.*down_proj$"], "location": "input", "inverse": False, "ignore": []},
                      {"targets": ["re:.*down_proj$"], "location": "weight_input", "inverse": True, "ignore": []}],
        }}}
    return {"quant_method": "compressed-tensors", "version": CT_VERSION, "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": transform}


def serve_command(cfg: SpinQuantConfig, transform: bool, folder: str = "model") -> str:
    tp = "--tensor-parallel-size 1" if transform else ""
    kv = " --kv-cache-dtype int4_per_token_head" if cfg.kv.bits == 4 else ""
    return f"vllm serve ./{folder} {tp}{kv}".strip() + "\n"


def serve_markdown(cfg: SpinQuantConfig, transform: bool, folder: str) -> str:
    """SERVE.md: how to serve this folder, and what each runtime does and does not apply."""
    verdict = vllm_serving_verdict(cfg)
    a, kv = cfg.activations.bits, cfg.kv.bits
    lines = [
        f"# Serving this checkpoint ({cfg.method.value}, {cfg.scheme})", "",
        "```", serve_command(cfg, transform, folder).strip(), "```", "",
        "| runtime | weights | activations | R4 (down_proj) | R3 (Q/K) | KV cache |",
        "|---|---|---|---|---|---|",
        f"| quant_core (`python -m quant_core eval {folder}/..`) | int4 | "
        f"{f'int{a} per token' if a < 16 else '16-bit'} | {'yes' if cfg.r4_mode[0] != 'none' else 'none'} | "
        f"{'yes' if cfg.r3_on else 'off'} | {f'int{kv}' if kv < 16 else '16-bit'} |",
        "| vLLM | int4 (Marlin/Machete) | "
        f"{'int4/int8 symmetric per token (recent vLLM + humming-kernels)' if a < 16 else '16-bit'} | "
        f"{'block Hadamard only, TP=1' if transform else 'none'} | not applied | "
        f"{'--kv-cache-dtype int4_per_token_head (no R3)' if kv == 4 else '16-bit' if kv == 16 else 'fp8/int8 flag'} |",
        "",
        "quant_core reproduces the report's `quant_ppl` exactly. "
        + ("vLLM serves exactly what was evaluated." if verdict is True else
           "vLLM serves an approximation of what was evaluated, because: " + "; ".join(verdict) + "."),
        "",
    ]
    if cfg.r4_mode[0] == "full":
        lines += ["**Do not serve this folder with vLLM**: the full K*2^m R4 is fused into down_proj but "
                  "compressed-tensors cannot describe it, so vLLM would run without the online half. "
                  "Re-run with `--method spinquant-vllm` or `--r4 block:auto` for a vLLM-servable checkpoint.", ""]
    return "\n".join(lines)


_FP16_NORMAL = (torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max)  # 6.1e-5 .. 65504


def gptq_quantization_config(cfg: SpinQuantConfig) -> dict[str, Any]:
    """config.json's quantization_config and quantize_config.json for a GPTQ v1 folder."""
    from . import __version__

    g = cfg.weights.group_size
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": g if g > 0 else -1,
            "desc_act": False, "sym": True, "lm_head": False, "pack_dtype": "int32",
            "meta": {"quantizer": f"quant_core {__version__}", "damp_percent": cfg.weights.gptq.damp,
                     "true_sequential": True,
                     "static_groups": cfg.weights.gptq.act_order and cfg.weights.gptq.static_groups,  # what GPTQModel calls it
                     "mse": 2.4 if cfg.weights.mse_clip else 0.0}}


def _gptq_state(result: QuantizeResult) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """GPTQ v1 tensors (qweight/qzeros/scales/g_idx, fp16 elsewhere) and facts about the scale cast."""
    cfg, model = result.cfg, result.model
    state: dict[str, torch.Tensor] = {}
    linear_names = set()
    max_rel = 0.0
    g = cfg.weights.group_size
    for i in range(result.arch.n_layers):
        for name, lin in decoder_linears(model, i).items():
            prefix = layer_prefix(name, i)
            linear_names.add(prefix + ".weight")
            res = result.qweights[prefix]
            out_f, in_f = lin.weight.shape
            scale = res.scale.to(lin.weight.dtype).float()  # exactly the compressed-tensors scale
            lo, hi = float(scale.abs().min()), float(scale.abs().max())
            if lo < _FP16_NORMAL[0] or hi > _FP16_NORMAL[1]:
                raise ExportError(
                    f"{prefix}: weight scales span [{lo:.3g}, {hi:.3g}], outside fp16's normal range "
                    f"[{_FP16_NORMAL[0]:.3g}, {_FP16_NORMAL[1]:.0f}] that GPTQ's fp16 scales need; "
                    "use the default compressed-tensors format (--format ct)")
            scales16 = scale.to(torch.float16)
            max_rel = max(max_rel, float(((scales16.float() - scale).abs() / scale.abs()).max()))
            try:
                state[prefix + ".qweight"] = pack_gptq_qweight(res.q.to(torch.int16))
                state[prefix + ".qzeros"] = gptq_qzeros(scale.shape[1], out_f, None)
            except ValueError as exc:
                raise ExportError(f"{prefix}: {exc}; use the default compressed-tensors format (--format ct)") from None
            state[prefix + ".scales"] = scales16.t().contiguous()  # (out, n_groups) -> (n_groups, out)
            state[prefix + ".g_idx"] = group_index(in_f, g)
        release_free_memory()  # as in _packed_state
    for key, value in model.state_dict().items():
        if key != "inv_freq" and key not in linear_names:
            v = value.detach().cpu()
            if v.is_floating_point():
                v16 = v.to(torch.float16)
                if not bool(torch.isfinite(v16).all()):
                    raise ExportError(f"{key} overflows fp16 (|x| > 65504), which the GPTQ folder stores; "
                                      "use the default compressed-tensors format (--format ct)")
                v = v16
            state[key] = v
    facts = {"scales_exact_in_fp16": max_rel == 0.0, "max_rel_scale_rounding": max_rel}
    return {k: v.contiguous().cpu() for k, v in state.items()}, facts


def r4_tensor(r4_block: int) -> dict[str, torch.Tensor]:
    """The online R4's stored matrix, as llm-compressor saves it: one float64 (b, b) ±1 copy under layer
    0's ``R4_input`` submodule (every layer shares it, so save deduplicates it; vLLM normalises by sqrt(b)
    on load and runs hadacore)."""
    return {"model.layers.0.mlp.down_proj.R4_input.weight": sylvester(r4_block).to(torch.float64)}


def _packed_state(result: QuantizeResult, r4_block: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the folder: packed int4 for decoder linears, model dtype for the rest, and the
    online R4's matrix when the folder lists one."""
    cfg, model = result.cfg, result.model
    if cfg.weights.bits != 4:
        raise ExportError(f"pack-quantized export holds 4-bit weights; this job has weights.bits={cfg.weights.bits}")
    state: dict[str, torch.Tensor] = {}
    linear_names = set()
    for i in range(result.arch.n_layers):
        for name, lin in decoder_linears(model, i).items():
            prefix = layer_prefix(name, i)
            linear_names.add(prefix + ".weight")
            res = result.qweights[prefix]
            # compressed-tensors stores signed codes; our asymmetric codes are 0..15 with zero 0..15.
            q = res.q.to(torch.int16) if cfg.weights.sym else res.q.to(torch.int16) - INT4_OFFSET
            state[prefix + ".weight_packed"] = pack_int4_rows(q)
            state[prefix + ".weight_scale"] = res.scale.to(lin.weight.dtype).contiguous()
            state[prefix + ".weight_shape"] = torch.tensor(list(lin.weight.shape), dtype=torch.int64)
            if not cfg.weights.sym:
                assert res.zero is not None
                state[prefix + ".weight_zero_point"] = pack_int4_zero_points(res.zero.round().to(torch.int16) - INT4_OFFSET)
            if _weight_args(cfg)["actorder"] == "group":
                state[prefix + ".weight_g_idx"] = res.g_idx.to(torch.int32)
        # The packing's int64 temporaries of a layer are freed between its small packed results: handed back here,
        # or the heap grows by them layer after layer (0.5 GB on SmolLM2-135M, quant_core.memory).
        release_free_memory()
    for key, value in model.state_dict().items():
        if key != "inv_freq" and key not in linear_names:
            state[key] = value.detach().contiguous().cpu()
    if r4_block is not None:
        state.update(r4_tensor(r4_block))
    return {k: v.contiguous().cpu() for k, v in state.items()}


def _write_sidecar(folder: Path, result: QuantizeResult, transform: bool) -> None:
    """Tokenizer/generation files, rotations, the job config and serve.sh (eval_report.json comes last)."""
    for p in result.source_path.iterdir():
        if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "generation_config"))
                            or p.suffix in (".model", ".tiktoken")):
            shutil.copy2(p, folder / p.name)
    if result.r1 is not None:
        rot = {"R1": result.r1.float().contiguous().cpu()}
        for i, r2 in enumerate(result.r2s or []):
            rot[f"model.layers.{i}.self_attn.R2"] = r2.float().contiguous().cpu()
        (folder / "spinquant").mkdir()
        save_file(rot, str(folder / "spinquant" / "rotations.safetensors"))
    config_json = json.dumps(config_to_dict(result.cfg), indent=2)
    for name in ("quant_config.json", "spinquant_config.json"):  # the issue's name and CHECKPOINT.md's
        (folder / name).write_text(config_json)
    (folder / "serve.sh").write_text(serve_command(result.cfg, transform, folder.name))
    (folder / "SERVE.md").write_text(serve_markdown(result.cfg, transform, folder.name))


def export_checkpoint(result: QuantizeResult, out_dir: Path, formats: Any = ("ct",)) -> QuantizeResult:
    """Write the job folder atomically; returns the result with its export facts (its report says the bytes).

    Args:
        formats: any of "ct" (compressed-tensors, model/) and "gptq" (GPTQ v1, gptq/); "both" for both.

    Raises:
        ExportError: a format that cannot hold the job (checked before anything is written).
    """
    out_dir = Path(out_dir)
    formats = check_formats(result.cfg, formats, result.runtime is not None and result.runtime.r4 is not None)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError("out", f"{out_dir} already exists and is not empty; choose a new --out folder")
    t0 = time.perf_counter()
    cfg = result.cfg
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        src_cfg = json.loads((result.source_path / "config.json").read_text())
        src_cfg["tie_word_embeddings"] = False  # lm_head is a separate copy (rotated, norm folded)
        r4 = result.runtime.r4 if result.runtime is not None else None
        folders: list[Path] = []
        gptq_facts: dict[str, Any] | None = None
        if "ct" in formats:
            folders.append(_write_ct(result, tmp / "model", src_cfg, r4))
        if "gptq" in formats:
            gdir, gptq_facts = _write_gptq(result, tmp / "gptq", src_cfg)
            folders.append(gdir)
        facts = ExportFacts(
            seconds=0.0,
            bytes_by_folder={f.name: sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) for f in folders},
            # the command in each folder's serve.sh, also in the report so a UI can show it without a download
            serve_commands={f.name: serve_command(cfg, r4 is not None and f.name == "model", f.name).strip()
                            for f in folders},
            gptq_export=gptq_facts)
        done = dataclasses.replace(result, export=dataclasses.replace(facts, seconds=time.perf_counter() - t0))
        text = json.dumps(done.report, indent=2)
        for f in folders:
            (f / "eval_report.json").write_text(text)
        write_sums(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return done


def _write_ct(result: QuantizeResult, mdir: Path, src_cfg: dict[str, Any], r4: HadamardPlan | None) -> Path:
    """model/: compressed-tensors pack-quantized weights, config.json with its quantization_config, sidecar."""
    mdir.mkdir()
    # The full K*2^m R4 has no compressed-tensors description; our runtime still runs it.
    r4_block = (r4.block if r4.mode == "block" else None) if r4 is not None else None
    save_file(_packed_state(result, r4_block), str(mdir / "model.safetensors"), metadata={"format": "pt"})
    ct_cfg = dict(src_cfg, quantization_config=quantization_config(result.cfg, result.arch.head_dim, r4_block))
    (mdir / "config.json").write_text(json.dumps(ct_cfg, indent=2))
    _write_sidecar(mdir, result, r4 is not None)
    return mdir


def _write_gptq(result: QuantizeResult, gdir: Path, src_cfg: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """gptq/: GPTQ v1 (AutoGPTQ/GPTQModel/vLLM's gptq kernels) in float16, with quantize_config.json."""
    gdir.mkdir()
    gstate, facts = _gptq_state(result)
    save_file(gstate, str(gdir / "model.safetensors"), metadata={"format": "pt"})
    qc = gptq_quantization_config(result.cfg)
    g_cfg = dict(src_cfg, quantization_config=qc)
    for key in ("dtype", "torch_dtype"):
        if key in g_cfg or key == "dtype":
            g_cfg[key] = "float16"
    (gdir / "config.json").write_text(json.dumps(g_cfg, indent=2))
    (gdir / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    _write_sidecar(gdir, result, False)
    return gdir, facts

"""EXPORT: a compressed-tensors ``pack-quantized`` Hugging Face folder plus our sidecar, atomically.

Layout (CHECKPOINT.md §0, §1, §3)::

    <out>/model/config.json                 incl. quantization_config (+ transform_config for R4)
    <out>/model/model.safetensors           weight_packed / weight_scale / weight_shape per linear
    <out>/model/tokenizer*, generation_config.json
    <out>/model/spinquant_config.json       the exact versioned job config
    <out>/model/eval_report.json            the report (quant_ppl is this folder's perplexity)
    <out>/model/serve.sh                    the vLLM command for this scheme
    <out>/model/spinquant/rotations.safetensors   R1 and every layer's R2 (Meta's R.bin key names)
    <out>/SHA256SUMS                        every file above, written last

The folder is built in a temporary sibling, checksummed, then renamed: an interrupted export
never leaves a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from .config import SpinQuantConfig, config_to_dict, vllm_serving_verdict
from .models import decoder_linears, layer_prefix
from .packing import pack_int4_rows, pack_int4_zero_points

if TYPE_CHECKING:
    from .pipeline import QuantizeResult

CT_VERSION = "0.20.0"  # the compressed-tensors version our interop tests decompress with


class ExportError(ValueError):
    """A setting the requested format cannot hold; the message says what it accepts."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sha256sums(folder: Path) -> None:
    """``<hex>  <relative path>`` for every file (sha256sum format), written last."""
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}"
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _weight_args(cfg: SpinQuantConfig) -> dict[str, Any]:
    g = cfg.weights.group_size
    return {"num_bits": cfg.weights.bits, "type": "int", "symmetric": cfg.weights.sym,
            "strategy": "group" if g > 0 else "channel", "group_size": g if g > 0 else None,
            "dynamic": False, "actorder": "group" if (cfg.weights.gptq.act_order and g > 0) else None}


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
            "apply": [{"targets": ["re:.*down_proj$"], "location": "input", "inverse": False, "ignore": []},
                      {"targets": ["re:.*down_proj$"], "location": "weight_input", "inverse": True, "ignore": []}],
        }}}
    return {"quant_method": "compressed-tensors", "version": CT_VERSION, "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": transform}


def serve_command(cfg: SpinQuantConfig, transform: bool) -> str:
    tp = "--tensor-parallel-size 1" if transform else ""
    kv = " --kv-cache-dtype int4_per_token_head" if cfg.kv.bits == 4 else ""
    return f"vllm serve ./model {tp}{kv}".strip() + "\n"


def _packed_state(result: QuantizeResult) -> dict[str, torch.Tensor]:
    """Every tensor of the folder: packed int4 for decoder linears, model dtype for the rest."""
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
            q = res.q.to(torch.int16) if cfg.weights.sym else res.q.to(torch.int16) - 8
            state[prefix + ".weight_packed"] = pack_int4_rows(q)
            state[prefix + ".weight_scale"] = res.scale.to(lin.weight.dtype).contiguous()
            state[prefix + ".weight_shape"] = torch.tensor(list(lin.weight.shape), dtype=torch.int64)
            if not cfg.weights.sym:
                assert res.zero is not None
                state[prefix + ".weight_zero_point"] = pack_int4_zero_points(res.zero.round().to(torch.int16) - 8)
            if _weight_args(cfg)["actorder"] == "group":
                state[prefix + ".weight_g_idx"] = res.g_idx.to(torch.int32)
    for key, value in model.state_dict().items():
        if key != "inv_freq" and key not in linear_names:
            state[key] = value.detach().contiguous().cpu()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def export_checkpoint(result: QuantizeResult, out_dir: Path) -> int:
    """Write the job folder atomically; returns the bytes of the model folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new --out folder")
    cfg, arch = result.cfg, result.arch
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        mdir = tmp / "model"
        mdir.mkdir()
        save_file(_packed_state(result), str(mdir / "model.safetensors"), metadata={"format": "pt"})
        r4 = result.runtime.r4 if result.runtime is not None else None
        if r4 is not None and r4.mode != "block":
            # The full K*2^m R4 has no compressed-tensors description; our runtime still runs it.
            r4_block = None
        else:
            r4_block = r4.block if r4 is not None else None
        src_cfg = json.loads((result.source_path / "config.json").read_text())
        src_cfg["tie_word_embeddings"] = False  # lm_head is a separate copy (rotated, norm folded)
        src_cfg["quantization_config"] = quantization_config(cfg, arch.head_dim, r4_block)
        (mdir / "config.json").write_text(json.dumps(src_cfg, indent=2))
        for p in result.source_path.iterdir():
            if p.is_file() and (p.name.startswith(("tokenizer", "special_tokens", "generation_config"))
                                or p.suffix in (".model", ".tiktoken")):
                shutil.copy2(p, mdir / p.name)
        if result.r1 is not None:
            rot = {"R1": result.r1.float().contiguous().cpu()}
            for i, r2 in enumerate(result.r2s or []):
                rot[f"model.layers.{i}.self_attn.R2"] = r2.float().contiguous().cpu()
            (mdir / "spinquant").mkdir()
            save_file(rot, str(mdir / "spinquant" / "rotations.safetensors"))
        (mdir / "spinquant_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        (mdir / "serve.sh").write_text(serve_command(cfg, r4 is not None))
        size = sum(p.stat().st_size for p in mdir.rglob("*") if p.is_file())
        result.report["checkpoint_bytes"] = size
        result.report["serving"] = {"vllm": vllm_serving_verdict(cfg)}
        (mdir / "eval_report.json").write_text(json.dumps(result.report, indent=2))
        write_sha256sums(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size

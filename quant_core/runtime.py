"""Load an exported folder and run it exactly as the report evaluated it.

``load(path)`` verifies SHA256SUMS, unpacks the int4 weights, dequantizes them with the stored
scales (bit-identical to the fake-quantized weights the job evaluated) and switches on the online
R3/R4 and the activation/KV quantizers that ``quant_config.json`` records.

Example:
    >>> model, cfg, report = load("out/job")
    >>> perplexity(model, windows)   # == report["quant_ppl"]
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .checksums import SUMS, sums_problems
from .config import ConfigError, SpinQuantConfig, config_from_dict
from .errors import CheckpointError as CheckpointError
from .models import ArchSpec, DecoderLM, ModelError, arch_from_config, rope_inv_freq
from .packing import INT4_OFFSET, group_index, unpack_int4_rows, unpack_int4_zero_points
from .placement import pick_device
from .quantizers import dequantize_weight_gidx


def _folders(path: Path) -> tuple[Path, Path]:
    """(root with SHA256SUMS, model folder) for a job folder or its model/ subfolder."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path, path / "model"
    if (path / "config.json").is_file():
        return (path.parent if (path.parent / "SHA256SUMS").is_file() else path), path
    raise CheckpointError(f"{path} is not an exported checkpoint (no model/config.json or config.json)")


def verify_checksums(root: Path) -> None:
    """Every file listed in SHA256SUMS exists and matches; files not listed are refused too."""
    if not (root / SUMS).is_file():
        raise CheckpointError(f"{root} has no {SUMS}; refusing to load an unverified checkpoint")
    problems = sums_problems(root)
    if problems:
        raise CheckpointError("; ".join(problems))


def _read_json(f: Path) -> Any:
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{f.name} is not valid JSON: {exc}") from None


def load(path: str | Path, *, device: str = "cpu", verify: bool = True,
         int4_kernels: bool = True) -> tuple[DecoderLM, SpinQuantConfig, dict[str, Any]]:
    """The exported model with its online transforms and quantizers, its config and its report.

    Args:
        path: the job folder (with model/ and SHA256SUMS) or its model/ folder.
        verify: check SHA256SUMS first (on by default; a mismatch names the file).
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
        int4_kernels: where the device has PyTorch's int4 weight kernel (CPU, CUDA sm80+; weight-only,
            symmetric, bfloat16, group 32/64/128/256) run the linears on it instead of dequantized
            weights, each checked against its dequantized weight first. Not bit-exact (the kernel
            accumulates in its own order; ~2e-5 relative perplexity on the fixture); False gives the
            bit-exact dequantize-and-matmul path. Other checkpoints ignore it.
    """
    from .pipeline import build_runtime, validate_environment  # the same runtime settings as the job

    device = pick_device(device)
    root, mdir = _folders(Path(path))
    if verify:
        verify_checksums(root)
    try:
        cfg = config_from_dict(_read_json(mdir / "quant_config.json"))
        arch = arch_from_config(_read_json(mdir / "config.json"))
    except (ConfigError, ModelError) as exc:
        raise CheckpointError(f"{mdir}: {exc}") from None
    report = _read_json(mdir / "eval_report.json") if (mdir / "eval_report.json").is_file() else {}
    with torch.device("meta"):
        model = DecoderLM(arch)
    shapes = {k: v.shape for k, v in model.state_dict().items() if k != "inv_freq"}
    state: dict[str, torch.Tensor] = {}
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with safe_open(str(mdir / "model.safetensors"), framework="pt", device="cpu") as fh:
            keys = set(fh.keys())
            dtype = fh.get_tensor("model.embed_tokens.weight").dtype
            for key in shapes:
                if key in keys:
                    state[key] = fh.get_tensor(key)
                    continue
                prefix = key.removesuffix(".weight")
                if prefix + ".weight_packed" not in keys:
                    raise CheckpointError(f"model.safetensors has no {key} nor {prefix}.weight_packed")
                out_f, in_f = fh.get_tensor(prefix + ".weight_shape").tolist()
                scale = fh.get_tensor(prefix + ".weight_scale").float()
                q = unpack_int4_rows(fh.get_tensor(prefix + ".weight_packed"), in_f).to(torch.int16)
                zero = None
                if not cfg.weights.sym:
                    zero = unpack_int4_zero_points(fh.get_tensor(prefix + ".weight_zero_point"), out_f).float() + INT4_OFFSET
                    q = q + INT4_OFFSET  # back to our unsigned asymmetric codes
                g = cfg.weights.group_size
                if prefix + ".weight_g_idx" in keys:
                    g_idx = fh.get_tensor(prefix + ".weight_g_idx")
                else:
                    g_idx = group_index(in_f, g)
                state[key] = dequantize_weight_gidx(q, scale, zero, g_idx, sym=cfg.weights.sym, dtype=torch.float32).to(dtype)
                codes[prefix] = (q, scale)
    except (OSError, SafetensorError, KeyError, RuntimeError) as exc:  # truncated header, missing tensor, bad shapes
        raise CheckpointError(f"model.safetensors cannot be read: {type(exc).__name__}: {exc}") from None
    for key, t in state.items():
        if t.shape != shapes[key]:
            raise CheckpointError(f"{key} has shape {tuple(t.shape)}; config.json implies {tuple(shapes[key])}")
    model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = rope_inv_freq(arch)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    plans = validate_environment(cfg, arch)
    model.quant = build_runtime(cfg, arch, plans, a_bits=cfg.activations.bits, kv_bits=cfg.kv.bits)
    if int4_kernels and int4_kernels_apply(cfg, dtype, device, arch):
        _swap_in_int4_kernels(model, codes, cfg.weights.group_size, device)
    return model, cfg, report


def _swap_in_int4_kernels(model: DecoderLM, codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          group: int, device: str) -> None:
    """Replace each decoder linear by an Int4Linear, once its kernel agrees with the dequantized weight.

    Each is probed against the dequantized matmul first: a kernel that disagrees (a PyTorch build whose
    packing differs from ours) costs the speed, never the numbers. Then the dequantized copies are freed.
    """
    kernels: dict[str, Int4Linear] = {}
    for prefix, (q, scale) in codes.items():
        old = model.get_submodule(prefix)
        assert isinstance(old, torch.nn.Linear), prefix
        lin = Int4Linear(q, scale, group, old.bias, device)
        err = kernel_error(lin, old.weight)
        if not err <= KERNEL_TOLERANCE:  # also catches NaN
            warnings.warn(f"PyTorch's int4 kernel disagrees with {prefix}'s dequantized weight (relative error "
                          f"{err:.3g} > {KERNEL_TOLERANCE}); running every linear dequantized instead", stacklevel=3)
            return
        kernels[prefix] = lin
    for prefix, lin in kernels.items():
        parent_name, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lin)


INT4_GROUPS = (32, 64, 128, 256)  # group sizes PyTorch's int4 weight kernels accept (CPU and CUDA)
KERNEL_TOLERANCE = 2e-2  # relative error vs the dequantized matmul above which a kernel is not trusted


class Int4Linear(torch.nn.Module):
    """A symmetric int4 weight-only Linear on PyTorch's int4 kernel (bfloat16 activations).

    Both kernels compute x @ ((u - 8) * scale + zero)^T with u the unsigned nibble, so our signed
    codes q map to u = q + 8 with zero = 0; the weight never exists dequantized in memory.
    CPU: ``_weight_int4pack_mm_for_cpu`` on (out, in) int32 nibbles. CUDA (sm80+):
    ``_weight_int4pack_mm`` (tinygemm) on (out, in/2) uint8 bytes, even column in the high nibble.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, group: int, bias: torch.Tensor | None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        assert q.ndim == 2 and group in INT4_GROUPS and q.shape[1] % group == 0, (tuple(q.shape), group)
        self.out_features, self.in_features, self.group = q.shape[0], q.shape[1], group
        self.cuda_kernel = torch.device(device).type == "cuda"
        u = (q.to(torch.int32) + INT4_OFFSET).contiguous()  # (out, in) unsigned 0..15
        if self.cuda_kernel:
            u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)  # (out, in) -> (out, in/2)
            packed = torch.ops.aten._convert_weight_to_int4pack(u8.to(device), cuda_inner_k_tiles(self.in_features))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        self.register_buffer("packed", packed)
        # (out, in/g) scales -> (in/g, out, 2) [scale, zero] as both kernels expect
        sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1)
        self.register_buffer("scale_zero", sz.to(device=device, dtype=torch.bfloat16).contiguous())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        mm = torch.ops.aten._weight_int4pack_mm if self.cuda_kernel else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed, self.group, self.scale_zero)  # (N, in) -> (N, out)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def cuda_inner_k_tiles(in_features: int) -> int:
    """The largest tinygemm K tiling (2, 4 or 8 tiles of 16) that divides in_features."""
    return next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)


def kernel_error(lin: Int4Linear, weight: torch.Tensor, seed: int = 0) -> float:
    """Relative error of the kernel against x @ weight^T in float32, on a seeded probe batch.

    bf16 activations alone give ~4e-3; a wrong packing or layout gives O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, lin.in_features, generator=gen).to(weight.device)  # (8, in)
    ref = x.to(torch.bfloat16).float() @ weight.float().t()
    got = lin(x.to(torch.bfloat16)).float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def int4_kernels_apply(cfg: SpinQuantConfig, dtype: torch.dtype, device: str, arch: ArchSpec) -> bool:
    """PyTorch's int4 kernel fits: weight-only, symmetric, a supported group, bf16 model, and a device
    that has it (CPU, or CUDA sm80+ with every linear's out a multiple of 8 and in of 32)."""
    g = cfg.weights.group_size
    fits = (dtype == torch.bfloat16 and cfg.weights.bits == 4 and cfg.weights.sym
            and cfg.activations.bits == 16 and g in INT4_GROUPS and not cfg.weights.permutes_groups)
    kind = torch.device(device).type
    if not fits or kind not in ("cpu", "cuda"):
        return False
    if kind == "cuda":
        if torch.cuda.get_device_capability(torch.device(device))[0] < 8:
            return False
        if any(o % 8 or i % 32 for o, i in arch.linear_shapes().values()):
            return False
    return True


@torch.no_grad()
def generate(model: DecoderLM, ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding (full recompute per token: simple and exactly the evaluated forward).

    ``ids`` (B, T) may live anywhere; the result (B, T + new) is on the model's device.
    """
    ids = ids.to(model.lm_head.weight.device)
    for _ in range(max_new_tokens):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
    return ids

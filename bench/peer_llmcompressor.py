"""Peer benchmark: llm-compressor's SpinQuant + GPTQ at W4A4 on our fixture, with our PPL protocol.

Runs in its OWN virtual environment (llm-compressor pins its own transformers), so it must not
import quant_core; the few protocol pieces it needs (tokenisation, windows, perplexity) are
re-implemented here exactly as SPINQUANT.md §8-9 and quant_core/calibration.py define them:

- eval: test text tokenised once with add_special_tokens=False (no BOS), non-overlapping
  256-token windows, tail dropped, each window scored alone, PPL = exp(mean next-token NLL);
- calibration: train text with one BOS prepended to the whole text, 64 windows of 256 tokens at
  offsets torch.randint(0, n - 256, (64,), generator=torch.Generator().manual_seed(0)).

Setup (once, outside the repo; torch is pinned so pip never swaps in a CUDA build):

    python3 -m venv /work/llmc-venv
    /work/llmc-venv/bin/pip install torch==2.13.0          # resolves to the local CPU wheel
    echo "torch==2.13.0" > /work/llmc-constraints.txt
    /work/llmc-venv/bin/pip install -c /work/llmc-constraints.txt llmcompressor==0.14.0.1
    # -> llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu

Run (from the repo root):

    /work/llmc-venv/bin/python bench/peer_llmcompressor.py \\
        --model tests/fixtures/models/llama-outlier --json runs/bench/peer.json

Recipe of the headline number ("w4a4_ppl"):

    SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="hadamard",
                      transform_block_size=128)
    GPTQModifier(config_groups={"group_0": W4A4 with per-channel weights}, ignore=["lm_head"])

- W4A4 here = int4 symmetric static per-output-channel weights + int4 symmetric dynamic
  per-token input activations on every Linear but lm_head: the scheme our `spinquant-vllm`
  preset evaluates. compressed-tensors 0.19's "W4A4" preset uses group-128 weights instead; it is
  run as the variant "preset_w4a4" (the literal `scheme="W4A4"` of the issue).
- R4: llm-compressor's deterministic "hadamard" is Sylvester-only (power-of-two sizes). With no
  block size it needs a d_ff-sized matrix and fails on d_ff = 384 = 12*32 (variant
  "r4_full_hadamard" records the error). transform_block_size=128 gives a block-diagonal
  Sylvester R4 of three 128-blocks, the same R4 as our `block:128` mode; R1 (hidden 128) is a full
  128 Hadamard either way and R2 always uses head_dim (32).
- GPTQModifier defaults are kept (actorder "static", dampening 0.01, block 128, min-max weight
  observer, no MSE clip search); calibration goes through llm-compressor's sequential pipeline
  with activation quantization disabled, as ours.

The quantized model is evaluated in memory (fake quant through compressed-tensors' quantized
forward, R4 as its online forward pre-hook on down_proj). `checks` in the JSON proves both are in
the forward: every quantized Linear's input leaves `forward_quantize` with at most 16 distinct
values per token, the down_proj input equals blockdiag(H_128)/sqrt(128) applied to silu(gate)*up,
and the PPL changes when activation quantization or the online R4 is switched off.

JSON: {"peer", "compressed_tensors", "transformers", "torch", "fp_ppl", "w4a4_ppl", "recipe",
"seconds", "checks", "variants": {name: {"recipe", "w4a4_ppl" | "error", "seconds", ...}}}
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SEQ_LEN = 256
CALIB_SAMPLES = 64
SEED = 0


# ----------------------------------------------------------------------------- protocol


def encode(tokenizer: Any, text: str, bos: bool) -> torch.Tensor:
    """The whole text as one 1-D int64 tensor; optionally one BOS before it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, seq_len: int = SEQ_LEN, max_windows: int = 0) -> torch.Tensor:
    n = tokens.numel() // seq_len
    if max_windows:
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len)  # (N, L), tail dropped; the first max_windows when > 0


def calibration_windows(tokens: torch.Tensor, samples: int = CALIB_SAMPLES, seq_len: int = SEQ_LEN,
                        seed: int = SEED) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])  # (samples, L)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token NLL) over (N, L) windows, each window scored on its own."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits  # (b, L, V)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll.double())
        count += ids[:, 1:].numel()
    return math.exp(total / count)


# ----------------------------------------------------------------------------- llm-compressor


def w4a16_group(group_size: int) -> dict[str, Any]:
    """config_groups for the W4A16 preset's weights (int4 sym static groups) at another group size: SmolLM2's
    hidden 576 is not a multiple of 128, so its preset's group 128 cannot apply there (a ValueError)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size, dynamic=False))}


def w4a4_groups(weight_strategy: str) -> dict[str, Any]:
    """config_groups for int4 sym static weights (per channel) + int4 sym dynamic per-token inputs."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    assert weight_strategy.startswith("channel"), weight_strategy
    return {
        "group_0": QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel", dynamic=False),
            input_activations=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="token",
                                               dynamic=True),
        )
    }


# name -> (SpinQuant kwargs or None for no rotation, weight scheme: "channel", "preset", "channel-noactorder"
# or "w4a16-g128" / "w4a16-g64" (the W4A16 preset: int4 symmetric group weights, activations unquantized))
VARIANTS: dict[str, tuple[dict[str, Any] | None, str]] = {
    "main": (dict(rotations=["R1", "R2", "R4"], transform_type="hadamard", transform_block_size=128), "channel"),
    "main_actorder_off": (dict(rotations=["R1", "R2", "R4"], transform_type="hadamard", transform_block_size=128),
                          "channel-noactorder"),
    "preset_w4a4": (dict(rotations=["R1", "R2", "R4"], transform_type="hadamard", transform_block_size=128),
                    "preset"),
    "r4_full_hadamard": (dict(rotations=["R1", "R2", "R4"], transform_type="hadamard"), "channel"),
    "r1r2_only": (dict(rotations=["R1", "R2"], transform_type="hadamard"), "channel"),
    "r4_full_random_hadamard": (dict(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"), "channel"),
    "gptq_w4a16_g128": (None, "w4a16-g128"),
    "gptq_w4a16_g64": (None, "w4a16-g64"),
}


def make_recipe(spin_kwargs: dict[str, Any] | None, weights: str) -> tuple[list[Any], str]:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier

    if weights == "w4a16-g128":  # plain GPTQ with the tool's defaults for its W4A16 preset
        gptq = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
        return [gptq], 'GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])  # group-128 sym, defaults'
    if weights == "w4a16-g64":  # the same at group 64 (what divides a 576 hidden size), the tool's other defaults
        gptq = GPTQModifier(config_groups=w4a16_group(64), ignore=["lm_head"])
        return [gptq], 'GPTQModifier(config_groups={"group_0": W4A16 preset weights, group_size=64}, ignore=["lm_head"])'
    assert spin_kwargs is not None
    spin = SpinQuantModifier(**spin_kwargs)
    if weights == "preset":
        gptq = GPTQModifier(targets="Linear", scheme="W4A4", ignore=["lm_head"])
        gptq_txt = 'GPTQModifier(targets="Linear", scheme="W4A4", ignore=["lm_head"])  # CT preset: group-128 weights'
    else:
        extra = {"actorder": None} if weights == "channel-noactorder" else {}
        gptq = GPTQModifier(config_groups=w4a4_groups(weights), ignore=["lm_head"], **extra)
        gptq_txt = ('GPTQModifier(config_groups={"group_0": {targets: ["Linear"], weights: int4 sym channel static, '
                    'input_activations: int4 sym token dynamic}}, ignore=["lm_head"]'
                    + (", actorder=None" if extra else "") + ")")
    spin_txt = "SpinQuantModifier(" + ", ".join(f"{k}={v!r}" for k, v in spin_kwargs.items()) + ")"
    return [spin, gptq], f"[{spin_txt}, {gptq_txt}]"


def run_oneshot(model: torch.nn.Module, tokenizer: Any, calib: torch.Tensor, recipe: list[Any]) -> None:
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    # A ready DataLoader is used as is by oneshot (no re-tokenisation, no shuffling, no truncation).
    rows = [{"input_ids": w[None], "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)} for w in calib]
    loader = DataLoader(rows, batch_size=None, shuffle=False)
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=loader, pipeline="independent")


# ----------------------------------------------------------------------------- verification


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert h.shape[0] == n, n
    return h


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None}


@torch.no_grad()
def verify(model: torch.nn.Module, windows: torch.Tensor, block: int | None, w4a4_ppl: float) -> dict[str, Any]:
    """Prove activation fake quant and the online R4 act in the evaluated forward (see module doc)."""
    import compressed_tensors.quantization.lifecycle.forward as ct_forward
    from compressed_tensors.quantization import disable_quantization, enable_quantization

    checks: dict[str, Any] = {}
    qlin = quantized_linears(model)
    checks["quantized_linears"] = len(qlin)
    checks["lm_head_quantized"] = "lm_head" in qlin
    schemes = {n: m.quantization_scheme for n, m in qlin.items()}
    ia = {(s.input_activations.num_bits, str(s.input_activations.strategy), s.input_activations.symmetric,
           s.input_activations.dynamic) if s.input_activations else None for s in schemes.values()}
    wa = {(s.weights.num_bits, str(s.weights.strategy), s.weights.group_size, s.weights.symmetric,
           str(getattr(s.weights.actorder, "value", s.weights.actorder))) for s in schemes.values()}
    checks["input_activation_args"] = sorted(map(str, ia))
    checks["weight_args"] = sorted(map(str, wa))
    checks["quantization_status"] = sorted({str(getattr(m, "quantization_status", None)) for m in qlin.values()})
    checks["quantization_enabled"] = all(getattr(m, "quantization_enabled", True) for m in qlin.values())

    # 1) Every quantized Linear's input passes forward_quantize and is on a 4-bit grid per token.
    seen: dict[int, int] = {}
    max_levels = 0
    orig_fq = ct_forward.forward_quantize

    def counting_fq(module, value, base_name, args):
        nonlocal max_levels
        out = orig_fq(module, value, base_name, args)
        if base_name == "input":
            seen[id(module)] = seen.get(id(module), 0) + 1
            rows = out.reshape(-1, out.shape[-1])[:64]
            max_levels = max(max_levels, max(int(torch.unique(r).numel()) for r in rows))
        return out

    # 2) The down_proj input after the online R4 equals blockdiag(H_b)/sqrt(b) applied to silu(gate)*up.
    downs = {n: m for n, m in qlin.items() if n.endswith("down_proj")}
    raw: dict[str, torch.Tensor] = {}
    rotated: dict[str, torch.Tensor] = {}
    handles = []
    for n, m in downs.items():
        # prepend=True puts ours before compressed-tensors' R4 hook (also prepended, earlier); the
        # appended one sees the input after every pre-hook, i.e. what the quantized forward gets.
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: raw.__setitem__(n, a[0].clone()), prepend=True))
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: rotated.__setitem__(n, a[0].clone())))
    try:
        with patched(ct_forward, "forward_quantize", counting_fq):
            model(input_ids=windows[:1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    checks["linears_with_input_fake_quant"] = sum(1 for m in qlin.values() if id(m) in seen)
    checks["max_distinct_values_per_token_after_input_quant"] = max_levels
    checks["down_proj_has_R4_input_module"] = all(hasattr(m, "R4_input") for m in downs.values())
    if block and downs:
        hb = sylvester(block) / math.sqrt(block)
        errs = []
        for n in downs:
            x = raw[n].double()
            y = (x.unflatten(-1, (-1, block)) @ hb).flatten(-2)  # x · blockdiag(H_b)/sqrt(b)
            errs.append(float((y - rotated[n].double()).abs().max() / x.abs().max()))
        checks["r4_block"] = block
        checks["r4_max_rel_err_vs_own_blockdiag_hadamard"] = max(errs)
    else:
        checks["r4_input_changed_by_hook"] = any(not torch.equal(raw[n], rotated[n]) for n in downs)

    # 3) The PPL depends on both: activation quant off (weights stay GPTQ-quantized) / online R4 off.
    model.apply(disable_quantization)
    try:
        checks["ppl_act_quant_off_w4a16"] = perplexity(model, windows)
    finally:
        model.apply(enable_quantization)
    if downs and all(hasattr(m, "R4_input") for m in downs.values()):
        with contextlib.ExitStack() as stack:
            for m in downs.values():
                stack.enter_context(patched(m.R4_input, "forward", lambda v: v))
            checks["ppl_online_r4_bypassed"] = perplexity(model, windows)
    checks["ppl_recheck"] = perplexity(model, windows)
    checks["ppl_recheck_matches"] = abs(checks["ppl_recheck"] - w4a4_ppl) <= 1e-9 * w4a4_ppl
    return checks


# ----------------------------------------------------------------------------- main


def run_variant(name: str, load: Callable[[], torch.nn.Module], tokenizer: Any, calib: torch.Tensor,
                windows: torch.Tensor, with_checks: bool, fp_seconds: float) -> dict[str, Any]:
    spin_kwargs, weights = VARIANTS[name]
    recipe, recipe_txt = make_recipe(spin_kwargs, weights)
    out: dict[str, Any] = {"recipe": recipe_txt}
    t_load = time.perf_counter()
    model = load()
    out["load_seconds"] = round(time.perf_counter() - t_load, 1)
    t0 = time.perf_counter()
    try:
        run_oneshot(model, tokenizer, calib, recipe)
    except Exception as exc:  # a recipe the installed version cannot apply: record it, go on
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["seconds"] = round(time.perf_counter() - t0, 1)
        return out
    out["oneshot_seconds"] = round(time.perf_counter() - t0, 1)
    wargs = [m.quantization_scheme.weights for m in quantized_linears(model).values()]
    out["weight_args"] = sorted({f"strategy={getattr(w.strategy, 'value', w.strategy)} group_size={w.group_size} "
                                 f"actorder={getattr(w.actorder, 'value', w.actorder)}" for w in wargs})
    t_eval = time.perf_counter()
    out["ppl"] = out["w4a4_ppl"] = perplexity(model, windows)
    out["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    # What our pipeline's timings_s.total covers: load, FP evaluation, rotation + calibration + GPTQ, evaluation.
    out["wall_s"] = round(out["load_seconds"] + fp_seconds + out["seconds"], 1)
    if with_checks and spin_kwargs is not None:
        out["checks"] = verify(model, windows, spin_kwargs.get("transform_block_size") if "R4" in
                               spin_kwargs["rotations"] else None, out["w4a4_ppl"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tests/fixtures/models/llama-outlier")
    ap.add_argument("--calib-text", default="tests/fixtures/text/train.txt")
    ap.add_argument("--eval-text", default="tests/fixtures/text/test.txt")
    ap.add_argument("--json", default="runs/bench/peer.json")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list from {list(VARIANTS)}; 'main' gives w4a4_ppl (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES)
    ap.add_argument("--eval-windows", type=int, default=0, help="the first N evaluation windows (0: all)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import compressed_tensors
    import llmcompressor
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_all = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = eval_windows(encode(tokenizer, Path(args.eval_text).read_text(encoding="utf-8"), bos=False),
                           args.seq_len, args.eval_windows)
    calib = calibration_windows(encode(tokenizer, Path(args.calib_text).read_text(encoding="utf-8"), bos=True),
                                args.calib_samples, args.seq_len)
    dtype = getattr(torch, args.dtype)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()

    t0 = time.perf_counter()
    fp_ppl = perplexity(load(), windows)
    fp_seconds = time.perf_counter() - t0

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = {}
    for name in names:
        print(f"--- variant {name}", flush=True)
        variants[name] = run_variant(name, load, tokenizer, calib, windows, with_checks=(name == "main"),
                                     fp_seconds=fp_seconds)
        print(json.dumps({k: v for k, v in variants[name].items() if k != "checks"}), flush=True)

    main_v = variants.get("main", {})
    report = {
        "peer": f"llmcompressor {llmcompressor.__version__}",
        "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "model": args.model,
        "model_sha256": hashlib.sha256((Path(args.model) / "model.safetensors").read_bytes()).hexdigest(),
        "dtype": args.dtype,
        "eval": {"text": args.eval_text, "seq_len": args.seq_len, "windows": int(windows.shape[0]), "bos": False},
        "calib": {"text": args.calib_text, "seq_len": args.seq_len, "samples": args.calib_samples, "seed": SEED,
                  "bos": True},
        "fp_ppl": fp_ppl,
        "fp_seconds": round(fp_seconds, 1),
        "w4a4_ppl": main_v.get("w4a4_ppl"),
        "recipe": main_v.get("recipe"),
        "seconds": main_v.get("seconds"),
        "checks": main_v.get("checks"),
        "variants": {k: {kk: vv for kk, vv in v.items() if kk != "checks"} for k, v in variants.items()},
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"\n{report['peer']}  compressed-tensors {report['compressed_tensors']}  "
          f"transformers {report['transformers']}  torch {report['torch']}")
    print(f"{'variant':<26} {'ppl':>12} {'wall s':>9}")
    print(f"{'fp32':<26} {fp_ppl:>12.4f} {fp_seconds:>9.1f}")
    for name, v in variants.items():
        ppl = f"{v['w4a4_ppl']:.4f}" if "w4a4_ppl" in v else "error"
        print(f"{name:<26} {ppl:>12} {v.get('wall_s', v['seconds']):>9.1f}")
        if "error" in v:
            print(f"    {v['error'][:200]}")
    if report["checks"]:
        print("checks:", json.dumps(report["checks"], indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

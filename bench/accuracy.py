"""Accuracy benchmark: the paper's table shape on the outlier fixture, on CPU.

Runs methods rtn, gptq, quarot, spinquant at W4A16KV16, W4A4KV16, W4A4KV4, plus learned vs random
Hadamard rotations for three seeds and spinquant with SpinQuant's plain STE (train.ste=identity) at
W4A4KV4, prints a table and writes JSON:
    {"<method>": {"<WxAyKVz>": {"ppl": x, "seconds": s}}, "fp": {"ppl": x},
     "learned_vs_random": {...}, "spinquant_identity_ste": {"W4A4KV4": {...}}, "checks": {...},
     "total_seconds": s}

The default model is tests/fixtures/models/llama-massive: a constant massive residual direction that
norm folding cannot remove (what R1 is for) plus injected channel outliers (unrotated W4A4 collapses).

    .venv/bin/python bench/accuracy.py --json runs/bench/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quant_core.config import make_config  # noqa: E402
from quant_core.pipeline import quantize_model  # noqa: E402

METHODS = ("rtn", "gptq", "quarot", "spinquant")
SETTINGS = {"W4A16KV16": (4, 16, 16), "W4A4KV16": (4, 4, 16), "W4A4KV4": (4, 4, 4)}


def run(model: str, method: str, bits: tuple[int, int, int], seed: int, args: argparse.Namespace,
        steps: int | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    w, a, kv = bits
    cfg = make_config(
        method, w_bits=w, a_bits=a, kv_bits=kv, seed=seed, seq_len=args.seq_len,
        calib_source=f"file:{args.calib_text}", eval_source=f"file:{args.eval_text}",
        calib_samples=args.calib_samples, train_samples=args.train_samples,
        steps=args.steps if steps is None else steps, eval_windows=args.eval_windows, device="cpu",
        micro_batch=args.micro_batch, settings={"train.checkpoint_layers": False, **(settings or {})},
    )
    t0 = time.perf_counter()
    rep = quantize_model(model, cfg).report
    return {"ppl": rep["quant_ppl"], "fp_ppl": rep["fp_ppl"], "seconds": time.perf_counter() - t0,
            "loss_curve": rep["loss_curve"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--model", default=str(ROOT / "tests/fixtures/models/llama-massive"))
    p.add_argument("--calib-text", default=str(ROOT / "tests/fixtures/text/train.txt"))
    p.add_argument("--eval-text", default=str(ROOT / "tests/fixtures/text/test.txt"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=800)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per learning forward (8 = the whole batch)")
    p.add_argument("--eval-windows", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    out: dict[str, Any] = {m: {} for m in METHODS}
    fp = None
    print(f"{'method':<10} {'setting':<10} {'ppl':>9} {'vs FP':>8} {'seconds':>8}", flush=True)
    for method in METHODS:
        for name, bits in SETTINGS.items():
            r = run(args.model, method, bits, 0, args)
            fp = r["fp_ppl"] if fp is None else fp
            assert abs(r["fp_ppl"] - fp) < 1e-6 * fp, "FP perplexity must not depend on the method"
            out[method][name] = {"ppl": r["ppl"], "seconds": r["seconds"]}
            if method == "spinquant":
                out[method][name]["loss_curve"] = r["loss_curve"]
            print(f"{method:<10} {name:<10} {r['ppl']:9.3f} {r['ppl'] / fp:7.3f}x {r['seconds']:8.1f}", flush=True)
    out["fp"] = {"ppl": fp}
    print(f"{'fp':<10} {'W16A16':<10} {fp:9.3f}", flush=True)

    # Learned vs random Hadamard: same quantizers, same seed; random = no learning steps.
    seeds = [int(s) for s in args.seeds.split(",")]
    lvr = {}
    print(f"\n{'seed':<6} {'random':>9} {'learned':>9}  (spinquant W4A4KV4)", flush=True)
    for seed in seeds:
        learned = out["spinquant"]["W4A4KV4"]["ppl"] if seed == 0 else run(args.model, "spinquant", (4, 4, 4), seed, args)["ppl"]
        random_ = run(args.model, "spinquant", (4, 4, 4), seed, args, steps=0)["ppl"]
        lvr[str(seed)] = {"random_ppl": random_, "learned_ppl": learned}
        print(f"{seed:<6} {random_:9.3f} {learned:9.3f}", flush=True)
    out["learned_vs_random"] = lvr
    plain = run(args.model, "spinquant", (4, 4, 4), 0, args, settings={"train.ste": "identity"})
    out["spinquant_identity_ste"] = {"W4A4KV4": {"ppl": plain["ppl"], "seconds": plain["seconds"]}}
    print(f"\nspinquant W4A4KV4 seed 0 with SpinQuant's plain STE (train.ste=identity): {plain['ppl']:.3f} "
          f"({plain['ppl'] / fp:.3f}x)", flush=True)

    assert fp is not None
    gap = lambda m, s: out[m][s]["ppl"] / fp - 1  # noqa: E731
    checks = {
        "no_rotation_w4a4_at_least_10x_fp": min(out["rtn"]["W4A4KV16"]["ppl"], out["gptq"]["W4A4KV16"]["ppl"]) >= 10 * fp,
        "quarot_w4a4kv4_within_15pct": gap("quarot", "W4A4KV4") <= 0.15,
        "spinquant_gap_at_most_0.6x_quarot": gap("spinquant", "W4A4KV4") <= 0.6 * gap("quarot", "W4A4KV4"),
        "spinquant_w4a16_within_2pct": gap("spinquant", "W4A16KV16") <= 0.02,
        "learned_beats_random_all_seeds": all(v["learned_ppl"] < v["random_ppl"] for v in lvr.values()),
    }
    out["checks"] = checks
    out["total_seconds"] = time.perf_counter() - t_all
    print("\nchecks:", flush=True)
    for k, v in checks.items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    print(f"total {out['total_seconds']:.0f}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark on a real pretrained model: SmolLM2-135M-Instruct (built by tests/fixtures/smollm2.py).

Every quantization run is the command a user types (``python -m quant_core quantize ...``) in its own
process, so its seconds and its peak resident memory (os.wait4) are its own. Every run uses the same
windows: evaluation = the first --eval-windows non-overlapping windows of --seq-len tokens of the fixture's
English test text; calibration = --calib-samples windows of the train text (seed 0); learning = --steps
Cayley steps of --batch-size sequences from the start of the train text, after the R1 pre-fit.

Sections (``--sections``, default all), each a table on stdout and a key in the JSON:
  grid    FP and rtn, gptq, quarot, spinquant at W4A16KV16 (per channel, g64: SmolLM2's hidden size 576 is
          not a multiple of 128, so g128 cannot apply to its q/k/v/o/gate/up inputs), W8A8KV8, W4A8KV8, W4A4KV16,
          W4A4KV4: perplexity, gap to FP, seconds, peak RSS
  seeds   quarot and spinquant W4A4KV4 for every --seeds: the share of quarot's gap spinquant closes
  curve   spinquant W4A4KV4 (seed 0) at --curve R1 pre-fit steps, and --curve-steps end-to-end steps after the
          default pre-fit: how the gain grows with the learning budget
  speed   seconds per learning step at (--batch-size, --seq-len), the share spent in the lm_head, beside a
          plain transformers forward+backward of the same batch
  memory  quarot and spinquant W4A4KV4 in float32 with export, learning at the default micro-batch (1): peak
          RSS against 3x the float32 model bytes,
          and quant_core.plan's prediction beside each stage's measured peak
  peers   llm-compressor 0.14 (its own venv: bench/peer_llmcompressor.py) SpinQuantModifier + GPTQ at W4A4KV16
          and GPTQ W4A16 g128 (its preset: refused on this model, recorded) and g64; GPTQModel (its own venv:
          bench/peer_gptqmodel.py --quantize) GPTQ W4A16 g64;
          beside our quarot W4A4KV16 and gptq W4A16 g64 on the same windows, with the wall-time ratio

    .venv/bin/python bench/real.py --json runs/bench/real.json            # or: make bench-real
    .venv/bin/python bench/real.py --sections grid,seeds --json runs/bench/real-grid.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quant_core.config import make_config  # noqa: E402
from quant_core.plan import Shape, stage_memory  # noqa: E402
from tests.fixtures import smollm2  # noqa: E402

MiB = 1 << 20
TRAIN = ROOT / "tests" / "fixtures" / "text" / "train.txt"
TEST = ROOT / "tests" / "fixtures" / "text" / "test.txt"
SETTINGS = {  # name -> (w_bits, a_bits, kv_bits, w_group_size)
    "W4A16KV16": (4, 16, 16, -1),
    "W4A16KV16-g64": (4, 16, 16, 64),
    "W8A8KV8": (8, 8, 8, -1),
    "W4A8KV8": (4, 8, 8, -1),
    "W4A4KV16": (4, 4, 16, -1),
    "W4A4KV4": (4, 4, 4, -1),
}
METHODS = ("spinquant", "quarot", "gptq", "rtn")
SECTIONS = ("seeds", "memory", "speed", "peers", "curve", "grid")  # the default order: the grid last (longest)
DEFAULT_PREFIT = make_config("spinquant").train.prefit_steps


def cli_args(args: argparse.Namespace, method: str, setting: str, *, seed: int = 0, steps: int | None = None,
             dtype: str | None = None, micro_batch: int | None = None, extra: list[str] | None = None) -> list[str]:
    w, a, kv, g = SETTINGS[setting]
    out = ["--method", method, "--w-bits", str(w), "--a-bits", str(a), "--kv-bits", str(kv),
           "--w-group-size", str(g), "--seq-len", str(args.seq_len), "--calib-text", str(TRAIN),
           "--calib-samples", str(args.calib_samples), "--eval-text", str(TEST), "--eval-windows",
           str(args.eval_windows), "--seed", str(seed), "--device", "cpu", "--dtype", dtype or args.dtype,
           "--steps", str(args.steps if steps is None else steps), "--batch-size", str(args.batch_size),
           "--micro-batch", str(micro_batch or args.micro_batch)]
    return out + (extra or [])


def run_cli(model: Path, argv: list[str], tag: str) -> dict[str, Any]:
    """One quantize run in its own process: its report, wall seconds and peak resident memory."""
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "quant_core", "quantize", str(model), *argv, "--no-progress",
               "--report-json", str(report_path)]
        t0 = time.perf_counter()
        with open(Path(tmp) / "log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            tail = (Path(tmp) / "log").read_text()[-3000:]
            raise RuntimeError(f"{tag}: quantize failed (exit {os.waitstatus_to_exitcode(status)}):\n{tail}")
        report = json.loads(report_path.read_text())
    # ru_maxrss alone is the high-water mark since the stage meter's last reset (clear_refs resets it too): the
    # job's peak is the larger of it and the report's (the meter's maximum over every stage)
    return {"report": report, "wall_s": wall, "peak_rss_mb": max(usage.ru_maxrss / 1024.0, report["peak_rss_mb"])}


RUNS: dict[tuple[str, ...], dict[str, Any]] = {}  # argv -> summary: a run two sections share is run once


def run(model: Path, argv: list[str], tag: str) -> dict[str, Any]:
    """The summary of one quantize run; the same arguments in another section reuse it."""
    key = tuple(argv)
    if key not in RUNS:
        RUNS[key] = summary(run_cli(model, argv, tag))
    return RUNS[key]


def summary(run: dict[str, Any]) -> dict[str, Any]:
    rep = run["report"]
    return {"ppl": rep["quant_ppl"], "fp_ppl": rep["fp_ppl"], "gap": rep["quant_ppl"] / rep["fp_ppl"] - 1,
            "wall_s": round(run["wall_s"], 1), "timings_s": {k: round(v, 1) for k, v in rep["timings_s"].items()},
            "peak_rss_mb": round(run["peak_rss_mb"], 1), "loss_curve": rep.get("loss_curve", []),
            "invariance": rep["rotation"].get("invariance_max_abs_logit_diff"), "memory_mb": rep.get("memory_mb"),
            "prefit_steps": rep["rotation"].get("prefit_steps", 0)}


def section_grid(args: argparse.Namespace, model: Path, out: dict[str, Any]) -> None:
    grid: dict[str, dict[str, Any]] = {}
    out["grid"] = grid  # filled row by row; main writes the JSON after every section, save() after every row
    print(f"\n{'method':<10} {'setting':<15} {'ppl':>9} {'gap':>8} {'wall s':>8} {'peak MB':>8}", flush=True)
    fp = None
    for method in METHODS:
        for setting in SETTINGS:
            r = run(model, cli_args(args, method, setting), f"{method} {setting}")
            fp = r["fp_ppl"] if fp is None else fp
            grid.setdefault(method, {})[setting] = r
            print(f"{method:<10} {setting:<15} {r['ppl']:9.3f} {r['gap']:+7.1%} {r['wall_s']:8.1f} "
                  f"{r['peak_rss_mb']:8.0f}", flush=True)
            save(args, out)
    print(f"{'fp':<10} {'':<15} {fp:9.3f}")
    out["fp_ppl"] = fp


def closed(spin: float, quarot: float, fp: float) -> float:
    """Share of quarot's gap to FP that spinquant closes."""
    return 1.0 - (spin - fp) / (quarot - fp)


def section_seeds(args: argparse.Namespace, model: Path, out: dict[str, Any]) -> None:
    rows: dict[str, dict[str, Any]] = {}
    print(f"\n{'seed':<5} {'quarot':>9} {'spinquant':>10} {'closed':>7}   (W4A4KV4, {args.steps} steps)", flush=True)
    for seed in args.seeds:
        q = run(model, cli_args(args, "quarot", "W4A4KV4", seed=seed), f"quarot seed {seed}")
        s = run(model, cli_args(args, "spinquant", "W4A4KV4", seed=seed), f"spinquant seed {seed}")
        c = closed(s["ppl"], q["ppl"], s["fp_ppl"])
        rows[str(seed)] = {"quarot": q, "spinquant": s, "closed": c}
        print(f"{seed:<5} {q['ppl']:9.3f} {s['ppl']:10.3f} {c:7.1%}", flush=True)
    out["seeds"] = {"steps": args.steps, "rows": rows, "all_at_least_40pct": all(r["closed"] >= 0.4 for r in rows.values())}


def section_curve(args: argparse.Namespace, model: Path, out: dict[str, Any]) -> None:
    """How the gain grows with the learning budget: the R1 pre-fit's steps (--curve, with --steps end-to-end
    steps after it), then --curve-steps end-to-end steps after the default pre-fit."""
    q = run(model, cli_args(args, "quarot", "W4A4KV4"), "quarot")
    rows = {}
    print(f"\n{'pre-fit':>7} {'steps':>6} {'ppl':>9} {'closed':>7} {'learn s':>8}   (spinquant W4A4KV4, seed 0; "
          f"quarot {q['ppl']:.3f})", flush=True)
    points = [(p, args.steps) for p in args.curve] + [(None, s) for s in args.curve_steps]
    for prefit, steps in points:
        default = prefit is None or prefit == DEFAULT_PREFIT  # the seeds section's seed-0 run
        extra = [] if default else ["--set", f"train.prefit_steps={prefit}"]
        r = run(model, cli_args(args, "spinquant", "W4A4KV4", steps=steps, extra=extra),
                f"curve prefit {prefit} steps {steps}")
        prefit_done = r["prefit_steps"]
        key = f"prefit{prefit_done}+steps{steps}"
        rows[key] = {**r, "closed": closed(r["ppl"], q["ppl"], r["fp_ppl"]), "steps": steps}
        print(f"{prefit_done:7d} {steps:6d} {r['ppl']:9.3f} {rows[key]['closed']:7.1%} "
              f"{r['timings_s'].get('learn', 0):8.1f}", flush=True)
    out["curve"] = {"quarot_ppl": q["ppl"], "rows": rows}


def section_speed(args: argparse.Namespace, model: Path, out: dict[str, Any]) -> None:
    """Learning step timing in this process (no pipeline around it), and plain transformers beside it."""
    cmd = [sys.executable, str(ROOT / "bench" / "learn_step.py"), "--model", str(model), "--dtype", args.dtype,
           "--batch-size", str(args.batch_size), "--micro-batch", str(args.micro_batch), "--seq-len",
           str(args.seq_len), "--json", "-"]
    res = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    out["speed"] = res
    print(f"\nlearning step ({args.batch_size} x {args.seq_len}, {args.dtype}): {res['ours_s']:.2f} s "
          f"(lm_head/vocabulary {res['head_share']:.0%}); plain transformers forward+backward: "
          f"{res['transformers_s']:.2f} s (all parameters trainable), {res['transformers_frozen_s']:.2f} s (frozen, "
          f"input gradient); ratio {res['ours_s'] / res['transformers_s']:.2f}", flush=True)


def plan_vs_measured(model: Path, rep: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The plan's stage peaks (float32 tensors the stage holds) beside the measured ones (RSS minus baseline)."""
    from quant_core.config import config_from_dict

    cfg = config_from_dict(rep["settings"])
    shape = Shape.from_config(json.loads((model / "config.json").read_text()))
    planned = {k: sum(v.values()) / MiB for k, v in stage_memory(shape, cfg, dtype).items()}
    mem = rep["memory_mb"]
    rows = {}
    for stage, peak in mem["stages"].items():
        if stage in planned:
            measured = peak - mem["baseline"]
            rows[stage] = {"plan_mb": round(planned[stage], 1), "measured_mb": round(measured, 1),
                           "ratio": round(planned[stage] / measured, 3) if measured > 0 else None}
    return rows


def section_memory(args: argparse.Namespace, model: Path, out: dict[str, Any]) -> None:
    fp32_bytes = Shape.from_config(json.loads((model / "config.json").read_text())).params * 4
    rows = {}
    print(f"\nmemory (float32, with export): 3x the float32 model = {3 * fp32_bytes / MiB:.0f} MB", flush=True)
    for method in ("quarot", "spinquant"):
        with tempfile.TemporaryDirectory(prefix="bench-real-out-") as tmp:
            r = run_cli(model, cli_args(args, method, "W4A4KV4", dtype="float32", steps=args.memory_steps,
                                        micro_batch=1, extra=["--out", str(Path(tmp) / "ckpt")]),
                        f"memory {method}")
        stages = plan_vs_measured(model, r["report"], "float32")
        rows[method] = {"peak_rss_mb": round(r["peak_rss_mb"], 1), "x_fp32_model": r["peak_rss_mb"] * MiB / fp32_bytes,
                        "baseline_mb": r["report"]["memory_mb"]["baseline"], "stages": stages}
        print(f"{method}: peak RSS {r['peak_rss_mb']:.0f} MB = {rows[method]['x_fp32_model']:.2f}x the float32 model "
              f"(process baseline {rows[method]['baseline_mb']:.0f} MB)")
        print(f"  {'stage':<12} {'plan MB':>8} {'measured MB':>12} {'plan/measured':>14}")
        for stage, v in stages.items():
            ratio = f"{v['ratio']:.2f}" if v["ratio"] is not None else "-"
            print(f"  {stage:<12} {v['plan_mb']:8.0f} {v['measured_mb']:12.0f} {ratio:>14}", flush=True)
    out["memory"] = {"fp32_model_mb": fp32_bytes / MiB, "rows": rows,
                     "peak_at_most_3x": all(v["x_fp32_model"] <= 3.0 for v in rows.values()),
                     "plan_within_25pct": all(s["ratio"] is not None and abs(s["ratio"] - 1) <= 0.25
                                              for v in rows.values() for s in v["stages"].values())}


def section_peers(args: argparse.Namespace, model: Path, out: dict[str, Any]) -> None:
    peers: dict[str, Any] = {}
    ours = {
        "quarot W4A4KV16": run(model, cli_args(args, "quarot", "W4A4KV16"), "ours quarot"),
        "gptq W4A16 g64": run(model, cli_args(args, "gptq", "W4A16KV16-g64"), "ours gptq g64"),
    }
    common = ["--model", str(model), "--calib-text", str(TRAIN), "--eval-text", str(TEST), "--seq-len",
              str(args.seq_len), "--calib-samples", str(args.calib_samples), "--eval-windows", str(args.eval_windows),
              "--dtype", args.dtype]
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        if args.llmc_python and Path(args.llmc_python).exists():
            js = Path(tmp) / "llmc.json"
            subprocess.run([args.llmc_python, str(ROOT / "bench" / "peer_llmcompressor.py"), *common,
                            "--variants", "r4_full_random_hadamard,gptq_w4a16_g128,gptq_w4a16_g64", "--json", str(js)],
                           cwd=ROOT, check=True)
            peers["llm-compressor"] = json.loads(js.read_text())
        if args.gptqmodel_python and Path(args.gptqmodel_python).exists():
            js = Path(tmp) / "gptqmodel.json"
            done = subprocess.run([args.gptqmodel_python, str(ROOT / "bench" / "peer_gptqmodel.py"), "--quantize",
                                   *common, "--group-size", "64", "--json", str(js)], cwd=ROOT, capture_output=True,
                                  text=True)
            # A peer that cannot run this setting (dtype, device) is a row that says why, not a lost bench.
            peers["gptqmodel"] = (json.loads(js.read_text()) if done.returncode == 0 and js.exists()
                                  else {"error": (done.stderr or done.stdout)[-600:]})
    res: dict[str, Any] = {"ours": ours, "peers": peers}
    llmc = peers.get("llm-compressor", {}).get("variants", {})
    spin = llmc.get("r4_full_random_hadamard", {})
    if "wall_s" in spin:
        res["quarot_wall_ratio"] = ours["quarot W4A4KV16"]["timings_s"]["total"] / spin["wall_s"]
    print("\npeers (same windows):", flush=True)
    print(f"  ours quarot W4A4KV16      ppl {ours['quarot W4A4KV16']['ppl']:.3f}  "
          f"{ours['quarot W4A4KV16']['timings_s']['total']:.0f} s")
    if spin:
        print(f"  llm-compressor W4A4KV16   ppl {spin.get('ppl', float('nan')):.3f}  {spin.get('wall_s', 0):.0f} s"
              + (f"  (error: {spin['error'][:120]})" if "error" in spin else ""))
    if "quarot_wall_ratio" in res:
        print(f"  wall-time ratio ours / llm-compressor: {res['quarot_wall_ratio']:.2f}")
    print(f"  ours gptq W4A16 g64      ppl {ours['gptq W4A16 g64']['ppl']:.3f}")
    for g_name in ("gptq_w4a16_g128", "gptq_w4a16_g64"):
        g = llmc.get(g_name, {})
        if g:
            print(f"  llm-compressor {g_name[5:]:<10} ppl {g.get('ppl', float('nan')):.3f}"
                  + (f"  (error: {g['error'][:120]})" if "error" in g else ""))
    gm = peers.get("gptqmodel", {})
    if gm:
        print(f"  GPTQModel W4A16 g64       ppl {gm.get('ppl', float('nan')):.3f}"
              + (f"  (error: {gm['error'][-200:]})" if "error" in gm else ""))
    out["peers"] = res


def save(args: argparse.Namespace, out: dict[str, Any]) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--model", type=Path, help="an HF folder (default: the SmolLM2 fixture, built when missing)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="compute dtype of the quality and speed runs (bfloat16: what a GPU job runs in)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--steps", type=int, default=0,
                   help="end-to-end learning steps of every spinquant run, after its R1 pre-fit (train.prefit_steps)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--curve", default="0,25,50,100,300", help="R1 pre-fit steps of the curve's runs")
    p.add_argument("--curve-steps", default="25", help="end-to-end steps after the default pre-fit, for the curve")
    p.add_argument("--memory-steps", type=int, default=4, help="learning steps of the float32 memory runs")
    p.add_argument("--llmc-python", default="/work/llmc-venv/bin/python", help="llm-compressor's venv python")
    p.add_argument("--gptqmodel-python", default="/work/gptq-venv/bin/python", help="GPTQModel's venv python")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.curve = [int(s) for s in args.curve.split(",") if s.strip()]
    args.curve_steps = [int(s) for s in args.curve_steps.split(",") if s.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; accepted: {', '.join(SECTIONS)}")
    model = args.model or smollm2.ensure()
    out: dict[str, Any] = {"model": str(model), "dtype": args.dtype, "seq_len": args.seq_len,
                           "calib_samples": args.calib_samples, "eval_windows": args.eval_windows,
                           "steps": args.steps, "batch_size": args.batch_size, "micro_batch": args.micro_batch}
    t0 = time.perf_counter()
    for name in sections:
        globals()[f"section_{name}"](args, model, out)
        save(args, out)  # after each section: a long run keeps what it measured
    out["total_s"] = time.perf_counter() - t0
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\ntotal {out['total_s'] / 60:.1f} min; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

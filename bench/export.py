"""Export benchmark: export and load time, size ratios, and the round trip, on the fixture.

For each setting, quantizes the fixture (bfloat16, as real checkpoints are stored), exports the
compressed-tensors folder, reloads it with quant_core.runtime and re-measures perplexity on the
same windows. Prints a table and writes JSON.

    .venv/bin/python bench/export.py --json runs/bench/export.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quant_core.config import make_config  # noqa: E402
from quant_core.evaluate import perplexity  # noqa: E402
from quant_core.export import export_checkpoint  # noqa: E402
from quant_core.pipeline import quantize_model  # noqa: E402
from quant_core.runtime import load  # noqa: E402

ROWS = [  # (method, w, a, kv, group size)
    ("spinquant", 4, 4, 4, -1),
    ("spinquant", 4, 8, 8, -1),
    ("spinquant", 4, 16, 16, -1),
    ("spinquant", 4, 16, 16, 128),
]


def size_ratios(folder: Path) -> dict[str, float]:
    """Packed decoder-linear bytes over their fp16 bytes, and the whole folder over an fp16 copy."""
    packed = fp16 = other = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        for key in fh.keys():
            t = fh.get_tensor(key)
            nbytes = t.numel() * t.element_size()
            if key.endswith(("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")):
                packed += nbytes
                if key.endswith("weight_shape"):
                    out_f, in_f = t.tolist()
                    fp16 += out_f * in_f * 2
            else:
                other += t.numel() * 2  # what an fp16 copy of the rest would take
    model_bytes = (folder / "model.safetensors").stat().st_size
    return {"decoder_linears": packed / fp16, "whole_weights_file": model_bytes / (fp16 + other)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--model", default=str(ROOT / "tests/fixtures/models/llama-outlier"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the job and the reload run")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    print(f"{'setting':<22} {'in-memory':>10} {'reloaded':>10} {'rel diff':>9} {'export s':>9} {'load s':>7} "
          f"{'lin/fp16':>9} {'file/fp16':>9}", flush=True)
    for method, w, a, kv, g in ROWS:
        cfg = make_config(method, w_bits=w, a_bits=a, kv_bits=kv, w_group_size=g, seq_len=256, steps=args.steps,
                          calib_source=f"file:{ROOT / 'tests/fixtures/text/train.txt'}", micro_batch=8,
                          eval_source=f"file:{ROOT / 'tests/fixtures/text/test.txt'}", calib_samples=64,
                          dtype="bfloat16", device=args.device)
        res = quantize_model(args.model, cfg)
        out = Path(tempfile.mkdtemp()) / "job"
        t0 = time.perf_counter()
        export_checkpoint(res, out)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, _, _ = load(out, device=args.device)
        t_load = time.perf_counter() - t0
        assert res.eval_windows is not None
        ppl = perplexity(model, res.eval_windows)
        ratios = size_ratios(out / "model")
        row = {"setting": f"{method} {cfg.scheme} g{g}", "quant_ppl": res.report["quant_ppl"], "reloaded_ppl": ppl,
               "rel_diff": abs(ppl / res.report["quant_ppl"] - 1), "export_s": t_export, "load_s": t_load, **ratios}
        rows.append(row)
        print(f"{row['setting']:<22} {row['quant_ppl']:10.4f} {ppl:10.4f} {row['rel_diff']:9.1e} {t_export:9.2f} "
              f"{t_load:7.2f} {ratios['decoder_linears']:9.4f} {ratios['whole_weights_file']:9.4f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    ok = all(r["rel_diff"] <= 1e-3 for r in rows) and all(
        r["decoder_linears"] <= (0.27 if "g128" in r["setting"] else 0.26) for r in rows)
    print("round trip within 0.1% and size targets met" if ok else "FAIL: see the table")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

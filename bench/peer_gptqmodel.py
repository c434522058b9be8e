"""Loader check: our GPTQ v1 export (`--format gptq`) loaded by GPTQModel, a real GPTQ runtime.

Runs in its OWN virtual environment (GPTQModel pins its own torchao and transformers). quant_core
only needs torch, safetensors and transformers, so it is imported from the repo for the reference.

Setup (once, outside the repo). gptqmodel 7.3.6 is the newest release that accepts torch 2.13;
7.4 and later require torch>=2.14.1, which pulls a CUDA build here:

    python3 -m venv /work/gptq-venv
    /work/gptq-venv/bin/pip install torch==2.13.0          # resolves to the local CPU wheel
    BUILD_CUDA_EXT=0 /work/gptq-venv/bin/pip install gptqmodel==7.3.6 torch==2.13.0 requests pillow

Run (from the repo root): export a float16 W4A16 job in both formats, then check it:

    python -m quant_core quantize tests/fixtures/models/llama-tiny --method spinquant --w-bits 4 \\
        --a-bits 16 --kv-bits 16 --w-group-size 128 --dtype float16 --device cpu --format both \\
        --calib-text tests/fixtures/text/train.txt --eval-text tests/fixtures/text/test.txt --out JOB
    /work/gptq-venv/bin/python bench/peer_gptqmodel.py --job JOB --json runs/bench/peer-gptqmodel.json

float16, because the GPTQ folder stores float16 scales and GPTQModel's CPU kernel (TorchLinear)
computes in float16/bfloat16 only; with a float16 job the scales are exact in both folders
(the report's ``gptq_export.scales_exact_in_fp16``), so the weights must agree bit for bit.

With ``--quantize --model DIR`` it is instead the peer row of bench/real.py: GPTQModel quantizes the model
itself (W4, --group-size, its other defaults: symmetric, no act-order, damp 0.05, group-aware reordering)
on quant_core's calibration windows, and the result is scored on quant_core's evaluation windows.

Checks (JSON ``checks``, exit 1 if one fails):
- every decoder linear GPTQModel dequantizes from gptq/ equals our runtime's weight from model/;
- max |logit diff| of GPTQModel against our runtime, both in float16 on the CPU, on fixed ids;
- perplexity over the job's evaluation windows, both ways, within 0.1% relative.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

# GPTQModel sizes its CPU thread pool as half the cores, then asks for 2 loader workers from it: on a 2-core
# machine that is 1 and it refuses to start ("requests 2 workers but parent 'cpu' only has 1").
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 1)))

import torch
import transformers  # noqa: F401  (before the stub below: transformers must see no torchvision)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class _Absent(types.ModuleType):
    """GPTQModel imports torchvision at import time for its vision-model definitions; no CPU
    torchvision build matches torch 2.13 here, and a llama text model never calls into it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__file__ = f"/nonexistent/{name.replace('.', '/')}.py"

    def __getattr__(self, name: str) -> _Absent:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}")

    def __call__(self, *args: object, **kwargs: object) -> _Absent:
        return self


def _stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build for another torch
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                     "torchvision.transforms.v2"):
            sys.modules[name] = _Absent(name)


def quantize_main(args: argparse.Namespace) -> int:
    """GPTQModel's own GPTQ on a local HF folder, with its defaults but the bits and group size, on our
    calibration windows; perplexity of the reloaded result on our evaluation windows (quant_core's protocol)."""
    import tempfile

    from quant_core.calibration import (
        calibration_windows,
        encode,
        eval_windows,
        load_text,
        load_tokenizer,
        with_bos,
    )
    from quant_core.evaluate import logits_nll

    dtype = getattr(torch, args.dtype)
    tok = load_tokenizer(args.model)
    windows = eval_windows(encode(tok, load_text(f"file:{args.eval_text}", "test")), args.seq_len, args.eval_windows)
    calib = calibration_windows(with_bos(tok, encode(tok, load_text(f"file:{args.calib_text}", "train"))),
                                args.calib_samples, args.seq_len, 0)

    _stub_torchvision()
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    qc = QuantizeConfig(bits=4, group_size=args.group_size, device="cpu")  # the rest: GPTQModel's defaults
    t0 = time.perf_counter()
    model = GPTQModel.load(str(args.model), qc, dtype=dtype)
    rows = [{"input_ids": w[None], "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)} for w in calib]
    model.quantize(rows, batch_size=1, calibration_sort=None)  # our windows, in our order
    quant_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="gptqmodel-") as tmp:
        model.save(tmp)
        del model
        peer = GPTQModel.load(tmp, device="cpu", backend=BACKEND.TORCH, dtype=dtype)
        hf = peer.model.eval()
        total, count = 0.0, 0
        t1 = time.perf_counter()
        with torch.no_grad():
            for w in windows.split(4):
                nll, n = logits_nll(hf(w).logits, w)
                total, count = total + nll, count + n
        eval_s = time.perf_counter() - t1
    ppl = math.exp(total / count)
    result = {"peer": f"gptqmodel {gptqmodel.__version__}", "torch": torch.__version__, "dtype": args.dtype,
              "quantize_config": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                                  for k, v in qc.to_dict().items()},
              "group_size": args.group_size, "seq_len": args.seq_len, "calib_samples": args.calib_samples,
              "windows": int(windows.shape[0]), "ppl": ppl, "quantize_s": quant_s, "eval_s": eval_s}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"{result['peer']} W4A16 g{args.group_size}: ppl {ppl:.4f} over {result['windows']} windows "
          f"(quantize {quant_s:.0f} s, eval {eval_s:.0f} s)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", type=Path, help="a quantize --out folder with model/ and gptq/ (the loader check)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--quantize", action="store_true", help="GPTQModel quantizes --model itself (the peer row)")
    p.add_argument("--model", type=Path, help="with --quantize: a local HF folder")
    p.add_argument("--calib-text", type=Path, default=ROOT / "tests/fixtures/text/train.txt")
    p.add_argument("--eval-text", type=Path, default=ROOT / "tests/fixtures/text/test.txt")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=0)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.quantize:
        if args.model is None or not (args.model / "config.json").is_file():
            print("error: --quantize needs --model, a local HF folder with config.json", file=sys.stderr)
            return 2
        return quantize_main(args)
    if args.job is None:
        print("error: give --job (the loader check) or --quantize --model DIR (the peer row)", file=sys.stderr)
        return 2

    from quant_core.calibration import encode, eval_windows, load_text, load_tokenizer
    from quant_core.evaluate import logits_nll
    from quant_core.models import decoder_linears, layer_prefix
    from quant_core.runtime import load

    if not (args.job / "gptq" / "config.json").is_file():
        print(f"error: {args.job}/gptq is missing; export with --format both", file=sys.stderr)
        return 2
    ours, cfg, report = load(args.job, int4_kernels=False)  # verifies SHA256SUMS; dequantized weights
    if ours.lm_head.weight.dtype != torch.float16:
        print(f"error: the job is {ours.lm_head.weight.dtype}; export it with --dtype float16", file=sys.stderr)
        return 2

    _stub_torchvision()
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    t0 = time.perf_counter()
    peer = GPTQModel.load(str(args.job / "gptq"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    load_s = time.perf_counter() - t0
    hf = peer.model.eval()

    # 1) weights: GPTQModel's dequantization of qweight/qzeros/scales against ours, bit for bit
    mismatched, kernel = [], ""
    for i in range(ours.arch.n_layers):
        for name, lin in decoder_linears(ours, i).items():
            prefix = layer_prefix(name, i)
            qlin = hf.get_submodule(prefix)
            kernel = type(qlin).__name__
            w = qlin.dequantize_weight().to(torch.float16).t()  # GPTQ's (in, out) -> (out, in)
            if not torch.equal(w, lin.weight):
                mismatched.append(prefix)

    # 2) logits on fixed ids, 3) perplexity over the job's evaluation windows
    ids = torch.randint(4, ours.lm_head.weight.shape[0], (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((hf(ids).logits.float() - ours(ids).float()).abs().max())
    tok = load_tokenizer(args.job / "model")
    windows = eval_windows(encode(tok, load_text(cfg.eval.source, "test"), bos=False), cfg.eval.seq_len,
                           cfg.eval.max_windows)  # as the pipeline scores them
    sums = {"ours": [0.0, 0], "gptqmodel": [0.0, 0]}
    with torch.no_grad():
        for w in windows.split(4):
            for who, logits in (("ours", ours(w)), ("gptqmodel", hf(w).logits)):
                nll, n = logits_nll(logits, w)
                sums[who][0] += nll
                sums[who][1] += n
    ppl = {who: math.exp(s / n) for who, (s, n) in sums.items()}
    rel = abs(ppl["gptqmodel"] / ppl["ours"] - 1)

    checks = {"weights_bit_exact": not mismatched, "ppl_within_0.1pct": rel <= 1e-3}
    result = {"peer": f"gptqmodel {gptqmodel.__version__}", "kernel": kernel, "torch": torch.__version__,
              "job": str(args.job), "scheme": cfg.scheme, "group_size": cfg.weights.group_size,
              "load_s": load_s, "mismatched_linears": mismatched, "max_abs_logit_diff_fp16": diff,
              "ppl_ours": ppl["ours"], "ppl_gptqmodel": ppl["gptqmodel"], "ppl_rel_diff": rel,
              "report_quant_ppl": report.get("quant_ppl"), "windows": int(windows.shape[0]), "checks": checks}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"{result['peer']} ({kernel}) loaded {args.job / 'gptq'} in {load_s:.2f}s")
    print(f"weights bit-exact: {not mismatched} ({len(mismatched)} linears differ)")
    print(f"max |logit diff| (fp16, CPU): {diff:.3e}")
    print(f"ppl ours {ppl['ours']:.4f}  gptqmodel {ppl['gptqmodel']:.4f}  rel diff {rel:.1e}  "
          f"({result['windows']} windows; report {report.get('quant_ppl')})")
    print("PASS" if all(checks.values()) else f"FAIL: {checks}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

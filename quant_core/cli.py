"""Command line: ``python -m quant_core quantize MODEL ...`` (the contract in ARCHITECTURE.md).

Bad input (unknown family, missing files, non-safetensors weights, impossible bit settings,
unreadable text) ends with one ``error:`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import A_BITS, KV_BITS, W_BITS, ConfigError, Method, make_config
from .errors import UserError
from .progress import Cancelled

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3
EXIT_INTERNAL = 1


def _settings_pair(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quant_core", description="SpinQuant 4-bit quantization")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model and report FP vs quantized perplexity")
    q.add_argument("model", help="Hugging Face model id, or a local directory in HF layout")
    q.add_argument("--revision", help="branch, tag or commit of a hub model")
    q.add_argument("--method", default="spinquant", choices=[m.value for m in Method], help="preset (default spinquant)")
    q.add_argument("--w-bits", type=int, choices=W_BITS, help="weight bits; 16 = not quantized (default 4)")
    q.add_argument("--a-bits", type=int, choices=A_BITS, help="activation bits; 16 = not quantized (default 16)")
    q.add_argument("--kv-bits", type=int, choices=KV_BITS, help="KV cache bits; 16 = not quantized (default 16)")
    q.add_argument("--w-group-size", type=int, help="input columns per weight scale; -1 = per output channel")
    data = q.add_mutually_exclusive_group()
    data.add_argument("--calib-text", type=Path, help="plain text file for calibration and rotation learning")
    data.add_argument("--calib-dataset", help="datasets name for calibration, e.g. wikitext2 (default)")
    q.add_argument("--calib-samples", type=int, help="GPTQ calibration windows (default 128)")
    q.add_argument("--seq-len", type=int, help="tokens per window for calibration, learning and evaluation (default 2048)")
    ev = q.add_mutually_exclusive_group()
    ev.add_argument("--eval-text", type=Path, help="plain text file for perplexity")
    ev.add_argument("--eval-dataset", help="datasets name for perplexity, e.g. wikitext2 (default)")
    q.add_argument("--eval-windows", type=int, help="score only the first N windows (default: all)")
    q.add_argument("--zero-shot-tasks", help="comma-separated lm-eval tasks, e.g. piqa,arc_easy (needs the 'eval' extra)")
    q.add_argument("--steps", type=int, help="Cayley SGD steps (default 100)")
    q.add_argument("--lr", type=float, help="Cayley SGD step size (default 1.5, cosine decay)")
    q.add_argument("--train-samples", type=int, help="training blocks from the start of the calibration text (default 800)")
    q.add_argument("--batch-size", type=int, help="sequences per learning step (default 8)")
    q.add_argument("--micro-batch", type=int, help="sequences per forward during learning (default 1)")
    q.add_argument("--r4", help="down_proj Hadamard: none, full, block:<b> (default: full when activations are quantized)")
    q.add_argument("--seed", type=int, help="seed for rotations, calibration windows and fallbacks (default 0)")
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    q.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="default auto")
    q.add_argument("--set", dest="settings", action="append", type=_settings_pair, default=[], metavar="KEY=VALUE",
                   help="any config field by dotted name, e.g. --set weights.gptq.act_order=true (repeatable)")
    q.add_argument("--out", type=Path, help="folder for the checkpoint (must not exist or be empty)")
    q.add_argument("--format", dest="export_format", choices=("ct", "gptq", "both"), default="ct",
                   help="checkpoint format under --out: ct = compressed-tensors model/ (default), "
                        "gptq = GPTQ v1 gptq/ (W4A16 with no online transform only), both")
    q.add_argument("--report-json", type=Path, help="write the report here")
    q.add_argument("--no-progress", action="store_true", help="no progress bar (plain stage lines instead)")
    e = sub.add_parser("eval", help="perplexity of an exported checkpoint, run as the report evaluated it")
    e.add_argument("checkpoint", type=Path, help="the --out folder of a quantize run (or its model/ folder)")
    ev2 = e.add_mutually_exclusive_group(required=True)
    ev2.add_argument("--eval-text", type=Path, help="plain text file")
    ev2.add_argument("--eval-dataset", help="datasets name, e.g. wikitext2")
    e.add_argument("--seq-len", type=int, help="window length (default: the one the report used)")
    e.add_argument("--eval-windows", type=int, default=0, help="score only the first N windows")
    e.add_argument("--report-json", type=Path, help='write {"ppl": x, ...} here')
    e.add_argument("--device", default="auto", help="auto (CUDA when available, the default), cpu, cuda or cuda:N")
    e.add_argument("--no-int4-kernels", action="store_true",
                   help="dequantize-and-matmul even where PyTorch's int4 kernel applies (bit-exact with the report)")
    pl = sub.add_parser("plan", help="per-stage device memory of a job, from the model's config.json alone")
    pl.add_argument("model", help="Hugging Face id, a local HF folder, or a config.json file")
    pl.add_argument("--revision", help="branch, tag or commit of a hub model")
    pl.add_argument("--method", default="spinquant", choices=[m.value for m in Method])
    pl.add_argument("--w-bits", type=int, choices=W_BITS)
    pl.add_argument("--a-bits", type=int, choices=A_BITS)
    pl.add_argument("--kv-bits", type=int, choices=KV_BITS)
    pl.add_argument("--seq-len", type=int, help="default 2048")
    pl.add_argument("--calib-samples", type=int, help="default 128")
    pl.add_argument("--micro-batch", type=int, help="learning sequences per forward (default 1)")
    pl.add_argument("--steps", type=int)
    pl.add_argument("--gpu-gib", type=float, default=80.0, help="device memory per GPU (default 80)")
    pl.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    g = sub.add_parser("generate", help="greedy text generation with an exported checkpoint")
    g.add_argument("checkpoint", type=Path)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--device", default="auto", help="auto (CUDA when available, the default), cpu, cuda or cuda:N")
    return p


def _eval(a: argparse.Namespace) -> int:
    from .calibration import encode, eval_windows, load_text, load_tokenizer
    from .evaluate import perplexity
    from .runtime import _folders, load

    model, cfg, report = load(a.checkpoint, device=a.device, int4_kernels=not a.no_int4_kernels)
    tok = load_tokenizer(_folders(a.checkpoint)[1])
    seq_len = a.seq_len or cfg.eval.seq_len
    source = f"file:{a.eval_text}" if a.eval_text else a.eval_dataset
    windows = eval_windows(encode(tok, load_text(source, "test")), seq_len, a.eval_windows)
    ppl = perplexity(model, windows)
    out = {"ppl": ppl, "windows": int(windows.shape[0]), "seq_len": seq_len, "report_quant_ppl": report.get("quant_ppl")}
    if a.report_json is not None:
        a.report_json.parent.mkdir(parents=True, exist_ok=True)
        a.report_json.write_text(json.dumps(out, indent=2))
    print(f"ppl {ppl:.4f} over {out['windows']} windows of {seq_len} tokens (report: {out['report_quant_ppl']})")
    return 0


def _generate(a: argparse.Namespace) -> int:
    import torch

    from .calibration import load_tokenizer, with_bos
    from .runtime import _folders, generate, load

    model, _, _ = load(a.checkpoint, device=a.device)
    tok = load_tokenizer(_folders(a.checkpoint)[1])
    ids = with_bos(tok, torch.tensor(tok(a.prompt, add_special_tokens=False)["input_ids"], dtype=torch.long))
    out = generate(model, ids[None], a.max_new_tokens, getattr(tok, "eos_token_id", None))
    print(tok.decode(out[0, ids.numel():].tolist(), skip_special_tokens=True))
    return 0


def config_from_args(a: argparse.Namespace) -> Any:
    calib = f"file:{a.calib_text}" if a.calib_text else a.calib_dataset
    evals = f"file:{a.eval_text}" if a.eval_text else a.eval_dataset
    settings = dict(a.settings)
    return make_config(
        a.method, w_bits=a.w_bits, a_bits=a.a_bits, kv_bits=a.kv_bits, w_group_size=a.w_group_size,
        calib_source=calib, calib_samples=a.calib_samples, seq_len=a.seq_len, eval_source=evals,
        eval_windows=a.eval_windows, steps=a.steps, lr=a.lr, train_samples=a.train_samples,
        batch_size=a.batch_size, micro_batch=a.micro_batch, r4=a.r4, seed=a.seed, device=a.device, dtype=a.dtype,
        zero_shot_tasks=a.zero_shot_tasks, settings=settings or None,
    )


class _Bar:
    """A tqdm bar per stage on a terminal; plain lines (stage starts and every 10%) otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.tty = enabled and sys.stderr.isatty()
        self.stage: str | None = None
        self.bar: Any = None
        self.last_tenth = -1

    def __call__(self, stage: str, fraction: float, info: dict[str, Any]) -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.last_tenth = stage, -1
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=1000, desc=f"{stage:<12}", leave=True,
                                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
        post = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()
                if k in ("step", "loss", "layer", "windows")}
        if self.bar is not None:
            self.bar.n = int(fraction * 1000)
            self.bar.set_postfix(post, refresh=True)
        else:
            tenth = int(fraction * 10)
            if tenth != self.last_tenth:
                self.last_tenth = tenth
                extra = " ".join(f"{k}={v}" for k, v in post.items())
                print(f"[{stage}] {fraction * 100:5.1f}% {extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _quantize(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)
    if a.out is not None and a.out.exists() and (not a.out.is_dir() or any(a.out.iterdir())):
        raise ConfigError("out", f"--out {a.out} already exists and is not an empty folder")
    if a.out is not None:
        from .formats import check_formats

        check_formats(cfg, a.export_format)  # refuse a format that cannot hold the job before any compute
    from .pipeline import run  # heavy imports only once the arguments are valid

    bar = _Bar(not a.no_progress)
    try:
        formats = ("ct", "gptq") if a.export_format == "both" else (a.export_format,)
        result = run(a.model, cfg, out=a.out, formats=formats, revision=a.revision, progress=bar)
    finally:
        bar.close()
    rep = result.report
    if a.report_json is not None:
        a.report_json.parent.mkdir(parents=True, exist_ok=True)
        a.report_json.write_text(json.dumps(rep, indent=2))
    gap = (rep["quant_ppl"] / rep["fp_ppl"] - 1) * 100
    print(f"{rep['method']} {rep['scheme']}: FP ppl {rep['fp_ppl']:.4f} -> quantized ppl {rep['quant_ppl']:.4f} "
          f"({gap:+.2f}%) in {rep['timings_s']['total']:.1f}s")
    return 0


def _model_config(model: str, revision: str | None) -> dict[str, Any]:
    from .models import ModelError

    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if path.suffix == ".json" or "/" not in model or model.startswith((".", "/")):
            raise ModelError(f"{model} is not a config.json, a model folder or a Hugging Face id")
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "config.json", revision=revision))
        except (OSError, ValueError) as exc:  # the hub's errors are OSError; a malformed id is ValueError
            raise ModelError(f"could not fetch config.json of {model!r}: {type(exc).__name__}: {exc}") from None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def _plan(a: argparse.Namespace) -> int:
    from .models import ModelError, arch_from_config
    from .plan import GiB, decide, plan, render

    mcfg = _model_config(a.model, a.revision)
    arch_from_config(mcfg)  # the same family checks as a real job
    cfg = make_config(a.method, w_bits=a.w_bits, a_bits=a.a_bits, kv_bits=a.kv_bits, seq_len=a.seq_len,
                      calib_samples=a.calib_samples, micro_batch=a.micro_batch, steps=a.steps)
    try:
        shape, stages = plan(mcfg, cfg, gpu_gib=a.gpu_gib, dtype=a.dtype)
    except KeyError as exc:
        raise ModelError(f"config.json lacks {exc}") from None
    dec = decide(mcfg, cfg, int(a.gpu_gib * GiB), a.dtype)
    verdict = f"refused: {dec.refusal}" if dec.refusal else ("layer-wise offload" if dec.offload else "whole model on the GPU")
    if a.json:
        print(json.dumps({"params": shape.params, "gpu_gib": a.gpu_gib, "dtype": a.dtype, "job": verdict,
                          "stages": [{"stage": s.stage, "bytes": s.device_bytes, "fits": s.fits,
                                      "placement": s.placement, "terms": s.terms} for s in stages]}, indent=2))
    else:
        print(render(a.model, shape, stages, a.gpu_gib, a.dtype))
        print(f"\nthis {a.method} job on one {a.gpu_gib:g} GiB GPU: {verdict}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "plan":
            return _plan(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except UserError as exc:  # bad input: one line, exit 2; anything else is ours and shows its traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Cancelled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    return EXIT_BAD_INPUT

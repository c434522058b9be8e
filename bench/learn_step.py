"""One rotation-learning step, timed by phase, beside a plain transformers forward+backward of the same batch.

Ours: the step of quant_core.learn.train_rotations with the spinquant W16A4KV4 learning setup (train.loss=kl,
train.ste=range, layer checkpointing unless --no-checkpoint): the FP teacher forward, the rotated fake-quantized
forward, the fused lm_head loss (the vocabulary), and the backward (with the checkpoint recompute), plus the Cayley
update.
Transformers: LlamaForCausalLM on the same ids with its own cross-entropy loss, (a) every parameter trainable,
(b) parameters frozen and the gradient taken at the input embeddings (no weight gradients, as in learning).
Medians of --repeat steps after one warm-up step.

    .venv/bin/python bench/learn_step.py --model ~/.cache/spinquant/models/smollm2-135m-instruct --json -
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quant_core.calibration import encode, load_text, load_tokenizer, train_blocks  # noqa: E402
from quant_core.cayley import cayley_step  # noqa: E402
from quant_core.config import make_config  # noqa: E402
from quant_core.learn import batch_loss, learning_hidden, teacher_hidden  # noqa: E402
from quant_core.models import arch_from_config, load_model, resolve_model  # noqa: E402
from quant_core.pipeline import _init_rotations, build_runtime, validate_environment  # noqa: E402
from quant_core.rotation import fold_norms, fuse_r4  # noqa: E402

TRAIN = ROOT / "tests" / "fixtures" / "text" / "train.txt"


def ours(model_dir: Path, dtype: torch.dtype, batch: int, micro: int, seq: int, repeat: int,
         checkpoint_layers: bool) -> dict[str, Any]:
    src = resolve_model(str(model_dir))
    arch = arch_from_config(src.config)
    cfg = make_config("spinquant", w_bits=16, a_bits=4, kv_bits=4, seq_len=seq, batch_size=batch, micro_batch=micro,
                      settings={"train.checkpoint_layers": checkpoint_layers})
    plans = validate_environment(cfg, arch)
    ids = train_blocks(encode(load_tokenizer(src.path), load_text(f"file:{TRAIN}", "train")), batch, seq)
    model = load_model(src, dtype=dtype)
    fold_norms(model)
    if plans.r4 is not None:
        fuse_r4(model, plans.r4)
    r1, r2s = _init_rotations(arch, 0)
    rots = [r.requires_grad_(True) for r in (r1, *r2s)]
    model.quant = build_runtime(cfg, arch, plans, a_bits=4, kv_bits=4, learning=True)
    teacher_rt = build_runtime(cfg, arch, plans, a_bits=16, kv_bits=16)
    phases: dict[str, list[float]] = {k: [] for k in ("teacher", "forward", "lm_head", "backward", "update", "step")}
    for it in range(repeat + 1):
        t: dict[str, float] = dict.fromkeys(phases, 0.0)
        t_step = time.perf_counter()
        for s in range(0, batch, micro):
            x = ids[s : s + micro]
            t0 = time.perf_counter()
            th = teacher_hidden(model, x, teacher_rt)
            t1 = time.perf_counter()
            h = learning_hidden(model, x, rots[0], rots[1:], 16, cfg, cfg.train.checkpoint_layers)
            t2 = time.perf_counter()
            loss = batch_loss(model, h, x, th) / (batch // micro)
            t3 = time.perf_counter()
            loss.backward()
            t4 = time.perf_counter()
            t["teacher"] += t1 - t0
            t["forward"] += t2 - t1
            t["lm_head"] += t3 - t2
            t["backward"] += t4 - t3
        t0 = time.perf_counter()
        with torch.no_grad():
            for r in rots:
                assert r.grad is not None
                r.copy_(cayley_step(r, r.grad, 0.0))  # the update's cost; lr 0 keeps every step the same
                r.grad = None
        t["update"] = time.perf_counter() - t0
        t["step"] = time.perf_counter() - t_step
        if it > 0:  # the first step warms caches and allocator
            for k, v in t.items():
                phases[k].append(v)
    med = {k: statistics.median(v) for k, v in phases.items()}
    return {"phases_s": med, "ours_s": med["step"], "head_share": med["lm_head"] / med["step"],
            "checkpoint_layers": cfg.train.checkpoint_layers}


def transformers_step(model_dir: Path, dtype: torch.dtype, batch: int, seq: int, repeat: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    out: dict[str, float] = {}
    for mode in ("all", "frozen"):
        for p in model.parameters():
            p.requires_grad_(mode == "all")
        times = []
        for it in range(repeat + 1):
            t0 = time.perf_counter()
            if mode == "all":
                model(input_ids=ids, labels=ids).loss.backward()
            else:
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                model(inputs_embeds=emb, labels=ids).loss.backward()
            if it > 0:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        out["transformers_s" if mode == "all" else "transformers_frozen_s"] = statistics.median(times)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-checkpoint", action="store_true",
                   help="train.checkpoint_layers=false: keep every layer's activations instead of recomputing them "
                        "in backward (faster, more memory)")
    p.add_argument("--json", default="-", help="a file, or - for stdout (the table then goes to stderr)")
    p.add_argument("--tune-allocator", action="store_true",
                   help="call quant_core.memory.tune_allocator first (off in the CLI and the worker)")
    a = p.parse_args()
    if a.tune_allocator:
        from quant_core.memory import tune_allocator

        tune_allocator()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    res = {"tune_allocator": a.tune_allocator, "dtype": a.dtype,
           "batch_size": a.batch_size, "micro_batch": a.micro_batch, "seq_len": a.seq_len,
           **ours(a.model, dtype, a.batch_size, a.micro_batch, a.seq_len, a.repeat, not a.no_checkpoint),
           **transformers_step(a.model, dtype, a.batch_size, a.seq_len, a.repeat)}
    res["ratio_to_transformers"] = res["ours_s"] / res["transformers_s"]
    text = json.dumps(res, indent=2)
    table = sys.stderr if a.json == "-" else sys.stdout
    print(f"ours {res['ours_s']:.2f} s/step " + " ".join(f"{k} {v:.2f}" for k, v in res["phases_s"].items())
          + f"; transformers {res['transformers_s']:.2f} s (frozen {res['transformers_frozen_s']:.2f} s); "
          f"ratio {res['ratio_to_transformers']:.2f}", file=table)
    if a.json == "-":
        print(text)
    else:
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

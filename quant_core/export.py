"""EXPORT (interim form): the fake-quantized model, rotations, config and report, written atomically.

The packed int4 compressed-tensors export replaces this file's ``save_job_output`` body; the
folder is always built in a temporary sibling, checksummed, then renamed, so an interrupted
export never leaves a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from .config import config_to_dict

if TYPE_CHECKING:
    from .pipeline import QuantizeResult


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sha256sums(folder: Path) -> None:
    """``<hex>  <relative path>`` for every file, written last."""
    lines = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "SHA256SUMS":
            lines.append(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def save_job_output(result: QuantizeResult, out_dir: Path) -> int:
    """Write the job folder atomically; returns its size in bytes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new --out folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in result.model.state_dict().items() if k != "inv_freq"}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "fake_quantized": "true"})
        cfg = json.loads((result.source_path / "config.json").read_text())
        cfg["tie_word_embeddings"] = False  # lm_head is a separate (rotated) copy now
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in os.listdir(result.source_path):
            if name.startswith(("tokenizer", "special_tokens", "generation_config")) or name.endswith(".model"):
                shutil.copy2(result.source_path / name, tmp / name)
        if result.r1 is not None:
            rot = {"R1": result.r1.float().contiguous().cpu()}
            for i, r2 in enumerate(result.r2s or []):
                rot[f"model.layers.{i}.self_attn.R2"] = r2.float().contiguous().cpu()
            (tmp / "spinquant").mkdir()
            save_file(rot, str(tmp / "spinquant" / "rotations.safetensors"))
        (tmp / "spinquant_config.json").write_text(json.dumps(config_to_dict(result.cfg), indent=2))
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        result.report["checkpoint_bytes"] = size
        (tmp / "eval_report.json").write_text(json.dumps(result.report, indent=2))
        write_sha256sums(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size

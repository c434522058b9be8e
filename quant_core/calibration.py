"""Text sources, tokenisation and the three ways we cut tokens into windows.

- calibration (GPTQ): ``calib.samples`` random windows of ``seq_len`` from the text with one BOS at
  its start (seeded), SPINQUANT.md §8;
- rotation learning: consecutive blocks from the start of the text, no BOS/EOS (§6);
- evaluation: non-overlapping windows, no added BOS, tail dropped (§9).

Sources are ``file:<path>`` (plain UTF-8 text) or a ``datasets`` name: ``wikitext2`` or
``name[:config]`` with a ``text`` column.

Example:
    >>> text = load_text("file:tests/fixtures/text/test.txt", split="test")
    >>> windows = eval_windows(encode(tok, text), seq_len=256)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import DataError as DataError
from .texts import KNOWN_DATASETS as KNOWN_DATASETS
from .texts import encode_ids
from .texts import load_text as load_text
from .texts import load_tokenizer as load_tokenizer


def encode(tokenizer: Any, text: str, bos: bool = False) -> Tensor:
    """Token ids of the whole text as one 1-D int64 tensor, optionally with one BOS at the start."""
    ids = encode_ids(tokenizer, text)
    if bos and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def _read_ids(path: Path) -> Tensor:
    raw = bytearray(path.read_bytes())  # native-order int32 (quant_core.texts.write_ids)
    if not raw:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(raw, dtype=torch.int32).long()


def _forked_child(fd: int, model: str, texts: dict[str, tuple[str, str]], out: str) -> None:
    from .texts import reply

    try:
        answer: dict[str, Any] = reply(model, texts, Path(out))
    except BaseException:
        answer = {"bug": traceback.format_exc()}
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(answer))


def _run_child(model: str, texts: dict[str, tuple[str, str]], out: str) -> dict[str, Any]:
    """The child's reply. Forked where the platform can (the interpreter and torch are already loaded, so the
    child pays only for transformers and the tokenizer: about 2.7 s against 5.6 s for a fresh interpreter);
    otherwise ``python -m quant_core.texts``, which imports this very quant_core and keeps the caller's cwd, so
    a relative file: source names the same file either way."""
    if hasattr(os, "fork") and "fork" in multiprocessing.get_all_start_methods():
        # os.fork itself, not multiprocessing's Process: a Celery pool child counts as daemonic there, and
        # daemonic processes may not have multiprocessing children.
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: tokenise, reply, and leave without running the parent's exit handlers
            code = 0
            try:
                os.close(rfd)
                _forked_child(wfd, model, texts, out)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        with os.fdopen(rfd) as f:
            raw = f.read()
        _, status = os.waitpid(pid, 0)
        if not raw:  # the child died without a word (killed, out of memory)
            return {"bug": f"the tokenizer process ended without a reply (status {status})"}
        return dict(json.loads(raw))
    home = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH")) if p)}
    request = json.dumps({"model": model, "texts": {k: list(v) for k, v in texts.items()}, "out": out})
    proc = subprocess.run([sys.executable, "-m", "quant_core.texts", request], capture_output=True, text=True,
                          check=False, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode in (0, 3) and lines:
        return dict(json.loads(lines[-1]))
    return {"bug": f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"}


def tokenize_texts(model: Path | str, texts: dict[str, tuple[str, str]]) -> tuple[dict[str, Tensor], int | None]:
    """Each named (source, split) tokenised by the model folder's tokenizer in a child process (quant_core.texts
    says why), as 1-D int64 tensors, and the tokenizer's BOS id. The same ids as :func:`encode` in process.
    Bad input raises DataError as it would here; a failure of the child itself is a RuntimeError with its
    traceback."""
    with tempfile.TemporaryDirectory(prefix="spinquant-texts-") as tmp:
        reply = _run_child(str(model), texts, tmp)
        if "error" in reply:
            raise DataError(reply["error"]["message"])
        if "files" not in reply:
            raise RuntimeError(f"the tokenizer process failed: {reply.get('bug')}")
        tokens = {name: _read_ids(Path(f)) for name, f in reply["files"].items()}
    return tokens, reply["bos"]


def with_bos(tokenizer: Any, tokens: Tensor) -> Tensor:
    """The same tokens with the tokenizer's BOS in front (when it has one)."""
    return with_bos_id(tokens, getattr(tokenizer, "bos_token_id", None))


def with_bos_id(tokens: Tensor, bos: int | None) -> Tensor:
    """The same tokens with ``bos`` in front (as they are when it is None)."""
    return tokens if bos is None else torch.cat([torch.tensor([bos], dtype=tokens.dtype), tokens])


def _need(tokens: Tensor, seq_len: int, what: str) -> None:
    assert tokens.ndim == 1, f"tokens must be 1-D, got {tuple(tokens.shape)}"
    if tokens.numel() < seq_len + 1:
        raise DataError(f"the {what} text has {tokens.numel()} tokens; at least seq_len + 1 = {seq_len + 1} are needed")


def calibration_windows(tokens: Tensor, samples: int, seq_len: int, seed: int) -> Tensor:
    """(samples, seq_len) windows at seeded random offsets (they may overlap, as in the GPTQ repo)."""
    _need(tokens, seq_len, "calibration")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def train_blocks(tokens: Tensor, samples: int, seq_len: int) -> Tensor:
    """The first ``samples`` consecutive blocks (fewer if the text is shorter), as the official loader."""
    _need(tokens, seq_len, "training")
    n = min(samples, tokens.numel() // seq_len)
    return tokens[: n * seq_len].view(n, seq_len)  # (n*L,) -> (n, L)


def eval_windows(tokens: Tensor, seq_len: int, max_windows: int = 0) -> Tensor:
    """Non-overlapping (N, seq_len) windows, tail dropped; max_windows > 0 keeps the first N."""
    _need(tokens, seq_len, "evaluation")
    n = tokens.numel() // seq_len
    if max_windows:
        n = min(n, max_windows)
    return tokens[: n * seq_len].view(n, seq_len)  # (n*L,) -> (n, L)

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

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import DataError as DataError

# Known dataset names -> (datasets path, config name). The join rule for each split follows §9.
KNOWN_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1"),
}




def load_text(source: str, split: str) -> str:
    """Read a text source. ``split`` is 'train' for calibration/learning and 'test' for evaluation."""
    if source.startswith("file:") or Path(source).is_file():
        path = Path(source[5:] if source.startswith("file:") else source).expanduser()
        if not path.is_file():
            raise DataError(f"text file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text: {exc}") from None
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        if not text.strip():
            raise DataError(f"{path} is empty")
        return text
    name, _, config = source.partition(":")
    ds_path, ds_config = KNOWN_DATASETS.get(name, (name, config or None))
    try:
        import datasets

        ds = datasets.load_dataset(ds_path, ds_config, split=split)
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        lines: list[str] = ds[column]
    except (OSError, ValueError, KeyError, ImportError) as exc:  # offline (hub errors are OSError), unknown name, bad split
        raise DataError(
            f"could not load dataset {source!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            "Accepted: 'wikitext2', a datasets name[:config] with a text column, or file:<path> of plain text"
        ) from None
    # WikiText convention: the raw lines joined with blank lines between them.
    return "\n\n".join(lines)


def load_tokenizer(path: Path | str) -> Any:
    """The model folder's tokenizer (never with trust_remote_code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:  # missing or malformed tokenizer files
        raise DataError(f"cannot load the tokenizer from {path}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        if type(exc) is not Exception:  # a bug somewhere: surface it
            raise
        # the tokenizers library raises a bare Exception for a tokenizer.json it cannot parse
        raise DataError(f"cannot load the tokenizer from {path}: {exc}") from None


def encode(tokenizer: Any, text: str, bos: bool = False) -> Tensor:
    """Token ids of the whole text as one 1-D int64 tensor, optionally with one BOS at the start."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long texts are windowed later
    if bos and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def with_bos(tokenizer: Any, tokens: Tensor) -> Tensor:
    """The same tokens with the tokenizer's BOS in front (when it has one)."""
    bos = getattr(tokenizer, "bos_token_id", None)
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

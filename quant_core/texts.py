"""Text sources and the tokenizer, without torch; and the child process that tokenises a job's texts.

Sources are ``file:<path>`` (plain UTF-8 text) or a ``datasets`` name: ``wikitext2`` or ``name[:config]``
with a ``text`` column.

Why a child process (:func:`quant_core.calibration.tokenize_texts`): loading a Hugging Face tokenizer imports
most of transformers' tokenisation stack, and a ``datasets`` source imports pyarrow. Neither can be unloaded,
so a job that tokenised in its own process kept them resident to its end: 155 MiB on SmolLM2-135M (the
tokenizer, its modules and their caches), a third of the headroom a 3x-the-model budget leaves. The child
(forked where the platform can, else ``python -m quant_core.texts``) writes each text's ids as raw int32
(native order: the same machine reads them) to a scratch folder and exits; the job reads them back. The ids
are the very ones the in-process path gives: the same tokenizer, the same call (tests/quant_core/test_texts.py).

Example:
    >>> text = load_text("file:tests/fixtures/text/test.txt", split="test")
    >>> ids = encode_ids(load_tokenizer("model/"), text)
"""

from __future__ import annotations

import json
import sys
from array import array
from pathlib import Path
from typing import Any

from .errors import DataError

# Known dataset names -> (datasets path, config name). The join rule for each split follows §9.
KNOWN_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext103": ("wikitext", "wikitext-103-raw-v1"),
}
ID_TYPECODE = "i"  # int32 ids in the child's files: every vocabulary fits (Llama-3: 128256)


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


def encode_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the whole text, no special tokens added (long texts are windowed later)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def bos_id(tokenizer: Any) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


def write_ids(model: str, texts: dict[str, tuple[str, str]], out: Path) -> dict[str, Any]:
    """Tokenise each named (source, split) with the model folder's tokenizer into ``out/<name>.i32``; what the
    parent reads: {"bos": id or None, "files": {name: file}}."""
    tokenizer = load_tokenizer(model)
    files = {}
    for name, (source, split) in texts.items():
        ids = array(ID_TYPECODE, encode_ids(tokenizer, load_text(source, split)))
        path = out / f"{name}.i32"
        path.write_bytes(ids.tobytes())
        files[name] = str(path)
    return {"bos": bos_id(tokenizer), "files": files}


def reply(model: str, texts: dict[str, tuple[str, str]], out: Path) -> dict[str, Any]:
    """What the child answers: :func:`write_ids`' result, or {"error": {"code", "message"}} for bad input."""
    try:
        return write_ids(model, texts, out)
    except DataError as exc:
        return {"error": {"code": exc.code, "message": exc.message}}


def main(argv: list[str] | None = None) -> int:
    """The child on a platform without fork: one JSON argument {"model", "texts": {name: [source, split]}, "out"};
    prints :func:`reply` as one JSON line (exit 3 for bad input). A bug keeps its traceback (exit 1)."""
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    answer = reply(args["model"], {k: (v[0], v[1]) for k, v in args["texts"].items()}, Path(args["out"]))
    print(json.dumps(answer))
    return 3 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["KNOWN_DATASETS", "bos_id", "encode_ids", "load_text", "load_tokenizer", "main", "reply", "write_ids"]

"""Texts are tokenised in a child process (quant_core.texts): the same ids as in process, the same errors, and
the job's process never imports the tokenizer's libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quant_core.calibration import encode, load_text, load_tokenizer, tokenize_texts, with_bos, with_bos_id
from quant_core.errors import DataError
from tests.conftest import MODELS, ROOT, TEST_TEXT, TRAIN_TEXT
from tests.fixtures import smollm2

FIXTURE = MODELS / "llama-massive"


@pytest.mark.parametrize("model", ["fixture", "smollm2"])
def test_the_child_gives_the_in_process_ids(model: str) -> None:
    path = FIXTURE if model == "fixture" else smollm2.ensure()
    tokens, bos = tokenize_texts(path, {"eval": (f"file:{TEST_TEXT}", "test"), "calib": (str(TRAIN_TEXT), "train")})
    tok = load_tokenizer(path)
    want_eval = encode(tok, load_text(f"file:{TEST_TEXT}", "test"))
    want_calib = encode(tok, load_text(str(TRAIN_TEXT), "train"))
    assert tokens["eval"].numel() > 10_000 and tokens["calib"].numel() > 100_000
    assert tokens["eval"].dtype == want_eval.dtype and tokens["eval"].tolist() == want_eval.tolist()
    assert tokens["calib"].tolist() == want_calib.tolist()
    assert bos == tok.bos_token_id
    assert with_bos_id(tokens["calib"], bos).tolist() == with_bos(tok, want_calib).tolist()


@pytest.mark.parametrize("start", ["fork", "fresh interpreter"])
def test_a_relative_file_source_names_the_callers_file(start: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if start != "fork":  # what a platform without fork runs: python -m quant_core.texts
        monkeypatch.setattr("multiprocessing.get_all_start_methods", lambda: ["spawn"])
    monkeypatch.chdir(TEST_TEXT.parent)
    tokens, _ = tokenize_texts(FIXTURE, {"eval": (f"file:{TEST_TEXT.name}", "test")})
    assert tokens["eval"].tolist() == encode(load_tokenizer(FIXTURE), TEST_TEXT.read_text()).tolist()


def test_bad_texts_are_the_same_data_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="does not exist"):
        tokenize_texts(FIXTURE, {"eval": (f"file:{missing}", "test")})
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(DataError, match="is not UTF-8 text"):
        tokenize_texts(FIXTURE, {"eval": (f"file:{latin}", "test")})
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        tokenize_texts(FIXTURE, {"eval": (f"file:{tmp_path / 'empty.txt'}", "test")})
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        tokenize_texts(tmp_path, {"eval": (f"file:{TEST_TEXT}", "test")})  # a folder with no tokenizer


def test_the_jobs_process_never_imports_the_tokenizer() -> None:
    code = ("import sys; from quant_core.calibration import tokenize_texts; "
            f"t, _ = tokenize_texts({str(FIXTURE)!r}, {{'eval': ('file:{TEST_TEXT}', 'test')}}); "
            "print(t['eval'].numel(), 'transformers' in sys.modules, 'tokenizers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert int(out[0]) > 10_000 and out[1:] == ["False", "False"]

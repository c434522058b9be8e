"""Our decoder forward equals transformers' on every family; loading refuses what it cannot hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from quant_core.models import ModelError, arch_from_config, load_model, resolve_model, weight_files
from tests.fixtures.tiny_random import CASES

SEQ = 40  # longer than the Mistral case's sliding window (16), so the window mask is exercised


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_transformers(case: str, tiny_dir) -> None:
    path = tiny_dir(case)
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ref = _hf_logits(path, ids)
    ours = load_model(resolve_model(str(path)))
    with torch.no_grad():
        out = ours(ids)
    assert (out - ref).abs().max().item() <= 1e-5


def test_tied_embeddings_are_untied_into_a_copy(tiny_dir) -> None:
    model = load_model(resolve_model(str(tiny_dir("llama-tied"))))
    assert model.arch.tied
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert torch.equal(emb, head)
    assert emb.data_ptr() != head.data_ptr()  # folding the final norm must not touch the embedding


def test_unknown_family_is_refused_with_the_supported_list(tiny_dir, tmp_path) -> None:
    path = tmp_path / "gemma"
    shutil.copytree(tiny_dir("llama-gqa"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gemma2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"gemma2.*supported: llama, mistral, qwen2"):
        load_model(resolve_model(str(path)))


def test_pickle_weights_are_refused(tiny_dir, tmp_path) -> None:
    path = tmp_path / "pickled"
    shutil.copytree(tiny_dir("llama-gqa"), path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only .safetensors are loaded"):
        weight_files(path)


def test_missing_config_and_missing_dir(tmp_path) -> None:
    with pytest.raises(ModelError, match=r"no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="neither a local directory nor a Hugging Face id"):
        resolve_model(str(tmp_path / "nope" / "deeper"))


def test_missing_and_misshapen_tensors_are_named(tiny_dir, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken"
    shutil.copytree(tiny_dir("llama-gqa"), path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ModelError, match=r"missing 1 weight.*down_proj"):
        load_model(resolve_model(str(path)))
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ModelError, match=r"down_proj.weight has shape"):
        load_model(resolve_model(str(path)))


def test_unsupported_rope_and_bad_config() -> None:
    base = dict(CASES["llama-gqa"])
    base["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ModelError, match="RoPE type 'yarn'"):
        arch_from_config(base)
    with pytest.raises(ModelError, match="missing or has a bad value"):
        arch_from_config({"model_type": "llama"})


def test_hub_download_failure_is_a_clear_error_hub_mocked(monkeypatch) -> None:
    """The hub cannot be reached from this machine; the error names the model and the cause."""
    import huggingface_hub

    def boom(*_a, **_k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)
    with pytest.raises(ModelError, match=r"could not download 'meta-llama/Llama-3.2-1B'.*no route"):
        resolve_model("meta-llama/Llama-3.2-1B")

"""The committed fixtures are loadable, sane and what the builders claim (tests/fixtures/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import build_models, tiny_random
from tests.fixtures.outliers import (
    DEFAULT_FF_CHANNELS,
    DEFAULT_FF_SCALE,
    DEFAULT_HIDDEN_CHANNELS,
    DEFAULT_HIDDEN_SCALE,
    inject_outliers,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODELS = FIXTURES / "models"
TEXT = FIXTURES / "text"
TRAINED = ["llama-tiny", "qwen2-tiny", "llama-outlier", "llama-massive"]
ARCH = {"llama-tiny": "LlamaForCausalLM", "qwen2-tiny": "Qwen2ForCausalLM", "llama-outlier": "LlamaForCausalLM",
        "llama-massive": "LlamaForCausalLM"}

PPL_TOKENS = 20_000
# Held-out perplexity on the first PPL_TOKENS tokens of test.txt: measured value x 1.05.
# Measured at build time (build_models, 2 CPU threads); see models/<name>/FIXTURE.md.
PPL_BOUND = {"llama-tiny": 24.6, "qwen2-tiny": 24.2}  # measured 23.460 and 23.037
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".pkl", ".npz", ".gguf")
SENTENCE = "The 'sort' command reads files and writes them sorted, line by line.\nUnicode: naïve café ✓"


def _load(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32).eval()


def _random_ids(vocab: int, shape=(2, 64), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def test_tokens() -> torch.Tensor:
    return build_models.load_tokens("test")


@pytest.mark.parametrize("name", TRAINED)
def test_trained_fixture_layout(name: str) -> None:
    folder = MODELS / name
    files = sorted(p.name for p in folder.iterdir())
    for required in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "FIXTURE.md"):
        assert required in files, (name, files)
    assert not [f for f in files if f.endswith(WEIGHT_SUFFIXES)], files  # safetensors only
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 10 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [ARCH[name]]
    assert config["vocab_size"] == 1024 and config["hidden_size"] == 128 and config["num_hidden_layers"] == 4


@pytest.mark.parametrize("name", TRAINED)
def test_trained_fixture_loads_and_tokenizes(name: str) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model = _load(name)
    assert type(model).__name__ == ARCH[name]
    with safe_open(str(MODELS / name / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    logits = model(input_ids=_random_ids(1024)).logits
    assert logits.shape == (2, 64, 1024) and torch.isfinite(logits).all()

    tok = AutoTokenizer.from_pretrained(MODELS / name)
    assert (tok.bos_token, tok.eos_token, tok.bos_token_id, tok.eos_token_id) == ("<s>", "</s>", 1, 2)
    assert len(tok) == 1024
    ids = tok(SENTENCE).input_ids
    assert ids[0] != tok.bos_token_id  # no BOS added by default (documented in build_tokenizer.py)
    assert tok.decode(ids) == SENTENCE
    assert len(ids) < len(SENTENCE.encode()) / 2  # BPE merges do compress


def test_qwen2_tiny_is_tied_with_biases() -> None:
    model = _load("qwen2-tiny")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    llama = _load("llama-tiny")
    assert not llama.config.tie_word_embeddings


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_heldout_perplexity(name: str, test_tokens: torch.Tensor) -> None:
    ppl = build_models.perplexity(_load(name), test_tokens, max_tokens=PPL_TOKENS)
    assert ppl < PPL_BOUND[name], ppl
    assert ppl < 1024 / 10  # far below uniform


def test_train_and_test_text_share_no_long_line() -> None:
    train = {line for line in (TEXT / "train.txt").read_text(encoding="utf-8").splitlines() if len(line) > 80}
    test = {line for line in (TEXT / "test.txt").read_text(encoding="utf-8").splitlines() if len(line) > 80}
    assert len(train) > 5000 and len(test) > 300
    assert not train & test


def _max_abs_q_input(model, ids: torch.Tensor) -> float:
    """max |x| over the inputs of every q_proj."""
    seen = []
    hooks = [
        layer.self_attn.q_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].abs().max().item()))
        for layer in model.model.layers
    ]
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    return max(seen)


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
@torch.no_grad()
def test_inject_outliers_preserves_function(name: str) -> None:
    model = _load(name)
    ids = _random_ids(1024, (4, 128), seed=1)
    ref = model(input_ids=ids).logits
    act_before = _max_abs_q_input(model, ids)
    inject_outliers(
        model,
        hidden_channels=list(DEFAULT_HIDDEN_CHANNELS),
        hidden_scale=DEFAULT_HIDDEN_SCALE,
        ff_channels=list(DEFAULT_FF_CHANNELS),
        ff_scale=DEFAULT_FF_SCALE,
    )
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    out = model(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= 1e-4
    assert _max_abs_q_input(model, ids) > 10 * act_before


@torch.no_grad()
def test_llama_outlier_reproduces_llama_tiny() -> None:
    ids = _random_ids(1024, (4, 128), seed=2)
    ref = _load("llama-tiny")(input_ids=ids).logits
    outlier = _load("llama-outlier")
    assert (outlier(input_ids=ids).logits - ref).abs().max().item() <= 1e-4
    gamma = outlier.model.layers[0].input_layernorm.weight
    assert gamma[list(DEFAULT_HIDDEN_CHANNELS)].abs().min() > 5 * gamma.abs().median()


@torch.no_grad()
def test_llama_massive_has_a_constant_massive_residual_direction(test_tokens: torch.Tensor) -> None:
    """h·u = c at the input of every layer for every token (nothing writes along u), and u survives folding:
    the normalised activations the q/k/v and gate/up quantizers see carry most of their energy along u."""
    record = json.loads((MODELS / "llama-massive" / "massive.json").read_text())
    u = torch.tensor(record["u"], dtype=torch.float64)
    assert torch.allclose(u, build_models.massive_direction(128, record["direction_seed"]), atol=1e-12)
    model = _load("llama-massive")
    uf = u.float()
    for layer in model.model.layers:
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert (uf @ lin.weight).abs().max() <= 1e-5 * lin.weight.abs().max()
    seen = []
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
             for layer in model.model.layers]
    model(input_ids=test_tokens[:1024].view(4, 256))
    for h in hooks:
        h.remove()
    assert len(seen) == 4
    for h in seen:
        a = h @ uf  # (B, T): the u-component of every residual vector
        torch.testing.assert_close(a, torch.full_like(a, record["c"]), rtol=0, atol=1e-4)
        share = a.pow(2) / h.pow(2).sum(-1)  # fraction of each token's energy along u
        assert share.mean() > 0.1
    ppl = build_models.perplexity(model, test_tokens, max_tokens=PPL_TOKENS)
    assert ppl < 1.05 * record["test_perplexity_prefix"], ppl


@pytest.mark.parametrize("case", sorted(tiny_random.CASES))
@torch.no_grad()
def test_tiny_random_case(case: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_random.build_tiny(case, tmp_path / case, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    assert cfg.model_type == tiny_random.CASES[case]["model_type"] and cfg.vocab_size == 256
    ids = _random_ids(cfg.vocab_size, (2, 40))
    logits = model(input_ids=ids).logits  # (2, 40, vocab); 40 > the mistral case's window of 16
    assert logits.shape == (2, 40, 256) and torch.isfinite(logits).all()

    norm = model.model.layers[0].input_layernorm.weight
    assert (norm - 1).abs().mean() > 0.05  # γ is not all ones, so folding is observable
    q = model.model.layers[0].self_attn.q_proj
    assert (q.bias is not None) == (cfg.model_type == "qwen2")
    if q.bias is not None:
        assert q.bias.abs().min() > 0
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == bool(cfg.tie_word_embeddings)
    # same seed, same weights
    again = AutoModelForCausalLM.from_pretrained(tiny_random.build_tiny(case, tmp_path / "again", seed=0))
    assert torch.equal(again(input_ids=ids).logits, logits)


def test_tiny_random_shapes() -> None:
    odd = tiny_random.make_config("llama-odd")
    assert (odd.hidden_size, odd.intermediate_size, odd.head_dim) == (96, 160, 24)
    q = tiny_random.make_config("qwen2-odd")
    assert (q.hidden_size, q.intermediate_size, q.num_attention_heads, q.num_key_value_heads) == (112, 304, 7, 1)
    assert q.hidden_size // q.num_attention_heads == 16
    assert tiny_random.make_config("llama3-rope").rope_parameters["rope_type"] == "llama3"
    assert tiny_random.make_config("llama-linear-rope").rope_parameters["rope_type"] == "linear"
    assert tiny_random.make_config("mistral").sliding_window == 16
    mha = tiny_random.make_config("llama-mha")
    assert mha.num_key_value_heads == mha.num_attention_heads

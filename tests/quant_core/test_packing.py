"""int4 packing: round trips, literal words, errors, and interop with compressed-tensors 0.20.0.

compressed-tensors API used (read from its 0.20.0 source):
    - compressors.pack_quantized.helpers.pack_to_int32 / unpack_from_int32 (the raw packers);
    - compressors.pack_quantized.base.PackedQuantizationCompressor.decompress (per-module, local names);
    - compressors.ModelCompressor.compress_model / decompress_model after
      quantization.apply_quantization_config on a one-Linear module (the transformers load lifecycle);
    - entrypoints.convert.converters.CompressedTensorsDequantizer (model-free, reads config.json).
Reconstructed by hand (not taken from any CT helper): the quantization_config dict, the per-Linear
state dict, the one-Linear module, and the reference dequantization (q - z) * scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quant_core.packing import (
    gptq_qzeros,
    pack_gptq_qweight,
    pack_int4_rows,
    pack_int4_zero_points,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
    unpack_int4_rows,
    unpack_int4_zero_points,
)
from quant_core.quantizers import dequantize_weight, quantize_weight, weight_qparams

try:  # the dev extra pins compressed-tensors==0.20.0; without it only the interop tests skip
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    HAVE_CT = True
except ImportError:  # pragma: no cover
    HAVE_CT = False

needs_ct = pytest.mark.skipif(not HAVE_CT, reason="needs the dev extra compressed-tensors==0.20.0")

SHAPES = [(1, 8), (3, 8), (5, 16), (8, 64), (13, 256), (20, 64), (64, 128)]
WORD_0x77777777 = 0x77777777  # 2004318071, positive as int32


def _q(out: int, inn: int, seed: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (out, inn), generator=g).to(dtype)


def _as_int32(word: int) -> int:
    """A 32-bit pattern as the signed int32 value torch stores."""
    return word - 2**32 if word >= 2**31 else word


# ----------------------------------------------------------------------------- reference bit loops


def _ref_nibble(word: int, pos: int) -> int:
    """Nibble `pos` of a 32-bit word, read one bit at a time (independent of the vectorised code)."""
    word &= 0xFFFFFFFF
    value = 0
    for b in range(4):
        value |= ((word >> (4 * pos + b)) & 1) << b
    return value


def _ref_unpack_rows(packed: torch.Tensor, inn: int) -> list[list[int]]:
    """CT weight_packed (out, in/8) -> signed codes, element by element."""
    return [[_ref_nibble(int(packed[r, c // 8]), c % 8) - 8 for c in range(inn)] for r in range(packed.shape[0])]


def _ref_unpack_gptq_qweight(qweight: torch.Tensor, inn: int) -> list[list[int]]:
    """GPTQ qweight (in/8, out) -> signed codes (out, in), element by element."""
    out = qweight.shape[1]
    return [[_ref_nibble(int(qweight[r // 8, c]), r % 8) - 8 for r in range(inn)] for c in range(out)]


def _ref_unpack_gptq_qzeros(qzeros: torch.Tensor, out: int) -> list[list[int]]:
    """GPTQ qzeros (n_groups, out/8) -> stored values (zero - 1), (n_groups, out)."""
    return [[_ref_nibble(int(qzeros[g, c // 8]), c % 8) for c in range(out)] for g in range(qzeros.shape[0])]


# ----------------------------------------------------------------------------- round trips / literals


@pytest.mark.parametrize("out,inn", SHAPES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_rows_round_trip(out: int, inn: int, dtype: torch.dtype) -> None:
    q = _q(out, inn, seed=out * 1000 + inn, dtype=dtype)
    packed = pack_int4_rows(q)
    assert packed.dtype == torch.int32 and packed.shape == (out, inn // 8)
    back = unpack_int4_rows(packed, inn)
    assert back.dtype == torch.int8 and back.shape == (out, inn)
    assert torch.equal(back, q.to(torch.int8))


def test_rows_extremes_and_negative_words() -> None:
    q = torch.stack([torch.full((16,), -8), torch.full((16,), 7), _q(1, 16, 3)[0]])  # (3, 16)
    packed = pack_int4_rows(q)
    assert (packed < 0).any(), "a word with nibble >= 8 on top must be negative as int32"
    assert torch.equal(unpack_int4_rows(packed, 16), q.to(torch.int8))


def test_rows_literal_words() -> None:
    q = torch.tensor(
        [
            [-8, -7, -6, -5, -4, -3, -2, -1],  # nibbles 0..7, lowest first
            [7, 7, 7, 7, 7, 7, 7, 7],  # all 0xF
            [-8, -8, -8, -8, -8, -8, -8, 7],  # only the top nibble set
            [0, 1, 2, 3, 4, 5, 6, 7],  # nibbles 8..15
        ]
    )
    packed = pack_int4_rows(q)
    expected = [0x76543210, 0xFFFFFFFF, 0xF0000000, 0xFEDCBA98]
    assert packed.flatten().tolist() == [_as_int32(w) for w in expected]
    assert packed.flatten().tolist() == [1985229328, -1, -268435456, -19088744]
    assert _ref_unpack_rows(packed, 8) == q.tolist()


def test_rows_match_bit_loop_reference() -> None:
    q = _q(5, 24, seed=7)
    assert _ref_unpack_rows(pack_int4_rows(q), 24) == q.tolist()


@pytest.mark.parametrize("out,ng", [(1, 1), (3, 2), (8, 4), (13, 8), (20, 2), (64, 1)])
def test_zero_points_round_trip(out: int, ng: int) -> None:
    z = _q(out, ng, seed=out + 17 * ng, dtype=torch.int16)
    packed = pack_int4_zero_points(z)
    assert packed.dtype == torch.int32 and packed.shape == ((out + 7) // 8, ng)
    back = unpack_int4_zero_points(packed, out)
    assert back.dtype == torch.int8 and back.shape == (out, ng)
    assert torch.equal(back, z.to(torch.int8))


def test_zero_points_literal_word() -> None:
    z = torch.arange(-8, 1).reshape(9, 1)  # rows 0..7 -> nibbles 0..7; row 8 -> nibble 8, then padding 0
    packed = pack_int4_zero_points(z)
    assert packed.flatten().tolist() == [0x76543210, 0x00000008]


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="in_features=12 must be a multiple of 8"):
        pack_int4_rows(torch.zeros(4, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match="must be 2-D"):
        pack_int4_rows(torch.zeros(16, dtype=torch.int8))
    with pytest.raises(ValueError, match="must be an integer tensor"):
        pack_int4_rows(torch.zeros(4, 16))
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\], got \[0, 8\]"):
        pack_int4_rows(torch.tensor([[8] + [0] * 7]))
    with pytest.raises(ValueError, match="must be non-empty"):
        pack_int4_rows(torch.zeros(0, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="does not match packed shape"):
        unpack_int4_rows(torch.zeros(4, 2, dtype=torch.int32), 24)
    with pytest.raises(ValueError, match=r"must be torch.int32"):
        unpack_int4_rows(torch.zeros(4, 2, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\]"):
        pack_int4_zero_points(torch.full((3, 2), -9))
    with pytest.raises(ValueError, match="needs 2 packed rows"):
        unpack_int4_zero_points(torch.zeros(1, 2, dtype=torch.int32), 9)
    with pytest.raises(ValueError, match="in_features=20 must be a multiple of 8"):
        pack_gptq_qweight(torch.zeros(8, 20, dtype=torch.int8))
    with pytest.raises(ValueError, match="does not match qweight shape"):
        unpack_gptq_qweight(torch.zeros(2, 8, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="out_features=12 must be a multiple of 8"):
        gptq_qzeros(1, 12, None)
    with pytest.raises(ValueError, match=r"zero must have shape \(out_features, n_groups\) = \(8, 2\)"):
        gptq_qzeros(2, 8, torch.full((2, 8), 8))
    with pytest.raises(ValueError, match="stores zero - 1"):
        gptq_qzeros(1, 8, torch.zeros(8, 1, dtype=torch.int16))
    with pytest.raises(ValueError, match="n_groups must be a positive int"):
        gptq_qzeros(0, 8, None)
    with pytest.raises(ValueError, match="does not match qzeros shape"):
        unpack_gptq_qzeros(torch.zeros(1, 2, dtype=torch.int32), 8)


# ----------------------------------------------------------------------------- CT raw packers


@needs_ct
@pytest.mark.parametrize("out,inn", SHAPES)
def test_ct_unpacks_our_rows_and_packs_like_us(out: int, inn: int) -> None:
    q = _q(out, inn, seed=inn * 31 + out)
    ours = pack_int4_rows(q)
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size((out, inn))), q)
    assert torch.equal(pack_to_int32(q, 4), ours)


@needs_ct
@pytest.mark.parametrize("out,ng", [(1, 1), (3, 2), (8, 4), (13, 8), (20, 2), (64, 1)])
def test_ct_zero_point_packing_matches(out: int, ng: int) -> None:
    z = _q(out, ng, seed=5 * out + ng)
    ours = pack_int4_zero_points(z)
    assert torch.equal(pack_to_int32(z, 4, packed_dim=0), ours)  # incl. the padding nibbles
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size((out, ng)), packed_dim=0), z)


# ----------------------------------------------------------------------------- CT decompression


def _weights_args(sym: bool, group_size: int) -> dict:
    strategy = "channel" if group_size == -1 else "group"
    return {"num_bits": 4, "type": "int", "symmetric": sym, "strategy": strategy,
            "group_size": None if group_size == -1 else group_size, "dynamic": False, "actorder": None}  # fmt: skip


def _quant_config(sym: bool, group_size: int) -> dict:
    return {
        "quant_method": "compressed-tensors", "version": "0.20.0", "format": "pack-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {},
        "config_groups": {"group_0": {"targets": ["re:.*proj$"], "format": "pack-quantized",
                                      "weights": _weights_args(sym, group_size),
                                      "input_activations": None, "output_activations": None}},
    }  # fmt: skip


def _our_linear(out: int, inn: int, sym: bool, group_size: int, scale_dtype: torch.dtype, seed: int):
    """Quantize a random weight with our quantizers; return (CT local state dict, our dequantized fp32 weight).

    Our asymmetric codes/zero are unsigned 0..15; CT's are signed, so both get -8 (as export.py does).
    """
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed))
    s, z_u = weight_qparams(w, bits=4, group_size=group_size, sym=sym, mse_clip=False, scale_dtype=scale_dtype)
    s = s.to(scale_dtype)
    q_ours = quantize_weight(w, s.float(), z_u, bits=4, group_size=group_size, sym=sym)  # (out, in) int8
    w_hat = dequantize_weight(q_ours, s.float(), z_u, group_size=group_size, sym=sym, dtype=torch.float32)
    q = q_ours.to(torch.int16) if sym else q_ours.to(torch.int16) - 8
    state = {
        "weight_packed": pack_int4_rows(q),
        "weight_scale": s.contiguous(),
        "weight_shape": torch.tensor([out, inn], dtype=torch.int64),
    }
    if not sym:
        assert z_u is not None
        state["weight_zero_point"] = pack_int4_zero_points(z_u.round().to(torch.int16) - 8)
    # Independent check of our dequantization: (q - z) * scale[:, col // g] with signed q, z.
    g = inn if group_size == -1 else group_size
    z_signed = torch.zeros_like(s.float()) if sym else z_u.round() - 8
    ref = (q.float() - z_signed.repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
    assert torch.equal(ref, w_hat)
    return state, w_hat


CASES = [(True, -1), (True, 32), (False, -1), (False, 32)]
LINEAR_SHAPES = [(20, 64), (16, 128)]


@needs_ct
@pytest.mark.parametrize("sym,group_size", CASES)
@pytest.mark.parametrize("out,inn", LINEAR_SHAPES)
def test_ct_compressor_decompresses_to_our_weights(sym: bool, group_size: int, out: int, inn: int) -> None:
    state, w_hat = _our_linear(out, inn, sym, group_size, torch.float32, seed=out + inn)
    scheme = QuantizationScheme(targets=["Linear"], weights=_weights_args(sym, group_size))
    assert PackedQuantizationCompressor.compression_param_names(scheme) == tuple(state)
    dec = PackedQuantizationCompressor.decompress(state, scheme)
    assert dec["weight"].dtype == torch.float32
    assert torch.equal(dec["weight"], w_hat)


@needs_ct
@pytest.mark.parametrize("sym,group_size", CASES)
def test_ct_compressor_bf16_scale(sym: bool, group_size: int) -> None:
    """With a bf16 scale CT dequantizes in bf16; (q - z) is exact there, so it equals ours rounded once."""
    state, w_hat = _our_linear(24, 64, sym, group_size, torch.bfloat16, seed=11)
    scheme = QuantizationScheme(targets=["Linear"], weights=_weights_args(sym, group_size))
    dec = PackedQuantizationCompressor.decompress(state, scheme)
    assert dec["weight"].dtype == torch.bfloat16
    assert torch.equal(dec["weight"], w_hat.to(torch.bfloat16))


class _OneLinear(torch.nn.Module):
    def __init__(self, out: int, inn: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(inn, out, bias=False)


@needs_ct
@pytest.mark.parametrize("sym,group_size", CASES)
def test_ct_model_compressor_decompresses_our_state_dict(sym: bool, group_size: int) -> None:
    """The transformers load lifecycle: apply config, compress placeholders, load our tensors, decompress."""
    out, inn = 20, 64
    state, w_hat = _our_linear(out, inn, sym, group_size, torch.float32, seed=3)
    qcfg = QuantizationConfig.model_validate(_quant_config(sym, group_size))
    model = _OneLinear(out, inn)
    apply_quantization_config(model, qcfg, show_progress=False)
    compressor = ModelCompressor(quantization_config=qcfg)
    compressor.compress_model(model)
    placeholders = model.state_dict()
    ours = {f"proj.{k}": v for k, v in state.items()}
    assert set(placeholders) == set(ours)
    for k, v in ours.items():  # CT's own compressed layout has our shapes and dtypes
        assert (placeholders[k].shape, placeholders[k].dtype) == (v.shape, v.dtype), k
    model.load_state_dict(ours, strict=True)
    compressor.decompress_model(model)
    assert torch.equal(model.proj.weight.data, w_hat)


@needs_ct
@pytest.mark.parametrize("sym,group_size", CASES)
def test_ct_dequantizer_reads_our_config_and_tensors(tmp_path: Path, sym: bool, group_size: int) -> None:
    """Model-free path: config.json + prefixed tensors, as in the exported folder."""
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": _quant_config(sym, group_size)}))
    prefix = "model.layers.0.self_attn.q_proj"
    state, w_hat = _our_linear(32, 96, sym, group_size, torch.float32, seed=9)
    tensors = {f"{prefix}.{k}": v for k, v in state.items()}
    tensors["model.norm.weight"] = torch.ones(96)
    result = CompressedTensorsDequantizer(tmp_path, dtype=torch.float32).validate(tensors)
    assert set(result) == {f"{prefix}.weight", "model.norm.weight"}
    assert torch.equal(result[f"{prefix}.weight"], w_hat)


# ----------------------------------------------------------------------------- GPTQ v1


@pytest.mark.parametrize("out,inn", SHAPES)
def test_gptq_qweight_round_trip(out: int, inn: int) -> None:
    q = _q(out, inn, seed=out * 7 + inn)
    qweight = pack_gptq_qweight(q)
    assert qweight.dtype == torch.int32 and qweight.shape == (inn // 8, out)
    assert torch.equal(qweight, pack_int4_rows(q).t())  # same words as CT, transposed
    back = unpack_gptq_qweight(qweight, inn)
    assert back.dtype == torch.int8 and back.shape == (out, inn)
    assert torch.equal(back, q)


def test_gptq_qweight_bit_loop_reference() -> None:
    q = _q(3, 16, seed=1)
    qweight = pack_gptq_qweight(q)
    assert _ref_unpack_gptq_qweight(qweight, 16) == q.tolist()
    column = pack_gptq_qweight(torch.arange(-8, 0).reshape(1, 8))  # one output, input rows 0..7
    assert column.tolist() == [[0x76543210]]


@pytest.mark.parametrize("n_groups,out", [(1, 8), (4, 64), (2, 24)])
def test_gptq_qzeros_symmetric(n_groups: int, out: int) -> None:
    qzeros = gptq_qzeros(n_groups, out, None)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (n_groups, out // 8)
    assert (qzeros == _as_int32(WORD_0x77777777)).all()
    assert torch.equal(qzeros, torch.full((n_groups, out // 8), 0x77777777, dtype=torch.int64).to(torch.int32))
    assert torch.equal(unpack_gptq_qzeros(qzeros, out), torch.full((out, n_groups), 8, dtype=torch.int8))
    assert torch.equal(gptq_qzeros(n_groups, out, torch.full((out, n_groups), 8)), qzeros)


@pytest.mark.parametrize("n_groups,out", [(1, 8), (4, 64), (3, 16)])
def test_gptq_qzeros_asymmetric_round_trip(n_groups: int, out: int) -> None:
    zero = torch.randint(1, 17, (out, n_groups), generator=torch.Generator().manual_seed(out + n_groups))
    qzeros = gptq_qzeros(n_groups, out, zero)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (n_groups, out // 8)
    assert torch.equal(unpack_gptq_qzeros(qzeros, out), zero.to(torch.int8))
    assert _ref_unpack_gptq_qzeros(qzeros, out) == (zero - 1).t().tolist()

"""The one config: presets, validation messages, versioned round trip, torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quant_core.config import (
    ConfigError,
    Method,
    Rotation,
    WeightAlgo,
    config_from_dict,
    config_to_dict,
    make_config,
    vllm_serving_verdict,
)


@pytest.mark.parametrize("method", [m.value for m in Method])
def test_presets_round_trip(method: str) -> None:
    cfg = make_config(method, w_bits=4, a_bits=4, kv_bits=4)
    payload = json.loads(json.dumps(config_to_dict(cfg)))
    assert payload["_type"] == "SpinQuantConfig" and payload["_version"] == 1
    assert config_from_dict(payload) == cfg


def test_preset_contents() -> None:
    sq = make_config("spinquant", w_bits=4, a_bits=4, kv_bits=4)
    assert sq.rotation.r1r2 is Rotation.LEARNED and sq.r3_on and sq.r4_mode == ("full", None)
    assert sq.train_w_bits == 16  # W16 during learning when GPTQ follows
    assert sq.train.lr == 1.5 and sq.train.steps == 100 and sq.train.grad_clip == 1.0
    assert sq.train.ste == "range" and make_config("spinquant", ste="identity").train.ste == "identity"
    assert not sq.activations.sym and sq.activations.clip_ratio == 1.0
    w_only = make_config("spinquant", w_bits=4, a_bits=16, kv_bits=16)
    assert w_only.r4_mode == ("none", None) and not w_only.r3_on  # SpinQuant_no_had for W4A16
    assert w_only.train_w_bits == 4  # no activation quantizer, so the loss needs the weight one
    qr = make_config("quarot", w_bits=4, a_bits=4, kv_bits=4)
    assert qr.rotation.r1r2 is Rotation.RANDOM and qr.activations.clip_ratio == 0.9 and qr.kv.clip_ratio == 0.95
    rtn = make_config("rtn", w_bits=4, a_bits=4)
    assert rtn.weights.algo is WeightAlgo.RTN and not rtn.rotating and rtn.train_w_bits == 4
    vl = make_config("spinquant-vllm", w_bits=4, a_bits=4, kv_bits=16)
    assert vl.r4_mode == ("block", None) and vllm_serving_verdict(vl) is True  # block:auto, sized per model
    reasons = vllm_serving_verdict(sq)
    assert isinstance(reasons, list) and any("asymmetric activations" in r for r in reasons)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"w_bits": 5}, r"weights.bits=5 is not valid; accepted: 2, 3, 4, 8, 16"),
        ({"a_bits": 2}, r"activations.bits=2 is not valid; accepted: 4, 8, 16"),
        ({"kv_bits": 3}, r"kv.bits=3"),
        ({"w_group_size": 0}, r"weights.group_size"),
        ({"a_clip_ratio": 1.5}, r"activations.clip_ratio=1.5"),
        ({"steps": -1}, r"train.steps=-1"),
        ({"r4": "block:100"}, r"rotation.r4='block:100'"),
        ({"batch_size": 8, "micro_batch": 3}, r"not a multiple"),
        ({"w_bits": 16, "a_bits": 16, "kv_bits": 16}, r"nothing to quantize"),
        ({"bogus": 1}, r"unknown setting 'bogus'"),
        ({"settings": {"weights.nope": 1}}, r"unknown setting 'weights.nope'"),
        ({"device": "tpu"}, r"device='tpu'"),
        ({"ste": "lsq"}, r"train.ste='lsq' is not valid; accepted: range, identity"),
    ],
)
def test_bad_settings_name_the_field(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config("spinquant", **overrides)


def test_rotation_settings_need_a_rotation() -> None:
    with pytest.raises(ConfigError, match=r"rotation.r4 needs"):
        make_config("gptq", w_bits=4, r4="full")
    with pytest.raises(ConfigError, match="method='nope'"):
        make_config("nope")


def test_from_dict_rejects_unknown_types_versions_and_keys() -> None:
    good = config_to_dict(make_config())
    with pytest.raises(ConfigError, match="not a SpinQuantConfig"):
        config_from_dict({"_type": "os.system", "_version": 1, "_data": {}})
    with pytest.raises(ConfigError, match="version 99"):
        config_from_dict({**good, "_version": 99})
    bad = json.loads(json.dumps(good))
    bad["_data"]["weights"]["extra"] = 1
    with pytest.raises(ConfigError, match=r"unknown setting.*weights.extra"):
        config_from_dict(bad)


def test_config_module_does_not_import_torch() -> None:
    code = "import sys, quant_core.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_the_pipeline_does_not_initialise_cuda() -> None:
    code = "import quant_core.pipeline, torch; assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)

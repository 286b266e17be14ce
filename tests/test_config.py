"""Bad configs fail in validate(), before anything compiles, naming the field and the fix."""

import pytest

from nopejax import config
from nopejax.config import ConfigError

BAD = [
    ("model.num_kv_heads", dict(model=dict(num_heads=6, num_kv_heads=4)), "not a multiple"),
    ("model.head_dim", dict(model=dict(head_dim=33, d_model=198)), "even"),
    ("model.no_rope_layers", dict(model=dict(no_rope_layers=(1, 1, 0))), "num_layers = 6"),
    ("model.no_rope_layers", dict(model=dict(no_rope_layers=(1, 2, 1, 1, 1, 0))), "0 or 1"),
    ("model.no_rope_layer_interval", dict(model=dict(no_rope_layer_interval=-1)), ">= 0"),
    ("model.num_layers", dict(model=dict(num_layers=0)), "positive"),
    ("model.dtype", dict(model=dict(dtype="float8")), "unknown dtype"),
    ("model.attention_impl", dict(model=dict(attention_impl="flash")), "unknown value"),
    ("model.attention_impl", dict(model=dict(attention_impl="pallas")), "head_dim 64, 128 or 256"),
    ("model.remat", dict(model=dict(remat="some")), "unknown policy"),
    ("model.rope_scaling", dict(model=dict(rope_scaling={"rope_type": "ntk", "factor": 2.0})), "not supported"),
    ("mesh.tensor", dict(mesh=dict(tensor=4)), "num_kv_heads=2"),
    ("mesh", dict(mesh=dict(data=-1, fsdp=-1)), "more than one"),
    ("train.grad_accum", dict(train=dict(grad_accum=3)), "not divisible"),
    ("optim.schedule", dict(optim=dict(schedule="step")), "unknown schedule"),
    ("optim.decay_steps", dict(optim=dict(warmup_steps=200, decay_steps=200)), "exceeds train.steps"),
    ("data.source", dict(data=dict(source="hub")), "unknown source"),
    ("data.path", dict(data=dict(source="jsonl")), "needs a path"),
    # layer types (issue 13)
    ("model.layer_types", dict(model=dict(layer_types=("full_attention",) * 5)), "num_layers = 6"),
    ("model.layer_types", dict(model=dict(layer_types=("global",) * 6)), "unknown layer type"),
    ("model.sliding_window", dict(model=dict(global_attention_interval=4)), "no size is set"),
    ("model.sliding_window", dict(model=dict(global_attention_interval=4, sliding_window=0)), "positive integer"),
    ("model.sliding_window", dict(model=dict(sliding_window=32)), "no layer is sliding_attention"),
    ("model.attention_chunk_size", dict(model=dict(attention_chunk_size=64)), "no layer is chunked_attention"),
    (
        "model.attention_chunk_size",
        dict(model=dict(layer_types=("chunked_attention", "full_attention") * 3)),
        "no size is set",
    ),
    ("model.global_attention_interval", dict(model=dict(global_attention_interval=-2)), ">= 0"),
    (
        "model.global_attention_interval",
        dict(model=dict(global_attention_interval=4, layer_types=("full_attention",) * 6)),
        "not both",
    ),
    (
        "model.global_attention_interval",
        dict(model=dict(global_attention_interval=4, sliding_window=8, attention_chunk_size=8)),
        "ambiguous",
    ),
    ("model.partial_rotary_factor", dict(model=dict(partial_rotary_factor=1.5)), "(0, 1]"),
    ("model.partial_rotary_factor", dict(model=dict(partial_rotary_factor=0.0)), "(0, 1]"),
    ("model.partial_rotary_factor", dict(model=dict(partial_rotary_factor=0.3)), "= 9 dims"),
    ("model.rope_layout", dict(model=dict(rope_layout="pairs")), "unknown layout"),
    ("model.qk_norm", dict(model=dict(qk_norm="layernorm")), "unknown value"),
    ("model.qk_norm", dict(model=dict(qk_norm="l2", no_rope_layers=(0,) * 6)), "every layer is NoPE"),
    (
        "model.partial_rotary_factor",
        dict(model=dict(partial_rotary_factor=0.5, no_rope_layers=(0,) * 6)),
        "every layer is NoPE",
    ),
    ("model.rope_theta_local", dict(model=dict(rope_theta_local=1e4)), "no local"),
    (
        "model.rope_theta_local",
        dict(model=dict(rope_theta_local=-1.0, global_attention_interval=2, sliding_window=4)),
        "positive",
    ),
    ("model.nope_temperature", dict(model=dict(nope_temperature=(8192.0,))), "two positive numbers"),
    ("model.nope_temperature", dict(model=dict(nope_temperature=(0.0, 0.1))), "two positive numbers"),
    (
        "model.nope_temperature",
        dict(model=dict(nope_temperature=(8192.0, 0.1), no_rope_layer_interval=0)),
        "no NoPE layer",
    ),
]


@pytest.mark.parametrize("field, changes, words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_config_is_rejected_with_field_and_fix(field, changes, words):
    cfg = config.base_config()
    for section, values in changes.items():
        cfg[section].update(values)
    with pytest.raises(ConfigError) as err:
        config.validate(cfg)
    assert err.value.field == field
    assert words in str(err.value)
    assert "Fix:" in str(err.value)


def test_default_and_shipped_configs_are_valid():
    from configs_loader import load

    config.validate(config.base_config())
    for name in ("tiny", "smollm3_3b", "tiny_local_global", "local_global_3b"):
        config.validate(load(name))


def test_overrides_parse_types_and_reject_unknown_keys():
    cfg = config.apply_overrides(
        config.base_config(),
        ["model.d_model=256", "optim.lr=1e-3", "model.scan_layers=false", "model.no_rope_layers=[1,0,1,1,1,0]",
         "optim.schedule=cosine", "optim.warmup_steps=5"],
    )  # fmt: skip
    assert cfg.model.d_model == 256 and cfg.optim.lr == 1e-3 and cfg.model.scan_layers is False
    assert cfg.model.no_rope_layers == (1, 0, 1, 1, 1, 0) and cfg.optim.schedule == "cosine"
    with pytest.raises(ConfigError, match="no such config key"):
        config.apply_overrides(config.base_config(), ["model.d_modle=3"])
    with pytest.raises(ConfigError, match="no such config section"):
        config.apply_overrides(config.base_config(), ["modle.d_model=3"])
    with pytest.raises(ConfigError, match="not a boolean"):
        config.apply_overrides(config.base_config(), ["model.scan_layers=maybe"])
    with pytest.raises(ConfigError, match="wrong type"):
        config.apply_overrides(config.base_config(), ["model.d_model=wide"])


def test_config_round_trips_through_json():
    cfg = config.base_config()
    cfg.model.no_rope_layers = (1, 1, 0, 1, 1, 0)
    cfg.model.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    back = config.from_dict(config.to_dict(cfg))
    assert config.to_dict(back) == config.to_dict(cfg)

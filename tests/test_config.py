"""Bad configs fail in validate(), before anything compiles, naming the field and the fix."""

import logging
import pathlib

import pytest

from nopejax import config, stages, validation
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
    # the Pallas kernel takes zig-zag chunks of 128-row multiples: 256 / (2 x 4) = 32 rows
    (
        "train.seq_len",
        dict(model=dict(attention_impl="pallas", head_dim=64), mesh=dict(context=4), train=dict(seq_len=256)),
        "multiple of 128 rows",
    ),
]


@pytest.mark.parametrize("field, changes, words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_config_is_rejected_with_field_and_fix(field, changes, words):
    cfg = config.base_config()
    for section, values in changes.items():
        cfg[section].update(values)
    with pytest.raises(ConfigError) as err:
        validation.validate(cfg)
    assert err.value.field == field
    assert words in str(err.value)
    assert "Fix:" in str(err.value)


ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = sorted(
    p for d in ("configs", "experiments") for p in (ROOT / d).rglob("*.py") if "def get_config" in p.read_text()
)


def test_shipped_config_files_are_all_found():
    names = {str(p.relative_to(ROOT)) for p in SHIPPED}
    study = "experiments/length_generalization"
    assert {"configs/tiny.py", "configs/smollm3_3b.py", f"{study}/copy/hybrid.py", f"{study}/text/nope.py"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_config_loads_and_validates(path):
    validation.validate(config.load_config(str(path)))


def test_default_config_is_valid():
    validation.validate(config.base_config())


def write_config(tmp_path, body: str) -> str:
    path = tmp_path / "my_config.py"
    path.write_text("from nopejax.config import base_config\n\n\ndef get_config():\n    cfg = base_config()\n"
                    + "".join(f"    {line}\n" for line in body.splitlines()) + "    return cfg\n")  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    "line, field, nearest",
    [
        ("cfg.train.stepz = 5", "train.stepz", "train.steps"),
        ("cfg.model.sliding_windw = 8", "model.sliding_windw", "model.sliding_window"),
        ("cfg.init_frm = 'x'", "init_frm", "init_from"),
    ],
)
def test_config_file_with_unknown_key_is_refused_naming_the_nearest(tmp_path, line, field, nearest):
    with pytest.raises(ConfigError) as err:
        config.load_config(write_config(tmp_path, line))
    assert err.value.field == field
    assert f"`{nearest}`" in err.value.fix and "my_config.py" in err.value.problem


def test_config_file_with_known_keys_loads(tmp_path):
    cfg = config.load_config(
        write_config(tmp_path, "cfg.train.steps = 5\ncfg.model.rope_scaling = {'rope_type': 'linear', 'factor': 2.0}")
    )
    assert cfg.train.steps == 5 and validation.validate(cfg).model.rope_scaling["factor"] == 2.0


def test_run_config_json_loads_as_a_config(tmp_path):
    cfg = config.base_config()
    cfg.train.steps, cfg.model.no_rope_layers = 7, (1, 1, 0, 1, 1, 0)
    stages.write_config(str(tmp_path), cfg, 0, {"step": 0, "stage": "new run"})  # as `nopejax train` does
    back = config.load_config(str(tmp_path / "config.json"))
    assert config.to_dict(back) == config.to_dict(cfg)


@pytest.mark.parametrize(
    "name, text, words",
    [("config.json", '{"train": {"stepz": 3}}', "train.stepz"), ("config.json", "{not json", "not valid JSON"),
     ("config.yaml", "train: {}", "neither a Python config")],
)  # fmt: skip
def test_bad_config_files_are_refused_in_one_line(tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load_config(str(tmp_path / name))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_window_covering_the_row_warns_once(caplog):
    cfg = config.base_config()
    cfg.model.update(global_attention_interval=2, sliding_window=32)
    with caplog.at_level(logging.WARNING, logger="nopejax.validation"):
        validation.validate(cfg)  # window 32 < seq_len 128: local layers stay local
        assert not caplog.records
        cfg.train.seq_len = 32
        validation.validate(cfg)
        validation.validate(cfg)
    assert len(caplog.records) == 1, caplog.text
    assert "model.sliding_window = 32 >= train.seq_len = 32" in caplog.records[0].getMessage()


def test_pallas_with_context_parallelism_is_refused_on_gpu():
    cfg = config.base_config()
    cfg.model.update(attention_impl="pallas", head_dim=64)
    cfg.mesh.context, cfg.train.seq_len = 2, 512
    validation.validate(cfg)
    validation.check_platform(cfg, "tpu")
    with pytest.raises(ConfigError) as err:
        validation.check_platform(cfg, "gpu")
    assert err.value.field == "model.attention_impl" and "mesh.context=1" in err.value.fix
    cfg.mesh.context = 1
    validation.check_platform(cfg, "gpu")


def test_overrides_parse_types_and_reject_unknown_keys():
    cfg = config.apply_overrides(
        config.base_config(),
        ["model.d_model=256", "optim.lr=1e-3", "model.scan_layers=false", "model.no_rope_layers=[1,0,1,1,1,0]",
         "optim.schedule=cosine", "optim.warmup_steps=5"],
    )  # fmt: skip
    assert cfg.model.d_model == 256 and cfg.optim.lr == 1e-3 and cfg.model.scan_layers is False
    assert cfg.model.no_rope_layers == (1, 0, 1, 1, 1, 0) and cfg.optim.schedule == "cosine"
    with pytest.raises(ConfigError, match="no such config key") as err:
        config.apply_overrides(config.base_config(), ["model.d_modle=3"])
    assert "`model.d_model`" in err.value.fix
    with pytest.raises(ConfigError, match="no such config section") as err:
        config.apply_overrides(config.base_config(), ["modle.d_model=3"])
    assert "`model`" in err.value.fix
    with pytest.raises(ConfigError, match="KEY=VALUE") as err:
        config.apply_overrides(config.base_config(), ["--config.train.steps"])
    assert err.value.fix == "write --config.train.steps=VALUE"
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

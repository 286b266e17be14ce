"""The contract every registered HF family keeps, parametrized over nopejax/hf/registry.py: a family
gets all of it by registering.

For each family: a tiny random transformers model (its own class, built from the family's config
class with odd sizes, fp32, norms in [0.5, 1.5] and sharp weights) -> `from_hf` gives its logits
(1e-4) -> `to_hf` writes back every tensor bit for bit -> `AutoModelForCausalLM` loads the export
and computes the same logits -> a config.json field without a row is refused, naming it, before
any weight is read -> the family's published config.json files (tests/data/hf_configs/<family>/,
each with its source) convert, validate, and export back to themselves. The references are
transformers and the published files, never nopejax.
"""

import copy
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from configs_loader import ROOT

import nopejax
from nopejax import cli, config, layers, model, tensorfile, validation
from nopejax.hf import fields, registry

PUBLISHED = ROOT / "tests" / "data" / "hf_configs"
SEQ = 13
# Odd sizes (vocab 61, 3 heads of 10, widths 37 and 11, 5 experts, 5 layers; Nemotron-H: 7 layers, 6 Mamba2
# heads of 5 in 3 groups, state 7), windows and chunks under the 13-token sequences. Each family's model gets
# the keys its config.json has a row for.
TINY = dict(
    vocab_size=61, hidden_size=30, intermediate_size=37, num_hidden_layers=5, num_attention_heads=3,
    num_key_value_heads=1, head_dim=10, max_position_embeddings=64, sliding_window=5, attention_chunk_size=4,
    moe_intermediate_size=11, intermediate_size_mlp=37, num_experts=5, num_local_experts=5, num_experts_per_tok=2,
    floor_scale=3, attn_scale=0.5, logit_scale=0.7, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},
    # Nemotron-H: Mamba2, relu2 MLP and NoPE attention layers; 13-token rows over 4-token SSD chunks
    hybrid_override_pattern="M-*M-M*", mamba_num_heads=6, mamba_head_dim=5, n_groups=3, ssm_state_size=7, chunk_size=4,
    # Granite 4.0-H: 5 experts of 37 beside a shared SwiGLU of 2 x 37; 6 Mamba2 heads of 10 in 3 groups, state 7,
    # 4-token chunks; the four muP multipliers away from 1
    shared_intermediate_size=74, mamba_n_heads=6, mamba_n_groups=3, mamba_d_state=7, mamba_chunk_size=4,
    embedding_multiplier=1.7, attention_multiplier=0.2, residual_multiplier=0.6, logits_scaling=1.3,
    # Qwen3-Next: GDN, GDN, GDN, attention, GDN (full_attention_interval 4), 2 key heads of 5 serving 4 value heads
    # of 3; partial RoPE rotates int(0.25 * 10) = 2 dims; layer 1 dense; a shared expert two routed experts wide
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=5, linear_value_head_dim=3,
    linear_conv_kernel_dim=3, mlp_only_layers=[1], shared_expert_intermediate_size=22,
)  # fmt: skip
# Qwen3.5 (dense) and Qwen3.5 MoE: the Qwen3-Next sizes above, and mRoPE sections in rope_parameters as the hub's
# configs give them (text positions: ordinary partial RoPE); head_dim 12 rotates 6 dims, 3 frequencies
QWEN3_5_ROPE = dict(
    head_dim=12,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5,
                     "mrope_section": [1, 1, 1], "mrope_interleaved": True},
)  # fmt: skip
# Keys that several families name but that mean a family's own layout: given to that family only
TINY_OF = {
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "mamba", "attention"]),
    # OLMo Hybrid: GDN x3, attention, GDN (its default layer_types); 2 key heads of 9, 6 value heads of 3 (key
    # and value widths equal: save_pretrained splits the conv into equal thirds, tests/hf/test_hf_olmo_hybrid.py)
    "olmo_hybrid": dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=9,
                        linear_value_head_dim=3, linear_conv_kernel_dim=3),
    "qwen3_5": QWEN3_5_ROPE,
    # every layer MoE: mlp_only_layers has a row only to refuse a nonempty list
    "qwen3_5_moe": {**QWEN3_5_ROPE, "mlp_only_layers": []},
}  # fmt: skip
NAMES = [family.name for family in registry.REGISTERED]
# Logit tolerance where a family's fp32 forward is ill-conditioned at these sharp weights. Qwen3-Next: nopejax
# differs from transformers by at most 2.1e-4 (measured), while transformers' own fp32 logits differ from its
# fp64 ones by 1.1e-3 (nopejax's fp32: 1.2e-3); at gentler weights tests/hf/test_hf_qwen3_next.py holds 1e-4.
# Qwen3.5 (dense): 8.7e-4 measured, transformers' fp32 against its fp64 3.5e-4 (nopejax's fp32: 5.1e-4), both on
# logits up to 10; at gentler weights tests/hf/test_hf_qwen3_5.py holds 1e-4.
# Qwen3.5 MoE: 1.37e-4 measured under the suite's XLA flags on an AMD EPYC (8.7e-5 without them; earlier
# machines under 1e-4), on logits up to 9.2: nopejax's fp32 differs from transformers' fp64 by 1.33e-4 and
# transformers' fp32 from its fp64 by 5.1e-5, so the two fp32 forwards may differ by their sum, 1.8e-4.
ATOL = {"qwen3_next": 4e-4, "qwen3_5": 1e-3, "qwen3_5_moe": 2e-4}
# The export reloaded by transformers against the in-memory original: Qwen3.5 MoE's loaded from the original's
# own directory differs from it by 2.4e-5 too (transformers fuses the saved experts on load; these sharp weights
# amplify the moved fp32 roundings), and the export's reload equals that one.
RELOAD_ATOL = {"qwen3_5_moe": 1e-4}


def tiny_reference(family: registry.Family, seed: int = 0):
    """The family's transformers causal LM at the TINY sizes, random, fp32, eager attention and experts."""
    # a deep copy: config classes write into the dicts they are given (Qwen3-Next's adds partial_rotary_factor
    # to rope_parameters), which would leak into the next family's model
    kw = copy.deepcopy(
        {key: value for key, value in TINY.items() if key in family.fields} | TINY_OF.get(family.name, {})
    )
    cfg = transformers.AutoConfig.for_model(family.model_type, **kw)
    cfg._attn_implementation, cfg._experts_implementation = "eager", "eager"
    torch.manual_seed(seed)
    ref = getattr(transformers, family.architecture)(cfg).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # a tied head is the embedding, listed once
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.25)
        for name, b in [*ref.named_buffers(), *ref.named_parameters()]:
            if name.endswith("expert_bias"):  # steers the choice of experts (AFMoE)
                b.normal_(0.0, 0.2)
    return ref


def logits_of(ref, tokens_BS):
    with torch.no_grad():
        return ref(torch.tensor(np.asarray(tokens_BS), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=NAMES)
def imported(request, tmp_path_factory):
    """(family, transformers model, its saved dir, nopejax.from_hf of that dir)."""
    family = registry.BY_NAME[request.param]
    ref = tiny_reference(family, seed=len(family.name))
    path = tmp_path_factory.mktemp(family.name) / "hf"
    ref.save_pretrained(path)
    return family, ref, path, nopejax.from_hf(str(path))


def assert_same_logits(ref, ours) -> None:
    """nopejax's fp32 logits are transformers' (1e-4; measured: at most 2.9e-5, Nemotron-H; `ATOL` where a
    family's own fp32 forward is less exact), on logits that are not all small (a lost scale or norm would show)."""
    tokens_BS = np.random.default_rng(0).integers(0, 61, (2, SEQ)).astype(np.int32)
    want = logits_of(ref, tokens_BS)
    assert np.abs(want).max() > 1.0
    graphdef, params = model.split(ours)  # one compiled forward: faster than op-by-op here
    logits = jax.jit(lambda p, t: model.apply(graphdef, p, t))(params, jnp.asarray(tokens_BS))
    np.testing.assert_allclose(np.asarray(logits), want, atol=ATOL.get(ours.cfg.hf_family, 1e-4), rtol=0)


def test_from_hf_gives_transformers_logits(imported):
    family, ref, _, ours = imported
    assert ours.cfg.hf_family == family.name
    assert_same_logits(ref, ours)


def test_to_hf_round_trip_loads_in_transformers(imported, tmp_path):
    """The export holds the original's tensors (names, dtypes, values) and transformers' Auto class
    builds the family's model from it, with the original's logits."""
    family, ref, path, ours = imported
    out = tmp_path / "back"
    nopejax.to_hf(ours, str(out))
    a, b = tensorfile.Reader(str(path)), tensorfile.Reader(str(out))
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert a.dtype(name) == b.dtype(name), name
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    again.eval()
    assert type(again).__name__ == family.architecture
    tokens_BS = np.arange(SEQ).reshape(1, SEQ) % 61
    np.testing.assert_allclose(
        logits_of(again, tokens_BS), logits_of(ref, tokens_BS), atol=RELOAD_ATOL.get(family.name, 1e-6), rtol=0
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_config_class_field_has_a_row_with_the_class_default(name):
    """The rows enumerate transformers' config class: its fields (with its defaults, where the row
    reads the value), what its to_dict writes, and the generation fields it moves to GenerationConfig."""
    family = registry.BY_NAME[name]
    cls = type(transformers.AutoConfig.for_model(family.model_type))
    for f in dataclasses.fields(cls):
        assert f.name in family.fields, f"{cls.__name__}.{f.name} has no row in nopejax/hf/{name}.py"
        if family.fields[f.name].read is not nopejax.hf.harmless:  # a harmless row accepts any value
            assert family.fields[f.name].default == f.default, f.name
    for field in cls().to_dict():
        assert field in family.fields, f"{cls.__name__}.{field} has no row in nopejax/hf/{name}.py"
    for field in transformers.GenerationConfig._get_default_generation_params():
        assert field in family.fields, field
    assert family.fields["rope_theta"].default == cls.default_theta


def test_unknown_field_is_refused_with_its_name_before_any_weight_is_read(imported, tmp_path):
    family, _, path, _ = imported
    hf_config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "attn_logit_softcapping": 50.0}))
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.from_hf(str(tmp_path))  # no safetensors here: refused on config.json alone
    message = str(err.value)
    assert err.value.field == "attn_logit_softcapping" and "\n" not in message
    assert f"Fix: add one to nopejax/hf/{family.name}.py" in message


def _published():
    return [(name, p) for name in NAMES for p in sorted((PUBLISHED / name).glob("*.json"))]


@pytest.mark.parametrize("name,path", _published(), ids=lambda x: x.stem if isinstance(x, pathlib.Path) else x)
def test_published_configs_convert_validate_and_export_back(name, path):
    """A published config.json imports as the family, validates, and the export's config.json imports
    to the same model; where a configs/*.py describes the model, it is that model."""
    published = json.loads(path.read_text())
    assert published["source"].startswith("https://huggingface.co/"), path
    m = nopejax.hf.model_config_from_hf(published["config"])
    assert m.hf_family == name
    cfg = config.base_config()
    cfg.model = m
    validation.validate(cfg)
    assert nopejax.hf.model_config_from_hf(nopejax.hf.hf_config(m)) == m
    if "nopejax_config" in published:
        ours = validation.validate(config.load_config(str(ROOT / published["nopejax_config"]))).model
        assert layers.layer_specs(m) == layers.layer_specs(ours)
        assert nopejax.hf.hf_config(m) == nopejax.hf.hf_config(ours)
        for field in ("d_model", "head_dim", "num_experts", "expert_d_ff", "d_ff", "routed_scale", "embed_scale"):
            assert m[field] == ours[field], field


# one layer of each kind (LayerSpec.mixer / .ffn) beside attention + dense FFN layers
LAYER_OF_MIXER = {"attention": "full_attention", "mamba2": "mamba2", "gated_deltanet": "gated_deltanet", "none": "mlp"}
UNHELD = [
    (family.name, what, kind)
    for family in registry.REGISTERED
    for what, kinds, held in (("mixer", layers.MIXERS, family.mixers), ("ffn", layers.FFNS, family.ffns))
    for kind in kinds
    if kind not in held
]


def _model_with(name: str, what: str, kind: str):
    """A 3-layer model of family `name` whose middle layer has mixer or FFN `kind`, the others attention + dense
    (+ MoE, in a family whose every FFN is MoE: Qwen3.5 MoE)."""
    cfg = config.base_config()
    cfg.model.update(
        hf_family=name, vocab_size=61, d_model=30, num_heads=3, num_kv_heads=1, head_dim=10, d_ff=37, num_layers=3,
        no_rope_layers=(0, 0, 0),
    )  # fmt: skip
    if kind == "mamba2":
        cfg.model.update(mamba_num_heads=6, mamba_head_dim=10, mamba_groups=3, mamba_state_size=7)
    if kind == "gated_deltanet":
        cfg.model.update(gdn_key_heads=2, gdn_value_heads=4, gdn_key_head_dim=3, gdn_value_head_dim=5)
    other = "dense" if "dense" in registry.BY_NAME[name].ffns else "moe"
    mixers, ffns = ["full_attention"] * 3, [other] * 3
    if what == "mixer":
        mixers[1] = LAYER_OF_MIXER[kind]
    else:
        ffns[1] = kind
    cfg.model.num_experts = 5 if "moe" in ffns else 0
    cfg.model.update(layer_types=tuple(mixers), ffn_types=tuple(ffns))
    return validation.validate(cfg).model


@pytest.mark.parametrize("name,what,kind", UNHELD, ids=lambda x: str(x))
def test_a_layer_kind_the_format_has_no_place_for_is_refused_by_name_before_anything_is_written(
    name, what, kind, tmp_path
):
    """A Gated DeltaNet layer as Granite 4.0-H or Nemotron-H, an FFN-only layer as Granite 4.0-H, a mixer-only
    layer or MoE as a dense family: one line naming the layer and its kind (the family's MIXERS / FFNS)."""
    m = _model_with(name, what, kind)
    fmt = registry.BY_NAME[name].architecture.removesuffix("ForCausalLM")
    with pytest.raises(config.ConfigError) as err:
        nopejax.to_hf({}, str(tmp_path / "out"), m)  # refused before a single param is asked for
    message = str(err.value)
    assert err.value.field == ("model.layer_types" if what == "mixer" else "model.ffn_types"), message
    assert f"layer 1 has {fields._MIXER_NAMES[kind] if what == 'mixer' else fields._FFN_NAMES[kind]}" in message
    assert f"the {fmt} format has no such layer" in message and "\n" not in message
    holders = [f.name for f in registry.REGISTERED if kind in (f.mixers if what == "mixer" else f.ffns)]
    assert f"one of {holders}" in message if holders else "no family nopejax exports holds it" in message
    assert not (tmp_path / "out").exists()


def test_the_hybrid_families_refuse_gated_deltanet():
    """The examples the generic rule exists for are among the cases tested above."""
    assert {("granitemoehybrid", "mixer", "gated_deltanet"), ("nemotron_h", "mixer", "gated_deltanet"),
            ("granitemoehybrid", "mixer", "none"), ("smollm3", "ffn", "moe")} <= set(UNHELD)  # fmt: skip


def test_published_configs_are_filed_under_registered_families():
    """A directory of published configs names a registered family (a typo would test nothing)."""
    dirs = {p.name for p in PUBLISHED.iterdir() if p.is_dir()}
    assert dirs <= set(NAMES), dirs - set(NAMES)


# ---------------------------------------------------------------------------------------------
# The registry is the one list


def test_every_family_module_is_registered():
    """A module in nopejax/hf/ that holds a family's rows and map has its registry line."""
    machinery = {"__init__", "fields", "tensors", "registry"}
    modules = {p.stem for p in (ROOT / "nopejax" / "hf").glob("*.py")} - machinery
    assert modules == set(NAMES)


def test_the_cli_help_names_the_registered_families(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert f"({registry.labels()})" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert f"one of {', '.join(registry.NAMES)}" in " ".join(capsys.readouterr().out.split())


def test_validation_accepts_exactly_the_registered_families():
    for name in (*registry.NAMES, "gemma3"):
        cfg = config.base_config()
        cfg.model.hf_family = name
        if name in registry.NAMES:
            validation.validate(cfg)
            continue
        with pytest.raises(
            config.ConfigError, match=rf"`model\.hf_family`.*use one of {re.escape(str(registry.NAMES))}"
        ):
            validation.validate(cfg)
    with pytest.warns(FutureWarning, match="registry.NAMES"):
        assert config.HF_FAMILIES == registry.NAMES  # the old spelling, for users' scripts


def _span(text: str) -> str:
    return text.split("<!-- families -->")[1].split("<!-- /families -->")[0]


def test_the_readme_and_the_guide_name_exactly_the_registered_families():
    assert _span((ROOT / "README.md").read_text()) == registry.labels()
    guide = _span((ROOT / "docs" / "guides" / "huggingface.md").read_text())
    rows = [line.split("|")[1].strip().strip("`") for line in guide.splitlines()[3:]]
    assert rows == [family.model_type for family in registry.REGISTERED]


def test_an_unregistered_model_type_is_refused_naming_the_registered_ones():
    with pytest.raises(nopejax.hf.HFConfigError) as err:
        nopejax.hf.model_config_from_hf({"model_type": "qwen2"})
    assert all(family.model_type in str(err.value) for family in registry.REGISTERED)


def test_a_family_without_its_module_is_not_registered(tmp_path):
    """Deleting a family's module takes it out of every list read from the registry, with no other edit."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(ROOT / "nopejax" / "hf", hf_dir)
    (hf_dir / "exaone4.py").unlink()
    spec = importlib.util.spec_from_file_location("registry_copy", hf_dir / "registry.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert tuple(n for n in registry.NAMES if n != "exaone4") == copy.NAMES
    assert "EXAONE 4" not in copy.labels() and "exaone4" not in copy.BY_MODEL_TYPE


# What a copy of the package without one family's module reports: its CLI help, its one-line error
# for that family as model.hf_family and as an imported model_type, and the two generated doc spans.
_WITHOUT_ONE = """
import contextlib, io, json
from nopejax import cli, config, hf, reference, validation

def out(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        cli.main(argv)
    return buf.getvalue()

def error(f):
    try:
        f()
    except Exception as e:
        return str(e)

cfg = config.base_config()
cfg.model.hf_family = "exaone4"
print(json.dumps({
    "help": out(["--help"]) + out(["export", "--help"]) + out(["import-hf", "--help"]),
    "hf_family": error(lambda: validation.validate(cfg)),
    "model_type": error(lambda: hf.model_config_from_hf({"model_type": "exaone4"})),
    "docs": reference.families_line() + reference.families_table(),
}))
"""


def test_deleting_a_family_module_takes_it_out_of_the_cli_errors_and_docs(tmp_path):
    """The acceptance rule of the registry, end to end: a copy of the package whose only change is
    a deleted nopejax/hf/exaone4.py names EXAONE 4 nowhere, and refuses it in one line."""
    shutil.copytree(ROOT / "nopejax", tmp_path / "nopejax", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "nopejax" / "hf" / "exaone4.py").unlink()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", _WITHOUT_ONE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    others = [family for family in registry.REGISTERED if family.name != "exaone4"]
    text = " ".join(got["help"].split())
    assert "EXAONE" not in text and "exaone4" not in text
    assert ", ".join(family.label for family in others) in text and ", ".join(f.name for f in others) in text
    assert "exaone4" not in got["docs"] and "EXAONE" not in got["docs"]
    assert all(f"| `{family.model_type}` | {family.label}" in got["docs"] for family in others)
    assert got["hf_family"].startswith("config field `model.hf_family`: unknown value 'exaone4'")
    assert str(tuple(family.name for family in others)) in got["hf_family"]
    imports = got["model_type"].split("nopejax imports ")[1]  # the message's list of what it imports
    assert "exaone4" not in imports and "EXAONE" not in imports and str(sorted(f.model_type for f in others)) in imports

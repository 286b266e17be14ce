"""Cohere2 and EXAONE 4: logits parity with transformers, exact round trips, the export mirror rule,
and continued pretraining (the block forms on every path: tests/test_blocks.py).

The references are transformers' own Cohere2ForCausalLM / Exaone4ForCausalLM, built from configs in
this file (no download), fp32, with norm weights away from 1 so a misplaced norm cannot pass.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from configs_loader import ROOT

import nopejax
from nopejax import cli, config, hf, layers, model, tensorfile, validation

CLASSES = {"cohere2": transformers.Cohere2Config, "exaone4": transformers.Exaone4Config}
# odd sizes: vocab 61, 3 heads of 10, d_ff 37, 5 layers (L L L G L), window 5 < the 13-token sequences
TINY = dict(vocab_size=61, hidden_size=30, intermediate_size=37, num_hidden_layers=5, num_attention_heads=3,
            max_position_embeddings=64, sliding_window=5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0})  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # fmt: skip
SEQ = 13
CASES = {
    "cohere2-gqa3-tied-bias": ("cohere2", dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                               logit_scale=0.7)),
    "cohere2-mha-untied-pattern3": ("cohere2", dict(num_key_value_heads=3, tie_word_embeddings=False,
                                                    sliding_window_pattern=3, logit_scale=1.3)),
    # heads * head_dim != hidden_size, as Cohere2Attention allows (the published tiny random Tiny Aya has it)
    "cohere2-head-dim-14": ("cohere2", dict(num_key_value_heads=1, head_dim=14, logit_scale=1.0)),
    "exaone4-gqa3-untied-llama3": ("exaone4", dict(num_key_value_heads=1, head_dim=10, tie_word_embeddings=False,
                                                   rope_parameters=LLAMA3)),
    "exaone4-mha-tied": ("exaone4", dict(num_key_value_heads=3, head_dim=10, tie_word_embeddings=True)),
    # no window: every layer global and rotating (EXAONE-4.0-1.2B's form)
    "exaone4-all-global": ("exaone4", dict(num_key_value_heads=1, head_dim=10, sliding_window=None,
                                           layer_types=["full_attention"] * 5)),
}  # fmt: skip


def hf_model(family: str, seed: int = 0, **kw):
    """A tiny random transformers model with norms in [0.5, 1.5] and sharp weights."""
    torch.manual_seed(seed)
    cfg = CLASSES[family](**{**TINY, **kw})
    ref = getattr(transformers, f"{type(cfg).__name__.removesuffix('Config')}ForCausalLM")(cfg).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # a tied head is the embedding, listed once
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.25)
    return ref


def logits_of(ref, tokens_BS):
    with torch.no_grad():
        return ref(torch.tensor(np.asarray(tokens_BS), dtype=torch.long)).logits.numpy()


def saved_and_imported(case: str, ref, tmp_path_factory):
    """(case, transformers model, its saved dir, nopejax.from_hf of that dir)."""
    path = tmp_path_factory.mktemp(case) / "hf"
    ref.save_pretrained(path)
    return case, ref, path, nopejax.from_hf(str(path))


@pytest.fixture(scope="module", params=list(CASES))
def imported(request, tmp_path_factory):
    family, kw = CASES[request.param]
    return saved_and_imported(request.param, hf_model(family, seed=len(request.param), **kw), tmp_path_factory)


def test_logits_match_transformers(imported):
    case, ref, _, ours = imported
    family, _ = CASES[case]
    assert ours.cfg.hf_family == family
    tokens_BS = np.random.default_rng(0).integers(0, 61, (2, SEQ)).astype(np.int32)
    want = logits_of(ref, tokens_BS)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens_BS))), want, atol=1e-4, rtol=0)
    types = ref.config.layer_types
    specs = layers.layer_specs(ours.cfg)
    assert [s.attention == "sliding" for s in specs] == [t == "sliding_attention" for t in types]
    if ref.config.sliding_window is not None:  # both families rotate exactly their sliding layers
        assert [s.use_rope for s in specs] == [t == "sliding_attention" for t in types]
    else:
        assert all(s.use_rope for s in specs)


def assert_export_reproduces_every_tensor(imported, out) -> None:
    """Export the imported model to `out`: the same tensor names, dtypes and values as the HF original."""
    _, ref, path, ours = imported
    nopejax.to_hf(ours, str(out))
    a, b = tensorfile.Reader(str(path)), tensorfile.Reader(str(out))
    tied = ref.config.tie_word_embeddings
    names = [n for n in a.names() if not (tied and n == "lm_head.weight")]
    assert sorted(names) == sorted(b.names())
    for name in names:
        assert a.dtype(name) == b.dtype(name), name
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)


def test_round_trip_reproduces_every_tensor(imported, tmp_path):
    ref, out = imported[1], tmp_path / "back"
    assert_export_reproduces_every_tensor(imported, out)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(ref) and again.config.layer_types == ref.config.layer_types
    tokens_BS = np.arange(SEQ).reshape(1, SEQ) % 61
    np.testing.assert_allclose(logits_of(again, tokens_BS), logits_of(ref, tokens_BS), atol=1e-6, rtol=0)


def test_llama_imports_and_exports_as_llama(tmp_path):
    """A Llama import keeps its family: the export is a LlamaForCausalLM with the same tensors and logits."""
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=30, intermediate_size=37, num_hidden_layers=3,
                                   num_attention_heads=3, num_key_value_heads=1, attention_bias=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": 100.0})  # fmt: skip
    ref = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.25)
    ref.save_pretrained(tmp_path / "hf")
    ours = nopejax.from_hf(str(tmp_path / "hf"))
    assert ours.cfg.hf_family == "llama"
    nopejax.to_hf(ours, str(tmp_path / "back"))
    a, b = tensorfile.Reader(str(tmp_path / "hf")), tensorfile.Reader(str(tmp_path / "back"))
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert type(again) is transformers.LlamaForCausalLM
    tokens_BS = np.arange(SEQ).reshape(1, SEQ) % 61
    np.testing.assert_allclose(logits_of(again, tokens_BS), logits_of(ref, tokens_BS), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# config.json rows: every class field has one; what transformers cannot run is refused


@pytest.mark.parametrize(
    "family,field,value",
    [
        ("cohere2", "mlp_bias", True),  # Cohere2's MLP has none: a field it ignores would hide weights
        ("cohere2", "sliding_window", None),  # transformers' Cohere2 fails without a window
        ("cohere2", "rotary_pct", 0.5),  # Command R7B's hub field: only the value transformers computes
        ("cohere2", "use_qk_norm", True),  # Cohere (1) has QK-norm, Cohere2 does not: no row
        ("cohere2", "logit_scale", 0.0),
        ("exaone4", "attention_bias", True),
        ("exaone4", "sliding_window_pattern", "LLLG"),  # transformers cannot derive layer_types from it
    ],
)
def test_what_transformers_does_not_compute_is_refused(tmp_path, family, field, value):
    cfg = json.loads(CLASSES[family](**{**TINY, "num_key_value_heads": 1}).to_json_string())
    cfg[field] = value
    if field == "sliding_window_pattern":
        del cfg["layer_types"]
    with pytest.raises(hf.HFConfigError) as err:
        hf.model_config_from_hf(cfg)
    assert err.value.field.split(".")[0] == field and "Fix:" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Export: the mirror rule, per family


@pytest.mark.parametrize(
    "family,overrides,field",
    [
        ("cohere2", dict(), "block"),  # a pre-norm model
        ("cohere2", dict(block="parallel", norm="layernorm", rope_layout="interleaved", no_rope_layer_interval=0),
         "no_rope_layers"),  # RoPE on a global layer
        ("exaone4", dict(block="post_norm", qk_norm="rms", attention_bias=True), "attention_bias"),
        ("exaone4", dict(block="post_norm"), "qk_norm"),
        ("smollm3", dict(block="sandwich"), "block"),
        ("llama", dict(), "no_rope_layers"),  # the default model has NoPE layers
    ],
)  # fmt: skip
def test_export_of_an_inexpressible_model_fails_and_writes_nothing(tmp_path, family, overrides, field):
    cfg = config.base_config()
    cfg.model.update(hf_family=family, global_attention_interval=4, sliding_window=8, **overrides)
    m = validation.validate(cfg).model
    out = tmp_path / "out"
    name = hf.FAMILIES[family].architecture.removesuffix("ForCausalLM")
    with pytest.raises(config.ConfigError, match=rf"`model\.{field}`.* the {name} format has no .*Fix:"):
        hf.to_hf({}, str(out), m)  # refused before a single param is asked for
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Continued pretraining: import-hf, train, export, and transformers agrees with nopejax


@pytest.mark.parametrize("family", ["cohere2", "exaone4"])  # ~1 min each on 2 loaded cores
def test_import_train_export_matches_transformers(tmp_path, family):
    """A transformers model of the tiny config's shape -> import-hf -> 3 steps of `nopejax train
    --config configs/tiny_<family>.py` resuming from it -> export -> transformers' logits."""
    config_file = f"{ROOT}/configs/tiny_{family}.py"
    m = validation.validate(config.load_config(config_file)).model
    m.num_layers = 4  # the CLI override below: L L L G
    written = hf.hf_config(m, {"bos": 257, "eos": 258, "pad": 256})
    ref = CLASSES[family](**{k: v for k, v in written.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    start = getattr(transformers, f"{type(ref).__name__.removesuffix('Config')}ForCausalLM")(ref).float()
    start.save_pretrained(tmp_path / "hf")
    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    assert cli.main(["import-hf", str(tmp_path / "hf"), "--workdir", workdir]) == 0
    overrides = ["--config.model.num_layers=4", "--config.train.steps=3", "--config.train.global_batch_size=8",
                 "--config.train.seq_len=48", "--config.train.eval_every=0", "--config.train.sample_every=0",
                 "--config.checkpoint.every_steps=3"]  # fmt: skip
    assert cli.main(["train", "--config", config_file, "--workdir", workdir, *overrides, "--no-progress"]) == 0
    assert cli.main(["export", "--workdir", workdir, "--out", out]) == 0
    ours = nopejax.load_model(workdir)
    assert ours.cfg.hf_family == family
    _, trained = model.split(ours)
    _, initial = model.split(nopejax.from_hf(str(tmp_path / "hf")))
    assert not np.allclose(trained["layers"]["wq"], initial["layers"]["wq"])  # it trained
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens_BS = np.random.default_rng(5).integers(0, 384, (2, 40)).astype(np.int32)  # past the window of 32
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens_BS))), logits_of(exported, tokens_BS), atol=1e-4,
                               rtol=0)  # fmt: skip

"""AFMoE (Arcee Trinity) and Llama 4 text: logits parity with transformers, exact round trips of
tensors and config fields, what is refused on import and export.

The references are transformers' own AfmoeForCausalLM / Llama4ForCausalLM, built from configs in
this file (no download), fp32, eager attention and experts, with norms in [0.5, 1.5], sharp
weights and (AFMoE) a random expert bias, so a misplaced norm, gate or bias cannot pass.
Odd sizes: vocab 61, d_model 40, 3 heads of 14 (42 != 40), dense width 37, expert width 11,
5 experts; windows and chunks of 4 under 13-token sequences.
"""

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from nopejax import cli, config, hf, layers, tensorfile, validation
from tests.hf.test_hf_contract import assert_same_logits
from tests.test_hf_families import assert_export_reproduces_every_tensor, logits_of, saved_and_imported

SEQ = 13
COMMON = dict(vocab_size=61, hidden_size=40, num_attention_heads=3, head_dim=14, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
              experts_implementation="eager")  # fmt: skip
AFMOE = dict(intermediate_size=37, moe_intermediate_size=11, num_hidden_layers=5, num_experts=5, sliding_window=4,
             rope_parameters={"rope_type": "default", "rope_theta": 100.0})  # fmt: skip
LLAMA4 = dict(intermediate_size=11, intermediate_size_mlp=37, num_hidden_layers=5, num_local_experts=5,
              attention_chunk_size=4, rope_parameters={"rope_type": "default", "rope_theta": 100.0})  # fmt: skip
# Llama 4 Scout's RoPE scaling form: low_freq_factor == high_freq_factor (no interpolated band)
SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 16.0, "low_freq_factor": 1.0,
              "high_freq_factor": 1.0, "original_max_position_embeddings": 8}  # fmt: skip
CASES = {
    # 2 dense layers then MoE; sliding RoPE x2 : global NoPE (L L G L L); muP on; gate always
    "afmoe-dense2-mup-untied": ("afmoe", dict(num_key_value_heads=1, num_dense_layers=2, num_experts_per_tok=2,
                                              num_shared_experts=1, route_scale=1.7, global_attn_every_n_layers=3,
                                              mup_enabled=True, tie_word_embeddings=False)),
    "afmoe-mha-tied-bias-2shared": ("afmoe", dict(num_key_value_heads=3, num_dense_layers=1, num_experts_per_tok=3,
                                                  num_shared_experts=2, global_attn_every_n_layers=2,
                                                  tie_word_embeddings=True, attention_bias=True)),
    # MoE every 2nd layer; RoPE x3 : NoPE (chunked RoPE layers, global NoPE); temperature at floor_scale 3
    "llama4-step2-top1": ("llama4_text", dict(num_key_value_heads=1, interleave_moe_layer_step=2,
                                              num_experts_per_tok=1, floor_scale=3, attn_scale=0.5,
                                              tie_word_embeddings=False)),
    "llama4-top2-tied-scout-rope": ("llama4_text", dict(num_key_value_heads=3, num_experts_per_tok=2, floor_scale=2,
                                                    attn_scale=0.3, no_rope_layers=[1, 0, 1, 1, 0],
                                                    tie_word_embeddings=True, rope_parameters=SCOUT_ROPE)),
}  # fmt: skip
CLASSES = {"afmoe": transformers.AfmoeConfig, "llama4_text": transformers.Llama4TextConfig}


def hf_model(model_type: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    base = AFMOE if model_type == "afmoe" else LLAMA4
    cfg = CLASSES[model_type](**{**COMMON, **base, **kw})
    cls = transformers.AfmoeForCausalLM if model_type == "afmoe" else transformers.Llama4ForCausalLM
    ref = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # a tied head is the embedding, listed once
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.25)
        for name, b in ref.named_buffers():
            if name.endswith("expert_bias"):  # steers the choice of experts, not their weights
                b.normal_(0.0, 0.2)
        for name, p in ref.named_parameters():
            if name.endswith("expert_bias"):
                p.normal_(0.0, 0.2)
    return ref


@pytest.fixture(scope="module", params=list(CASES))
def imported(request, tmp_path_factory):
    model_type, kw = CASES[request.param]
    return saved_and_imported(request.param, hf_model(model_type, seed=len(request.param), **kw), tmp_path_factory)


def test_logits_match_transformers(imported):
    case, ref, _, ours = imported
    assert_same_logits(ref, ours)
    m, specs = ours.cfg, layers.layer_specs(ours.cfg)
    if case.startswith("afmoe"):
        assert m.attention_gate and m.block == "sandwich" and m.qk_norm == "rms"
        assert m.embed_scale == (40**0.5 if ref.config.mup_enabled else 1.0)
        assert [s.ffn for s in specs] == ["dense" if i < ref.config.num_dense_layers else "moe" for i in range(5)]
        assert [s.use_rope for s in specs] == [t == "sliding_attention" for t in ref.config.layer_types]
    else:
        assert [s.ffn == "moe" for s in specs] == [i in ref.config.moe_layers for i in range(5)]
        assert [s.use_rope for s in specs] == [bool(x) for x in ref.config.no_rope_layers[:5]]
        assert [s.attention for s in specs] == [t.removesuffix("_attention") for t in ref.config.layer_types]
        assert all(s.nope_temperature == (float(ref.config.floor_scale), ref.config.attn_scale)
                   for s in specs if not s.use_rope)  # fmt: skip
        assert "chunked" in {s.attention for s in specs} and m.qk_norm == "l2"


def test_the_features_are_live(imported):
    """Turning off the muP scale or the expert bias (AFMoE), or the query temperature (Llama 4),
    moves transformers' logits in these cases: the parity above covers each of them."""
    case, ref, _, _ = imported
    tokens_BS = np.random.default_rng(1).integers(0, 61, (1, SEQ))
    base = logits_of(ref, tokens_BS)
    switches = []  # (object, attribute, value while off)
    if case.startswith("afmoe"):
        switches += [(ref.config, "mup_enabled", False)] if ref.config.mup_enabled else []
        switches += [(layer.mlp, "expert_bias", torch.nn.Parameter(torch.zeros(5), requires_grad=False))
                     for layer in ref.model.layers[ref.config.num_dense_layers :]]  # fmt: skip
    else:
        switches += [(layer.self_attn, "attn_temperature_tuning", False) for layer in ref.model.layers]
    for group in ([s for s in switches if s[1] != "expert_bias"], [s for s in switches if s[1] == "expert_bias"]):
        if not group:
            continue
        saved = [getattr(obj, attr) for obj, attr, _ in group]
        for obj, attr, off in group:
            setattr(obj, attr, off)
        try:
            assert np.abs(logits_of(ref, tokens_BS) - base).max() > 1e-3, [attr for _, attr, _ in group]
        finally:
            for (obj, attr, _), value in zip(group, saved):
                setattr(obj, attr, value)


def _resolved(path) -> dict:
    """config.json after transformers' own derivations (layer_types, no_rope_layers, moe_layers ...)."""
    return transformers.AutoConfig.from_pretrained(path).to_dict()


def test_round_trip_reproduces_every_tensor_and_field(imported, tmp_path):
    _, ref, path, _ = imported
    out = tmp_path / "back"
    assert_export_reproduces_every_tensor(imported, out)  # dtypes too: AFMoE's expert bias stays fp32
    # every field nopejax reads (a row that is not `harmless`) comes back with its value
    fam = hf.FAMILIES[ref.config.model_type]
    want, got = _resolved(path), _resolved(out)
    read = [name for name, field in fam.fields.items() if field.read is not hf.harmless]
    for name in [*read, "layer_types", "no_rope_layers", "moe_layers", "sliding_window", "attention_chunk_size"]:
        if name in want:
            assert got[name] == want[name], name
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager",
                                                              attn_implementation="eager").eval()  # fmt: skip
    assert type(again) is type(ref)
    tokens_BS = np.arange(SEQ).reshape(1, SEQ) % 61
    np.testing.assert_allclose(logits_of(again, tokens_BS), logits_of(ref, tokens_BS), atol=1e-6, rtol=0)


ONE_PER_FAMILY = ("afmoe-dense2-mup-untied", "llama4-step2-top1")


@pytest.mark.parametrize("imported", ONE_PER_FAMILY, indirect=True)
def test_cli_import_then_export(imported, tmp_path):
    """`nopejax import-hf` then `nopejax export` reproduce the checkpoint (the CLI path of both families)."""
    _case, _ref, path, _ = imported
    work, out = tmp_path / "work", tmp_path / "out"
    assert cli.main(["import-hf", str(path), "--workdir", str(work)]) in (0, None)
    assert cli.main(["export", "--workdir", str(work), "--out", str(out)]) in (0, None)
    a, b = tensorfile.Reader(str(path)), tensorfile.Reader(str(out))
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)


@pytest.mark.parametrize("imported", ONE_PER_FAMILY, indirect=True)
@pytest.mark.parametrize("dispatch", [d for d in config.MOE_DISPATCHERS if d != "allgather"])
def test_export_of_a_model_trained_with_another_dispatcher(imported, tmp_path, dispatch):
    """model.moe_dispatch says how tokens travel between devices, not what the model computes: a
    model configured with another dispatcher exports, the same config.json and tensors as with the
    default (whose export reproduces the HF original: test_round_trip_reproduces_every_tensor_and_field)."""
    _case, _ref, _path, ours = imported
    params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
    m = ours.cfg.as_configdict()  # the imported model's config is frozen
    m.moe_dispatch = dispatch
    hf.to_hf(params, str(tmp_path / "other"), m)
    hf.to_hf(params, str(tmp_path / "default"), ours.cfg)
    assert ours.cfg.moe_dispatch == "allgather"
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("default", "other")]
    assert configs[0] == configs[1]
    a, b = tensorfile.Reader(str(tmp_path / "default")), tensorfile.Reader(str(tmp_path / "other"))
    assert a.names() == b.names()
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)


# ---------------------------------------------------------------------------------------------
# config.json rows and refusals


@pytest.mark.parametrize(
    "model_type,field,value",
    [
        ("afmoe", "num_shared_experts", 0),  # nopejax maps at least one shared expert
        ("afmoe", "head_dim", None),  # AfmoeAttention reads it as is
        ("afmoe", "sliding_window", None),
        ("afmoe", "hidden_act", "gelu"),
        ("afmoe", "mlp_bias", True),  # no such field in AFMoE: no row
        ("llama4_text", "moe_layers", [0, 2, 3]),  # not every k-th layer
        ("llama4_text", "layer_types", ["sliding_attention"] * 5),
        ("llama4_text", "floor_scale", 0),
        ("llama4", "model_type", "llama4"),  # the multimodal checkpoint: its text model only
    ],
)
def test_what_nopejax_cannot_compute_is_refused(model_type, field, value):
    base = "llama4_text" if model_type == "llama4" else model_type
    cfg = json.loads(CLASSES[base](**{**(AFMOE if base == "afmoe" else LLAMA4), **{
        k: v for k, v in COMMON.items() if "implementation" not in k}}).to_json_string())  # fmt: skip
    cfg[field] = value
    if field == "sliding_window":
        cfg["layer_types"] = None
    with pytest.raises(hf.HFConfigError) as err:
        hf.model_config_from_hf(cfg)
    assert err.value.field.split(".")[0] == field and "Fix:" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Export: the mirror rule


def _moe_model(family: str, **overrides):
    cfg = config.base_config()
    m = cfg.model
    m.update(vocab_size=61, d_model=40, num_layers=4, num_heads=3, num_kv_heads=1, head_dim=14, d_ff=37,
             num_experts=5, experts_per_token=2, expert_d_ff=11, num_shared_experts=1, router="sigmoid",
             hf_family=family, no_rope_layer_interval=4, global_attention_interval=4)  # fmt: skip
    if family == "afmoe":
        m.update(block="sandwich", qk_norm="rms", attention_gate=True, router_normalize=True, sliding_window=4,
                 num_dense_layers=1)  # fmt: skip
    else:
        m.update(rope_layout="interleaved", qk_norm="l2", router_scale_input=True, attention_chunk_size=4,
                 nope_temperature=(3.0, 0.5))  # fmt: skip
    m.update(overrides)
    return validation.validate(cfg).model


@pytest.mark.parametrize(
    "family,overrides,field",
    [
        ("afmoe", dict(attention_gate=False), "attention_gate"),
        ("afmoe", dict(embed_scale=3.0), "embed_scale"),  # neither 1 nor sqrt(40)
        ("afmoe", dict(router_normalize=False), "router_normalize"),
        ("afmoe", dict(capacity_factor=1.25), "capacity_factor"),
        ("afmoe", dict(block="pre_norm"), "block"),
        ("llama4", dict(nope_temperature=(2.5, 0.5)), "nope_temperature"),  # HF's floor_scale is an int
        ("llama4", dict(num_shared_experts=2), "num_shared_experts"),
        ("llama4", dict(expert_bias_rate=1e-3), "expert_bias_rate"),
        ("llama4", dict(attention_gate=True), "attention_gate"),
        ("smollm3", dict(), "num_experts"),  # a dense family cannot hold experts
    ],
)
def test_export_of_an_inexpressible_model_fails_and_writes_nothing(tmp_path, family, overrides, field):
    if family == "smollm3":
        m = _moe_model("afmoe")
        m.hf_family = "smollm3"
        name = "SmolLM3"
    else:
        m = _moe_model(family, **overrides)
        name = hf.FAMILIES[family].architecture.removesuffix("ForCausalLM")
    out = tmp_path / "out"
    with pytest.raises(config.ConfigError, match=rf"`model\.{field}`.* the {name} format has no .*Fix:"):
        hf.to_hf({}, str(out), m)  # refused before a single param is asked for
    assert not out.exists()


def test_llama4_export_refuses_a_nonzero_expert_bias(tmp_path):
    """The config cannot tell (a bias trained elsewhere): the params are checked before writing."""
    m = _moe_model("llama4")
    params = {"layers": {"expert_bias": np.zeros((4, 5), np.float32)}}  # all the check reads
    params["layers"]["expert_bias"][2, 1] = 0.5
    out = tmp_path / "out"
    with pytest.raises(config.ConfigError, match=r"nonzero expert bias.*Fix:"):
        hf.to_hf(params, str(out), m)
    assert not out.exists()
